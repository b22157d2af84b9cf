"""The tokenizer.json kind: a WordPiece tokenizer in 4M's layout and a byte-level BPE in Chameleon's
layout, both built here with the `tokenizers` library; their ids, round trips, and use by
`mmjax prepare tokens`."""

from __future__ import annotations

import os

import ml_collections
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mmjax import config as mmconfig
from mmjax import pretokenize
from mmjax.data.shapes import world as shapes
from mmjax.data.tokens import records as tokens_tfds
from mmjax.errors import UserError
from mmjax.tokenizers import special
from mmjax.tokenizers.hf_text import HFTextTokenizer, text_order

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CODES = 12


def captions(n: int) -> list[str]:
  return [shapes.generate_scene(i, split="train")["caption"] for i in range(n)]


def wordpiece_4m(path: str) -> str:
  """4M's layout: [PAD] [UNK] [SOS] [EOS], sentinels [S_k], then the word pieces (trained here on
  shapes captions)."""
  tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece()
  tok.train_from_iterator(captions(200), trainers.WordPieceTrainer(
      vocab_size=300, show_progress=False,
      special_tokens=["[PAD]", "[UNK]", "[SOS]", "[EOS]", "[S_0]", "[S_1]", "[S_2]"]))
  tok.save(path)
  return path


def chameleon_bpe(path: str, corpus: list[str], codes: int = CODES) -> str:
  """Chameleon's layout: <s> <pad> </s> <unk>, image tokens IMGIMG..Z, <eoss> <racm3:break>, then
  byte-level BPE pieces."""
  image = ["IMGIMG" + "".join(chr(ord("A") + int(c)) for c in str(k)) + "Z" for k in range(codes)]
  specials = ["<s>", "<pad>", "</s>", "<unk>"] + image + ["<eoss>", "<racm3:break>"]
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  tok.save(path)
  return path


def test_wordpiece_keeps_4m_ids(tmp_path):
  path = wordpiece_4m(str(tmp_path / "tokenizer.json"))
  tok = HFTextTokenizer.load(path)
  raw = Tokenizer.from_file(path)
  np.testing.assert_array_equal(tok.hf_ids, np.arange(raw.get_vocab_size()))  # already mmjax's
  assert tok.special.num_sentinels == 3 and tok.special.sentinel(2) == 6
  text = captions(1)[0]
  ids = tok.encode(text, add_bos=True, add_eos=True)
  assert ids[0] == special.BOS and ids[-1] == special.EOS
  np.testing.assert_array_equal(ids[1:-1], raw.encode(text, add_special_tokens=False).ids)
  # WordPiece's decoder puts a space before punctuation; compare words.
  assert tok.decode(ids).replace(" ,", ",") == text
  assert tok.piece(special.PAD) == "[PAD]" and tok.piece(4) == "[S_0]"


def test_bpe_moves_chameleon_specials_and_drops_image_tokens(tmp_path):
  corpus = captions(40)
  path = chameleon_bpe(str(tmp_path / "tokenizer.json"), corpus)
  tok = HFTextTokenizer.load(path)
  vocab = Tokenizer.from_file(path).get_vocab()
  order = tok.hf_ids
  assert order[:4].tolist() == [vocab["<pad>"], vocab["<unk>"], vocab["<s>"], vocab["</s>"]]
  assert tok.vocab_size == len(vocab) - CODES - 2
  names = {i: n for n, i in vocab.items()}
  assert not any(names[i].startswith("IMGIMG") or names[i] in ("<eoss>", "<racm3:break>")
                 for i in order)
  for text in corpus[:10]:
    ids = tok.encode(text)
    assert ids.min() >= 4 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == text
  batch = tok.encode_batch(corpus[:3], add_eos=True)
  assert all(b[-1] == special.EOS for b in batch)


def test_errors_are_named(tmp_path):
  missing = tmp_path / "no_pad.json"
  tok = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
  tok.save(str(missing))
  with pytest.raises(UserError, match="no PAD token"):
    HFTextTokenizer.load(str(missing))
  with pytest.raises(UserError, match="does not exist"):
    HFTextTokenizer.load(str(tmp_path / "absent.json"))
  (tmp_path / "broken.json").write_text("{not json")
  with pytest.raises(UserError, match="not a Hugging Face tokenizer.json"):
    HFTextTokenizer.load(str(tmp_path / "broken.json"))
  path = wordpiece_4m(str(tmp_path / "ok.json"))
  with pytest.raises(UserError, match="outside the vocabulary"):
    HFTextTokenizer.load(path).decode([10_000])


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_prepare_tokens_with_a_tokenizer_json(tmp_path, kind):
  path = str(tmp_path / "tokenizer.json")
  if kind == "wordpiece":
    wordpiece_4m(path)
  else:
    chameleon_bpe(path, captions(40))
  config = mmconfig.load(os.path.join(ROOT, "configs/fourm/shapes.py:tiny"))
  config.unlock()
  config.modalities = ml_collections.ConfigDict(sort_keys=False, initial_dictionary=dict(
      caption=dict(kind="sequence", source="caption", vocab_size=512, max_length=48,
                   tokenizer=path)))
  config.tokens = ml_collections.ConfigDict(dict(shard_size=8, batch_size=8))
  workdir = str(tmp_path / "work")
  summary = pretokenize.run_prepare_tokens(
      config, workdir, sources={"train": shapes.SceneSource(6, split="train")}, progress=False)
  tok = HFTextTokenizer.load(path)
  assert summary["fingerprints"]["caption"] == tok.fingerprint
  data_dir = os.path.dirname(os.path.dirname(os.path.dirname(summary["path"])))
  source = tokens_tfds.load_tokens(data_dir, summary["name"], "train")
  for i in range(len(source)):
    ids = source[i]["caption"]
    want = shapes.generate_scene(i, split="train")["caption"]
    assert tok.decode(ids).replace(" ,", ",") == want


def test_text_order_matches_its_definition():
  vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "IMGIMGAZ": 4, "IMGIMGBZ": 5,
           "<eoss>": 6, "<racm3:break>": 7, "x": 8, "[S_0]": 9, "y": 10}
  assert text_order(vocab, 11).tolist() == [1, 3, 0, 2, 9, 8, 10]
  assert text_order(vocab, 11, bos=8, eos=10).tolist() == [1, 3, 8, 10, 9, 0, 2]
