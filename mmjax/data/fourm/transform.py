"""Records -> the 4M batch (`mmjax.data.fourm.batch`), many records at once with numpy.

A record is a dict keyed by modality name: for an `image_tokens` modality an int array of
grid_h*grid_w ids (any int dtype, [G] or [grid_h, grid_w]); for a `sequence` modality a 1-D int array
without EOS (appended here, then truncated to max_length); for an `image_pixels` modality an uint8
image [H, W, 3]. A modality a dataset declares optional may be absent (key missing or None): it is then
empty for that record. Anything else wrong (a required modality absent, a wrong length or dtype, an id
outside [0, vocab_size)) is a bad record: an error naming the record and field, or, with
`bad_records="skip"`, the row becomes padding (every slot invalid) and is flagged in bad_B [B].
A record the reader could not parse arrives as {BAD_RECORD: message} and is bad the same way.

Per batch: a mixture component per sample, input budgets over N and target budgets over M
(`masking.dirichlet_budgets`), disjoint random input/target cells for images, span masking for
sequences, then every modality's candidates concatenated in modality-id order and the valid ones moved
to the front (stable), so the encoder's N slots and the decoder's M slots come out laid out.

Decoder slots of a sequence whose (cut) target is t_0 .. t_{T-1}: T slots, slot j holding the input
t_j (`dec_tokens`) and the label t_{j+1} (`dec_targets`), position j; the last slot has no label
(`dec_loss_mask` False), as in the reference (decoder input = target[:-1], labels = target[1:]).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmjax.config import ConfigError
from mmjax.data.fourm import batch as fourm_batch
from mmjax.data.fourm import masking
from mmjax.data.fourm.mixtures import Mixture
from mmjax.data.record_keys import BAD_RECORD
from mmjax.errors import UserError
from mmjax.modalities import IMAGE_PIXELS, IMAGE_TOKENS, SEQUENCE, Modality, Registry
from mmjax.tokenizers import special

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
BAD_RECORD_MODES = ("error", "skip")


class BadRecord(UserError):
  """A record that cannot be used; the message names the record and the field."""


def patchify(images_BHWC: np.ndarray, patch: int) -> np.ndarray:
  """uint8 images -> ImageNet-normalised patches [B, P, patch*patch*C] in row-major patch order,
  each flattened in (patch_row, patch_col, channel) order."""
  B, H, W, C = images_BHWC.shape
  x = images_BHWC.reshape(B, H // patch, patch, W // patch, patch, C).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(B, (H // patch) * (W // patch), patch * patch * C).astype(np.float32)
  # (x / 255 - mean) / std as one multiply and one add, in place: this is memory-bound.
  x *= np.tile(1.0 / (255.0 * IMAGENET_STD[:C]), patch * patch).astype(np.float32)
  x += np.tile(-IMAGENET_MEAN[:C] / IMAGENET_STD[:C], patch * patch).astype(np.float32)
  return x


_DTYPE, _NDIM, _SIZE = (operator.attrgetter(a) for a in ("dtype", "ndim", "size"))


def _all_int_arrays(values: Sequence[Any], size: int | None) -> bool:
  """True if every value is an integer numpy array (1-D for sequences, `size` elements for
  images): the common case, checked before taking the fast path (each check one C-level pass)."""
  if not values:
    return True
  if set(map(type, values)) != {np.ndarray}:
    return False
  if not all(d.kind in "iu" for d in set(map(_DTYPE, values))):
    return False
  return set(map(_NDIM, values)) == {1} if size is None else set(map(_SIZE, values)) == {size}


def _field(records: Sequence[Mapping[str, Any]], name: str) -> list[Any]:
  """Every record's value of `name` (None where absent)."""
  return [r.get(name) for r in records]


def _out_of_vocab(ids: np.ndarray, vocab_size: int) -> bool:
  """Whether any id lies outside [0, vocab_size): a max (and a min for signed ids), no mask."""
  if not ids.size:
    return False
  return bool(ids.max() >= vocab_size or (ids.dtype.kind == "i" and ids.min() < 0))


class _InBatch:
  """Labels of records by their place in the batch, made when an error message needs one."""

  def __getitem__(self, b: int) -> str:
    return f"{b} of the batch"


class FourMTransform:
  """Callable `(records, rng) -> (batch, bad_B)`: the 4M masking of a batch of records.

  `optional[d]` names the modalities dataset d may lack; `dataset_B` (per record, default 0) says
  which dataset each record comes from; `where_B` labels records in error messages.
  """

  def __init__(self, registry: Registry, mixture: Mixture, num_input: int, num_target: int, *,
               num_sentinels: int = 100, bad_records: str = "error",
               optional: Sequence[Sequence[str]] = ((),)):
    if bad_records not in BAD_RECORD_MODES:
      raise ConfigError(f"data.bad_records must be one of {BAD_RECORD_MODES}, got {bad_records!r}")
    pixels = [m for m in registry if m.kind == IMAGE_PIXELS]
    if len(pixels) > 1:
      raise ConfigError(f"the 4M batch holds one image_pixels modality, got "
                        f"{[m.name for m in pixels]}")
    self.registry = registry
    self.mixture = mixture
    self.num_input, self.num_target = int(num_input), int(num_target)
    self.bad_records = bad_records
    self.optional = tuple(frozenset(registry[n].name for n in names) for names in optional)
    self.special = special.SpecialIds(num_sentinels=num_sentinels)
    self.sentinel0 = self.special.sentinel(0)
    for m in registry:
      if m.is_sequence:
        needed = (m.max_length + 1) // 2 + 2  # [S_0] .. [S_{runs+1}]
        if needed > num_sentinels:
          raise ConfigError(f"modality {m.name}: max_length {m.max_length} can need {needed} "
                            f"sentinels; masking.num_sentinels is {num_sentinels}")
        if self.special.num_reserved > m.vocab_size:
          raise ConfigError(f"modality {m.name}: vocab_size {m.vocab_size} has no room for the "
                            f"{self.special.num_reserved} reserved ids")
    self.pixel = pixels[0] if pixels else None
    self.num_tokens = np.array([m.num_tokens for m in registry], np.int64)
    self.is_image = np.array([m.is_image for m in registry])
    self.can_target = np.array([m.can_be_target for m in registry])
    self.cum_weights = np.cumsum(mixture.weights)  # rng.choice's law and draw, without its checks
    self.cum_weights /= self.cum_weights[-1]

  # -------------------------------------------------------------------------------------------
  # Gathering and validation.

  def _bad(self, where: str, name: str, what: str, bad_B: np.ndarray, b: int) -> None:
    if self.bad_records == "error":
      raise BadRecord(f"bad record {where}: field {name!r}: {what}")
    bad_B[b] = True

  def _absent(self, value: Any, m: Modality, b: int, dataset_B: np.ndarray, where: Sequence[str],
              bad_B: np.ndarray) -> bool:
    """True if the value is absent; a bad record unless the record's dataset allows it."""
    if value is not None:
      return False
    if m.name not in self.optional[dataset_B[b]]:
      self._bad(where[b], m.name, "missing (not declared optional for its dataset)", bad_B, b)
    return True

  def _gather_image(self, m: Modality, records, dataset_B, where, bad_B, present_B):
    B, G = len(records), m.num_tokens
    values = _field(records, m.name)
    out = None
    if _all_int_arrays(values, G):  # fast path: every record well formed
      out = np.concatenate(values, axis=None)
    if out is None:
      out = np.zeros((B, G), np.int64)
      for b, v in enumerate(values):
        if self._absent(v, m, b, dataset_B, where, bad_B):
          present_B[b] = False
          continue
        a = np.asarray(v)
        if a.dtype.kind not in "iu":
          self._bad(where[b], m.name, f"dtype {a.dtype} is not an integer type", bad_B, b)
        elif a.size != G:
          self._bad(where[b], m.name, f"has {a.size} tokens, expected {G} ({m.grid[0]}x"
                    f"{m.grid[1]})", bad_B, b)
        else:
          out[b] = a.reshape(-1)
    out = out.reshape(B, G)
    if _out_of_vocab(out, m.vocab_size):
      self._check_vocab(m, out, np.arange(B), where, bad_B, present_B)
    return out.astype(np.int32)

  def _check_vocab(self, m, ids, rows, where, bad_B, present_B):
    wrong = (ids >= m.vocab_size) | (ids < 0)
    if wrong.any():
      flat = wrong.reshape(len(ids), -1) if ids.ndim > 1 else wrong
      for i in np.flatnonzero(flat.any(axis=-1) if ids.ndim > 1 else flat):
        b = int(rows[i])
        if not present_B[b] or bad_B[b]:
          continue
        bad_id = int(ids[i][flat[i]][0]) if ids.ndim > 1 else int(ids[i])
        self._bad(where[b], m.name, f"id {bad_id} outside [0, {m.vocab_size})", bad_B, b)

  def _gather_sequence(self, m, records, dataset_B, where, bad_B, present_B):
    B, L = len(records), m.max_length
    values = _field(records, m.name)
    if not _all_int_arrays(values, None):  # slow path: say what is wrong with which record
      for b, v in enumerate(values):
        if self._absent(v, m, b, dataset_B, where, bad_B):
          present_B[b] = False
          values[b] = np.zeros(0, np.int64)
          continue
        a = np.asarray(v)
        if a.ndim != 1 or (a.dtype.kind not in "iu" and a.size):
          self._bad(where[b], m.name, f"expected a 1-D integer array, got shape {a.shape} dtype "
                    f"{a.dtype}", bad_B, b)
          a = np.zeros(0, np.int64)
        values[b] = a
    lens = np.fromiter(map(len, values), np.int64, len(values))
    # Work at the batch's longest sequence (+ EOS), not max_length: text is usually much shorter.
    L = int(min(L, max(1, lens.max(initial=0) + 1)))
    flat = np.concatenate(values) if lens.sum() else np.zeros(0, np.int64)
    if _out_of_vocab(flat, m.vocab_size):
      rows = np.repeat(np.arange(B), lens)
      wrong = (flat >= m.vocab_size) | (flat < 0)
      self._check_vocab(m, flat[wrong], rows[wrong], where, bad_B, present_B)
    # Token t of row b goes to flat slot b * L + t: one scatter (truncated rows: their first L).
    dest = np.arange(len(flat)) + np.repeat(np.arange(B) * L - (np.cumsum(lens) - lens), lens)
    out = np.zeros((B, L), np.int32)
    if lens.max(initial=0) >= L:
      fits = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens) < L
      dest, flat = dest[fits], flat[fits]
    out.reshape(-1)[dest] = flat
    with_eos = present_B & (lens < L)
    out[np.flatnonzero(with_eos), lens[with_eos]] = self.special.eos
    length = np.where(present_B, np.minimum(lens + 1, L), 0)
    return out, length

  def _gather_pixels(self, m, records, dataset_B, where, bad_B, present_B):
    B, S = len(records), m.image_size
    images = np.zeros((B, S, S, m.channels), np.uint8)
    for b, r in enumerate(records):
      v = r.get(m.name)
      if self._absent(v, m, b, dataset_B, where, bad_B):
        present_B[b] = False
        continue
      a = np.asarray(v)
      if a.shape != images.shape[1:] or a.dtype != np.uint8:
        self._bad(where[b], m.name, f"expected uint8 {images.shape[1:]}, got {a.dtype} "
                  f"{a.shape}", bad_B, b)
        continue
      images[b] = a
    return patchify(images, m.patch_size)

  # -------------------------------------------------------------------------------------------

  def __call__(self, records: Sequence[Mapping[str, Any]], rng: np.random.Generator, *,
               dataset_B: Sequence[int] | None = None,
               where_B: Sequence[str] | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    B, K = len(records), len(self.registry)
    dataset_B = np.zeros(B, np.int64) if dataset_B is None else np.asarray(dataset_B)
    where = _InBatch() if where_B is None else where_B  # read only for error messages
    bad_B = np.zeros(B, bool)
    for b, record in enumerate(records):  # unreadable from its bytes: the reader named it
      if BAD_RECORD in record:
        if self.bad_records == "error":
          raise BadRecord(f"bad record {record[BAD_RECORD]}")
        bad_B[b] = True
    present_BK = np.ones((B, K), bool)
    data = []
    for k, m in enumerate(self.registry):
      gather = {IMAGE_TOKENS: self._gather_image, SEQUENCE: self._gather_sequence,
                IMAGE_PIXELS: self._gather_pixels}[m.kind]
      data.append(gather(m, records, dataset_B, where, bad_B, present_BK[:, k]))
    present_BK &= ~bad_B[:, None]  # a skipped record becomes an all-padding row

    mix = self.mixture
    comp_B = np.minimum(np.searchsorted(self.cum_weights, rng.random(B), side="right"),
                        len(mix.weights) - 1)  # a component per sample, by weight
    cap_in = self.num_tokens[None, :] * present_BK
    in_BK = masking.dirichlet_budgets(rng, mix.input_alpha[comp_B] * present_BK, self.num_input,
                                      cap_in)
    cap_tgt = np.where(self.is_image[None, :], cap_in - in_BK, cap_in) * self.can_target[None, :]
    tgt_BK = masking.dirichlet_budgets(rng, mix.target_alpha[comp_B] * present_BK,
                                       self.num_target, cap_tgt)

    enc, dec = [], []
    for k, m in enumerate(self.registry):
      if m.is_image:
        is_in, is_tgt = masking.image_selection(rng, in_BK[:, k], tgt_BK[:, k], m.num_tokens)
        pixel = m.kind == IMAGE_PIXELS  # a pixel slot's id is its patch index = its position
        # Cells selected per row = the budgets (clamped to the grid: inputs + targets <= G).
        enc.append(_Part(k, is_in, {"tokens": None if pixel else data[k]}, in_BK[:, k]))
        if m.can_be_target:  # decoder input unused for images (the mask token); loss = valid
          dec.append(_Part(k, is_tgt, {"targets": data[k], "loss_mask": True}, tgt_BK[:, k]))
      else:
        tokens, length = data[k]
        keep_prob = masking.keep_probabilities(rng, mix.keep[comp_B, k])
        spans = masking.span_mask(rng, tokens, length, in_BK[:, k], tgt_BK[:, k], keep_prob,
                                  self.sentinel0)
        enc.append(_Part(k, spans.input_len_B, {"tokens": spans.input_BI}))
        dec.append(_Part(k, spans.target_len_B, {"tokens": spans.target_BT,
                                                 "targets": _NEXT, "loss_mask": _NEXT}))

    P, C = (self.pixel.num_tokens, self.pixel.patch_dim) if self.pixel else (0, 0)
    batch = fourm_batch.empty(B, self.num_input, self.num_target, P, C)
    if self.pixel is not None:
      batch["enc_pixels"] = data[self.registry.index(self.pixel.name)]
    _pack(batch, "enc", enc, self.num_input)
    _pack(batch, "dec", dec, self.num_target)
    return batch, bad_B


_NEXT = "next"  # a sequence's decoder label: the next target token (teacher forcing)


@dataclasses.dataclass
class _Part:
  """One modality's candidate slots [B, W]: `valid` is a mask, or lengths [B] for a left-aligned
  prefix (sequences); `fields` maps an output field to a [B, W] array of values, True (constant),
  None (the position itself) or _NEXT (the `tokens` value one slot later, within the length; for
  `loss_mask`: True where that slot exists). `count` [B], if known, is the valid slots per row."""
  modality: int
  valid: np.ndarray
  fields: dict[str, Any]
  count: np.ndarray | None = None


def _pack(batch: dict[str, np.ndarray], prefix: str, parts: Sequence[_Part], width: int) -> None:
  """Writes the modalities' valid candidates into `batch[prefix_*]` [B, width] in place: modality
  by modality in part order, each in column order, from slot 0 on (the rest stays padding).

  Per part, its valid entries are listed once as (row, column) pairs; a candidate's slot is the
  row's count of valid slots of earlier parts plus its rank within the part (its column for a
  prefix). Every field is then one gather and one scatter, with no concatenation of parts.
  """
  if not parts:
    return
  B = len(parts[0].valid)
  counts = np.stack([p.valid if p.valid.ndim == 1 else
                     p.count if p.count is not None else np.count_nonzero(p.valid, axis=1)
                     for p in parts], axis=1).astype(np.int64)
  offsets = np.cumsum(counts, axis=1) - counts
  out = {name: batch[f"{prefix}_{name}"].reshape(-1)
         for name in ("valid", "modality", "positions", "tokens", "targets", "loss_mask")
         if f"{prefix}_{name}" in batch}
  for j, part in enumerate(parts):
    count = counts[:, j]
    total = int(count.sum())
    if not total:
      continue
    row = np.repeat(np.arange(B), count)
    rank = np.arange(total) - np.repeat(np.cumsum(count) - count, count)
    if part.valid.ndim == 1:
      src = None  # a prefix: the column is the rank
      col = rank
    else:
      src = np.flatnonzero(part.valid)
      col = src - row * part.valid.shape[1]
    slot = rank + offsets[row, j]
    if (offsets[:, j] + count > width).any():  # budgets make this impossible; cut if it happens
      fit = slot < width
      row, col, slot = row[fit], col[fit], slot[fit]
      src = None if src is None else src[fit]
    dest = row * width + slot
    out["valid"][dest] = True
    out["modality"][dest] = part.modality
    out["positions"][dest] = col
    for name, value in part.fields.items():
      if value is None:
        out[name][dest] = col
      elif value is True:
        out[name][dest] = True
      elif value is _NEXT:
        has_next = col + 1 < part.valid[row]
        if name == "loss_mask":
          out[name][dest] = has_next
        else:
          tokens = np.ascontiguousarray(part.fields["tokens"])
          at = row * tokens.shape[1] + np.minimum(col + 1, tokens.shape[1] - 1)
          out[name][dest] = np.where(has_next, tokens.reshape(-1)[at], 0)
      else:
        value = np.ascontiguousarray(value)
        at = src if src is not None and value.shape == part.valid.shape else (
            row * value.shape[1] + col)
        out[name][dest] = value.reshape(-1)[at]
