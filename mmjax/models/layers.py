"""Generic transformer building blocks shared by the models: parameters, norms, linears, attention, MLPs,
sin-cos position tables, sharding constraints and scanned stacks of layers.

Conventions: parameters are fp32 (or `param_dtype`) with logical axis names; matmuls take inputs in the
compute dtype and accumulate in fp32 (`preferred_element_type=jnp.float32`), so the residual stream
stays fp32 and bf16 only feeds the matmul units. A module built with `layers=L` holds every parameter
with a leading `layers` axis of size L; `scan_layers` runs such a stack under `jax.lax.scan`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import meta
from flax.core import spmd as core_spmd

from mmjax.sharding import logical_to_spec

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

Names = tuple[str | None, ...]


def resolve_dtype_name(name: str, platform: str | None = None) -> str:
  """"auto" is bf16 on accelerators (TPU, GPU) and fp32 on CPUs, whose fp32 path is the default."""
  if name != "auto":
    return name
  return "float32" if (platform or jax.default_backend()) == "cpu" else "bfloat16"


def dtype_of(name: str) -> jnp.dtype:
  name = resolve_dtype_name(name)
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; known: {sorted(DTYPES)}")
  return DTYPES[name]


def param(key: jax.Array, init, shape: Sequence[int], names: Names, dtype=jnp.float32) -> nnx.Param:
  """A parameter with logical axis names; created sharded when a global mesh is set."""
  if len(names) != len(shape):
    raise ValueError(f"parameter of shape {tuple(shape)} needs {len(shape)} axis names, got {names}")
  value = init(key, tuple(shape), dtype)
  if meta.get_global_mesh() is None:  # no mesh: names are metadata only
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)
  return nnx.Param(value, out_sharding=tuple(names))  # the context decides eager sharding


def _stacked(layers: int, shape: Sequence[int], names: Names) -> tuple[tuple[int, ...], Names]:
  if layers:
    return (layers, *shape), ("layers", *names)
  return tuple(shape), tuple(names)


def xavier(in_dims: int, out_dims: int, layers: int):
  """Xavier-uniform over the given in/out axes (a leading layers axis is a batch axis)."""
  lead = 1 if layers else 0
  in_axes = tuple(range(lead, lead + in_dims))
  out_axes = tuple(range(lead + in_dims, lead + in_dims + out_dims))
  return jax.nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=in_axes,
                                              out_axis=out_axes, batch_axis=tuple(range(lead)))


# ---------------------------------------------------------------------------------------------------
# Sharding of activations.


def constrain(x: jax.Array, names: Names) -> jax.Array:
  """`with_sharding_constraint` by logical axis names under the active mesh and `nnx.logical_axis_rules`
  (mesh axes that do not divide a dimension are dropped, as for parameters); a no-op without them."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = core_spmd.get_logical_axis_rules()
  if mesh.empty or not rules:
    return x
  spec = logical_to_spec(names, tuple(rules), mesh, x.shape)
  return jax.lax.with_sharding_constraint(x, spec)


# ---------------------------------------------------------------------------------------------------
# Matmuls, linears and norms.


def einsum(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
  """`jnp.einsum(spec, a, b)` with inputs in the compute dtype, fp32 accumulation and result.

  Below fp32 the backward matmuls take compute-dtype inputs too: JAX's own transpose of a
  bf16 x bf16 -> fp32 einsum upcasts the bf16 operand to meet the fp32 cotangent, which runs two
  thirds of the training matmuls at the fp32 rate. Every index of an operand must appear in the
  other operand or the output (true of matmuls and attention).
  """
  a, b = a.astype(dtype), b.astype(dtype)
  if jnp.dtype(dtype) == jnp.float32:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
  return _low_precision_einsum(spec, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _low_precision_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  return _batched_matmul(spec, a, b)


def _low_precision_einsum_fwd(spec, a, b):
  return _batched_matmul(spec, a, b), (a, b)


def _low_precision_einsum_bwd(spec, residuals, g):
  a, b = residuals
  inputs, out = spec.split("->")
  spec_a, spec_b = inputs.split(",")
  g = g.astype(a.dtype)  # what JAX's transpose would round the operand's gradient to anyway
  da = _batched_matmul(f"{out},{spec_b}->{spec_a}", g, b)
  db = _batched_matmul(f"{spec_a},{out}->{spec_b}", a, g)
  return da.astype(a.dtype), db.astype(b.dtype)


def _batched_matmul(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """The einsum with an fp32 result; on CPU as one [batch, M, K] @ [batch, K, N] matmul of
  materialised operands.

  XLA:CPU runs bf16 x bf16 -> fp32 only on operands in this standard layout; a transposed one
  (e.g. the attention backward's contraction over queries) fails with "Unsupported element type
  for DotThunk::Execute". TPUs and GPUs take any layout, so there the einsum stays as it is.
  """
  if jax.default_backend() != "cpu":
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
  inputs, out = spec.split("->")
  spec_a, spec_b = inputs.split(",")
  batch = [i for i in out if i in spec_a and i in spec_b]
  free_a = [i for i in out if i in spec_a and i not in spec_b]
  free_b = [i for i in out if i in spec_b and i not in spec_a]
  contract = [i for i in spec_a if i in spec_b and i not in out]
  size = {**dict(zip(spec_a, a.shape)), **dict(zip(spec_b, b.shape))}

  def arrange(x, spec_x, first, second):
    x = jnp.transpose(x, [spec_x.index(i) for i in batch + first + second])
    count = lambda names: int(np.prod([size[i] for i in names], dtype=np.int64))  # noqa: E731
    return x.reshape(count(batch), count(first), count(second))

  lhs, rhs = arrange(a, spec_a, free_a, contract), arrange(b, spec_b, contract, free_b)
  y = jax.lax.dot_general(lhs, rhs, (((2,), (1,)), ((0,), (0,))),
                          preferred_element_type=jnp.float32)
  y = y.reshape([size[i] for i in batch + free_a + free_b])
  return jnp.transpose(y, [(batch + free_a + free_b).index(i) for i in out])


_low_precision_einsum.defvjp(_low_precision_einsum_fwd, _low_precision_einsum_bwd)


def matmul(x: jax.Array, w: jax.Array, contract: int, dtype) -> jax.Array:
  """Contracts the last `contract` axes of x with the first `contract` axes of w; fp32 result."""
  letters = "abcdefghijklmnopqrstuvwxyz"
  keep, inner = x.ndim - contract, w.ndim - contract
  x_spec = letters[:x.ndim]
  w_spec = x_spec[keep:] + letters[x.ndim:x.ndim + inner]
  return einsum(f"{x_spec},{w_spec}->{x_spec[:keep]}{w_spec[contract:]}", x, w, dtype)


class Linear(nnx.Module):
  """y = x @ W (+ b), with W of shape [*in, *out]; several in/out axes allow fused or per-head layouts."""

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], in_names: Names,
               out_names: Names, *, use_bias: bool, dtype, param_dtype=jnp.float32, layers: int = 0,
               rngs: nnx.Rngs):
    self.dtype, self.contract = dtype, len(in_shape)
    shape, names = _stacked(layers, (*in_shape, *out_shape), (*in_names, *out_names))
    self.kernel = param(rngs.params(), xavier(len(in_shape), len(out_shape), layers), shape, names,
                        param_dtype)
    shape, names = _stacked(layers, out_shape, out_names)
    self.bias = param(rngs.params(), nnx.initializers.zeros, shape, names, param_dtype) \
        if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = matmul(x, self.kernel[...], self.contract, self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y


def normalize(x: jax.Array, kind: str, eps: float) -> jax.Array:
  """LayerNorm (centred) or RMSNorm without the affine part, in fp32."""
  x = x.astype(jnp.float32)
  if kind == "layernorm":
    x = x - jnp.mean(x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


class Norm(nnx.Module):
  """LayerNorm or RMSNorm over the last axis (fp32), with a scale and an optional bias."""

  def __init__(self, dim: int, *, kind: str, eps: float, use_bias: bool, names: Names = ("embed",),
               param_dtype=jnp.float32, layers: int = 0, rngs: nnx.Rngs):
    self.kind, self.eps = kind, eps
    shape, pnames = _stacked(layers, (dim,), names)
    self.scale = param(rngs.params(), nnx.initializers.ones, shape, pnames, param_dtype)
    self.bias = param(rngs.params(), nnx.initializers.zeros, shape, pnames, param_dtype) \
        if use_bias and kind == "layernorm" else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = normalize(x, self.kind, self.eps) * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y


# ---------------------------------------------------------------------------------------------------
# Attention.


def attention(q_BQHK: jax.Array, k_BSHK: jax.Array, v_BSHK: jax.Array, mask_BQS: jax.Array,
              dtype) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v. Masked logits take fp32's most negative finite value (never -inf),
  so a fully masked row is uniform, not NaN. `mask_BQS` broadcasts over heads."""
  scale = q_BQHK.shape[-1] ** -0.5
  logits = einsum("bqhk,bshk->bhqs", q_BQHK * scale, k_BSHK, dtype)
  logits = jnp.where(mask_BQS[:, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  return einsum("bhqs,bshk->bqhk", probs, v_BSHK, dtype)


# ---------------------------------------------------------------------------------------------------
# MLPs.


class Mlp(nnx.Module):
  """SwiGLU `fc2(silu(fc1 x) * fc3 x)` or GELU `fc2(gelu(fc1 x))`."""

  def __init__(self, dim: int, hidden: int, *, kind: str, use_bias: bool, dtype,
               param_dtype=jnp.float32, layers: int = 0, rngs: nnx.Rngs):
    if kind not in ("swiglu", "gelu"):
      raise ValueError(f"unknown MLP kind {kind!r}")
    self.kind = kind
    kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, layers=layers, rngs=rngs)
    self.fc1 = Linear((dim,), (hidden,), ("embed",), ("mlp",), **kw)
    self.fc2 = Linear((hidden,), (dim,), ("mlp",), ("embed",), **kw)
    self.fc3 = Linear((dim,), (hidden,), ("embed",), ("mlp",), **kw) if kind == "swiglu" else None

  def __call__(self, x: jax.Array) -> jax.Array:
    names = ("batch", "length", "mlp")
    if self.fc3 is not None:
      h = jax.nn.silu(self.fc1(x)) * self.fc3(x)
    else:
      h = jax.nn.gelu(self.fc1(x), approximate=False)
    return self.fc2(constrain(h, names))


# ---------------------------------------------------------------------------------------------------
# Fixed position tables (numpy: constants folded at trace time).


def sincos_1d(length: int, dim: int) -> np.ndarray:
  """[length, dim]: position p gets [sin(p w), cos(p w)] with w_k = 1 / 10000^(k / (dim/2))."""
  if dim % 2:
    raise ValueError(f"1D sin-cos needs an even width, got {dim}")
  omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
  angles = np.arange(length, dtype=np.float64)[:, None] * omega[None]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def sincos_2d(rows: int, cols: int, dim: int) -> np.ndarray:
  """[rows * cols, dim] in row-major order: cell (r, c) gets [sin(r w), cos(r w), sin(c w), cos(c w)]
  with w_k = 1 / 10000^(k / (dim/4))."""
  if dim % 4:
    raise ValueError(f"2D sin-cos needs a width divisible by 4, got {dim}")
  omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
  r, c = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64),
                     indexing="ij")
  ra = r.reshape(-1)[:, None] * omega[None]
  ca = c.reshape(-1)[:, None] * omega[None]
  return np.concatenate([np.sin(ra), np.cos(ra), np.sin(ca), np.cos(ca)], axis=1).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Scanned stacks.

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def scan_layers(stack: nnx.Module, carry, xs, body: Callable, remat: str):
  """Runs `body(layer_module, carry, x) -> carry` over the leading `layers` axis of `stack`'s params.

  `xs` is a pytree of per-layer inputs with the same leading axis (or None). Under `remat` the body's
  activations are recomputed in the backward pass according to the named policy.
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {remat!r}; known: {sorted(REMAT_POLICIES)}")
  graphdef, state = nnx.split(stack)

  def step(c, inputs):
    layer_state, x = inputs
    return body(nnx.merge(graphdef, layer_state), c, x), None

  if remat != "none":
    step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=False)
  carry, _ = jax.lax.scan(step, carry, (state, xs))
  return carry
