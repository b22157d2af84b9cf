"""Token sets for tests: a text-only corpus, small pre-tokenized shapes sets, tampered copies."""

import json
import os
import shutil

import ml_collections

from mmjax import config as mmconfig
from mmjax import modalities as mod
from mmjax import pretokenize
from mmjax.data.shapes import world as shapes
from mmjax.data.tokens import records as tokens_tfds
from mmjax.objectives import text_tokenizer
from mmjax.tokenizers import image, text

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Captions:
  """Scenes reduced to their captions: a text corpus."""

  def __init__(self, n):
    self.base = shapes.SceneSource(n, split="train")

  def __len__(self):
    return len(self.base)

  def __getitem__(self, i):
    return {"caption": self.base[i]["caption"]}


def tampered(data_dir, tmp_path, name="shapes", **metadata):
  """A copy of token set `name` in tmp_path whose metadata.json has `metadata` merged in."""
  src = os.path.join(data_dir, tokens_tfds.NAME, name)
  shutil.copytree(src, os.path.join(tmp_path, tokens_tfds.NAME, name))
  path = os.path.join(tokens_tfds.dataset_dir(tmp_path, name), "metadata.json")
  meta = tokens_tfds.read_json(path)
  for key, value in metadata.items():
    meta[key] = {**meta[key], **value} if isinstance(value, dict) else value
  with open(path, "w") as f:
    json.dump(meta, f)
  return str(tmp_path)


def shapes_token_sets(root: str) -> str:
  """<root>/mmjax_tokens/shapes: rgb pixels, tok_rgb (64 codes) and caption, in that order (train
  24, validation 8), from a SentencePiece model trained on 300 captions
  (<root>/tokenizers/shapes_text) and an untrained small rgb tokenizer; and
  <root>/mmjax_tokens/captions: 16 captions alone. Returns `root`."""
  cfg = mmconfig.load(os.path.join(ROOT, "configs/tokenizers/shapes_text.py"))
  pairs = text_tokenizer.shapes_sentences(300, split="train", seed=0, image_size=64,
                                          coord_bins=65)
  sentences = [s for pair in pairs for s in pair]
  text.train_text_tokenizer(sentences, os.path.join(root, "tokenizers", "shapes_text", "text"),
                            cfg.tokenizer)
  config = ml_collections.ConfigDict()
  config.data = ml_collections.ConfigDict(dict(name="shapes"))
  config.modalities = ml_collections.ConfigDict(sort_keys=False, initial_dictionary=dict(
      rgb=dict(kind="image_pixels", source="rgb", image_size=64, patch_size=8),
      tok_rgb=dict(kind="image_tokens", source="rgb", vocab_size=64, grid=(8, 8),
                   tokenizer="configs/tokenizers/shapes_rgb.py"),
      caption=dict(kind="sequence", source="caption", vocab_size=1024, max_length=48,
                   tokenizer="configs/tokenizers/shapes_text.py"),
  ))
  config.tokens = ml_collections.ConfigDict(dict(shard_size=16, batch_size=8))
  rgb = image.create_tokenizer(image.ImageTokenizerConfig(
      modality="rgb", codebook_size=64, code_dim=8, width=32, num_heads=2, encoder_layers=1,
      decoder_layers=1), seed=1)
  registry = mod.from_config(config.modalities)
  pretokenize.run_prepare_tokens(
      config, root, progress=False,
      sources={"train": shapes.SceneSource(24, split="train"),
               "validation": shapes.SceneSource(8, split="validation")},
      tokenizers={"tok_rgb": pretokenize.ImageModalityTokenizer(registry["tok_rgb"], rgb,
                                                                batch_size=8)})
  config.data.name = "captions"
  config.modalities = ml_collections.ConfigDict(dict(caption=config.modalities.caption))
  pretokenize.run_prepare_tokens(config, root, progress=False, sources={"train": Captions(16)})
  return root
