"""The 4M objective on real pre-tokenized data: records are read by the dataset's own modality
order, the dataset is checked against the config when the iterator is made (modalities,
vocabularies, tokenizer fingerprints, sentinels), and `data.mixture` mixes datasets that lack
modalities."""

import os

import ml_collections
import numpy as np
import pytest

from mmjax import config as mmconfig
from mmjax import pretokenize
from mmjax.config import ConfigError
from mmjax.data.fourm.transform import patchify
from mmjax.data.pipeline import stream as record_stream
from mmjax.data.pipeline import token_sets
from mmjax.data.shapes import world as shapes
from mmjax.data.tokens import records as tokens_tfds
from mmjax.errors import UserError
from mmjax.objectives import text_tokenizer
from mmjax.tokenizers import text
from mmjax.train.objective import get_objective
from tests.objectives.token_sets import Captions, tampered

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT = "configs/tokenizers/shapes_text.py"
RGB = dict(kind="image_pixels", source="rgb", image_size=64, patch_size=8)
CAPTION = dict(kind="sequence", source="caption", vocab_size=1024, max_length=48, tokenizer=TEXT)
DET = dict(kind="sequence", source="det", vocab_size=1024, max_length=64, tokenizer=TEXT)


def _prepare(root, name, modalities, sources, missing=""):
  config = ml_collections.ConfigDict()
  config.data = ml_collections.ConfigDict(dict(name=name, missing=missing))
  config.modalities = ml_collections.ConfigDict(modalities, sort_keys=False)
  config.tokens = ml_collections.ConfigDict(dict(shard_size=16, batch_size=8))
  return pretokenize.run_prepare_tokens(config, root, sources=sources, progress=False)


class WithoutDet:
  """Scenes of which those at `indices` have no boxes."""

  def __init__(self, base, indices):
    self.base, self.indices = base, set(indices)

  def __len__(self):
    return len(self.base)

  def __getitem__(self, i):
    scene = dict(self.base[i])
    if i in self.indices:
      del scene["det_boxes"], scene["det_classes"]
    return scene


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """<dir>/tokenizers/shapes_text (SentencePiece, 64 sentinels) and two token sets made by it:
  "shapes" (caption, det, rgb pixels, in that order; train 24, validation 8 of which 2 and 5 have
  no det) and "captions" (caption only; train 16, no validation split)."""
  root = str(tmp_path_factory.mktemp("fourm_tokens"))
  cfg = mmconfig.load(os.path.join(ROOT, TEXT))
  pairs = text_tokenizer.shapes_sentences(300, split="train", seed=0, image_size=64,
                                          coord_bins=65)
  sentences = [s for pair in pairs for s in pair]
  text.train_text_tokenizer(sentences, os.path.join(root, "tokenizers", "shapes_text", "text"),
                            cfg.tokenizer)
  _prepare(root, "shapes", dict(caption=CAPTION, det=DET, rgb=RGB),
           {"train": shapes.SceneSource(24, split="train"),
            "validation": WithoutDet(shapes.SceneSource(8, split="validation"), (2, 5))},
           missing="det")
  _prepare(root, "captions", dict(caption=CAPTION), {"train": Captions(16)})
  return root


def fourm_config(data_dir, *overrides, modalities=None):
  """The shapes 4M config over rgb pixels, caption and det (another order than the data's)."""
  config = mmconfig.load(os.path.join(ROOT, "configs/fourm/shapes.py:tiny"), [
      "--config.model.num_input_tokens=32", "--config.model.num_target_tokens=32",
      "--config.train.batch_size=8", f"--config.data.data_dir={data_dir}", *overrides])
  with config.unlocked():
    config.modalities = ml_collections.ConfigDict(
        modalities or dict(rgb=RGB, caption=CAPTION, det=DET), sort_keys=False)
  return config


def test_records_are_read_by_the_datasets_own_modality_order(data_dir):
  """The data's `present` flags follow its order (caption, det, rgb), not the config's."""
  config = fourm_config(data_dir, "--config.data.missing=det")
  objective = get_objective(config)
  it = objective.make_iterator("val", 0, 1)
  batch = next(it)
  assert it.bad_records == 0 and batch["enc_tokens"].shape == (8, 32)
  # Row b is position b of the validation stream: its pixels are that scene's.
  specs = token_sets.token_datasets(config, "validation", objective.registry,
                                    objective.registry.names)
  stream = record_stream.record_dataset(specs, seed=int(config.data.shuffle_seed), num_epochs=1)
  index = np.array([stream[b][1] for b in range(8)])
  scenes = [shapes.generate_scene(i, split="validation") for i in index]
  np.testing.assert_allclose(batch["enc_pixels"], patchify(np.stack([s["rgb"] for s in scenes]),
                                                          8), atol=1e-5)
  k = {n: objective.registry.index(n) for n in ("caption", "det")}
  slots = {n: (batch["enc_valid"] & (batch["enc_modality"] == k[n])).sum(1)
           + (batch["dec_valid"] & (batch["dec_modality"] == k[n])).sum(1) for n in k}
  no_det = np.isin(index, (2, 5))
  assert no_det.sum() == 2 and (slots["det"][no_det] == 0).all()
  assert (slots["det"][~no_det] > 0).mean() > 0.5 and (slots["caption"] > 0).mean() > 0.5


def test_a_mismatch_with_the_config_is_a_clear_error_at_training_time(data_dir, tmp_path):
  ds_dir = tokens_tfds.dataset_dir(data_dir, "shapes")
  objective = get_objective(fourm_config(data_dir, modalities=dict(
      rgb=RGB, caption=dict(CAPTION, vocab_size=2048), det=DET)))
  with pytest.raises(ConfigError, match=f"{ds_dir} does not match the config: modalities.caption "
                                        f"has vocab_size 2048, the data has vocab_size 1024"):
    objective.make_iterator("train", 0, 1)

  text_dir = os.path.join(data_dir, "tokenizers", "shapes_text")
  other = tampered(data_dir, tmp_path / "fp", fingerprints={"caption": "0" * 64})
  config = fourm_config(other, f"--config.data.tokenizers_dir={os.path.dirname(text_dir)}")
  with pytest.raises(UserError, match=r"mmjax_tokens/shapes/1.0.0 does not match the tokenizers: "
                                      r"caption: tokens made by tokenizer 000000000000, the "
                                      rf"config's is [0-9a-f]{{12}} \(in {text_dir}\)"):
    get_objective(config).make_iterator("train", 0, 1)
  config.data.check_tokenizers = False  # the opt-out
  next(get_objective(config).make_iterator("train", 0, 1))

  objective = get_objective(fourm_config(data_dir, "--config.masking.num_sentinels=100"))
  with pytest.raises(ConfigError, match=f"masking.num_sentinels is 100, but for modality caption "
                                        f"the data {ds_dir} records 64 sentinels"):
    objective.make_iterator("train", 0, 1)
  unrecorded = tampered(data_dir, tmp_path / "unrecorded", num_sentinels=None)  # older data
  objective = get_objective(fourm_config(
      unrecorded, "--config.masking.num_sentinels=100",
      f"--config.data.tokenizers_dir={os.path.dirname(text_dir)}"))
  with pytest.raises(ConfigError, match=f"masking.num_sentinels is 100, but for modality caption "
                                        f"its tokenizer in {text_dir} has 64 sentinels"):
    objective.make_iterator("train", 0, 1)
  recorded = tampered(data_dir, tmp_path / "sentinels", num_sentinels=32)
  objective = get_objective(fourm_config(recorded, "--config.data.check_tokenizers=False"))
  with pytest.raises(ConfigError, match="masking.num_sentinels is 64, but for modality caption "
                                        "the data .* records 32 sentinels"):
    objective.make_iterator("train", 0, 1)

  depth = dict(kind="image_tokens", source="depth", vocab_size=64, grid=(8, 8),
               tokenizer="configs/tokenizers/shapes_depth.py")
  with_depth = dict(rgb=RGB, caption=CAPTION, det=DET, tok_depth=depth)
  objective = get_objective(fourm_config(data_dir, modalities=with_depth))
  with pytest.raises(ConfigError, match=f"modality tok_depth is not in the pre-tokenized data "
                                        f"{ds_dir} \\(it has caption, det, rgb\\); declare it in "
                                        f"data.missing"):
    objective.make_iterator("train", 0, 1)
  objective = get_objective(fourm_config(data_dir, "--config.data.missing=tok_depth",
                                         modalities=with_depth))
  batch = next(objective.make_iterator("train", 0, 1))  # declared missing: empty
  k = objective.registry.index("tok_depth")
  assert not (batch["dec_valid"] & (batch["dec_modality"] == k)).any()


def test_mixture_of_a_text_only_dataset(data_dir, tmp_path):
  config = fourm_config(data_dir)
  config.data.mixture = (dict(name="shapes", weight=3, missing="det"), dict(name="captions"))
  objective = get_objective(config)
  it = objective.make_iterator("train", 0, 1)
  batches = [next(it) for _ in range(6)]
  specs = token_sets.token_datasets(config, "train", objective.registry, objective.registry.names)
  assert [(s.name, s.weight, s.missing) for s in specs] == [("shapes", 3.0, ("det",)),
                                                            ("captions", 1.0, ("rgb", "det"))]
  stream = record_stream.record_dataset(specs, seed=int(config.data.shuffle_seed))
  text_rows = np.array([stream[i][0] == 1 for i in range(48)])
  assert text_rows.mean() == 0.25
  k = {n: objective.registry.index(n) for n in ("rgb", "caption", "det")}
  enc = np.concatenate([b["enc_valid"] for b in batches])
  enc_mod = np.concatenate([b["enc_modality"] for b in batches])
  dec = np.concatenate([b["dec_valid"] for b in batches])
  dec_mod = np.concatenate([b["dec_modality"] for b in batches])
  for valid, mods in ((enc, enc_mod), (dec, dec_mod)):
    assert not (valid & (mods != k["caption"]))[text_rows].any()  # no rgb or det slots
  assert (dec & (dec_mod == k["caption"]))[text_rows].any(1).all()
  assert (enc & (enc_mod == k["rgb"]))[~text_rows].any(1).mean() > 0.9
  # The validation split: "captions" has none, so only "shapes" is read.
  assert len(list(objective.make_iterator("val", 0, 1))) == 1

  bad = [((dict(name="shapes", weight=0),), r"data.mixture\[0\].weight' must be a positive"),
         ((dict(name="shapes", dir="x"),), r"data.mixture\[0\]' has unknown keys \['dir'\]"),
         ((dict(name="shapes"), dict(name="shapes", weight=2)), r"repeats data.mixture\[0\]"),
         ((dict(name="shapes", missing="tok_zz"),), "unknown modality 'tok_zz'")]
  for mixture, message in bad:
    config.data.mixture = mixture
    with pytest.raises(ConfigError, match=message):
      get_objective(config).make_iterator("train", 0, 1)

  # Tokens of one modality made by two tokenizers are not mixed.
  other = tampered(data_dir, tmp_path, name="captions", fingerprints={"caption": "0" * 64})
  config.data.check_tokenizers = False
  config.data.mixture = (dict(name="shapes"), dict(data_dir=other, name="captions"))
  with pytest.raises(ConfigError, match="modality caption: the data .* by 000000000000; one "
                                        "mixture needs one tokenizer per modality"):
    get_objective(config).make_iterator("train", 0, 1)
