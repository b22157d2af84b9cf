"""The shared text tokenizer: SentencePiece with the reserved ids of `mmjax.tokenizers.special`.

Id layout (K sentinels, B coordinate bins, C class names; checked after training and on load):

  0 PAD, 1 UNK, 2 BOS, 3 EOS
  4 .. 4+K-1                     [S_0] .. [S_{K-1}]               (span-masking sentinels)
  4+K .. 4+K+4B-1                v0=0 .. v0=B-1, v1=.., v2=.., v3=..  (box coordinates)
  4+K+4B .. 4+K+4B+C-1           class names, in the configured order
  then 256 byte pieces (when byte_fallback), then the learned pieces.

SentencePiece gives PAD/UNK/BOS/EOS the ids we ask for and then assigns user-defined symbols the
next free ids in the order listed, so the list order above fixes every reserved id. Coordinate and
class tokens are word-initial pieces (`▁v0=12`, `▁circle`): in "v2=40 circle" each is then one
token instead of a separate `▁` plus the symbol. Sentinels are bare (`[S_0]`), as the masking code
inserts them by id. Normalisation is the identity and whitespace is kept as is, so decode(encode(s))
== s for any text whose characters were seen in training (and for any UTF-8 text with byte fallback).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import sentencepiece as spm
from etils import epath
from sentencepiece import sentencepiece_model_pb2

from mmjax import paths
from mmjax.config import ConfigError, to_dataclass
from mmjax.errors import UserError
from mmjax.tokenizers import special

WORD = "\u2581"  # SentencePiece's whitespace marker
_SENTINEL_RE = re.compile(r"^\[S_(\d+)\]$")
_COORD_RE = re.compile(rf"^{WORD}v([0-3])=(\d+)$")


@dataclasses.dataclass(frozen=True)
class TextTokenizerConfig:
  """How to train the SentencePiece model; every field has a key in configs/tokenizers/*_text.py."""
  vocab_size: int = 1024            # upper bound on the vocabulary: a small corpus may yield fewer
  num_sentinels: int = 32           # K sentinels [S_0] .. [S_{K-1}]
  coord_bins: int = 65              # B bins per box coordinate (0 = no coordinate tokens)
  class_names: tuple[str, ...] = ()  # single-token class names
  model_type: str = "bpe"           # "bpe" or "unigram" (SentencePiece)
  character_coverage: float = 1.0   # fraction of characters covered by pieces; rest -> bytes/UNK
  byte_fallback: bool = True        # unseen characters become UTF-8 byte pieces, never UNK
  max_sentence_length: int = 4192   # bytes; longer training sentences are skipped by SentencePiece
  num_threads: int = 1

  def __post_init__(self):
    if self.model_type not in ("bpe", "unigram"):
      raise ConfigError(f"text tokenizer model_type must be 'bpe' or 'unigram', got {self.model_type!r}")
    if self.num_sentinels < 0 or self.coord_bins < 0:
      raise ConfigError(f"text tokenizer num_sentinels ({self.num_sentinels}) and coord_bins "
                        f"({self.coord_bins}) must be >= 0")
    if not 0.0 < self.character_coverage <= 1.0:
      raise ConfigError(f"text tokenizer character_coverage must be in (0, 1], got "
                        f"{self.character_coverage}")
    names = list(self.class_names)
    if len(set(names)) != len(names) or any(not n.strip() or n != n.strip() for n in names):
      raise ConfigError(f"text tokenizer class_names must be distinct, non-empty and without "
                        f"surrounding spaces, got {names}")
    if self.vocab_size <= self.special.num_reserved + (256 if self.byte_fallback else 0):
      raise ConfigError(f"text tokenizer vocab_size ({self.vocab_size}) leaves no room for learned "
                        f"pieces after {self.special.num_reserved} reserved ids"
                        f"{' and 256 byte pieces' if self.byte_fallback else ''}")

  @property
  def special(self) -> special.SpecialIds:
    return special.SpecialIds(num_sentinels=self.num_sentinels, coord_bins=self.coord_bins,
                              class_names=tuple(self.class_names))


def class_piece(name: str) -> str:
  """The piece of a class name: word-initial, spaces as SentencePiece's marker."""
  return WORD + name.replace(" ", WORD)


def reserved_pieces(ids: special.SpecialIds) -> list[str]:
  """The user-defined symbols in id order, from id special.FIRST_SENTINEL on."""
  pieces = [f"[S_{k}]" for k in range(ids.num_sentinels)]
  pieces += [f"{WORD}v{j}={b}" for j in range(4) for b in range(ids.coord_bins)]
  pieces += [class_piece(name) for name in ids.class_names]
  return pieces


class TextTokenizer:
  """A trained SentencePiece model with the reserved-id layout; encode/decode to int32 ids."""

  def __init__(self, model_bytes: bytes, path: str = ""):
    self.path = path
    self._model_bytes = model_bytes
    self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    self.special = _layout_of(model_bytes, where=path or "text tokenizer model")
    self._check_layout()

  @classmethod
  def load(cls, path: str) -> "TextTokenizer":
    model = epath.Path(path)
    if not model.is_file():
      raise UserError(f"text tokenizer model {path!r} does not exist (train it with "
                      f"`mmjax tokenizer train --config configs/tokenizers/shapes_text.py`)")
    return cls(model.read_bytes(), os.fspath(path))

  def _check_layout(self) -> None:
    where = self.path or "text tokenizer model"
    expected = ["<pad>", "<unk>", "<s>", "</s>"] + reserved_pieces(self.special)
    if self.vocab_size < len(expected):
      raise UserError(f"{where}: {self.vocab_size} pieces, fewer than the {len(expected)} reserved")
    for i, piece in enumerate(expected):
      if self._sp.id_to_piece(i) != piece:
        raise UserError(f"{where}: id {i} is {self._sp.id_to_piece(i)!r}, expected {piece!r}: "
                        f"not a model trained by mmjax.tokenizers.text")

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def fingerprint(self) -> str:
    """sha256 of the serialized model: the version recorded with pre-tokenized data."""
    return hashlib.sha256(self._model_bytes).hexdigest()

  def piece(self, token_id: int) -> str:
    return self._sp.id_to_piece(int(token_id))

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
    """int32 [T] ids of `text`."""
    if not isinstance(text, str):
      raise UserError(f"text tokenizer: expected a str, got {type(text).__name__}")
    return np.asarray(self._sp.encode(text, add_bos=add_bos, add_eos=add_eos), np.int32)

  def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False,
                   add_eos: bool = False) -> list[np.ndarray]:
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise UserError(f"text tokenizer: text {i} is a {type(text).__name__}, not a str")
    ids = self._sp.encode(list(texts), add_bos=add_bos, add_eos=add_eos)
    return [np.asarray(x, np.int32) for x in ids]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids`; PAD, BOS and EOS decode to nothing, sentinels to `[S_k]`."""
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      bad = ids[(ids < 0) | (ids >= self.vocab_size)][0]
      raise UserError(f"text tokenizer: id {int(bad)} outside the vocabulary [0, {self.vocab_size})")
    return self._sp.decode(ids.astype(np.int64).tolist())

  def decode_batch(self, batch: Iterable[Sequence[int] | np.ndarray]) -> list[str]:
    return [self.decode(ids) for ids in batch]


def _layout_of(model_bytes: bytes, *, where: str) -> special.SpecialIds:
  """Recovers K, B and the class names from the model's user-defined symbols."""
  proto = sentencepiece_model_pb2.ModelProto()
  try:
    proto.ParseFromString(model_bytes)
  except Exception as e:  # noqa: BLE001 -- protobuf raises its own DecodeError
    raise UserError(f"{where}: not a SentencePiece model ({e})") from None
  symbols = list(proto.trainer_spec.user_defined_symbols)
  k = 0
  while k < len(symbols) and _SENTINEL_RE.match(symbols[k]) and symbols[k] == f"[S_{k}]":
    k += 1
  rest = symbols[k:]
  bins = 0
  while bins < len(rest) and rest[bins] == f"{WORD}v0={bins}":
    bins += 1
  classes = rest[4 * bins:]
  if any(not c.startswith(WORD) for c in classes):
    raise UserError(f"{where}: user-defined symbols {classes} are not class-name pieces")
  names = tuple(c[1:].replace(WORD, " ") for c in classes)
  return special.SpecialIds(num_sentinels=k, coord_bins=bins, class_names=names)


def as_config(config: TextTokenizerConfig | Mapping[str, Any]) -> TextTokenizerConfig:
  if isinstance(config, TextTokenizerConfig):
    return config
  fields = {f.name for f in dataclasses.fields(TextTokenizerConfig)}
  section = {k: config[k] for k in config if k in fields}
  return to_dataclass(TextTokenizerConfig, section, where="tokenizer")


def train_text_tokenizer(sentences: Iterable[str], out_prefix: str,
                         config: TextTokenizerConfig | Mapping[str, Any]) -> TextTokenizer:
  """Trains SentencePiece on `sentences` in-process; writes `<out_prefix>.model`.

  `config` is a TextTokenizerConfig or a mapping with its keys (other keys are ignored, so a whole
  tokenizer config section can be passed).
  """
  cfg = as_config(config)
  ids = cfg.special
  count = [0]

  def stream() -> Iterator[str]:
    for i, sentence in enumerate(sentences):
      if not isinstance(sentence, str):
        raise UserError(f"text tokenizer training sentence {i} is a {type(sentence).__name__}, "
                        f"not a str")
      count[0] += 1
      yield sentence

  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=stream(), model_writer=model, vocab_size=cfg.vocab_size,
        hard_vocab_limit=False, model_type=cfg.model_type,
        character_coverage=cfg.character_coverage, byte_fallback=cfg.byte_fallback,
        pad_id=special.PAD, unk_id=special.UNK, bos_id=special.BOS, eos_id=special.EOS,
        user_defined_symbols=reserved_pieces(ids), normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=False,
        max_sentence_length=cfg.max_sentence_length, num_threads=cfg.num_threads, minloglevel=2)
  except RuntimeError as e:
    if isinstance(e.__cause__ or e.__context__, UserError):
      raise (e.__cause__ or e.__context__) from None
    raise UserError(f"text tokenizer training failed on {count[0]} sentences: {e}") from None
  if count[0] == 0:
    raise UserError("text tokenizer: no training sentences")
  data = model.getvalue()
  path = epath.Path(f"{out_prefix}.model")
  path.parent.mkdir(parents=True, exist_ok=True)
  if paths.is_url(path):  # an object appears whole when its upload completes
    path.write_bytes(data)
  else:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)  # atomic: a reader never sees half a model
  return TextTokenizer(data, os.fspath(path))

