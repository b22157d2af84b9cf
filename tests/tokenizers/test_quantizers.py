"""VQ (cosine lookup, EMA, dead-code restarts, commitment, straight-through) and FSQ levels."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmjax.config import ConfigError
from mmjax.tokenizers import quantizers
from mmjax.tokenizers.quantizers import FSQ, VectorQuantizer


def _vq(codes, decay=0.9, dead_threshold=0.03, counts=None):
  codes = np.asarray(codes, np.float32)
  vq = VectorQuantizer(codes.shape[0], codes.shape[1], decay=decay, dead_threshold=dead_threshold,
                       rngs=nnx.Rngs(0))
  unit = codes / np.linalg.norm(codes, axis=1, keepdims=True)
  vq.codebook[...] = jnp.asarray(unit)
  vq.ema_sum[...] = jnp.asarray(unit)
  vq.ema_count[...] = jnp.asarray(np.ones(codes.shape[0]) if counts is None else counts,
                                   jnp.float32)
  return vq


def test_lookup_picks_max_cosine_not_min_distance():
  # Unnormalised, code 1 is nearer in Euclidean distance to z; by cosine, code 0 wins.
  vq = _vq([[10.0, 1.0], [0.5, 0.5], [-1.0, 0.0]])
  vq.codebook[...] = jnp.asarray([[10.0, 1.0], [0.5, 0.5], [-1.0, 0.0]]) / jnp.asarray(
      [[np.hypot(10, 1)], [np.hypot(0.5, 0.5)], [1.0]])
  z = jnp.asarray([[3.0, 0.2], [0.1, 0.3], [-2.0, 1.0]])
  np.testing.assert_array_equal(vq.encode(z), [0, 1, 2])
  rng = np.random.default_rng(0)
  codes = rng.normal(size=(16, 5))
  vq = _vq(codes)
  z = rng.normal(size=(40, 5)) * rng.uniform(0.1, 10, size=(40, 1))
  cos = (z / np.linalg.norm(z, axis=1, keepdims=True)) @ (
      codes / np.linalg.norm(codes, axis=1, keepdims=True)).T
  np.testing.assert_array_equal(vq.encode(jnp.asarray(z)), cos.argmax(1))
  np.testing.assert_allclose(np.linalg.norm(vq.decode_ids(jnp.arange(16)), axis=1), 1.0, rtol=1e-6)


def test_ema_update_matches_hand_computation():
  vq = _vq([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], decay=0.9, dead_threshold=0.0)
  z = jnp.asarray([[2.0, 0.0], [0.6, 0.8], [0.0, 3.0]])  # -> unit: (1,0), (.6,.8), (0,1)
  _, ids, _ = vq(z, train=True, rng=jax.random.key(0))
  np.testing.assert_array_equal(ids, [0, 1, 1])  # (.6, .8) is nearer (0, 1) than (1, 0)
  # count: 0.9 * 1 + 0.1 * n_k; sum: 0.9 * code_k + 0.1 * sum of unit vectors assigned to k.
  np.testing.assert_allclose(vq.ema_count[...], [1.0, 1.1, 0.9], rtol=1e-6)
  expected_sum = np.array([[0.9 + 0.1, 0.0], [0.06, 0.9 + 0.1 * 1.8], [-0.9, 0.0]])
  np.testing.assert_allclose(vq.ema_sum[...], expected_sum, rtol=1e-6)
  expected_codes = expected_sum / np.linalg.norm(expected_sum, axis=1, keepdims=True)
  np.testing.assert_allclose(vq.codebook[...], expected_codes, rtol=1e-6)


def test_inference_mode_leaves_the_codebook_alone():
  vq = _vq(np.eye(3))
  before = jax.tree.map(np.asarray, nnx.state(vq))
  vq(jnp.ones((4, 3)), train=False)
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.state(vq)))


def test_dead_code_restart_replaces_exactly_the_dead_codes():
  codes = np.random.default_rng(1).normal(size=(6, 4))
  # 8 vectors over 6 codes: mean usage 4/3; threshold 0.5 -> dead below 2/3.
  counts = np.array([2.0, 0.1, 1.0, 0.0, 0.7, 0.5], np.float32)
  vq = _vq(codes, dead_threshold=0.5, counts=counts)
  z_ND = np.asarray(quantizers.l2_normalize(jnp.asarray(
      np.random.default_rng(2).normal(size=(8, 4)), jnp.float32)))
  old_codes = np.asarray(vq.codebook[...])
  dead = np.asarray(vq.restart_dead_codes(jnp.asarray(z_ND), jax.random.key(3)))
  np.testing.assert_array_equal(dead, [False, True, False, True, False, True])
  new_codes = np.asarray(vq.codebook[...])
  np.testing.assert_array_equal(new_codes[~dead], old_codes[~dead])
  for k in np.flatnonzero(dead):  # each restarted code is one of the batch's vectors
    assert np.min(np.abs(z_ND - new_codes[k]).max(axis=1)) < 1e-6
  # Restarted codes sit at the threshold (0.5 x 8 / 6): dead again unless the next batch uses them.
  np.testing.assert_allclose(vq.ema_count[...], np.where(dead, 0.5 * 8 / 6, counts), rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(vq.ema_sum[...], axis=1)[dead], 0.5 * 8 / 6, rtol=1e-5)


def test_commitment_loss_value():
  vq = _vq([[1.0, 0.0], [0.0, 1.0]], dead_threshold=0.0)
  vq.commitment_weight = 2.0
  z = jnp.asarray([[3.0, 4.0]])  # unit (0.6, 0.8) -> code (0, 1); squared error .36 + .04
  _, _, aux = vq(z, train=False)
  np.testing.assert_allclose(aux["commitment"], 0.4 / 2, rtol=1e-6)  # mean over 2 elements
  np.testing.assert_allclose(aux["loss"], 2.0 * 0.2, rtol=1e-6)


def test_straight_through_gradient_is_identity():
  vq = _vq(np.random.default_rng(4).normal(size=(8, 3)))
  z = jnp.asarray(np.random.default_rng(5).normal(size=(5, 3)), jnp.float32)
  z_unit = quantizers.l2_normalize(z)
  w = jnp.asarray(np.random.default_rng(6).normal(size=(5, 3)), jnp.float32)
  # d/dz_unit of sum(w * z_q) is w: the lookup is skipped in the backward pass.
  grad = jax.grad(lambda u: jnp.sum(w * vq(u, train=False)[0]))(z_unit)
  np.testing.assert_allclose(grad, w - jnp.sum(w * z_unit, -1, keepdims=True) * z_unit, atol=1e-5)
  grad_st = jax.grad(lambda x: jnp.sum(w * quantizers.straight_through(x, jnp.round(x))))(z)
  np.testing.assert_allclose(grad_st, w)
  fsq = FSQ((5, 4, 3))
  bounded_grad = jax.grad(lambda x: jnp.sum(fsq.bound(x)))(z)
  grad_fsq = jax.grad(lambda x: jnp.sum(fsq(x)[0] * jnp.floor(jnp.asarray(fsq.levels) / 2.0)))(z)
  np.testing.assert_allclose(grad_fsq, bounded_grad, rtol=1e-6)


def test_vq_training_mode_needs_rng():
  with pytest.raises(ValueError, match="rng"):
    _vq(np.eye(2))(jnp.ones((1, 2)), train=True)


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (8, 8, 8, 6, 5), (2, 3), (7,)])
def test_fsq_levels(levels):
  fsq = FSQ(levels)
  assert fsq.codebook_size == int(np.prod(levels))
  ids = jnp.arange(fsq.codebook_size)
  codes = np.asarray(fsq.decode_ids(ids))
  assert codes.shape == (fsq.codebook_size, len(levels))
  assert np.all(codes >= -1.0) and np.all(codes <= 1.0)
  # Channel i takes exactly levels[i] distinct values; all combinations appear once.
  for i, n in enumerate(levels):
    assert len(np.unique(codes[:, i])) == n
  assert len({tuple(c) for c in codes}) == fsq.codebook_size
  # Every code is reachable from some input: invert the bound at each code's centre.
  half = np.floor(np.asarray(levels) / 2)
  half_l = (np.asarray(levels) - 1) * (1 + fsq.eps) / 2
  # Aim a quarter step from each grid point towards the range's centre -offset (the outermost
  # points are approached, never reached).
  offset = np.where(np.asarray(levels) % 2 == 0, 0.5, 0.0)
  target = codes * half - 0.25 * np.sign(codes * half + offset)
  z = np.arctanh((target + offset) / half_l) - np.arctanh(offset / half_l)
  np.testing.assert_array_equal(fsq.encode(jnp.asarray(z, jnp.float32)), ids)
  z_q, got_ids, _ = fsq(jnp.asarray(z, jnp.float32))
  np.testing.assert_array_equal(got_ids, ids)
  np.testing.assert_allclose(z_q, codes, atol=1e-6)


def test_fsq_bounds_hold_for_extreme_inputs():
  fsq = FSQ((8, 5))
  z = jnp.asarray(list(itertools.product([-1e4, -3.0, 0.0, 0.4, 3.0, 1e4], repeat=2)), jnp.float32)
  ids = np.asarray(fsq.encode(z))
  assert ids.min() >= 0 and ids.max() < 40
  z_q, _, _ = fsq(z)
  assert np.all(np.abs(z_q) <= 1.0)
  np.testing.assert_allclose(fsq.decode_ids(jnp.asarray(ids)), z_q, atol=1e-6)


def test_bad_quantizer_settings_are_errors():
  with pytest.raises(ConfigError, match="levels"):
    FSQ((8, 1))
  with pytest.raises(ConfigError, match="decay"):
    VectorQuantizer(8, 2, decay=1.0, rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match="'vq' or 'fsq'"):
    quantizers.make_quantizer("pq", codebook_size=8, dim=2, fsq_levels=(2,), decay=0.9,
                              commitment_weight=1.0, dead_threshold=0.0, rngs=nnx.Rngs(0))
