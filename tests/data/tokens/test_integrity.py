"""Damaged token sets: each fault stops `mmjax train` / `mmjax verify` with one line naming the file
(or the dataset, split, record and field) and exit status 2, and leaves what was written as it was;
bad records skipped on request are counted per dataset in metrics.jsonl and the summary."""

import hashlib
import json
import os
import re
import shutil

import ml_collections
import numpy as np
import pytest
from tensorflow_datasets.proto import tf_example_pb2

from mmjax import cli, pretokenize
from mmjax import modalities as mod
from mmjax.data.tokens import records as tokens_tfds
from mmjax.errors import UserError
from mmjax.tokenizers.modality import ModalityTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
MODS = dict(
    rgb=dict(kind="image_pixels", source="rgb", image_size=8, patch_size=4),
    tok_rgb=dict(kind="image_tokens", source="rgb", vocab_size=16, grid=(2, 2),
                 tokenizer="configs/tokenizers/shapes_rgb.py"),
)
NAME = "toks"
TRAIN = [f"--config.model.{k}={v}" for k, v in (("d_model", 32), ("num_heads", 2),
                                                ("encoder_layers", 1), ("decoder_layers", 1),
                                                ("num_input_tokens", 8), ("num_target_tokens", 8))]
TRAIN += ["--config.train.steps=2", "--config.train.warmup_steps=1", "--config.train.batch_size=8", "--config.train.eval_every=0",
          "--config.train.eval_batches=1", "--config.data.check_tokenizers=False",
          f"--config.data.name={NAME}"]


class QuarterTokenizer(ModalityTokenizer):
  """tok_rgb ids without a model: the red channel of 4 pixels, in 16 levels."""

  def __init__(self, modality):
    self.modality, self.fingerprint, self.vocab_size = modality, "quarter-v1", 16

  def check(self, sample, where):
    return np.asarray(sample["rgb"])

  def encode_values(self, values):
    return [(v[::4, ::4, 0] // 16).reshape(-1).astype(np.int32) for v in values]


class Pixels:
  def __init__(self, n, seed):
    self.images = np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {"id": f"img{i}", "rgb": self.images[i]}


@pytest.fixture(scope="module")
def token_set(tmp_path_factory):
  """<dir>/mmjax_tokens/toks: 16 train records in 2 shards, 8 validation records in 1."""
  root = str(tmp_path_factory.mktemp("tokens"))
  config = ml_collections.ConfigDict()
  config.data = ml_collections.ConfigDict(dict(name=NAME))
  config.modalities = ml_collections.ConfigDict(MODS, sort_keys=False)
  config.tokens = ml_collections.ConfigDict(dict(shard_size=8, batch_size=8))
  registry = mod.from_config(config.modalities)
  pretokenize.run_prepare_tokens(
      config, root, progress=False, sources={"train": Pixels(16, 0), "validation": Pixels(8, 1)},
      tokenizers={"tok_rgb": QuarterTokenizer(registry["tok_rgb"])})
  return root


def _copy(token_set, tmp_path):
  shutil.copytree(os.path.join(token_set, tokens_tfds.NAME),
                  os.path.join(tmp_path, "data", tokens_tfds.NAME))
  data_dir = str(tmp_path / "data")
  return data_dir, tokens_tfds.dataset_dir(data_dir, NAME)


def _snapshot(directory):
  """{relative path: sha256} of every file under `directory`."""
  out = {}
  for dirpath, _, files in os.walk(directory):
    for f in files:
      path = os.path.join(dirpath, f)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, directory)] = hashlib.sha256(fh.read()).hexdigest()
  return out


_CONFIG = """
import importlib.util
import ml_collections

def get_config(arg=None):
  spec = importlib.util.spec_from_file_location("fourm_shapes", {path!r})
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.modalities = ml_collections.ConfigDict({mods!r}, sort_keys=False)
  return config
"""


def _train(capsys, data_dir, workdir, *overrides):
  config = os.path.join(os.path.dirname(workdir), "fourm_pixels.py")
  with open(config, "w") as f:
    f.write(_CONFIG.format(path=os.path.join(ROOT, "configs/fourm/shapes.py"), mods=MODS))
  code = cli.main(["train", "--config", config, "--workdir", workdir,
                   f"--config.data.data_dir={data_dir}", *TRAIN, *overrides])
  out, err = capsys.readouterr()
  return code, out, err


def _error_line(err):
  lines = [line for line in err.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("mmjax: error: ")]
  assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
  return errors[0]


def test_metadata_records_every_shard_and_verify_passes(token_set, capsys):
  ds_dir = tokens_tfds.dataset_dir(token_set, NAME)
  meta = tokens_tfds.read_metadata(ds_dir)
  entries = meta["shards"]["train"] + meta["shards"]["validation"]
  assert [e["records"] for e in entries] == [8, 8, 8]
  for e in entries:
    path = os.path.join(ds_dir, e["file"])
    assert e["bytes"] == os.path.getsize(path) and e["sha256"] == tokens_tfds.file_sha256(path)
  assert cli.main(["verify", token_set]) == 0
  out, err = capsys.readouterr()
  assert json.loads(out)["verified"] == {ds_dir: 3}
  assert f"{ds_dir}: 3 shards, sizes and sha256 as recorded" in err


def test_truncated_shard_stops_training_before_the_first_step(token_set, tmp_path, capsys):
  data_dir, ds_dir = _copy(token_set, tmp_path)
  shard = os.path.join(ds_dir, tokens_tfds.shard_filename("train", 1, 2))
  size = os.path.getsize(shard)
  with open(shard, "r+b") as f:
    f.truncate(size - 100)
  before = _snapshot(data_dir)
  workdir = str(tmp_path / "run")
  code, _, err = _train(capsys, data_dir, workdir)
  assert code == 2
  assert _error_line(err) == (
      f"mmjax: error: token shard {shard} is {size - 100} bytes, its metadata records {size} "
      f"(truncated or overwritten); restore the file, or rebuild the token set with `mmjax "
      f"prepare tokens --overwrite` (`mmjax verify {ds_dir}` checks every shard)")
  assert _snapshot(data_dir) == before  # nothing moved, rewritten or removed
  assert not os.path.exists(os.path.join(workdir, "checkpoints", "1"))
  assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))  # no step was taken


def test_damaged_shard_named_by_verify_and_by_training(token_set, tmp_path, capsys):
  data_dir, ds_dir = _copy(token_set, tmp_path)
  shard = os.path.join(ds_dir, tokens_tfds.shard_filename("train", 0, 2))
  with open(shard, "r+b") as f:  # same size, garbage in the middle of the records
    f.seek(200)
    f.write(b"\xff" * 64)
  before = _snapshot(data_dir)
  assert cli.main(["verify", data_dir]) == 2
  _, err = capsys.readouterr()
  assert _error_line(err) == (
      f"mmjax: error: token shard {shard} has another sha256 than its metadata records (damaged); "
      f"restore the file, or rebuild the token set with `mmjax prepare tokens --overwrite` "
      f"(`mmjax verify {ds_dir}` checks every shard)")
  code, _, err = _train(capsys, data_dir, str(tmp_path / "run"))
  assert code == 2
  line = _error_line(err)
  assert line.startswith(f"mmjax: error: token shard {shard} cannot be read at record ")
  assert line.endswith("the file is damaged; restore it or rebuild the token set (`mmjax verify` "
                       "checks every shard)")
  assert _snapshot(data_dir) == before  # (sizes alone cannot see this damage before the first
  # step: the run stops at the batch that reads it; `mmjax verify` finds it up front)


def _drop_field(ds_dir, shard_index, record_index, field):
  """Rewrites one shard with `field` removed from one record; the metadata records the new file
  (as a job that wrote such records would have): only the record itself is bad."""
  filename = tokens_tfds.shard_filename("train", shard_index, 2)
  path = os.path.join(ds_dir, filename)
  from array_record.python import array_record_module
  reader = array_record_module.ArrayRecordReader(path)
  records = list(reader.read_all())
  reader.close()
  example = tf_example_pb2.Example.FromString(records[record_index])
  del example.features.feature[field]
  records[record_index] = example.SerializeToString()
  tokens_tfds.write_shard(path, records)
  meta_path = os.path.join(ds_dir, "metadata.json")
  meta = tokens_tfds.read_json(meta_path)
  meta["shards"]["train"][shard_index] = tokens_tfds.shard_entry(ds_dir, filename, len(records))
  tokens_tfds.write_json(meta_path, meta)
  return path


def test_record_parser_names_a_missing_field_never_an_index_error(token_set):
  ds_dir = tokens_tfds.dataset_dir(token_set, NAME)
  parse = tokens_tfds.RecordParser(tokens_tfds.read_metadata(ds_dir)["modalities"])
  data = tokens_tfds.load_token_bytes(token_set, NAME, "train")[2]
  for field in ("present", "tok_rgb", "index"):
    example = tf_example_pb2.Example.FromString(data)
    del example.features.feature[field]
    with pytest.raises(tokens_tfds.RecordError, match=f"^field '{field}': missing$"):
      parse(example.SerializeToString())
  with pytest.raises(UserError, match="not a serialized record"):
    parse(b"\x07garbage")


@pytest.mark.slow  # three runs, one of them trains (~25 s idle, 75 s under load)
def test_record_missing_a_field_is_a_named_error_or_a_counted_skip(token_set, tmp_path, capsys):
  data_dir, ds_dir = _copy(token_set, tmp_path)
  shard = _drop_field(ds_dir, 0, 3, "tok_rgb")
  before = _snapshot(data_dir)
  code, _, err = _train(capsys, data_dir, str(tmp_path / "error"))
  assert code == 2
  assert _error_line(err) == (f"mmjax: error: bad record '{NAME}' split train record 3 ({shard}): "
                              f"field 'tok_rgb': missing")
  # Skipped: 1 of 16 records is more than the default bound of 5%.
  code, _, err = _train(capsys, data_dir, str(tmp_path / "bound"), "--config.data.bad_records=skip")
  assert code == 2
  assert re.fullmatch(
      f"mmjax: error: data: 1 of the (8|16) records read from dataset '{NAME}' were bad and "
      r"skipped, more than data.max_bad_fraction=0.05; fix or rebuild the data \(`mmjax verify` "
      r"checks its shards\), or raise data.max_bad_fraction", _error_line(err))
  # Within the bound: trained, and the skip is in metrics.jsonl, the progress line, the summary.
  workdir = str(tmp_path / "skip")
  code, out, err = _train(capsys, data_dir, workdir, "--config.data.bad_records=skip",
                          "--config.data.max_bad_fraction=0.2", "--config.train.log_every=1")
  assert code == 0, err[-2000:]
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary["step"] == 2
  assert summary["bad_records"] == {"total": 1, "by_dataset": {NAME: 1}}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  assert [r["data/bad_records/" + NAME] for r in rows if "loss" in r] == [1.0, 1.0]
  assert "bad_records=1" in err and f"mmjax: skipped bad records: {NAME} 1" in err
  assert _snapshot(data_dir) == before


def test_verify_of_a_directory_without_token_sets_is_one_line(tmp_path, capsys):
  assert cli.main(["verify", str(tmp_path)]) == 2
  _, err = capsys.readouterr()
  assert _error_line(err) == (f"mmjax: error: {tmp_path} holds no finished token set (a directory "
                              f"with dataset_info.json, or mmjax_tokens/<name>/<version>/ under it)")
