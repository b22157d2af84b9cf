"""Shared layers: position tables, norms, attention masking, init scale, scanned stacks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmjax.config import ConfigError
from mmjax.models import attention, configs, layers


def test_sincos_1d_matches_hand_values():
  table = layers.sincos_1d(5, 4)  # w = [1, 1/100]
  p = 3
  expected = [math.sin(p), math.sin(p / 100), math.cos(p), math.cos(p / 100)]
  np.testing.assert_allclose(table[p], expected, rtol=1e-6)
  np.testing.assert_allclose(table[0], [0, 0, 1, 1])


def test_sincos_2d_matches_hand_values_row_major():
  table = layers.sincos_2d(2, 3, 8)  # w = [1, 1/100]; cell (1, 2) is row-major index 5
  r, c = 1, 2
  expected = [math.sin(r), math.sin(r / 100), math.cos(r), math.cos(r / 100),
              math.sin(c), math.sin(c / 100), math.cos(c), math.cos(c / 100)]
  assert table.shape == (6, 8)
  np.testing.assert_allclose(table[5], expected, rtol=1e-6)


def test_norms_match_numpy():
  x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32) * 3 + 1
  ln = layers.Norm(8, kind="layernorm", eps=1e-6, use_bias=False, rngs=nnx.Rngs(0))
  ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(ln(jnp.asarray(x)), ref, rtol=1e-4, atol=1e-5)
  rms = layers.Norm(8, kind="rmsnorm", eps=1e-6, use_bias=False, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(rms(jnp.asarray(x)), x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6),
                             rtol=1e-4, atol=1e-5)


def test_attention_masking_and_fully_masked_row():
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 3, 2, 4)), jnp.float32) for _ in range(3))
  mask = jnp.asarray([[[True, False, True], [True, True, True], [False, False, False]]])
  out = attention.xla_attention(q * 0.5, k, v, mask, jnp.float32)  # pre-scaled: 1 / sqrt(4)
  # Row 0 against a hand softmax over keys 0 and 2.
  logits = np.einsum("hk,shk->hs", np.asarray(q[0, 0]), np.asarray(k[0])) / 2.0
  logits[:, 1] = -np.inf
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(out[0, 0], np.einsum("hs,shk->hk", p, np.asarray(v[0])), rtol=1e-5)
  # A fully masked row is the uniform average, never NaN.
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out[0, 2], np.asarray(v[0]).mean(0), rtol=1e-5)


def test_stacked_xavier_bound_is_per_layer():
  lin = layers.Linear((64,), (3, 2, 32), ("embed",), (None, "heads", "kv"), use_bias=False,
                      dtype=jnp.float32, layers=4, rngs=nnx.Rngs(0))
  w = np.asarray(lin.kernel[...])
  assert w.shape == (4, 64, 3, 2, 32)
  bound = math.sqrt(6 / (64 + 192))
  assert w.max() <= bound and w.min() >= -bound and w.max() > 0.9 * bound
  assert nnx.get_partition_spec(nnx.state(lin))["kernel"].get_value() == \
      jax.sharding.PartitionSpec("layers", "embed", None, "heads", "kv")


def test_constrain_is_noop_without_mesh():
  x = jnp.ones((2, 3))
  assert layers.constrain(x, ("batch", "embed")) is x


def test_scan_layers_with_remat_matches_loop():
  mlp = layers.Mlp(8, 16, kind="swiglu", use_bias=False, dtype=jnp.float32, layers=3,
                   rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 8)), jnp.float32)

  def run(remat, x):
    return layers.scan_layers(mlp, x, None, lambda blk, c, _: c + blk(c), remat)

  ref = x
  for i in range(3):
    w1, w2, w3 = (getattr(mlp, n).kernel[...][i] for n in ("fc1", "fc2", "fc3"))
    ref = ref + (jax.nn.silu(ref @ w1) * (ref @ w3)) @ w2
  np.testing.assert_allclose(run("none", x), ref, rtol=1e-5, atol=1e-5)
  g0 = jax.grad(lambda x: run("none", x).sum())(x)
  g1 = jax.grad(lambda x: run("full", x).sum())(x)
  assert np.abs(g0).sum() > 0
  np.testing.assert_allclose(g0, g1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec,shape_a,shape_b", [
    ("abc,cde->abde", (2, 5, 8), (8, 3, 4)),        # fused qkv
    ("abcd,cde->abe", (2, 5, 3, 4), (3, 4, 8)),     # output projection over heads
    ("bqhk,bshk->bhqs", (2, 5, 3, 4), (2, 7, 3, 4)),  # attention scores
    ("bhqs,bshk->bqhk", (2, 3, 5, 7), (2, 7, 3, 4)),  # weighted values
])
def test_bf16_einsum_backward_runs_bf16_matmuls_and_matches_fp32(spec, shape_a, shape_b):
  a = jax.random.normal(jax.random.key(0), shape_a)
  b = jax.random.normal(jax.random.key(1), shape_b)
  ct = jax.random.normal(jax.random.key(2), jnp.einsum(spec, a, b).shape)

  def grads(dtype):
    _, vjp = jax.vjp(lambda a, b: layers.einsum(spec, a, b, dtype), a, b)
    return vjp(ct)

  exact = jnp.einsum(spec, a, b)
  np.testing.assert_allclose(layers.einsum(spec, a, b, jnp.float32), exact, rtol=1e-5, atol=1e-5)
  for low, high in zip(grads(jnp.bfloat16), grads(jnp.float32)):
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, high, atol=0.05 * float(jnp.max(jnp.abs(high))))
  # Under a scan (as the stacked layers run) XLA:CPU must still find standard-layout operands.
  hlo = jax.jit(lambda a, b, ct: grads_under_scan(spec, a, b, ct)).lower(a, b, ct).as_text()
  dots = [line for line in hlo.splitlines() if "stablehlo.dot_general" in line]
  assert dots and all(line.split(":")[-1].split("->")[0].count("xbf16>") == 2 for line in dots)
  jax.block_until_ready(jax.jit(lambda a, b, ct: grads_under_scan(spec, a, b, ct))(a, b, ct))


def grads_under_scan(spec, a, b, ct):
  def body(carry, _):
    _, vjp = jax.vjp(lambda a, b: layers.einsum(spec, a, b, jnp.bfloat16), a, b)
    da, db = vjp(ct)
    return carry + da.sum() + db.sum(), None
  return jax.lax.scan(body, 0.0, None, length=2)[0]


def test_auto_compute_dtype_is_bf16_on_accelerators_and_fp32_on_cpu():
  assert configs.resolve_dtype_name("auto", "tpu") == "bfloat16"
  assert configs.resolve_dtype_name("auto", "gpu") == "bfloat16"
  assert configs.resolve_dtype_name("auto", "cpu") == "float32"
  assert configs.resolve_dtype_name("bfloat16", "cpu") == "bfloat16"  # an explicit choice stays
  cfg = configs.FourMConfig()  # "auto" platform: these tests run on CPU devices
  assert (cfg.platform, cfg.dtype) == ("cpu", "float32")
  cfg = configs.DecoderConfig(platform="gpu")
  assert (cfg.platform, cfg.dtype) == ("gpu", "bfloat16")
  assert configs.platform_of("cuda") == "gpu" and configs.platform_of("TPU") == "tpu"
  with pytest.raises(ConfigError, match="model.platform"):
    configs.FourMConfig(platform="metal")
  with pytest.raises(ConfigError, match="model.remat"):
    configs.DecoderConfig(remat="dots")


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_matmul_layout_and_result_dtype_follow_the_target(platform):
  a = jax.random.normal(jax.random.key(0), (2, 5, 3, 4))
  b = jax.random.normal(jax.random.key(1), (2, 7, 3, 4))

  def f(a, b):
    with layers.target(platform):
      return layers.einsum("bqhk,bshk->bhqs", a, b, jnp.bfloat16)

  out = jax.eval_shape(f, a, b)
  hlo = jax.jit(f).lower(a, b).as_text()
  if platform == "cpu":  # XLA:CPU: standard-layout operands (transposes), an fp32 result
    assert out.dtype == jnp.float32 and "stablehlo.transpose" in hlo
  else:  # accelerators: the einsum as it is, activations in the compute dtype
    assert out.dtype == jnp.bfloat16 and "stablehlo.transpose" not in hlo
  np.testing.assert_allclose(np.asarray(jax.jit(f)(a, b), np.float32),
                             jnp.einsum("bqhk,bshk->bhqs", a, b), atol=0.1)


def test_remat_policies_by_name_give_the_same_gradients():
  mlp = layers.Mlp(8, 16, kind="swiglu", use_bias=False, dtype=jnp.float32, layers=2,
                   rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 8)), jnp.float32)
  grad = lambda name: jax.grad(lambda x: layers.scan_layers(  # noqa: E731
      mlp, x, None, lambda blk, c, _: c + blk(c), name).sum())(x)
  reference = grad("none")
  assert set(configs.REMAT_NAMES) == set(layers.REMAT_POLICIES)
  for name in configs.REMAT_NAMES:
    np.testing.assert_allclose(grad(name), reference, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="unknown remat policy"):
    layers.remat(lambda x: x, "dots")
