"""Reference text tokenizers: a Hugging Face `tokenizer.json` (4M's WordPiece, Chameleon's BPE)
behind the interface of the SentencePiece `TextTokenizer`, with mmjax's reserved-id layout.

A sequence modality uses one when its `tokenizer` names a `.json` file:
    config.modalities.caption = dict(kind="sequence", vocab_size=30000, max_length=256,
                                     tokenizer="path/to/tokenizer.json")
Nothing is trained: `mmjax prepare tokens` and `mmjax generate` load the file as it is.

Ids: mmjax's text ids are the file's ids reordered so that its special tokens sit where
`mmjax.tokenizers.special` wants them: PAD 0, UNK 1, BOS 2, EOS 3 (found by name: [PAD]/<pad>,
[UNK]/<unk>, [SOS]/<s>/[CLS], [EOS]/</s>/[SEP]), then the sentinels [S_0], [S_1], ... when the file
has them, then every other token in the file's id order. Image tokens (Chameleon's `IMGIMG...Z`) and
the begin/end-of-image markers (`<racm3:break>`, `<eoss>`) are not text: a mixed-modal decoder holds
them as its image codes and its own begin/end-image ids
(mmjax.data.sequences.documents.SharedVocab), so they are left out here. 4M's tokenizer already has
this layout, so its ids are unchanged.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from tokenizers import Tokenizer

from mmjax.errors import UserError
from mmjax.tokenizers import special

PAD_NAMES = ("[PAD]", "<pad>")
UNK_NAMES = ("[UNK]", "<unk>")
BOS_NAMES = ("[SOS]", "<s>", "[CLS]")
EOS_NAMES = ("[EOS]", "</s>", "[SEP]")
IMAGE_MARKERS = ("<racm3:break>", "<eoss>")  # Chameleon's begin / end of image
_IMAGE_TOKEN = re.compile(r"^IMGIMG[A-J]+Z$")


def is_image_token(name: str) -> bool:
  return bool(_IMAGE_TOKEN.match(name)) or name in IMAGE_MARKERS


def _find(vocab: Mapping[str, int], names: Sequence[str], given: int | None, what: str,
          where: str) -> int:
  if given is not None:
    return int(given)
  for name in names:
    if name in vocab:
      return int(vocab[name])
  raise UserError(f"{where}: no {what} token (looked for {', '.join(names)}): mmjax's text layout "
                  "needs PAD, UNK, BOS and EOS")


def text_order(vocab: Mapping[str, int], size: int, *, bos: int | None = None,
               eos: int | None = None, where: str = "tokenizer") -> np.ndarray:
  """The file's ids in mmjax text-id order: PAD, UNK, BOS, EOS, sentinels, then the rest (without
  image tokens); `bos`/`eos` override the lookup by name (Chameleon's config names them by id)."""
  first = [_find(vocab, PAD_NAMES, None, "PAD", where), _find(vocab, UNK_NAMES, None, "UNK", where),
           _find(vocab, BOS_NAMES, bos, "BOS", where), _find(vocab, EOS_NAMES, eos, "EOS", where)]
  if len(set(first)) != 4:
    raise UserError(f"{where}: PAD, UNK, BOS and EOS must be four different tokens, got ids "
                    f"{first}")
  k = 0
  while f"[S_{k}]" in vocab:
    first.append(int(vocab[f"[S_{k}]"]))
    k += 1
  skip = set(first) | {int(i) for name, i in vocab.items() if is_image_token(name)}
  return np.array(first + [i for i in range(size) if i not in skip], np.int64)


class HFTextTokenizer:
  """A `tokenizers` tokenizer.json with mmjax's text-id layout; the TextTokenizer interface."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      data = f.read()
    try:
      self._tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # noqa: BLE001 -- a broken file is the user's input
      raise UserError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None
    vocab = self._tok.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1
    self._order = text_order(vocab, size, where=path)
    self._local = np.full(size, special.UNK, np.int64)
    self._local[self._order] = np.arange(len(self._order))
    num_sentinels = sum(1 for k in range(len(vocab)) if f"[S_{k}]" in vocab)
    self.special = special.SpecialIds(num_sentinels=num_sentinels)
    self.fingerprint = hashlib.sha256(data).hexdigest()

  @classmethod
  def load(cls, path: str) -> "HFTextTokenizer":
    if not os.path.isfile(path):
      raise UserError(f"text tokenizer {path!r} does not exist (a Hugging Face tokenizer.json)")
    return cls(path)

  @property
  def vocab_size(self) -> int:
    return len(self._order)

  @property
  def hf_ids(self) -> np.ndarray:
    """The file's id of each mmjax text id."""
    return self._order.copy()

  def piece(self, token_id: int) -> str:
    return self._tok.id_to_token(int(self._order[int(token_id)]))

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
    return self.encode_batch([text], add_bos=add_bos, add_eos=add_eos)[0]

  def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False,
                   add_eos: bool = False) -> list[np.ndarray]:
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise UserError(f"text tokenizer: text {i} is a {type(text).__name__}, not a str")
    out = []
    for encoding in self._tok.encode_batch(list(texts), add_special_tokens=False):
      ids = list(self._local[np.asarray(encoding.ids, np.int64)])
      out.append(np.asarray(([special.BOS] if add_bos else []) + ids +
                            ([special.EOS] if add_eos else []), np.int32))
    return out

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids`; PAD, BOS and EOS decode to nothing."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      bad = ids[(ids < 0) | (ids >= self.vocab_size)][0]
      raise UserError(f"text tokenizer: id {int(bad)} outside the vocabulary "
                      f"[0, {self.vocab_size})")
    ids = ids[~np.isin(ids, (special.PAD, special.BOS, special.EOS))]
    return self._tok.decode(self._order[ids].tolist(), skip_special_tokens=False)

  def decode_batch(self, batch: Iterable[Sequence[int] | np.ndarray]) -> list[str]:
    return [self.decode(ids) for ids in batch]
