"""The mixed-modal sequence batch: packed, fixed-length token streams for decoder-only models.

B = batch, L = sequence length. One shared vocabulary: text ids first, then each image modality's
codes at an offset, then special tokens (begin/end of each image modality); `documents`
owns that layout. Per token (specs/mixed_modal.md, "One data model"):

  tokens       int32   [B, L]  input token id
  targets      int32   [B, L]  the next token of the same document (the label at this slot)
  modality     int32   [B, L]  modality id of the input token (registry order; specials count as
                               the modality they wrap)
  segment      int32   [B, L]  document id inside the pack, 1, 2, ...; 0 for padding
  block        int32   [B, L]  bidirectional group (e.g. one image), unique in the pack; 0 = causal
  position     int32   [B, L]  position inside the document, from 0
  loss_weight  float32 [B, L]  weight of this slot's loss (0 for padding and unlearned slots)

The attention mask is `(causal OR same_block) AND same_segment AND valid` with
`valid = segment > 0`, so pure causal decoding, bidirectional images and packing are one code path.
"""

from __future__ import annotations

import numpy as np

FIELDS = {
    "tokens": np.int32,
    "targets": np.int32,
    "modality": np.int32,
    "segment": np.int32,
    "block": np.int32,
    "position": np.int32,
    "loss_weight": np.float32,
}


def empty(batch: int, length: int) -> dict[str, np.ndarray]:
  """An all-padding batch (segment 0 everywhere), to fill in place."""
  return {name: np.zeros((batch, length), dtype) for name, dtype in FIELDS.items()}
