"""Reserved ids of the shared text vocabulary (specs/fourm.md, "Tokenizers and special tokens").

PAD 0, UNK 1, BOS 2, EOS 3, then the sentinels [S_0] .. [S_{K-1}] used by span masking, then (when
configured) the coordinate tokens v0=0 .. v0=B-1, v1=.., v2=.., v3=.. of boxes as text, then the class
names as single tokens, then the tokenizer's byte-fallback and learned pieces. The masking code and the
text tokenizer both read them from here.
"""

from __future__ import annotations

import dataclasses

PAD = 0
UNK = 1
BOS = 2
EOS = 3
FIRST_SENTINEL = 4


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """The reserved ids of a vocabulary with `num_sentinels` sentinels."""
  num_sentinels: int = 100
  pad: int = PAD
  unk: int = UNK
  bos: int = BOS
  eos: int = EOS
  coord_bins: int = 0                 # B: bins per box coordinate; 0 = no coordinate tokens
  class_names: tuple[str, ...] = ()   # single-token class names, in id order

  def sentinel(self, k: int) -> int:
    """Id of [S_k]."""
    if not 0 <= k < self.num_sentinels:
      raise ValueError(f"sentinel index {k} outside [0, {self.num_sentinels})")
    return FIRST_SENTINEL + k

  def is_sentinel(self, token_id):
    """True where `token_id` (an int or a numpy array) is a sentinel."""
    return (token_id >= FIRST_SENTINEL) & (token_id < FIRST_SENTINEL + self.num_sentinels)

  @property
  def first_coord(self) -> int:
    """Id of v0=0; coordinate j (0..3) of bin b is first_coord + j * coord_bins + b."""
    return FIRST_SENTINEL + self.num_sentinels

  def coord(self, j: int, b: int) -> int:
    """Id of the token `v{j}={b}`."""
    if not (0 <= j < 4 and 0 <= b < self.coord_bins):
      raise ValueError(f"coordinate token v{j}={b} outside v0..v3 x [0, {self.coord_bins})")
    return self.first_coord + j * self.coord_bins + b

  @property
  def first_class(self) -> int:
    """Id of the first class name."""
    return self.first_coord + 4 * self.coord_bins

  def class_id(self, name: str) -> int:
    """Id of the class name token `name`."""
    if name not in self.class_names:
      raise ValueError(f"class {name!r} is not one of the {len(self.class_names)} class names")
    return self.first_class + self.class_names.index(name)

  @property
  def num_reserved(self) -> int:
    """Ids below this are reserved at fixed positions; the tokenizer's own pieces start here."""
    return self.first_class + len(self.class_names)
