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

import numpy as np

KEEP_RANDOM, KEEP_ALL, KEEP_BINARY = 0, 1, 2
KEEP_SCHEMES = {"random": KEEP_RANDOM, "all": KEEP_ALL, "binary": KEEP_BINARY}
KEEP_DECAY = 0.9       # keep probability factor per retry while the input is over budget
_RETRIES_PER_DRAW = 8  # over-budget rows draw this many retries at once (same law as one by one)


# ---------------------------------------------------------------------------------------------
# Dirichlet budgets.


def _log_gamma(rng: np.random.Generator, alpha: np.ndarray) -> np.ndarray:
  """log of Gamma(alpha, 1) draws, exact for tiny alpha; -inf where alpha == 0.

  Gamma(a) = Gamma(a + 1) * U^(1/a): the log form never underflows, so alpha = 0.01 behaves.
  """
  positive = alpha > 0
  safe = np.where(positive, alpha, 1.0)
  g = rng.standard_gamma(safe + 1.0)
  u = rng.random(alpha.shape)
  with np.errstate(divide="ignore"):
    out = np.log(g) + np.log(u) / safe
  return np.where(positive, out, -np.inf)


def dirichlet_budgets(rng: np.random.Generator, alpha_BK: np.ndarray, total: int,
                      cap_BK: np.ndarray) -> np.ndarray:
  """Token budgets [B, K] summing to `total` (before clamping) as 4M draws them.

  floor(Dir(alpha) * total), then each remaining token goes to the argmax of a further Dirichlet
  draw (so alpha = 0 modalities get nothing), then a clamp to `cap_BK` (excess not redistributed).
  Rows whose alphas are all 0 get nothing.
  """
  alpha_BK = np.asarray(alpha_BK, np.float64)
  B, K = alpha_BK.shape
  log_g = _log_gamma(rng, alpha_BK)
  top = log_g.max(axis=1, keepdims=True)
  alive = np.isfinite(top)
  w = np.exp(log_g - np.where(alive, top, 0.0))
  p = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-300)
  budget = np.floor(p * total).astype(np.int64)
  diff = np.where(alive[:, 0], total - budget.sum(axis=1), 0).clip(0, K)
  # Remainder: up to K further draws per row; only the first diff[b] of them count.
  extra = _log_gamma(rng, np.broadcast_to(alpha_BK[:, None, :], (B, K, K)))
  winner_BK = extra.argmax(axis=2)
  counts = (np.arange(K)[None, :] < diff[:, None])
  onehot = (winner_BK[:, :, None] == np.arange(K)[None, None, :]) & counts[:, :, None]
  budget += onehot.sum(axis=1)
  return np.minimum(budget, np.asarray(cap_BK, np.int64))


# ---------------------------------------------------------------------------------------------
# Image modalities.


def image_selection(rng: np.random.Generator, input_B: np.ndarray, target_B: np.ndarray,
                    num_cells: int) -> tuple[np.ndarray, np.ndarray]:
  """Disjoint input / target cells [B, G]: a random permutation per row; its first input_B[b]
  cells are inputs, the next target_B[b] targets."""
  B = len(input_B)
  perm = np.argsort(rng.random((B, num_cells)), axis=1)
  rank = np.empty_like(perm)
  np.put_along_axis(rank, perm, np.arange(num_cells)[None, :].repeat(B, 0), axis=1)
  is_input = rank < input_B[:, None]
  is_target = ~is_input & (rank < (input_B + target_B)[:, None])
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
  u = rng.random(len(scheme_B))
  coin = rng.integers(0, 2, len(scheme_B)).astype(np.float64)
  return np.where(scheme_B == KEEP_RANDOM, u, np.where(scheme_B == KEEP_ALL, 1.0, coin))


def _input_lengths(keep: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Input length (kept tokens + one sentinel per dropped run) over the last axis."""
  dropped = valid & ~keep
  starts = dropped.copy()
  starts[..., 1:] &= ~dropped[..., :-1]
  return (keep & valid).sum(-1) + starts.sum(-1)


def span_keep_masks(rng: np.random.Generator, valid_BL: np.ndarray, input_budget_B: np.ndarray,
                    keep_prob_B: np.ndarray) -> np.ndarray:
  """Which tokens stay in the input [B, L]: each kept with its row's keep probability; while a
  row's input (tokens + sentinels) exceeds its budget, the probability is multiplied by 0.9 and the
  mask redrawn. A row with input budget 0 drops everything (the whole sequence is the target)."""
  B, L = valid_BL.shape
  keep = rng.random((B, L)) <= keep_prob_B[:, None]
  keep &= (input_budget_B > 0)[:, None]
  over = np.flatnonzero((_input_lengths(keep, valid_BL) > input_budget_B) & (input_budget_B > 0))
  prob = keep_prob_B[over].astype(np.float64)
  while len(over):
    R = _RETRIES_PER_DRAW
    factors = KEEP_DECAY ** np.arange(1, R + 1)
    probs_RO = factors[:, None] * prob[None, :]
    trial = rng.random((R, len(over), L)) <= probs_RO[:, :, None]
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
  sentinel an over-budget target is cut at."""
  B, L = tokens_BL.shape
  valid = np.arange(L)[None, :] < length_B[:, None]
  keep = keep_BL & valid & (input_budget_B > 0)[:, None]
  dropped = valid & ~keep
  starts = dropped.copy()
  starts[:, 1:] &= ~dropped[:, :-1]
  run_id = np.cumsum(starts, axis=1, dtype=np.int32)  # k of [S_k] for a dropped token
  num_runs = run_id[:, -1].astype(np.int64) if L else np.zeros(B, np.int64)
  sentinel_BL = sentinel0 + run_id

  # Input: a kept token emits itself, a run start its sentinel; row-major order = output order.
  emits = keep | starts
  input_BI = np.zeros((B, L), np.int32)
  idx, dest, _ = _left_align(emits, L)
  input_BI.reshape(-1)[dest] = np.where(keep, tokens_BL, sentinel_BL).reshape(-1)[idx]
  input_len = np.where(input_budget_B > 0, emits.sum(axis=1), 0)  # budget 0: no input at all
  input_BI[input_budget_B <= 0] = 0

  # Target: slot 2i holds position i's sentinel (if a run starts there), 2i+1 its dropped token.
  T = L + (L + 1) // 2 + 1
  S = (L + 1) // 2 + 1
  emits2 = np.stack([starts, dropped], axis=2).reshape(B, 2 * L)
  values2 = np.stack([sentinel_BL, tokens_BL.astype(np.int32)], axis=2).reshape(-1)
  target_BT = np.zeros((B, T), np.int32)
  idx2, dest2, rank2 = _left_align(emits2, T)
  target_BT.reshape(-1)[dest2] = values2[idx2]
  target_len = np.where(length_B > 0, emits2.sum(axis=1) + 1, 0).astype(np.int64)
  last = np.maximum(target_len - 1, 0)  # an empty sequence has no target at all
  target_BT[np.arange(B), last] = np.where(target_len > 0, sentinel0 + num_runs + 1, 0)
  # Sentinel positions in the target, by sentinel order: [B, S].
  spos = np.zeros((B, S), np.int64)
  is_sent = idx2 % 2 == 0
  spos.reshape(-1)[(idx2 // (2 * L) * S + values2[idx2] - sentinel0 - 1)[is_sent]] = rank2[is_sent]
  spos[np.arange(B), num_runs] = last
  num_sent = num_runs + 1

  # The cut (drawn for every row, used where the target is over budget).
  chosen = np.floor(cut_u_B * np.maximum(1, num_sent - 1)).astype(np.int64)
  start_c = spos[np.arange(B), chosen]
  fits = (target_len[:, None] - spos <= target_budget_B[:, None]) & (np.arange(S)[None, :] <
                                                                   num_sent[:, None])
  start_f = spos[np.arange(B), fits.argmax(axis=1)]
  long_rest = target_len - start_c >= target_budget_B
  cut = target_len > target_budget_B
  start = np.where(cut, np.where(long_rest, start_c, start_f), 0)
  new_len = np.where(cut, np.where(long_rest, target_budget_B, target_len - start_f), target_len)
  cols = np.minimum(start[:, None] + np.arange(T)[None, :], T - 1)
  window = np.take_along_axis(target_BT, cols, axis=1)
  window[np.arange(T)[None, :] >= new_len[:, None]] = 0
  return SpanResult(input_BI, input_len.astype(np.int64), window, new_len.astype(np.int64))


def _left_align(mask_BW: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """For the True entries of `mask_BW` in row-major order: their flat index, the flat index of
  their left-aligned slot in a [B, width] array, and their rank within the row."""
  B = mask_BW.shape[0]
  idx = np.flatnonzero(mask_BW)
  count = np.count_nonzero(mask_BW, axis=1)
  rank = np.arange(len(idx)) - np.repeat(np.cumsum(count) - count, count)
  dest = np.repeat(np.arange(B) * width, count) + rank
  return idx, dest, rank
