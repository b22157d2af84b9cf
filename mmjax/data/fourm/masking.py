"""4M token-budget sampling and masking, vectorised over a batch (specs/fourm.md, "Token-budget
sampling and masking"). Pure numpy; every random draw comes from the `np.random.Generator` passed in,
in a fixed order, so a batch is a pure function of (records, generator state).

Shapes: B = batch, K = modalities, G = grid cells of one image modality, L = padded length of one
sequence modality (EOS included), I = input width, T = target width.

Sentinels follow the reference (`simple_span_masking` of apple/ml-4m): the first dropped span of a
sequence is replaced by [S_1], the next by [S_2], ..., and the target ends with [S_{spans+1}]; [S_0]
is never used. With `mmjax.tokenizers.special` ids, [S_k] = FIRST_SENTINEL + k, so the first span
gets id 5.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

KEEP_RANDOM, KEEP_ALL, KEEP_BINARY = 0, 1, 2
KEEP_SCHEMES = {"random": KEEP_RANDOM, "all": KEEP_ALL, "binary": KEEP_BINARY}
KEEP_DECAY = 0.9       # keep probability factor per retry while the input is over budget
_RETRIES_PER_DRAW = 8  # over-budget rows draw this many retries at once (same law as one by one)


# ---------------------------------------------------------------------------------------------
# Random bits in bulk.


def _raw_u32(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  """Uniform 32-bit words of the given shape, two per 64-bit output of `rng`'s bit generator:
  about 3x cheaper than `rng.random` for masks that only compare against a probability."""
  n = math.prod(shape)
  return rng.bit_generator.random_raw((n + 1) // 2).view(np.uint32)[:n].reshape(shape)


def _thresholds(p: np.ndarray) -> np.ndarray:
  """uint32 t with P(u < t) = floor(p * 2^32) / 2^32 for a uniform 32-bit word u: p to within
  2^-32, except p >= 1, which the caller handles (t saturates at 2^32 - 1)."""
  return np.minimum(np.floor(np.asarray(p, np.float64) * 2.0**32), 2.0**32 - 1).astype(np.uint32)


def _bernoulli_rows(rng: np.random.Generator, p_B: np.ndarray, width: int) -> np.ndarray:
  """[B, width] bools, each True with its row's probability p_B[b]."""
  out = _raw_u32(rng, (len(p_B), width)) < _thresholds(p_B)[:, None]
  full = p_B >= 1
  if full.any():
    out |= full[:, None]
  return out


# ---------------------------------------------------------------------------------------------
# Dirichlet budgets.

_MAX_ALPHA_GROUPS = 32  # more distinct alphas than this: one array-shaped gamma call instead


def _log_gamma(rng: np.random.Generator, alpha: np.ndarray) -> np.ndarray:
  """log of Gamma(alpha, 1) draws, exact for tiny alpha; -inf where alpha == 0.

  alpha < 1 uses Gamma(a) = Gamma(a + 1) * U^(1/a) in log form, which never underflows (a 0 would
  tie in an argmax), so alpha = 0.01 behaves. Mixture alphas take few distinct values: each gets one
  scalar-shape call over its entries (about half the cost per draw of an array of shapes), and
  alpha = 0 entries draw nothing.
  """
  alpha = np.asarray(alpha, np.float64)
  out = np.full(alpha.shape, -np.inf)
  flat_out, flat_alpha = out.reshape(-1), alpha.reshape(-1)
  values = np.unique(flat_alpha)
  if len(values) > _MAX_ALPHA_GROUPS:
    at = np.flatnonzero(flat_alpha > 0)
    a = flat_alpha[at]
    flat_out[at] = np.log(rng.standard_gamma(a + 1.0)) + np.log(rng.random(len(at))) / a
    return out
  for a in values.tolist():
    if a <= 0:
      continue
    at = np.flatnonzero(flat_alpha == a)
    if a == 0.5:  # Gamma(1/2) = Z^2 / 2 for a standard normal Z: one cheap draw, one log
      flat_out[at] = 2.0 * np.log(np.abs(rng.standard_normal(len(at)))) - np.log(2.0)
    elif a >= 1:
      flat_out[at] = np.log(rng.standard_gamma(a, len(at)))
    else:
      flat_out[at] = np.log(rng.standard_gamma(a + 1.0, len(at))) + np.log(rng.random(len(at))) / a
  return out


def dirichlet_budgets(rng: np.random.Generator, alpha_BK: np.ndarray, total: int,
                      cap_BK: np.ndarray) -> np.ndarray:
  """Token budgets [B, K] summing to `total` (before clamping) as 4M draws them.

  floor(Dir(alpha) * total), then each remaining token goes to the argmax of a further Dirichlet
  draw (so alpha = 0 modalities get nothing), then a clamp to `cap_BK` (excess not redistributed).
  Rows whose alphas are all 0 get nothing. Only the further draws a row needs are made (a row with
  one non-zero alpha needs none).
  """
  alpha_BK = np.asarray(alpha_BK, np.float64)
  B, K = alpha_BK.shape
  log_g = _log_gamma(rng, alpha_BK)
  top = log_g.max(axis=1, keepdims=True)
  alive = np.isfinite(top)
  w = np.exp(log_g - np.where(alive, top, 0.0))
  p = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-300)
  budget = np.floor(p * total).astype(np.int64)
  diff = np.minimum(np.maximum(np.where(alive[:, 0], total - budget.sum(axis=1), 0), 0), K)
  # Remainder: diff[b] further draws for row b; each one's argmax gets a token.
  draw_row = np.repeat(np.arange(B), diff)
  if len(draw_row):
    alpha = alpha_BK[draw_row]
    positive = alpha > 0
    # Equal non-zero alphas (all->all): the argmax of iid gammas is a uniform pick among them.
    same = alpha.max(axis=1) == np.where(positive, alpha, np.inf).min(axis=1)
    winner = np.empty(len(draw_row), np.int64)
    if same.any():
      pos = positive[same]
      j = np.floor(rng.random(len(pos)) * pos.sum(axis=1)).astype(np.int64)
      winner[same] = (np.cumsum(pos, axis=1) > j[:, None]).argmax(axis=1)  # the j-th non-zero
    if not same.all():
      winner[~same] = _log_gamma(rng, alpha[~same]).argmax(axis=1)
    budget += np.bincount(draw_row * K + winner, minlength=B * K).reshape(B, K)
  return np.minimum(budget, np.asarray(cap_BK, np.int64))


# ---------------------------------------------------------------------------------------------
# Image modalities.


def image_selection(rng: np.random.Generator, input_B: np.ndarray, target_B: np.ndarray,
                    num_cells: int) -> tuple[np.ndarray, np.ndarray]:
  """Disjoint input / target cells [B, G]: a random permutation per row; the cells it ranks first
  (input_B[b] of them) are inputs, the next target_B[b] targets.

  The permutation sorts random 64-bit keys whose low bits hold the cell index (one sort of integers,
  no argsort; ties of the random high bits have probability ~G^2 / 2^(64 - bits)). The inverse of a
  uniform permutation is uniform, so the sorted cell indices serve directly as the cells' ranks.
  """
  B = len(input_B)
  bits = max(1, (num_cells - 1).bit_length())
  low = np.uint64((1 << bits) - 1)
  keys = rng.bit_generator.random_raw((B, num_cells)) & ~low
  keys |= np.arange(num_cells, dtype=np.uint64)
  keys.sort(axis=1)
  rank = (keys & low).astype(np.int32)
  is_input = rank < np.asarray(input_B, np.int32)[:, None]
  is_target = ~is_input & (rank < np.asarray(input_B + target_B, np.int32)[:, None])
  return is_input, is_target


# ---------------------------------------------------------------------------------------------
# Sequence modalities: T5 span masking.


@dataclasses.dataclass
class SpanResult:
  """Masked sequences, left-aligned: input [B, I] with lengths, target [B, T] with lengths."""
  input_BI: np.ndarray
  input_len_B: np.ndarray
  target_BT: np.ndarray
  target_len_B: np.ndarray


def keep_probabilities(rng: np.random.Generator, scheme_B: np.ndarray) -> np.ndarray:
  """Initial keep probability per row: `random` U(0,1), `all` 1, `binary` 0 or 1."""
  u = rng.random(len(scheme_B))  # a row uses u or the coin, never both: one draw serves
  coin = (u < 0.5).astype(np.float64)
  return np.where(scheme_B == KEEP_RANDOM, u, np.where(scheme_B == KEEP_ALL, 1.0, coin))


def _input_lengths(keep: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Input length (kept tokens + one sentinel per dropped run) over the last axis.

  Valid is a prefix, so a valid position i emits (a token or a run's sentinel) iff i = 0, it is
  kept, or i - 1 is kept.
  """
  emits = keep.copy()
  emits[..., 1:] |= keep[..., :-1]
  emits[..., 0] = True
  emits &= valid
  return emits.view(np.uint8).sum(-1, dtype=np.int64)


def span_keep_masks(rng: np.random.Generator, valid_BL: np.ndarray, input_budget_B: np.ndarray,
                    keep_prob_B: np.ndarray) -> np.ndarray:
  """Which tokens stay in the input [B, L]: each kept with its row's keep probability; while a
  row's input (tokens + sentinels) exceeds its budget, the probability is multiplied by 0.9 and the
  mask redrawn. A row with input budget 0 drops everything (the whole sequence is the target)."""
  L = valid_BL.shape[1]
  has_input = input_budget_B > 0
  keep = _bernoulli_rows(rng, np.where(has_input, keep_prob_B, 0.0), L)
  over = np.flatnonzero((_input_lengths(keep, valid_BL) > input_budget_B) & has_input)
  prob = keep_prob_B[over].astype(np.float64)
  while len(over):
    R = _RETRIES_PER_DRAW
    factors = KEEP_DECAY ** np.arange(1, R + 1)
    probs_RO = factors[:, None] * prob[None, :]  # < 1: no saturated threshold
    trial = _raw_u32(rng, (R, len(over), L)) < _thresholds(probs_RO)[:, :, None]
    lengths = _input_lengths(trial, valid_BL[over][None])
    fits = lengths <= input_budget_B[over][None, :]
    done = fits.any(axis=0)
    first = fits.argmax(axis=0)
    rows = over[done]
    keep[rows] = trial[first[done], np.flatnonzero(done)]
    over, prob = over[~done], probs_RO[-1, ~done]
  return keep & valid_BL


def span_mask(rng: np.random.Generator, tokens_BL: np.ndarray, length_B: np.ndarray,
              input_budget_B: np.ndarray, target_budget_B: np.ndarray, keep_prob_B: np.ndarray,
              sentinel0: int) -> SpanResult:
  """T5-style span masking of a batch of sequences (EOS already appended, padded to L).

  Input: kept tokens with each maximal dropped run replaced by [S_k], k = 1, 2, ...; target:
  [S_1] run_1 [S_2] run_2 ... [S_{runs+1}]. `sentinel0` is the id of [S_0]. A target longer than its
  budget is cut to start at a sentinel as the reference does: a random sentinel other than the last
  if the rest from it fills the budget (then truncated to the budget), else the earliest sentinel
  from which the rest fits.
  """
  L = tokens_BL.shape[1]
  valid = np.arange(L)[None, :] < length_B[:, None]
  keep = span_keep_masks(rng, valid, input_budget_B, keep_prob_B)
  return spans_from_keep(tokens_BL, length_B, keep, input_budget_B, target_budget_B,
                         rng.random(len(length_B)), sentinel0)


def spans_from_keep(tokens_BL: np.ndarray, length_B: np.ndarray, keep_BL: np.ndarray,
                    input_budget_B: np.ndarray, target_budget_B: np.ndarray, cut_u_B: np.ndarray,
                    sentinel0: int) -> SpanResult:
  """The input and target of `span_mask` for a given keep mask; `cut_u_B` ~ U(0,1) picks the
  sentinel an over-budget target is cut at.

  Slots come from running counts: an emitting position i's input slot is (emits up to i) - 1; a
  dropped token's target slot (dropped + run starts up to i) - 1, its run's sentinel just before.
  Every position is scattered at once, those that emit nothing into a spare last column.
  """
  B, L = tokens_BL.shape
  valid = np.arange(L)[None, :] < length_B[:, None]
  has_input = input_budget_B > 0
  keep = keep_BL & valid & has_input[:, None]
  dropped = valid & ~keep
  starts = dropped.copy()
  starts[:, 1:] &= ~dropped[:, :-1]
  emits = keep | starts
  c_in = np.cumsum(emits.view(np.uint8), axis=1, dtype=np.int32)
  c_tg = np.cumsum(dropped.view(np.uint8) + starts.view(np.uint8), axis=1, dtype=np.int32)
  # In the valid prefix kept + dropped up to i = i + 1, so c_in + c_tg = i + 1 + 2 * (runs up to i).
  run_BL = (c_in + c_tg - np.arange(1, L + 1, dtype=np.int32)) >> 1
  sentinel_BL = sentinel0 + run_BL
  num_runs = np.where(length_B > 0, run_BL[np.arange(B), np.maximum(length_B, 1) - 1], 0)

  # Input: a kept token emits itself, a run start its sentinel (budget 0: no input at all).
  input_BI = np.zeros((B, L + 1), np.int32)
  dest = np.where(emits & has_input[:, None], c_in - 1, L)
  dest += (np.arange(B, dtype=np.int32) * (L + 1))[:, None]
  input_BI.reshape(-1)[dest.reshape(-1)] = np.where(keep, tokens_BL, sentinel_BL).reshape(-1)
  input_len = np.where(has_input, c_in[:, -1], 0).astype(np.int64)

  # Target: [S_1] run_1 [S_2] run_2 ... [S_{runs+1}]: token i of a run at slot c_tg - 1, its
  # run's sentinel just before, the closing sentinel at target_len - 1.
  T = L + (L + 1) // 2 + 1
  S = (L + 1) // 2 + 1
  target_len = np.where(length_B > 0, c_tg[:, -1] + 1, 0).astype(np.int64)
  last = np.maximum(target_len - 1, 0)  # an empty sequence has no target at all

  # The cut: an over-budget target keeps the window [start, start + new_len) of those slots.
  start, new_len = np.zeros(B, np.int64), target_len.copy()
  rows = np.flatnonzero(target_len > target_budget_B)
  if len(rows):
    # Sentinel positions in the target by sentinel order [R, S]; the closing one last.
    R = len(rows)
    spos = np.zeros((R, S + 1), np.int64)
    at = np.where(starts[rows], run_BL[rows] - 1, S) + (np.arange(R) * (S + 1))[:, None]
    spos.reshape(-1)[at.reshape(-1)] = (c_tg[rows] - 2).reshape(-1)
    spos[np.arange(R), num_runs[rows]] = last[rows]
    num_sent = num_runs[rows] + 1
    length, budget = target_len[rows], target_budget_B[rows]
    chosen = np.floor(cut_u_B[rows] * np.maximum(1, num_sent - 1)).astype(np.int64)
    start_c = spos[np.arange(R), chosen]
    fits = (length[:, None] - spos[:, :S] <= budget[:, None]) & (np.arange(S)[None, :] <
                                                                 num_sent[:, None])
    start_f = spos[np.arange(R), fits.argmax(axis=1)]
    long_rest = length - start_c >= budget
    start[rows] = np.where(long_rest, start_c, start_f)
    new_len[rows] = np.where(long_rest, budget, length - start_f)

  # Scatter every slot shifted by its row's start; slots outside [0, new_len) go to column T.
  target = np.zeros((B, T + 1), np.int32)
  flat_t = target.reshape(-1)
  row_t = (np.arange(B, dtype=np.int32) * (T + 1))[:, None]
  limit = new_len.astype(np.uint32)[:, None]
  slot = c_tg - (1 + start.astype(np.int32))[:, None]
  inside = dropped & (slot.view(np.uint32) < limit)  # negative slots wrap to large: outside
  flat_t[(np.where(inside, slot, T) + row_t).reshape(-1)] = tokens_BL.reshape(-1)
  slot -= 1
  inside = starts & (slot.view(np.uint32) < limit)
  flat_t[(np.where(inside, slot, T) + row_t).reshape(-1)] = sentinel_BL.reshape(-1)
  closing = last - start
  has_closing = (target_len > 0) & (closing < new_len)
  target[np.flatnonzero(has_closing), closing[has_closing]] = (
      sentinel0 + num_runs[has_closing] + 1)
  target_BT = target[:, :T]
  return SpanResult(np.ascontiguousarray(input_BI[:, :L]), input_len,
                    np.ascontiguousarray(target_BT), new_len)
