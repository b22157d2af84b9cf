"""The decoder objective on real pre-tokenized shapes data: a token set made for another model (more
modalities, another order) feeds it, its "val" split is the dataset's "validation", mismatched
vocabularies are config errors, and `run_train` trains, evaluates and checkpoints on it."""

import os

import ml_collections
import numpy as np
import pytest

from mmjax import config as mmconfig
from mmjax import modalities as mod
from mmjax.config import ConfigError
from mmjax.data import pretokenize, shapes
from mmjax.tokenizers import image, text
from mmjax.train import loop
from mmjax.train.objective import get_objective

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """<dir>/mmjax_tokens/shapes: rgb pixels, tok_rgb (64 codes) and caption, in that order, from a
  SentencePiece model trained on 300 captions and an untrained small rgb tokenizer."""
  root = str(tmp_path_factory.mktemp("tokens"))
  cfg = mmconfig.load(os.path.join(ROOT, "configs/tokenizers/shapes_text.py"))
  sentences = [s for pair in text.shapes_sentences(300, split="train", seed=0, image_size=64,
                                                   coord_bins=65) for s in pair]
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
  return root


def decoder_config(data_dir, *overrides):
  return mmconfig.load(os.path.join(ROOT, "configs/decoder/shapes.py:tiny,runlocal"), [
      "--config.model.d_model=32", "--config.model.num_layers=1", "--config.model.num_heads=2",
      "--config.model.max_length=128", "--config.modalities.tok_rgb.vocab_size=64",
      "--config.train.batch_size=8", f"--config.data.data_dir={data_dir}", *overrides])


def test_batches_hold_the_records_documents(data_dir):
  objective = get_objective(decoder_config(data_dir))
  vocab = objective.vocab
  captions = {shapes.generate_scene(i, split="validation")["caption"] for i in range(8)}
  tokenizer = text.TextTokenizer.load(os.path.join(data_dir, "tokenizers", "shapes_text",
                                                   "text.model"))
  batch = next(objective.make_iterator("val", 0, 1))
  assert batch["tokens"].shape == (8, 128)
  boi, eoi = vocab.begin_image("tok_rgb"), vocab.end_image("tok_rgb")
  seen = 0
  for tokens, segment in zip(batch["tokens"], batch["segment"]):
    for s in np.unique(segment[segment > 0]):
      doc = tokens[segment == s].tolist()
      assert doc[0] == vocab.bos and doc[-1] == vocab.eos
      start, stop = doc.index(boi), doc.index(eoi)
      assert stop - start == 65  # the 8x8 codes of the record's tok_rgb
      text_ids = doc[1:start] if start > 1 else doc[stop + 1:-1]
      assert tokenizer.decode(text_ids) in captions  # the validation records' own captions
      seen += 1
  assert seen >= 8


def test_mismatched_vocabulary_is_a_config_error(data_dir):
  objective = get_objective(decoder_config(data_dir, "--config.modalities.tok_rgb.vocab_size=1024"))
  with pytest.raises(ConfigError, match="modalities.tok_rgb .* vocab_size 1024.* vocab_size 64"):
    objective.make_iterator("train", 0, 1)


def test_run_train_on_pretokenized_data(data_dir, tmp_path):
  config = decoder_config(data_dir, "--config.train.steps=2", "--config.train.checkpoint_every=2",
                          "--config.train.eval_batches=1")
  with open(os.devnull, "w") as quiet:
    summary = loop.run_train(config, str(tmp_path), stream=quiet)
  assert summary["step"] == 2 and summary["checkpoints"] == [2]
  assert np.isfinite(summary["eval"]["eval/loss"])
