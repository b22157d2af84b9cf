"""4M budgets, image selection and T5 span masking against specs/fourm.md."""

import numpy as np
import pytest

from mmjax.data.fourm import masking
from mmjax.tokenizers import special

S0 = special.SpecialIds().sentinel(0)  # [S_0]; the reference's first span gets [S_1] = S0 + 1


def test_budgets_sum_to_total_when_capacity_allows():
  rng = np.random.default_rng(0)
  alpha = np.tile([0.5, 0.5, 0.01, 10.0, 1.0], (2000, 1))
  budget = masking.dirichlet_budgets(rng, alpha, 128, np.full((2000, 5), 1000))
  assert (budget.sum(1) == 128).all() and (budget >= 0).all()


def test_zero_alpha_gets_nothing_and_rgb2all_gets_everything():
  rng = np.random.default_rng(1)
  alpha = np.tile([0.5, 0.0, 0.5, 0.0], (1000, 1))
  budget = masking.dirichlet_budgets(rng, alpha, 100, np.full((1000, 4), 500))
  assert (budget[:, [1, 3]] == 0).all() and (budget.sum(1) == 100).all()
  rgb = masking.dirichlet_budgets(rng, np.tile([1000.0, 0, 0], (50, 1)), 128,
                                  np.full((50, 3), 196))
  np.testing.assert_array_equal(rgb, np.tile([128, 0, 0], (50, 1)))


def test_all_zero_alpha_row_gets_nothing():
  rng = np.random.default_rng(2)
  budget = masking.dirichlet_budgets(rng, np.zeros((3, 4)), 64, np.full((3, 4), 64))
  assert (budget == 0).all()


def test_budget_clamped_without_redistribution():
  rng = np.random.default_rng(3)
  # One modality with alpha 1000 wants everything but can hold 10: the rest is not moved.
  budget = masking.dirichlet_budgets(rng, np.tile([1000.0, 0.5], (20, 1)), 128,
                                     np.tile([10, 500], (20, 1)))
  assert (budget[:, 0] == 10).all() and (budget.sum(1) < 128).all()


def test_budget_mean_follows_alpha():
  rng = np.random.default_rng(4)
  budget = masking.dirichlet_budgets(rng, np.tile([1.0, 3.0], (20000, 1)), 100,
                                     np.full((20000, 2), 1000))
  # E[Dir(1, 3)] = (0.25, 0.75).
  assert abs(budget[:, 0].mean() - 25) < 1.0


@pytest.mark.parametrize("alpha", [0.1, 0.5, 2.0])
def test_budget_spread_follows_the_dirichlet(alpha):
  # Var(N * Dir_k) = N^2 a (a0 - a) / (a0^2 (a0 + 1)); checks the gamma draws of each alpha range
  # (a < 1 boosted, a = 0.5 by a normal, a >= 1 direct) and the remainder rule (equal alphas).
  rng = np.random.default_rng(11)
  n, K, N = 20000, 5, 128
  budget = masking.dirichlet_budgets(rng, np.full((n, K), alpha), N, np.full((n, K), 1000))
  a0 = K * alpha
  want = N**2 * alpha * (a0 - alpha) / (a0**2 * (a0 + 1))
  assert (budget.sum(1) == N).all()
  for k in range(K):
    assert abs(budget[:, k].var() / want - 1) < 0.08
    assert abs(budget[:, k].mean() - N / K) < 0.03 * N / K


def test_image_selection_disjoint_with_exact_counts():
  rng = np.random.default_rng(5)
  n_in = rng.integers(0, 30, 500)
  n_tgt = rng.integers(0, 35, 500)
  is_in, is_tgt = masking.image_selection(rng, n_in, n_tgt, 64)
  assert not (is_in & is_tgt).any()
  np.testing.assert_array_equal(is_in.sum(1), n_in)
  np.testing.assert_array_equal(is_tgt.sum(1), n_tgt)
  # Every cell is chosen as an input about equally often.
  freq = is_in.mean(0)
  assert freq.max() - freq.min() < 0.15


def test_spec_example_sentence():
  # "a photo of a dog on a bench [EOS]" with "a bench [EOS]" dropped.
  sentence = np.array([[100, 101, 102, 100, 103, 104, 100, 105, special.EOS]])
  keep = np.array([[1, 1, 1, 1, 1, 1, 0, 0, 0]], bool)
  out = masking.spans_from_keep(sentence, np.array([9]), keep, np.array([128]),
                                np.array([128]), np.array([0.5]), S0)
  s1, s2 = S0 + 1, S0 + 2
  assert s1 == 5
  np.testing.assert_array_equal(out.input_BI[0, :out.input_len_B[0]],
                                [100, 101, 102, 100, 103, 104, s1])
  np.testing.assert_array_equal(out.target_BT[0, :out.target_len_B[0]],
                                [s1, 100, 105, special.EOS, s2])


def _reconstruct(inp, tgt):
  """Merges target spans back into the input at their sentinels."""
  spans, current = {}, None
  for t in tgt:
    if t >= S0 and t < S0 + 100:
      current = int(t)
      spans[current] = []
    else:
      spans[current].append(int(t))
  out = []
  for t in inp:
    out.extend(spans[int(t)] if S0 <= t < S0 + 100 else [int(t)])
  return out


def test_span_masking_reconstructs_the_sequence():
  rng = np.random.default_rng(6)
  B, L = 300, 40
  tokens = rng.integers(200, 900, (B, L)).astype(np.int32)
  length = rng.integers(1, L + 1, B)
  tokens[np.arange(L)[None, :] >= length[:, None]] = 0
  in_budget = np.full(B, 1000)
  in_budget[:50] = 0  # the whole sequence becomes the target
  out = masking.span_mask(rng, tokens, length, in_budget, np.full(B, 1000),
                          rng.random(B), S0)
  for b in range(B):
    inp = out.input_BI[b, :out.input_len_B[b]]
    tgt = out.target_BT[b, :out.target_len_B[b]]
    assert tgt[0] >= S0
    if b < 50:
      assert len(inp) == 0 and tgt[0] == S0 + 1 and len(tgt) == length[b] + 2
      np.testing.assert_array_equal(tgt[1:-1], tokens[b, :length[b]])
    else:
      assert tgt[-1] == S0 + 1 + np.sum((inp >= S0) & (inp < S0 + 100))
      assert _reconstruct(inp, tgt) == tokens[b, :length[b]].tolist()


def test_input_budget_enforced_by_retry():
  rng = np.random.default_rng(7)
  B, L = 400, 48
  tokens = rng.integers(200, 900, (B, L)).astype(np.int32)
  length = np.full(B, L)
  budget = rng.integers(1, 20, B)
  keep_prob = np.ones(B)  # `all`: always over budget at first
  out = masking.span_mask(rng, tokens, length, budget, np.full(B, 1000), keep_prob, S0)
  assert (out.input_len_B <= budget).all() and (out.input_len_B >= 1).all()
  for b in range(0, B, 37):
    inp = out.input_BI[b, :out.input_len_B[b]]
    tgt = out.target_BT[b, :out.target_len_B[b]]
    assert _reconstruct(inp, tgt) == tokens[b].tolist()


def test_random_keep_scheme_keeps_a_uniform_fraction():
  # Budgets with room: no retry, so a row keeps each token with its U(0,1) keep probability.
  rng = np.random.default_rng(12)
  B, L = 4000, 40
  p = masking.keep_probabilities(rng, np.full(B, masking.KEEP_RANDOM))
  keep = masking.span_keep_masks(rng, np.ones((B, L), bool), np.full(B, 1000), p)
  frac = keep.mean(1)
  assert abs(frac.mean() - 0.5) < 0.02
  assert abs((frac < 0.25).mean() - 0.25) < 0.03 and abs((frac > 0.75).mean() - 0.25) < 0.03
  # Per token, the rate follows the row's probability (Bernoulli(p) mask).
  assert np.abs(np.polyfit(p, frac, 1) - [1.0, 0.0]).max() < 0.03


def test_keep_schemes():
  rng = np.random.default_rng(8)
  schemes = np.array([masking.KEEP_ALL] * 10 + [masking.KEEP_BINARY] * 1000)
  p = masking.keep_probabilities(rng, schemes)
  assert (p[:10] == 1).all() and set(np.unique(p[10:])) == {0.0, 1.0}
  # `all` with room: the input is the sequence, the target only the closing sentinel.
  tokens = np.arange(200, 210)[None, :].repeat(2, 0)
  out = masking.span_mask(rng, tokens, np.array([10, 10]), np.array([10, 10]),
                          np.array([10, 100]), np.array([1.0, 0.0]), S0)
  np.testing.assert_array_equal(out.input_BI[0, :10], tokens[0])
  assert out.target_len_B[0] == 1 and out.target_BT[0, 0] == S0 + 1
  # keep probability 0: one sentinel in, everything out.
  assert out.input_len_B[1] == 1 and out.input_BI[1, 0] == S0 + 1
  assert out.target_len_B[1] == 12


@pytest.mark.parametrize("budget", [0, 1, 3, 7])
def test_target_cut_starts_at_a_sentinel(budget):
  rng = np.random.default_rng(9)
  B, L = 300, 30
  tokens = rng.integers(200, 900, (B, L)).astype(np.int32)
  length = np.full(B, L)
  keep = rng.random((B, L)) < 0.5
  full = masking.spans_from_keep(tokens, length, keep, np.full(B, 100), np.full(B, 1000),
                                 rng.random(B), S0)
  cut = masking.spans_from_keep(tokens, length, keep, np.full(B, 100), np.full(B, budget),
                                rng.random(B), S0)
  assert (cut.target_len_B <= budget).all()
  for b in range(B):
    whole = full.target_BT[b, :full.target_len_B[b]].tolist()
    part = cut.target_BT[b, :cut.target_len_B[b]].tolist()
    if budget == 0:
      assert part == []
      continue
    assert S0 <= part[0] < S0 + 100
    start = whole.index(part[0])
    assert whole[start:start + len(part)] == part
    # Either the budget is filled, or the part runs to the end of the target.
    assert len(part) == budget or start + len(part) == len(whole)
