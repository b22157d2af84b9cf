"""Pre-tokenization: round trips through the shards, idempotence and resumption, tokenizer versions,
and every bad-input path. Tokenizers are tiny: a SentencePiece model trained on 300 scene captions
and randomly initialised (untrained, but real and deterministic) image tokenizers."""

import os

import jax
import ml_collections
import numpy as np
import pytest

from mmjax import config as mmconfig
from mmjax import modalities as mod
from mmjax import pretokenize
from mmjax.data.pipeline import fourm as fourm_pipeline
from mmjax.data.pipeline import stream
from mmjax.data.shapes import records as shapes_tfds
from mmjax.data.shapes import world as shapes
from mmjax.data.tokens import records as tokens_tfds
from mmjax.errors import UserError
from mmjax.objectives import text_tokenizer
from mmjax.tokenizers import image, text
from mmjax.train.checkpoint import Checkpointer
from mmjax.train.loop import build
from mmjax.train.state import init_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEMSEG_CONFIG = "configs/tokenizers/shapes_semseg.py:runlocal"


@pytest.fixture(scope="module")
def tokenizers_dir(tmp_path_factory):
  """<dir>/shapes_text/text.model, and <dir>/shapes_semseg: the initial (untrained) checkpoint of
  the semseg tokenizer written by the shared trainer's Checkpointer, restored the real way."""
  root = str(tmp_path_factory.mktemp("tokenizers"))
  cfg = mmconfig.load(os.path.join(ROOT, "configs/tokenizers/shapes_text.py"))
  pairs = text_tokenizer.shapes_sentences(300, split="train", seed=0, image_size=64,
                                          coord_bins=65)
  sentences = [s for pair in pairs for s in pair]
  text.train_text_tokenizer(sentences, os.path.join(root, "shapes_text", "text"), cfg.tokenizer)
  semseg = mmconfig.load(os.path.join(ROOT, SEMSEG_CONFIG))
  objective, setup = build(semseg)
  checkpointer = Checkpointer(os.path.join(root, "shapes_semseg", "checkpoints"), keep=1)
  state = jax.device_get(init_state(semseg, setup))  # host arrays: a quick synchronous save
  checkpointer.save(0, state, objective.make_iterator("train", 0, 1))
  checkpointer.close()
  return root


def make_config(tokenizers_dir: str, **tokens) -> ml_collections.ConfigDict:
  config = mmconfig.load(os.path.join(ROOT, "configs/fourm/shapes.py:tiny"))
  config.unlock()
  config.modalities = ml_collections.ConfigDict(sort_keys=False, initial_dictionary=dict(
      rgb=dict(kind="image_pixels", source="rgb", image_size=64, patch_size=8),
      tok_rgb=dict(kind="image_tokens", source="rgb", vocab_size=64, grid=(8, 8),
                   tokenizer="configs/tokenizers/shapes_rgb.py"),
      tok_semseg=dict(kind="image_tokens", source="semseg", vocab_size=256, grid=(8, 8),
                      tokenizer=SEMSEG_CONFIG),
      caption=dict(kind="sequence", source="caption", vocab_size=1024, max_length=48,
                   tokenizer="configs/tokenizers/shapes_text.py"),
      det=dict(kind="sequence", source="det", vocab_size=1024, max_length=64,
               tokenizer="configs/tokenizers/shapes_text.py"),
  ))
  config.tokens = ml_collections.ConfigDict(dict(tokenizers_dir=tokenizers_dir, shard_size=8,
                                                 batch_size=8, **tokens))
  return config


@pytest.fixture(scope="module")
def image_tokenizers(tokenizers_dir):
  """tok_rgb: randomly initialised (untrained but real and deterministic); tok_semseg: restored
  from its checkpoint through load_modality_tokenizer."""
  registry = mod.from_config(make_config("").modalities)
  rgb = image.create_tokenizer(image.ImageTokenizerConfig(
      modality="rgb", codebook_size=64, code_dim=8, width=32, num_heads=2, encoder_layers=1,
      decoder_layers=1), seed=1)
  semseg = pretokenize.load_modality_tokenizer(
      registry["tok_semseg"], os.path.join(tokenizers_dir, "shapes_semseg"), batch_size=8)
  return {"tok_rgb": pretokenize.ImageModalityTokenizer(registry["tok_rgb"], rgb, batch_size=8),
          "tok_semseg": semseg}


def scenes(n, split="train"):
  return shapes.SceneSource(n, split=split)


class Patched:
  """A source whose sample `index` gets `changes` (a dict of fields; None deletes the field)."""

  def __init__(self, base, changes_by_index):
    self.base, self.changes = base, changes_by_index

  def __len__(self):
    return len(self.base)

  def __getitem__(self, i):
    sample = dict(self.base[i])
    for key, value in self.changes.get(i, {}).items():
      if value is None:
        sample.pop(key, None)
      else:
        sample[key] = value
    return sample


class Killed:
  """A source that dies (as a killed process would stop) when sample `at` is read."""

  def __init__(self, base, at):
    self.base, self.at = base, at

  def __len__(self):
    return len(self.base)

  def __getitem__(self, i):
    if i == self.at:
      raise RuntimeError("killed")
    return self.base[i]


def read_split(summary, split):
  data_dir = os.path.dirname(os.path.dirname(os.path.dirname(summary["path"])))
  source = tokens_tfds.load_tokens(data_dir, summary["name"], split)
  return [source[i] for i in range(len(source))]


def shard_bytes(ds_dir):
  out = {}
  for name in sorted(os.listdir(ds_dir)):
    if ".array_record-" in name:
      with open(os.path.join(ds_dir, name), "rb") as f:
        out[name] = f.read()
  return out


# ---------------------------------------------------------------------------------------------


def test_shapes_round_trip_through_tfds_shards(tmp_path, tokenizers_dir, image_tokenizers):
  workdir = str(tmp_path)
  shapes_tfds.prepare_shapes(os.path.join(workdir, "data"), num_train=12, num_val=4,
                             progress=False)
  config = make_config(tokenizers_dir)
  # tok_semseg comes from <tokenizers_dir>/shapes_semseg, restored by the job itself.
  summary = pretokenize.run_prepare_tokens(config, workdir,
                                           tokenizers={"tok_rgb": image_tokenizers["tok_rgb"]},
                                           progress=False)
  assert summary["fingerprints"]["tok_semseg"] == image_tokenizers["tok_semseg"].fingerprint
  assert summary["splits"]["train"]["records"] == 12
  assert summary["splits"]["validation"]["records"] == 4
  assert summary["shards_written"] == 2 + 1 and not summary["reused"]
  assert summary["bad_samples"]["total"] == 0 and summary["absent_modalities"] == []

  registry = mod.from_config(config.modalities)
  caption_tok = pretokenize.load_modality_tokenizer(registry["caption"],
                                                    os.path.join(tokenizers_dir, "shapes_text"))
  det_tok = pretokenize.load_modality_tokenizer(registry["det"],
                                                os.path.join(tokenizers_dir, "shapes_text"))
  records = read_split(summary, "train")
  assert [r["index"] for r in records] == list(range(12))
  raw = [shapes.generate_scene(i, split="train") for i in range(12)]
  for r, scene in zip(records, raw):
    assert r["id"] == f"train/{scene['index']}".encode()
    assert r["present"].tolist() == [1] * 5
    assert r["caption"].dtype == np.uint16 and r["tok_semseg"].dtype == np.uint8
    assert r["caption"].ndim == 1 and r["tok_rgb"].shape == (64,)
    np.testing.assert_array_equal(r["rgb"], scene["rgb"])
    assert r["gt_caption"].decode() == scene["caption"]
    np.testing.assert_array_equal(r["gt_obj_shape"], scene["obj_shape"])
    np.testing.assert_array_equal(r["gt_det_boxes"], scene["det_boxes"])
  # Text and boxes decode exactly.
  decoded = caption_tok.decode_batch([r["caption"] for r in records])
  assert [d["caption"] for d in decoded] == [s["caption"] for s in raw]
  for d, scene in zip(det_tok.decode_batch([r["det"] for r in records]), raw):
    order = np.lexsort(scene["det_boxes"].T[::-1])
    got = np.lexsort(d["det_boxes"].T[::-1])
    np.testing.assert_array_equal(d["det_boxes"][got], scene["det_boxes"][order])
    np.testing.assert_array_equal(d["det_classes"][got], scene["det_classes"][order])
  # Image tokens: within the vocabulary and exactly the tokenizer's own tokens of the image, so
  # detokenize(stored tokens) == detokenize(tokenize(image)).
  for name, field in (("tok_rgb", "rgb"), ("tok_semseg", "semseg")):
    tok = image_tokenizers[name].tokenizer
    stored = np.stack([r[name] for r in records]).astype(np.int32)
    assert stored.max() < registry[name].vocab_size and stored.min() >= 0
    fresh = np.asarray(tok.tokenize(np.stack([s[field] for s in raw])))
    np.testing.assert_array_equal(stored, fresh)
    np.testing.assert_array_equal(np.asarray(tok.detokenize(stored)),
                                  np.asarray(tok.detokenize(fresh)))
  # The training pipeline reads the shards.
  meta = tokens_tfds.read_metadata(summary["path"])
  text_model = os.path.join(tokenizers_dir, "shapes_text", "text.model")
  sentinels = text.TextTokenizer.load(text_model).special.num_sentinels
  assert meta["num_sentinels"] == {"caption": sentinels, "det": sentinels}
  source = tokens_tfds.load_tokens(tmp_path, "shapes", "train")
  it = fourm_pipeline.make_iterator(
      config, [stream.DatasetSpec("shapes", source,
                                  decode=tokens_tfds.RecordDecoder(meta["modalities"]))],
      batch_size=4, process_index=0, process_count=1)
  batch = next(it)
  assert batch["enc_tokens"].shape[0] == 4 and it.bad_records == 0
  # data.max_objects keeps fewer scenes; each record keeps its scene's index (evaluation
  # regenerates the scene from it).
  with config.unlocked():
    config.data.data_dir = os.path.join(workdir, "data")
    config.data.max_objects = 2
  few = pretokenize.run_prepare_tokens(config, str(tmp_path / "few"),
                                       tokenizers={"tok_rgb": image_tokenizers["tok_rgb"]},
                                       progress=False)
  kept = [s for s in raw if s["num_objects"] <= 2]
  assert 0 < len(kept) < 12
  assert [(int(r["index"]), r["gt_caption"].decode()) for r in read_split(few, "train")] == [
      (int(s["index"]), s["caption"]) for s in kept]


def test_rerun_skips_and_killed_run_resumes_to_the_same_shards(tmp_path, tokenizers_dir,
                                                               image_tokenizers):
  config = make_config(tokenizers_dir)
  clean_dir, killed_dir = str(tmp_path / "clean"), str(tmp_path / "killed")
  sources = {"train": scenes(20), "validation": scenes(5, "validation")}
  first = pretokenize.run_prepare_tokens(config, clean_dir, sources=sources,
                                         tokenizers=image_tokenizers, progress=False)
  assert first["shards_written"] == 3 + 1
  before = shard_bytes(first["path"])
  again = pretokenize.run_prepare_tokens(config, clean_dir, sources=sources,
                                         tokenizers=image_tokenizers, progress=False)
  assert again["reused"] and again["shards_written"] == 0 and again["shards_skipped"] == 4
  assert shard_bytes(first["path"]) == before

  with pytest.raises(RuntimeError, match="killed"):
    pretokenize.run_prepare_tokens(config, killed_dir,
                                   sources={"train": Killed(scenes(20), at=13),
                                            "validation": scenes(5, "validation")},
                                   tokenizers=image_tokenizers, progress=False)
  ds_dir = tokens_tfds.dataset_dir(killed_dir, "shapes")
  assert list(shard_bytes(ds_dir)) == [tokens_tfds.shard_filename("train", 0, 3)]
  with pytest.raises(UserError, match="no finished pre-tokenized dataset"):
    tokens_tfds.read_metadata(ds_dir)
  resumed = pretokenize.run_prepare_tokens(config, killed_dir, sources=sources,
                                           tokenizers=image_tokenizers, progress=False)
  assert resumed["shards_skipped"] == 1 and resumed["shards_written"] == 3
  assert shard_bytes(ds_dir) == before
  for a, b in zip(read_split(resumed, "train"), read_split(first, "train"), strict=True):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  assert tokens_tfds.read_metadata(ds_dir)["splits"] == tokens_tfds.read_metadata(
      first["path"])["splits"]

  # Another job in the same place is refused, not mixed in; overwrite starts afresh.
  changed = make_config(tokenizers_dir)
  changed.tokens.shard_size = 16
  with pytest.raises(UserError, match="different job.*shard_size"):
    pretokenize.run_prepare_tokens(changed, killed_dir, sources=sources,
                                   tokenizers=image_tokenizers, progress=False)
  redone = pretokenize.run_prepare_tokens(changed, killed_dir, sources=sources, overwrite=True,
                                          tokenizers=image_tokenizers, progress=False)
  assert redone["shards_written"] == 2 + 1


def test_fingerprints_in_metadata_and_mismatch_error(tmp_path, tokenizers_dir, image_tokenizers):
  config = make_config(tokenizers_dir)
  summary = pretokenize.run_prepare_tokens(config, str(tmp_path), sources={"train": scenes(3)},
                                           tokenizers=image_tokenizers, progress=False)
  meta = tokens_tfds.read_metadata(summary["path"])
  text_model = text.TextTokenizer.load(os.path.join(tokenizers_dir, "shapes_text", "text.model"))
  assert meta["fingerprints"]["caption"] == text_model.fingerprint
  assert meta["fingerprints"]["det"] != text_model.fingerprint  # bins and classes are in it
  assert meta["fingerprints"]["tok_rgb"] == pretokenize.image_fingerprint(
      image_tokenizers["tok_rgb"].tokenizer)
  assert [m["dtype"] for m in meta["modalities"]] == ["uint8", "uint8", "uint8", "uint16",
                                                      "uint16"]
  pretokenize.check_tokenizer_versions(summary["path"], meta["fingerprints"])
  with pytest.raises(UserError, match="tok_rgb: tokens made by tokenizer .* the config's is"):
    pretokenize.check_tokenizer_versions(summary["path"], {**meta["fingerprints"],
                                                           "tok_rgb": "0" * 64})
  with pytest.raises(UserError, match="tok_depth: not in the dataset"):
    pretokenize.check_tokenizer_versions(summary["path"], {"tok_depth": "x"})
  # A different (re-initialised) image tokenizer has another fingerprint.
  other = image.create_tokenizer(image_tokenizers["tok_rgb"].tokenizer.cfg, seed=7)
  assert pretokenize.image_fingerprint(other) != meta["fingerprints"]["tok_rgb"]


def test_modality_tokenizer_interface(tokenizers_dir, image_tokenizers):
  registry = mod.from_config(make_config("").modalities)
  tdir = os.path.join(tokenizers_dir, "shapes_text")
  samples = [shapes.generate_scene(i, split="validation") for i in range(3)]
  caption = pretokenize.load_modality_tokenizer(registry["caption"], tdir)
  ids = caption.encode_batch(samples)
  assert [d["caption"] for d in caption.decode_batch(ids)] == [s["caption"] for s in samples]
  det = pretokenize.load_modality_tokenizer(registry["det"], tdir)
  texts = det.tokenizer.decode_batch(det.encode_batch(samples))
  assert texts[0].startswith("v0=") and texts[0].split()[4] in shapes.SHAPES
  rgb = image_tokenizers["tok_rgb"]
  ids = rgb.encode_batch(samples)
  assert len(ids) == 3 and ids[0].shape == (64,)
  assert rgb.decode_batch(ids)[0]["rgb"].shape == (64, 64, 3)
  with pytest.raises(UserError, match="bad sample #1: field 'rgb': image is 32x32"):
    rgb.encode_batch([samples[0], {"rgb": np.zeros((32, 32, 3), np.uint8)}])
  with pytest.raises(UserError, match="tok_rgb"):
    pretokenize.load_modality_tokenizer(registry["tok_rgb"], os.path.join(tokenizers_dir, "nope"))
  with pytest.raises(UserError, match="does not exist"):
    pretokenize.load_modality_tokenizer(registry["caption"], os.path.join(tokenizers_dir, "nope"))


# ---------------------------------------------------------------------------------------------
# Bad input.

_S = 64
BAD = {
    "size": ({"rgb": np.zeros((32, 32, 3), np.uint8)}, "rgb", "image is 32x32, expected 64x64"),
    "channels": ({"rgb": np.zeros((_S, _S, 2), np.uint8)}, "rgb", "1 \\(grey\\), 3 .*or 4"),
    "float pixels": ({"rgb": np.zeros((_S, _S, 3), np.float32)}, "rgb", "must be uint8"),
    "empty caption": ({"caption": "  "}, "caption", "empty text"),
    "non-utf8 caption": ({"caption": b"caf\xe9"}, "caption", "not valid UTF-8 \\(byte 0xe9 at "
                                                               "offset 3\\)"),
    "broken box": ({"det_boxes": np.array([[0.5, 0.5, 0.2, 0.9]], np.float32),
                    "det_classes": np.array([0], np.int32)}, "det_boxes", "box 0"),
    "semseg class": ({"semseg": np.full((_S, _S), 9, np.uint8)}, "semseg", "integers in \\[0, 6\\)"),
    "missing field": ({"caption": None}, "caption", "missing"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sample_errors_name_sample_and_field(tmp_path, tokenizers_dir, image_tokenizers, case):
  change, field, what = BAD[case]
  source = Patched(scenes(4), {2: change})
  with pytest.raises(pretokenize.BadSample,
                     match=f"bad sample shapes train sample 2 \\(train/2\\): field '{field}': "
                           f".*{what}"):
    pretokenize.run_prepare_tokens(make_config(tokenizers_dir), str(tmp_path),
                                   sources={"train": source}, tokenizers=image_tokenizers,
                                   progress=False)


def test_bad_samples_skipped_and_counted(tmp_path, tokenizers_dir, image_tokenizers):
  changes = {1: BAD["size"][0], 4: BAD["non-utf8 caption"][0], 6: BAD["empty caption"][0],
             9: BAD["broken box"][0]}
  config = make_config(tokenizers_dir, bad_samples="skip")
  summary = pretokenize.run_prepare_tokens(config, str(tmp_path),
                                           sources={"train": Patched(scenes(12), changes)},
                                           tokenizers=image_tokenizers, progress=False)
  bad = summary["bad_samples"]
  assert bad["total"] == 4
  assert bad["by_field"] == {"rgb": 1, "caption": 2, "det_boxes": 1}
  assert any("sample 9" in m and "det_boxes" in m for m in bad["messages"])
  records = read_split(summary, "train")
  assert [r["index"] for r in records] == [0, 2, 3, 5, 7, 8, 10, 11]
  assert tokens_tfds.read_metadata(summary["path"])["bad_samples"]["total"] == 4


def test_ids_outside_the_vocabulary(tmp_path, tokenizers_dir, image_tokenizers):
  config = make_config(tokenizers_dir)
  config.modalities.caption.vocab_size = 400  # the tokenizer has more ids than the modality
  with pytest.raises(pretokenize.BadSample, match="sample 0 .*field 'caption': id \\d+ outside "
                                                  "the vocabulary \\[0, 400\\)"):
    pretokenize.run_prepare_tokens(config, str(tmp_path / "a"), sources={"train": scenes(2)},
                                   tokenizers=image_tokenizers, progress=False)
  config.tokens.bad_samples = "skip"
  summary = pretokenize.run_prepare_tokens(config, str(tmp_path / "b"),
                                           sources={"train": scenes(4)},
                                           tokenizers=image_tokenizers, progress=False)
  assert summary["bad_samples"]["by_field"] == {"caption": 4}
  assert summary["splits"]["train"]["records"] == 0


def test_grey_and_rgba_pixels_are_converted(tmp_path, tokenizers_dir, image_tokenizers):
  base = scenes(2)
  grey = base[0]["rgb"][..., 1]
  rgba = np.concatenate([base[1]["rgb"], np.zeros((_S, _S, 1), np.uint8)], axis=-1)
  rgba[:_S // 2, :, 3] = 255  # top half opaque, bottom half transparent -> white
  summary = pretokenize.run_prepare_tokens(
      make_config(tokenizers_dir), str(tmp_path),
      sources={"train": Patched(base, {0: {"rgb": grey}, 1: {"rgb": rgba}})},
      tokenizers=image_tokenizers, progress=False)
  records = read_split(summary, "train")
  np.testing.assert_array_equal(records[0]["rgb"], np.repeat(grey[..., None], 3, axis=-1))
  np.testing.assert_array_equal(records[1]["rgb"][:_S // 2], base[1]["rgb"][:_S // 2])
  assert (records[1]["rgb"][_S // 2:] == 255).all()


def test_optional_modality_is_absent_not_bad(tmp_path, tokenizers_dir, image_tokenizers):
  config = make_config(tokenizers_dir)
  config.data.missing = "det"
  no_det = {"det_boxes": None, "det_classes": None}
  summary = pretokenize.run_prepare_tokens(
      config, str(tmp_path), sources={"train": Patched(scenes(3), {1: no_det})},
      tokenizers=image_tokenizers, progress=False)
  records = read_split(summary, "train")
  assert records[1]["present"].tolist() == [1, 1, 1, 1, 0] and records[1]["det"].size == 0
  meta = tokens_tfds.read_metadata(summary["path"])
  decoded = tokens_tfds.decode_record(records[1], meta["modalities"])
  assert decoded["det"] is None and decoded["caption"] is not None
  assert records[1]["gt_det_boxes"].shape == (0, 4)
