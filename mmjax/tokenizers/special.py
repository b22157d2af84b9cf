"""Reserved ids of the shared text vocabulary (specs/fourm.md, "Tokenizers and special tokens").

PAD 0, UNK 1, BOS 2, EOS 3, then the sentinels [S_0] .. [S_{K-1}] used by span masking, then the
tokenizer's learned pieces. The masking code and the text tokenizer both read them from here.
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

  def sentinel(self, k: int) -> int:
    """Id of [S_k]."""
    if not 0 <= k < self.num_sentinels:
      raise ValueError(f"sentinel index {k} outside [0, {self.num_sentinels})")
    return FIRST_SENTINEL + k

  def is_sentinel(self, token_id):
    """True where `token_id` (an int or a numpy array) is a sentinel."""
    return (token_id >= FIRST_SENTINEL) & (token_id < FIRST_SENTINEL + self.num_sentinels)

  @property
  def num_reserved(self) -> int:
    """Ids below this are reserved; learned pieces start here."""
    return FIRST_SENTINEL + self.num_sentinels
