"""The SentencePiece text tokenizer: reserved-id layout, exact round trips, loading, errors."""

import hashlib
import io

import numpy as np
import pytest
import sentencepiece as spm

from mmjax import config as mmconfig
from mmjax.config import ConfigError
from mmjax.data.shapes import world as shapes
from mmjax.errors import UserError
from mmjax.objectives import text_tokenizer
from mmjax.tokenizers import boxes, special, text

CONFIG = "configs/tokenizers/shapes_text.py"


@pytest.fixture(scope="module")
def shapes_config():
  return mmconfig.load(CONFIG)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, shapes_config):
  pairs = text_tokenizer.shapes_sentences(400, split="train", seed=0, image_size=64,
                                          coord_bins=65)
  sentences = [s for pair in pairs for s in pair]
  return text.train_text_tokenizer(sentences, str(tmp_path_factory.mktemp("tok") / "text"),
                                   shapes_config.tokenizer)


def test_reserved_ids_at_documented_positions(tokenizer):
  ids = tokenizer.special
  assert (ids.num_sentinels, ids.coord_bins, ids.class_names) == (64, 65, shapes.SHAPES)
  assert [tokenizer.piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
  # K = 64 sentinels from 4, 4 x 65 coordinate tokens from 68, 5 classes from 328.
  assert tokenizer.piece(4) == "[S_0]" and tokenizer.piece(35) == "[S_31]"
  assert ids.first_coord == 68 and ids.coord(0, 0) == 68 and ids.coord(3, 64) == 68 + 259
  assert tokenizer.piece(68) == "\u2581v0=0" and tokenizer.piece(68 + 65 + 7) == "\u2581v1=7"
  assert ids.first_class == 328 and ids.num_reserved == 333
  assert [tokenizer.piece(328 + k) for k in range(5)] == ["\u2581" + s for s in shapes.SHAPES]
  assert tokenizer.piece(333) == "<0x00>"  # byte pieces follow, then the learned ones
  assert tokenizer.vocab_size <= 1024


def test_reserved_tokens_encode_to_single_ids(tokenizer):
  ids = tokenizer.special
  assert tokenizer.encode("v2=40").tolist() == [ids.coord(2, 40)]
  assert tokenizer.encode("star").tolist() == [ids.class_id("star")]
  # sentinels are bare pieces (inserted by id), so the text's leading word marker stays apart
  assert tokenizer.encode("[S_3]").tolist()[-1] == ids.sentinel(3)
  assert tokenizer.decode([ids.sentinel(0), ids.coord(1, 2), ids.class_id("circle")]) == (
      "[S_0] v1=2 circle")
  # longest match: v0=64 is one token, not v0=6 followed by 4
  assert tokenizer.encode("v0=64 v3=6").tolist() == [ids.coord(0, 64), ids.coord(3, 6)]
  assert tokenizer.encode("a", add_bos=True, add_eos=True).tolist()[::2] == [special.BOS,
                                                                             special.EOS]


def test_captions_and_det_round_trip_exactly(tokenizer):
  # validation scenes: none was seen in training
  pairs = list(text_tokenizer.shapes_sentences(1500, split="validation", seed=0, image_size=64,
                                               coord_bins=65))
  captions, dets = [c for c, _ in pairs], [d for _, d in pairs]
  assert len(set(captions)) > 1000
  assert tokenizer.decode_batch(tokenizer.encode_batch(captions)) == captions
  assert tokenizer.decode_batch(tokenizer.encode_batch(dets)) == dets
  assert all(tokenizer.decode(tokenizer.encode(c)) == c for c in captions[:50])
  for ids in tokenizer.encode_batch(captions):
    assert ids.dtype == np.int32 and special.UNK not in ids


def test_det_string_is_five_reserved_tokens_per_box(tokenizer):
  sp = tokenizer.special
  scene = shapes.generate_scene(3, split="validation")
  det = boxes.det_text(scene["det_boxes"], scene["det_classes"], shapes.SHAPES, 65)
  parsed = boxes.text_to_boxes(det, 65)
  q = boxes.quantize(parsed.boxes, 65)
  expected = [tok for box, name in zip(q, parsed.classes)
              for tok in [sp.coord(j, int(box[j])) for j in range(4)] + [sp.class_id(name)]]
  assert tokenizer.encode(det).tolist() == expected


def test_unseen_characters_round_trip_by_bytes(tokenizer):
  s = "Ünïcødé 🙂 tab\there  two  spaces"
  ids = tokenizer.encode(s)
  assert special.UNK not in ids and tokenizer.decode(ids) == s


def test_load_and_fingerprint(tokenizer):
  loaded = text.TextTokenizer.load(tokenizer.path)
  with open(tokenizer.path, "rb") as f:
    assert loaded.fingerprint == hashlib.sha256(f.read()).hexdigest() == tokenizer.fingerprint
  assert loaded.special == tokenizer.special and loaded.vocab_size == tokenizer.vocab_size
  caption = shapes.generate_scene(0, split="test")["caption"]
  assert loaded.encode(caption).tolist() == tokenizer.encode(caption).tolist()


def test_configurable_layout_and_multiword_class(tmp_path):
  cfg = text.TextTokenizerConfig(vocab_size=300, num_sentinels=3, coord_bins=7,
                                 class_names=("cat", "traffic light"), byte_fallback=False)
  tok = text.train_text_tokenizer(["a cat near a traffic light", "v0=1 v1=2 v2=6 v3=6 cat"] * 20,
                                  str(tmp_path / "small"), cfg)
  sp = tok.special
  assert (sp.num_sentinels, sp.coord_bins, sp.class_names) == (3, 7, ("cat", "traffic light"))
  assert sp.first_coord == 7 and sp.first_class == 7 + 28 and sp.num_reserved == 37
  assert tok.piece(sp.sentinel(2)) == "[S_2]" and tok.piece(sp.coord(3, 6)) == "\u2581v3=6"
  assert tok.encode("v2=6 traffic light").tolist() == [sp.coord(2, 6), sp.class_id("traffic light")]
  assert text.TextTokenizer.load(str(tmp_path / "small.model")).special == sp


def test_run_text_tokenizer_train(tmp_path):
  config = mmconfig.load(CONFIG + ":runlocal")
  report = text_tokenizer.run_text_tokenizer_train(config, str(tmp_path))
  assert (tmp_path / "text.model").is_file() and (tmp_path / "text_tokenizer.json").is_file()
  assert report["caption_round_trip"] == 1.0 and report["det_round_trip"] == 1.0
  assert report["val_captions"] == 100 and report["tokens_per_box"] == 5.0
  assert report["num_reserved"] == 333 and 333 + 256 < report["vocab_size"] <= 1024
  assert 5 < report["tokens_per_caption"] < 48


def test_errors(tmp_path, tokenizer):
  with pytest.raises(UserError, match="does not exist"):
    text.TextTokenizer.load(str(tmp_path / "missing.model"))
  with pytest.raises(UserError, match=r"id 5000 outside the vocabulary"):
    tokenizer.decode([5, 5000])
  with pytest.raises(UserError, match="sentence 1 is a int"):
    text.train_text_tokenizer(["a b", 7], str(tmp_path / "bad"), text.TextTokenizerConfig())
  with pytest.raises(ConfigError, match="vocab_size"):
    text.TextTokenizerConfig(vocab_size=100, num_sentinels=200)
  with pytest.raises(ConfigError, match="model_type"):
    text.TextTokenizerConfig(model_type="wordpiece")
  # a SentencePiece model without the reserved layout is refused by name
  plain = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world"] * 30), model_writer=plain,
                                 vocab_size=20, hard_vocab_limit=False, minloglevel=2)
  (tmp_path / "plain.model").write_bytes(plain.getvalue())
  with pytest.raises(UserError, match="not a model trained by mmjax"):
    text.TextTokenizer.load(str(tmp_path / "plain.model"))


def test_decoding_random_ids_then_boxes_never_crashes(tokenizer):
  rng = np.random.default_rng(0)
  sp = tokenizer.special
  for n in range(200):
    # garbage: any ids, or ids biased towards the coordinate and class tokens
    ids = rng.integers(0, tokenizer.vocab_size, rng.integers(0, 30))
    if n % 2:
      ids = rng.integers(sp.first_coord, sp.num_reserved, rng.integers(0, 30))
    decoded = boxes.text_to_boxes(tokenizer.decode(ids), sp.coord_bins, class_names=sp.class_names)
    assert decoded.boxes.shape == (len(decoded.classes), 4)
    assert set(decoded.classes) <= set(shapes.SHAPES)
