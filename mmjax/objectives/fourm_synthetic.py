"""Random but valid 4M batches (data/fourm_batch.py layout), for benchmarks and tests.

`synthetic_batch` fills the slots with no masking logic at all; `masked_batch` runs random records
through the training masking (the config's Dirichlet mixture, clamps, span masking, teacher
forcing), so its valid-token counts follow the budget statistics of training and of the reference.

`synthetic_batch`, per sample: Dirichlet-split input and target budgets over the modalities; image modalities draw a
random permutation of their grid (inputs first, then disjoint targets); sequences get random ids with
teacher-forced targets (decoder input = target[:-1], label = target[1:]). Slots are grouped by
modality in id order, valid ones first, as the masking pipeline produces them.
"""

from __future__ import annotations

import numpy as np

from mmjax.data.fourm import batch as fourm_batch
from mmjax.data.fourm.transform import FourMTransform
from mmjax.modalities import IMAGE_PIXELS, Registry

# Text length of `masked_batch`'s random captions and boxes. The reference's benchmark batch of 16
# (4M-7 mixture, 128/128 slots) carried 1,258 valid targets; 8-token texts under the same masking
# give 1,262 per 16 on average (40 batches; a batch's own count varies by about +-160, which
# `bench step --valid-targets` pins down).
REFERENCE_TEXT_TOKENS = 8


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


def random_records(registry: Registry, count: int, text_tokens: int, rng: np.random.Generator,
                   first_free: int = 0) -> list[dict[str, np.ndarray]]:
  """`count` records of random content: ids over each vocabulary (text ids from `first_free`, past
  the reserved ones), `text_tokens` ids per sequence (cut to its max_length), random pixels."""
  records = []
  for _ in range(count):
    record = {}
    for m in registry:
      if m.kind == IMAGE_PIXELS:
        record[m.name] = rng.integers(0, 256, (m.image_size, m.image_size, m.channels), np.uint8)
      elif m.is_image:
        record[m.name] = rng.integers(0, m.vocab_size, m.num_tokens)
      else:
        low = min(first_free, m.vocab_size - 1)
        record[m.name] = rng.integers(low, m.vocab_size, min(text_tokens, m.max_length - 1))
    records.append(record)
  return records


def masked_batch(transform: FourMTransform, batch_size: int, seed: int = 0,
                 text_tokens: int = REFERENCE_TEXT_TOKENS) -> dict[str, np.ndarray]:
  """A batch of random records through the training masking `transform`."""
  rng = np.random.default_rng(seed)
  records = random_records(transform.registry, batch_size, text_tokens, rng,
                           first_free=transform.special.num_reserved)
  batch, _ = transform(records, rng)
  return batch
