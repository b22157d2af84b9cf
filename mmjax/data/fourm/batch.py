"""The 4M batch: the fixed-shape arrays the host's masking produces and the model consumes.

All variable-length decisions (token budgets, span masking, padding) are made on the host; the
device sees only these arrays, with static shapes. B = batch, N = encoder slots, M = decoder slots,
P = raw-pixel patches of the `image_pixels` modality (0 without one), C = values per patch.

Encoder slots (valid tokens of all modalities first, in modality-id order, then padding):
  enc_tokens    int32 [B, N]   token id; for an `image_pixels` slot, the patch index into enc_pixels
  enc_modality  int32 [B, N]   modality id (registry order); padding slots hold 0
  enc_positions int32 [B, N]   grid cell (row-major) for images, token index for sequences
  enc_valid     bool  [B, N]   False for padding
  enc_pixels    float32 [B, P, C]  normalised patches of the image_pixels modality, flattened in
                               (patch_row, patch_col, channel) order; P = 0 when there is none

Decoder slots (target tokens of all modalities first, in modality-id order, then padding):
  dec_tokens    int32 [B, M]   decoder input id: for sequences the previous target token
                               (teacher forcing); for images unused (the model uses its mask token)
  dec_modality  int32 [B, M]   modality id
  dec_positions int32 [B, M]   grid cell for images; position in the target part for sequences
  dec_valid     bool  [B, M]   slot holds a decoder query (False for padding)
  dec_targets   int32 [B, M]   label to predict at this slot
  dec_loss_mask bool  [B, M]   slot contributes to the loss (a subset of dec_valid)

Decoder self-attention is derived on device from these fields and the registry: a query attends to a
valid key of its own modality, bidirectionally for image modalities and causally (key slot <= query
slot) for sequence modalities; never across modalities. Because slots are grouped by modality in id
order, each modality's slots are contiguous, which lets the model run each output head on its own
slots only.
"""

from __future__ import annotations

import numpy as np

# name -> (dtype, shape in terms of B, N, M, P, C)
FIELDS = {
    "enc_tokens": (np.int32, ("B", "N")),
    "enc_modality": (np.int32, ("B", "N")),
    "enc_positions": (np.int32, ("B", "N")),
    "enc_valid": (np.bool_, ("B", "N")),
    "enc_pixels": (np.float32, ("B", "P", "C")),
    "dec_tokens": (np.int32, ("B", "M")),
    "dec_modality": (np.int32, ("B", "M")),
    "dec_positions": (np.int32, ("B", "M")),
    "dec_valid": (np.bool_, ("B", "M")),
    "dec_targets": (np.int32, ("B", "M")),
    "dec_loss_mask": (np.bool_, ("B", "M")),
}


def shapes(batch: int, num_input: int, num_target: int, num_patches: int = 0,
           patch_dim: int = 0) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
  """The dtype and shape of every field for the given sizes."""
  sizes = dict(B=batch, N=num_input, M=num_target, P=num_patches, C=patch_dim)
  return {name: (np.dtype(dtype), tuple(sizes[d] for d in dims))
          for name, (dtype, dims) in FIELDS.items()}


def empty(batch: int, num_input: int, num_target: int, num_patches: int = 0,
          patch_dim: int = 0) -> dict[str, np.ndarray]:
  """An all-padding batch (every slot invalid), to fill in place."""
  return {name: np.zeros(shape, dtype)
          for name, (dtype, shape) in shapes(batch, num_input, num_target, num_patches,
                                             patch_dim).items()}
