"""Attention kernels against the einsum (XLA) path: forward and gradients, with packing, GQA and
bidirectional blocks. Splash runs through Pallas's interpreter on CPU; cuDNN cannot run here, so its
arguments are checked through `jax.nn.dot_product_attention`'s XLA implementation."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmjax.models import attention, layers
from mmjax.models.decoder_attention import attention_mask
from tests.models import fourm_fixtures as fx
from tests.models.test_decoder import make_batch, make_cfg, make_model


def _qkv(b, lq, s, h, g, d=64, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(keys[0], (b, lq, h, d)), jax.random.normal(keys[1], (b, s, g, d)),
          jax.random.normal(keys[2], (b, s, g, d)))


def _packed(b, length, blocks=False, seed=0):
  """Segment ids of packed rows (documents of random lengths, padding at the end) and blocks."""
  rng = np.random.default_rng(seed)
  segment = np.zeros((b, length), np.int32)
  block = np.zeros((b, length), np.int32)
  for i in range(b):
    at, doc = 0, 1
    while at < length - 20:
      n = int(rng.integers(10, 70))
      segment[i, at:at + n] = doc
      if blocks and n > 12:
        block[i, at + 3:at + 11] = doc
      at, doc = at + n, doc + 1
  segment[:, length - 7:] = 0  # padding
  index = np.broadcast_to(np.arange(length, dtype=np.int32), (b, length))
  args = [jnp.asarray(x) for x in (segment, block, index)]
  return args[0], attention_mask(*args, *args)


def _compare(run, reference, q, k, v, rows, rtol=2e-4):
  """Outputs on the rows that matter and the gradients of a loss over them agree."""
  weights = jax.random.normal(jax.random.key(9), q.shape) * rows[:, :, None, None]
  loss = lambda f: lambda *a: jnp.sum(f(*a) * weights)  # noqa: E731
  out, ref = run(q, k, v), reference(q, k, v)
  np.testing.assert_allclose(out * rows[:, :, None, None], ref * rows[:, :, None, None],
                             rtol=rtol, atol=rtol)
  grads = jax.jit(jax.grad(loss(run), argnums=(0, 1, 2)))(q, k, v)
  expected = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(grads, expected):
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, atol=rtol * scale * 10)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_splash_matches_xla_on_packed_causal_rows(heads, kv_heads):
  b, length = 2, 160  # not a multiple of the kernel's 128-slot tiles: padded inside
  q, k, v = _qkv(b, length, length, heads, kv_heads, d=32)
  segment, dense = _packed(b, length)
  mask = attention.Mask(dense, causal=True, q_segment_BQ=segment, kv_segment_BS=segment)
  run = jax.jit(lambda q, k, v: attention.attend(q, k, v, mask, impl="splash", dtype=jnp.float32))
  reference = lambda q, k, v: attention.attend(q, k, v, mask, impl="xla",  # noqa: E731
                                               dtype=jnp.float32)
  _compare(run, reference, q, k, v, (segment > 0).astype(jnp.float32))


def test_splash_matches_xla_on_key_padding_cross_attention():
  b, lq, s = 1, 128, 160  # 4M's cross-attention: queries attend to the valid context tokens
  q, k, v = _qkv(b, lq, s, 2, 2, d=32)
  valid = jnp.asarray(np.random.default_rng(1).random((b, s)) < 0.7)
  mask = attention.key_padding_mask(lq, valid)
  run = lambda q, k, v: attention.attend(q, k, v, mask, impl="splash",  # noqa: E731
                                         dtype=jnp.float32)
  reference = lambda q, k, v: attention.attend(q, k, v, mask, impl="xla",  # noqa: E731
                                               dtype=jnp.float32)
  _compare(run, reference, q, k, v, jnp.ones((b, lq)))


@pytest.mark.parametrize("blocks", [False, True])
def test_cudnn_arguments_give_the_xla_result(blocks):
  """What the cuDNN path passes to jax.nn.dot_product_attention (GQA, packing, causal flag, and
  with bidirectional blocks the dense mask) computes the einsum path's attention."""
  b, length = 2, 64
  q, k, v = _qkv(b, length, length, 4, 2, d=16)
  segment, dense = _packed(b, length, blocks=blocks)
  mask = attention.Mask(dense, causal=not blocks)
  run = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
      **attention.cudnn_arguments(q, k, v, mask, jnp.float32), implementation="xla")
  reference = lambda q, k, v: attention.attend(q, k, v, mask, impl="xla",  # noqa: E731
                                               dtype=jnp.float32)
  _compare(run, reference, q, k, v, (segment > 0).astype(jnp.float32))


def test_auto_is_the_platforms_kernel_and_unfit_masks_fall_back_with_one_line(caplog):
  mask = attention.Mask(jnp.ones((1, 4, 4), bool), causal=True, q_segment_BQ=jnp.ones((1, 4)),
                        kv_segment_BS=jnp.ones((1, 4)))
  for platform, kernel in (("cpu", "xla"), ("gpu", "cudnn"), ("tpu", "splash")):
    with layers.target(platform):
      assert attention.resolve_impl("auto", mask) == kernel
  unfit = attention.Mask(mask.dense_BQS, why_not_segments="a test's mask")
  with caplog.at_level(logging.WARNING, logger="mmjax"):
    assert attention.resolve_impl("splash", unfit) == "xla"
    assert attention.resolve_impl("splash", unfit) == "xla"
  lines = [r.getMessage() for r in caplog.records if "a test's mask" in r.getMessage()]
  assert lines == ["mmjax: splash attention cannot express a test's mask; using XLA attention"]


def _decoder_step(model, batch):
  graphdef, state = nnx.split(model)

  def loss(state):
    logits = nnx.merge(graphdef, state)(batch)[0]
    return jnp.sum(logits * batch["loss_weight"][..., None] * jnp.cos(jnp.arange(logits.shape[-1])))

  return jax.jit(jax.value_and_grad(loss))(state)


@pytest.mark.slow
def test_decoder_with_splash_attention_matches_xla():
  """The whole decoder (packed rows, GQA, qk-norm, RoPE): loss and every parameter's gradient."""
  segment = [[1] * 60 + [2] * 50 + [3] * 18, [1] * 100 + [0] * 28]
  batch = make_batch(segment)
  results = [_decoder_step(make_model(make_cfg(attention_impl=impl)), batch)
             for impl in ("xla", "splash")]
  (loss, grads), (loss_splash, grads_splash) = results
  np.testing.assert_allclose(loss_splash, loss, rtol=1e-4)
  fx.tree_allclose(grads_splash, grads, rtol=2e-3, atol=2e-4)


def test_decoder_blocks_fall_back_to_xla(caplog):
  block = np.zeros((1, 128), np.int32)
  block[0, 10:20] = 1
  batch = make_batch([[1] * 128], block=block)
  splash, xla = (make_model(make_cfg(attention_impl=impl), bidirectional_blocks=True)
                 for impl in ("splash", "xla"))
  with caplog.at_level(logging.WARNING, logger="mmjax"):
    out = splash(batch)[0]
  assert any("bidirectional image blocks" in r.getMessage() for r in caplog.records)
  np.testing.assert_allclose(out, xla(batch)[0], rtol=1e-6)


@pytest.mark.slow
def test_fourm_with_splash_attention_matches_xla_when_targets_are_images():
  """4M's encoder (key padding), cross-attention and, with image targets only, its bidirectional
  decoder self-attention all run as splash kernels; 128 slots fill one tile."""
  reg = fx.registry(["rgb", "tok_a", "glob"])
  results = []
  for impl in ("xla", "splash"):
    cfg = fx.config(num_input_tokens=128, num_target_tokens=128, attention_impl=impl)
    model = fx.model(cfg, reg)
    batch = fx.batch(cfg, reg, size=2)
    graphdef, state = nnx.split(model)
    valid = jnp.asarray(batch["dec_valid"], jnp.float32)[..., None]
    f = lambda s, g=graphdef: jnp.sum(nnx.merge(g, s)(batch) * valid * jnp.sin(jnp.arange(32)))
    results.append(jax.jit(jax.value_and_grad(f))(state))
  (loss, grads), (loss_splash, grads_splash) = results
  np.testing.assert_allclose(loss_splash, loss, rtol=1e-4)
  fx.tree_allclose(grads_splash, grads, rtol=2e-3, atol=2e-4)
