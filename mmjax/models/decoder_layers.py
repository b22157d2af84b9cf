"""Small building blocks of the mixed-modal decoder: parameters, norms (per modality for MoT), dropout.

Norm weights may carry a leading group axis G: none for the dense model, G = number of modalities for
Mixture-of-Transformers; each token then reads its modality's weights (a gather, no extra matmul).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax.models.grouped import Routing


def param(key: jax.Array, init, shape: tuple[int, ...], names: tuple, dtype=jnp.float32) -> nnx.Param:
  """A parameter with logical axis names. Not sharded at creation: the trainer maps the names to
  shardings (mmjax.sharding.tree_shardings, which replicates axes a mesh axis does not divide)."""
  return nnx.Param(init(key, shape, dtype), out_sharding=names, eager_sharding=False)


def _per_token(p: jax.Array, groups: int, routing: Routing | None, lead: tuple[int, ...]) -> jax.Array:
  """A norm parameter [G?, ...] broadcast to tokens [*lead, ...] (a gather, no matmul)."""
  if groups == 1:
    return p
  return p[routing.modality_N].reshape(*lead, *p.shape[1:])


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis, computed in fp32; one scale per modality when groups > 1."""

  def __init__(self, dim: int, *, eps: float, groups: int, param_dtype, rngs: nnx.Rngs):
    self.eps, self.groups = eps, groups
    shape, names = ((groups, dim), (None, "embed")) if groups > 1 else ((dim,), ("embed",))
    self.scale = param(rngs.params(), nnx.initializers.ones, shape, names, param_dtype)

  def __call__(self, x: jax.Array, routing: Routing | None = None) -> jax.Array:
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return y * _per_token(self.scale[...], self.groups, routing, x.shape[:-1]).astype(jnp.float32)


class HeadLayerNorm(nnx.Module):
  """qk-norm: LayerNorm over the head dimension with a weight and bias per head (Chameleon)."""

  def __init__(self, heads: int, head_dim: int, *, eps: float, groups: int, param_dtype,
               rngs: nnx.Rngs):
    self.eps, self.groups = eps, groups
    shape, names = (heads, head_dim), ("heads", "kv")
    if groups > 1:
      shape, names = (groups, *shape), (None, *names)
    self.weight = param(rngs.params(), nnx.initializers.ones, shape, names, param_dtype)
    self.bias = param(rngs.params(), nnx.initializers.zeros, shape, names, param_dtype)

  def __call__(self, x_BLHK: jax.Array, routing: Routing | None = None) -> jax.Array:
    x = x_BLHK.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    lead = x.shape[:-2]
    w = _per_token(self.weight[...], self.groups, routing, lead)
    b = _per_token(self.bias[...], self.groups, routing, lead)
    return y * w + b


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  if rate <= 0.0 or key is None:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)
