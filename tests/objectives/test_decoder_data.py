"""The decoder objective on real pre-tokenized shapes data: a token set made for another model (more
modalities, another order) feeds it, its "val" split is the dataset's "validation", mismatched
vocabularies and tokenizers are errors, a mixture with a text corpus reads both (bad records
skipped and counted on request), and `run_train` trains, evaluates and checkpoints on it."""

import os

import numpy as np
import pytest

from mmjax import config as mmconfig
from mmjax.config import ConfigError
from mmjax.data.shapes import world as shapes
from mmjax.errors import UserError
from mmjax.tokenizers import text
from mmjax.train import loop
from mmjax.train.objective import get_objective
from tests.objectives.token_sets import shapes_token_sets, tampered

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return shapes_token_sets(str(tmp_path_factory.mktemp("tokens")))


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


def test_tokens_of_another_tokenizer_are_an_error(data_dir, tmp_path):
  tampered(data_dir, tmp_path, fingerprints={"caption": "f" * 64})
  text_dir = os.path.join(data_dir, "tokenizers", "shapes_text")
  config = decoder_config(tmp_path, f"--config.data.tokenizers_dir={os.path.dirname(text_dir)}")
  with pytest.raises(UserError, match=rf"{tmp_path}/mmjax_tokens/shapes/1.0.0 does not match the "
                                      rf"tokenizers: caption: tokens made by tokenizer ffffffffffff"
                                      rf", the config's is [0-9a-f]{{12}} \(in {text_dir}\)"):
    get_objective(config).make_iterator("train", 0, 1)


def _documents(batches, vocab):
  """Whether each document of the batches' rows holds an image."""
  out = []
  for batch in batches:
    for tokens, segment in zip(batch["tokens"], batch["segment"]):
      for s in np.unique(segment[segment > 0]):
        out.append(vocab.begin_image("tok_rgb") in tokens[segment == s])
  return np.array(out)


def test_mixture_with_a_text_corpus_and_skipped_bad_records(data_dir):
  mixture = (dict(name="shapes", weight=3), dict(name="captions"))
  # A caption-only template: both datasets' records give documents.
  config = decoder_config(data_dir, "--config.sequences.templates=(('caption', 'tok_rgb'), "
                          "('caption',))", "--config.sequences.probabilities=(0.9, 0.1)")
  config.data.mixture = mixture
  objective = get_objective(config)
  it = objective.make_iterator("train", 0, 1)
  images = _documents([next(it) for _ in range(6)], objective.vocab)
  assert it.bad_records == 0 and images.any() and 0.2 < (~images).mean() < 0.5
  # With image templates only, a caption record fits none: an error naming it, or skipped.
  config = decoder_config(data_dir)
  config.data.mixture = mixture
  with pytest.raises(UserError, match=r"record \d+: no template applies; it has \['caption'\]"):
    next(get_objective(config).make_iterator("train", 0, 1))
  config.data.bad_records = "skip"
  with pytest.raises(UserError, match=r"data: 16 of the 16 records read from dataset 'captions' "
                     r"were bad and skipped, more than data.max_bad_fraction=0.05"):
    next(get_objective(config).make_iterator("train", 0, 1))
  config.data.max_bad_fraction = 1.0  # every caption-only record is bad here, by design
  objective = get_objective(config)
  it = objective.make_iterator("train", 0, 1)
  batch = next(it)
  assert _documents([batch], objective.vocab).all()
  # The first pack window held 64 records of the stream, every fourth a caption record.
  assert it.bad_records == 16 and it.get_state()["bad_records"] == 16
  assert it.bad_by_dataset == {"shapes": 0, "captions": 16}
  assert it.get_state()["read_by_dataset"] == {"shapes": 48, "captions": 16}
  state = it.get_state()
  resumed = objective.make_iterator("train", 0, 1)
  resumed.set_state(state)
  assert all((next(resumed)["tokens"] == next(it)["tokens"]).all() for _ in range(2))


def test_run_train_on_pretokenized_data(data_dir, tmp_path):
  config = decoder_config(data_dir, "--config.train.steps=2", "--config.train.checkpoint_every=2",
                          "--config.train.eval_batches=1")
  with open(os.devnull, "w") as quiet:
    summary = loop.run_train(config, str(tmp_path), stream=quiet)
  assert summary["step"] == 2 and summary["checkpoints"] == [2]
  assert np.isfinite(summary["eval"]["eval/loss"])
