"""The Grain pipeline: determinism, per-host shards, exact resume, mixtures, files, bad records."""

import io
import os

import ml_collections
import numpy as np
import pytest

from mmjax import modalities
from mmjax.data.fourm.transform import BadRecord
from mmjax.data.pipeline import demo_tokens
from mmjax.data.pipeline import fourm as fourm_pipeline
from mmjax.data.pipeline import stream as record_stream
from mmjax.data.pipeline import token_sets
from mmjax.data.pipeline.bench import synthetic_records

MODS = dict(
    tok_rgb=dict(kind="image_tokens", source="rgb", vocab_size=64, grid=(4, 4)),
    tok_depth=dict(kind="image_tokens", source="depth", vocab_size=64, grid=(4, 4)),
    caption=dict(kind="sequence", vocab_size=300, max_length=12),
)


def _config(**data):
  config = ml_collections.ConfigDict()
  config.modalities = ml_collections.ConfigDict(MODS, sort_keys=False)
  config.masking = dict(mixture="4m7", input_alpha=0.5, keep_scheme="random", num_sentinels=100)
  config.model = dict(num_input_tokens=16, num_target_tokens=16)
  config.train = dict(batch_size=8)
  config.data = dict(dict(shuffle_seed=3, num_workers=0, bad_records="error", missing=""), **data)
  return config


@pytest.fixture(scope="module")
def records():
  return synthetic_records(modalities.from_config(MODS), 40, seed=0)


def _iterator(config, records, **kw):
  kw.setdefault("process_index", 0)
  kw.setdefault("process_count", 1)
  return fourm_pipeline.make_iterator(config, [record_stream.DatasetSpec("syn", records)], **kw)


def _equal(a, b):
  return all(np.array_equal(a[k], b[k]) for k in a)


def test_same_seed_same_batches_other_seed_other(records):
  a = _iterator(_config(), records)
  b = _iterator(_config(), records)
  c = _iterator(_config(shuffle_seed=4), records)
  for _ in range(7):  # past the first epoch (40 records = 5 batches)
    x, y, z = next(a), next(b), next(c)
    assert _equal(x, y) and not _equal(x, z)


def test_hosts_see_disjoint_complete_data(records):
  spec = [record_stream.DatasetSpec("syn", records)]
  seen = []
  for host in range(3):
    stream = record_stream.record_dataset(spec, seed=1, process_index=host, process_count=3,
                                          num_epochs=1)
    seen.append([index for _, index, _ in stream])
  flat = sum(seen, [])
  assert len(flat) == len(set(flat)) == 40 and set(flat) == set(range(40))
  # The next epoch is a different permutation of all the records.
  two = record_stream.record_dataset(spec, seed=1, num_epochs=2)
  epochs = [index for _, index, _ in two]
  assert sorted(epochs[40:]) == list(range(40)) and epochs[40:] != epochs[:40]


def _ids_transform(records, rng, **kwargs):
  """A stand-in for the 4M transform: the batch is the records' ids."""
  del rng, kwargs
  return [int(r["id"]) for r in records], np.zeros(len(records), bool)


def test_batches_of_all_hosts_cover_a_dataset_mixture_once_per_epoch(records):
  texts = [{"id": 1000 + i} for i in range(10)]
  specs = [record_stream.DatasetSpec("a", records[:30], weight=3.0),
           record_stream.DatasetSpec("b", texts, weight=1.0)]
  seen = []
  for host in range(2):
    ds = fourm_pipeline.build_dataset(specs, _ids_transform, batch_size=5, seed=2,
                                      process_index=host, process_count=2, num_epochs=1)
    assert len(ds) == 4  # 40 records (30 + 10 at 3:1) over 2 hosts in batches of 5
    seen.append([i for k in range(len(ds)) for i in ds[k][0]])
  flat = seen[0] + seen[1]
  assert sorted(flat) == list(range(30)) + list(range(1000, 1010))
  # Every run of 4 stream positions holds 3 records of "a" and 1 of "b".
  stream = record_stream.record_dataset(specs, seed=2, num_epochs=1)
  owners = np.array([stream[i][0] for i in range(len(stream))]).reshape(-1, 4)
  assert (owners.sum(1) == 1).all()


def test_batches_read_the_record_stream_in_bulk(records):
  class Source(list):
    calls = 0

    def __getitems__(self, keys):
      Source.calls += 1
      return [self[i] for i in keys]

  spec = [record_stream.DatasetSpec("syn", Source(records))]
  ds = fourm_pipeline.build_dataset(spec, _ids_transform, batch_size=8, seed=5, process_index=1,
                                    process_count=2)
  stream = record_stream.record_dataset(spec, seed=5, process_index=1, process_count=2)
  for k in (0, 3, 7):  # 7 crosses into the second epoch (20 records per host)
    want = [int(stream[i][2]["id"]) for i in range(8 * k, 8 * k + 8)]
    Source.calls = 0
    assert ds[k][0] == want
    assert Source.calls == 1  # one batched read per dataset


def test_mixture_proportions():
  np.testing.assert_array_equal(record_stream._proportions([0.6, 0.2, 0.2]), [3, 1, 1])
  np.testing.assert_array_equal(record_stream._proportions([2.0]), [1])
  stream = record_stream.IndexStream([5, 5, 5], [0.5, 0.25, 0.25], seed=0)
  dataset, _ = stream(np.arange(400))
  np.testing.assert_array_equal(np.bincount(dataset), [200, 100, 100])


def test_hosts_mask_differently_and_split_the_batch(records):
  config = _config()
  it0 = _iterator(config, records, process_index=0, process_count=2)
  it1 = _iterator(config, records, process_index=1, process_count=2)
  h0, h1 = [next(it0) for _ in range(3)], [next(it1) for _ in range(3)]
  assert h0[0]["enc_tokens"].shape[0] == 4  # train.batch_size 8 over 2 hosts
  # Over 12 samples each (an rgb->all sample of a full grid has positions 0..15 on any host).
  positions = [np.concatenate([b[f"{s}_positions"] for b in h for s in ("enc", "dec")])
               for h in (h0, h1)]
  assert not np.array_equal(*positions)


@pytest.mark.parametrize("steps_before", [2, 6])
def test_exact_resume_mid_epoch(records, steps_before):
  config = _config()
  it = _iterator(config, records)
  for _ in range(steps_before):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  fresh = _iterator(config, records)
  fresh.set_state(state)
  for want in expected:
    assert _equal(want, next(fresh))


def test_dataset_mixture_weights_and_missing_modality(records):
  config = _config()
  texts = [{"caption": r["caption"], "id": r["id"]} for r in records]  # a text-only dataset
  specs = [record_stream.DatasetSpec("images", records, weight=3.0),
           record_stream.DatasetSpec("text", texts, weight=1.0, missing=("tok_rgb", "tok_depth"))]
  stream = record_stream.record_dataset(specs, seed=0)
  ids = [stream[i][0] for i in range(400)]
  assert abs(np.mean(np.array(ids) == 0) - 0.75) < 0.03
  it = fourm_pipeline.make_iterator(config, specs, process_index=0, process_count=1)
  batches = [next(it) for _ in range(10)]
  assert it.bad_records == 0
  # Row b of batch k is position 8k + b of the record stream (seeded by data.shuffle_seed).
  row_ids = np.array([record_stream.record_dataset(specs, seed=3)[i][0] for i in range(80)])
  text_rows = row_ids == 1
  assert text_rows.mean() == 0.25  # 3 : 1, interleaved exactly in every period of 4
  registry = modalities.from_config(MODS)
  images = [registry.index("tok_rgb"), registry.index("tok_depth")]
  caption = registry.index("caption")
  for side in ("enc", "dec"):
    valid = np.concatenate([b[f"{side}_valid"] for b in batches])
    mods = np.concatenate([b[f"{side}_modality"] for b in batches])
    image_slot = valid & np.isin(mods, images)
    assert not image_slot[text_rows].any()  # the missing image modalities are empty
    assert image_slot[~text_rows].any(1).mean() > 0.9
  # Text rows are masked text: every one has caption targets; inputs only outside rgb->all (half
  # of 4M-7, whose sole input modality the text dataset lacks).
  dec = np.concatenate([b["dec_valid"] & (b["dec_modality"] == caption) for b in batches])
  enc = np.concatenate([b["enc_valid"] & (b["enc_modality"] == caption) for b in batches])
  assert dec[text_rows].any(1).all() and 0.2 < enc[text_rows].any(1).mean() < 0.8


def test_bad_records_error_and_counted_skip(records):
  broken = list(records)
  broken[7] = dict(broken[7], tok_depth=np.zeros(5, np.int32))
  with pytest.raises(BadRecord, match=r"'syn' index 7: field 'tok_depth': has 5 tokens"):
    it = _iterator(_config(), broken, num_epochs=1)
    for _ in range(5):
      next(it)
  it = _iterator(_config(bad_records="skip"), broken, num_epochs=1)
  for _ in range(5):
    next(it)
  assert it.bad_records == 1
  state = it.get_state()
  assert state["bad_records"] == 1


def test_array_record_file_gives_the_same_batches(records, tmp_path):
  from array_record.python import array_record_module
  import grain

  def encode(record):
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in record.items()})
    return buffer.getvalue()

  def decode(data):
    with np.load(io.BytesIO(data)) as npz:
      return {k: npz[k] for k in npz.files}

  path = str(tmp_path / "records.array_record")
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for record in records:
    writer.write(encode(record))
  writer.close()
  source = grain.sources.ArrayRecordDataSource([path])
  config = _config()
  from_file = fourm_pipeline.make_iterator(
      config, [record_stream.DatasetSpec("syn", source, decode=decode)], process_index=0,
      process_count=1)
  in_memory = _iterator(config, records)
  for _ in range(3):
    assert _equal(next(from_file), next(in_memory))


def test_worker_processes_give_the_same_batches_and_resume(records):
  config = _config()
  plain = _iterator(config, records)
  want = [next(plain) for _ in range(5)]
  workers = _iterator(config, records, num_workers=2)
  try:
    got = [next(workers) for _ in range(3)]
    state = workers.get_state()
  finally:
    workers.close()
  assert all(_equal(w, g) for w, g in zip(want, got))
  resumed = _iterator(config, records, num_workers=2)
  try:
    resumed.set_state(state)
    assert _equal(want[3], next(resumed)) and _equal(want[4], next(resumed))
  finally:
    resumed.close()


def test_empty_data_dir_reads_the_demo_tokens_or_says_how_to_make_them(tmp_path, monkeypatch):
  from mmjax.config import ConfigError
  from mmjax.data.tokens import records as tokens_tfds

  demo_dir = tmp_path / "elsewhere" / "tokens"
  monkeypatch.setenv(demo_tokens.ENV, str(demo_dir))
  config = ml_collections.ConfigDict(dict(data=dict(data_dir="", name="shapes", mixture=())))
  demo_tokens.use_demo_tokens_if_unset(config)  # no demo tokens: nothing changes
  with pytest.raises(ConfigError, match=r"data\.data_dir' is empty.*elsewhere/tokens/.*"
                                        r"launch/local\.sh"):
    token_sets.mixture_from_config(config.data)
  os.makedirs(tokens_tfds.dataset_dir(demo_dir, "shapes"))
  demo_tokens.use_demo_tokens_if_unset(config)
  (token_set,) = token_sets.mixture_from_config(config.data)
  assert token_set.data_dir == str(demo_dir) and token_set.name == "shapes"


def test_the_demo_fallback_never_reads_the_working_directory(tmp_path, monkeypatch, capsys):
  """A decoy runs/demo/tokens in the cwd is ignored: the fallback is the explicit location (the
  environment variable) or the checkout's runs/demo/tokens, which `bash launch/local.sh` writes."""
  from mmjax.data.tokens import records as tokens_tfds

  cwd, checkout = tmp_path / "cwd", tmp_path / "checkout"
  os.makedirs(tokens_tfds.dataset_dir(str(cwd / "runs" / "demo" / "tokens"), "shapes"))
  monkeypatch.chdir(cwd)

  def resolved():
    config = ml_collections.ConfigDict(dict(data=dict(data_dir="", name="shapes", mixture=())))
    demo_tokens.use_demo_tokens_if_unset(config)
    return config.data.data_dir

  monkeypatch.setenv(demo_tokens.ENV, str(tmp_path / "absent"))
  assert resolved() == ""
  monkeypatch.delenv(demo_tokens.ENV)
  monkeypatch.setattr(demo_tokens, "CHECKOUT", checkout)
  assert demo_tokens.location() is None and resolved() == ""  # no checkout: no fallback
  os.makedirs(checkout / "launch")
  (checkout / "launch" / "local.sh").write_text("")
  assert resolved() == ""  # a checkout without demo tokens
  os.makedirs(tokens_tfds.dataset_dir(str(checkout / "runs" / "demo" / "tokens"), "shapes"))
  assert resolved() == str(checkout / "runs" / "demo" / "tokens")
  assert capsys.readouterr().out.count("data.data_dir is empty") == 1
