"""Random but valid 4M batches (data/fourm_batch.py layout), for benchmarks and tests.

Per sample: Dirichlet-split input and target budgets over the modalities; image modalities draw a
random permutation of their grid (inputs first, then disjoint targets); sequences get random ids with
teacher-forced targets (decoder input = target[:-1], label = target[1:]). Slots are grouped by
modality in id order, valid ones first, as the masking pipeline produces them.
"""

from __future__ import annotations

import numpy as np

from mmjax.data.fourm import batch as fourm_batch
from mmjax.modalities import Registry


def _split(rng: np.random.Generator, total: int, caps: np.ndarray) -> np.ndarray:
  if caps.sum() == 0:
    return np.zeros_like(caps)
  share = rng.dirichlet(np.full(len(caps), 0.5)) * total
  return np.minimum(np.floor(share).astype(np.int64), caps)


def synthetic_batch(registry: Registry, batch_size: int, num_input: int, num_target: int,
                    seed: int = 0) -> dict[str, np.ndarray]:
  """A batch of `batch_size` random samples with `num_input` encoder and `num_target` decoder slots."""
  rng = np.random.default_rng(seed)
  pixels = [m for m in registry if m.kind == "image_pixels"]
  if len(pixels) > 1:
    raise ValueError(f"the 4M batch holds one image_pixels modality, got {[m.name for m in pixels]}")
  num_patches, patch_dim = (pixels[0].num_tokens, pixels[0].patch_dim) if pixels else (0, 0)
  out = fourm_batch.empty(batch_size, num_input, num_target, num_patches, patch_dim)
  if pixels:
    out["enc_pixels"][...] = rng.standard_normal(out["enc_pixels"].shape, dtype=np.float32)
  mods = list(registry)
  in_caps = np.array([m.num_tokens for m in mods])
  for b in range(batch_size):
    n_in = _split(rng, num_input, in_caps)
    # Sequences need one token more than their target slots (teacher forcing).
    tgt_caps = np.array([0 if not m.can_be_target else
                         (m.num_tokens - n_in[i] if m.is_image else m.num_tokens - 1)
                         for i, m in enumerate(mods)])
    n_tgt = _split(rng, num_target, tgt_caps)
    e = t = 0
    for i, m in enumerate(mods):
      if m.is_image:
        perm = rng.permutation(m.num_tokens)
        in_pos, tgt_pos = perm[:n_in[i]], perm[n_in[i]:n_in[i] + n_tgt[i]]
        in_ids = in_pos if m.kind == "image_pixels" else rng.integers(0, m.vocab_size, n_in[i])
        tgt_in = np.zeros(n_tgt[i], np.int64)
        tgt_ids = rng.integers(0, max(m.vocab_size, 1), n_tgt[i])
      else:
        in_pos, in_ids = np.arange(n_in[i]), rng.integers(0, m.vocab_size, n_in[i])
        seq = rng.integers(0, m.vocab_size, n_tgt[i] + 1)
        tgt_pos, tgt_in, tgt_ids = np.arange(n_tgt[i]), seq[:-1], seq[1:]
      k = n_in[i]
      out["enc_tokens"][b, e:e + k] = in_ids
      out["enc_modality"][b, e:e + k] = i
      out["enc_positions"][b, e:e + k] = in_pos
      out["enc_valid"][b, e:e + k] = True
      e += k
      k = n_tgt[i]
      out["dec_tokens"][b, t:t + k] = tgt_in
      out["dec_modality"][b, t:t + k] = i
      out["dec_positions"][b, t:t + k] = tgt_pos
      out["dec_valid"][b, t:t + k] = True
      out["dec_targets"][b, t:t + k] = tgt_ids
      out["dec_loss_mask"][b, t:t + k] = True
      t += k
  return out
