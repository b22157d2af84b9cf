"""Generic transformer building blocks shared by the models: parameters, norms, linears, attention, MLPs,
sin-cos position tables, sharding constraints and scanned stacks of layers.

Conventions: parameters are fp32 (or `param_dtype`) with logical axis names; matmuls take inputs in the
compute dtype and accumulate in fp32. What a matmul returns follows the target platform (`target`,
set once per model call from `model.platform`): fp32 on CPUs, where the fast bf16 kernels produce
fp32 and the residual stream stays fp32; the compute dtype on TPUs and GPUs, where activations
between blocks are bf16 and only softmax, norm statistics and the loss run in fp32. A module built
with `layers=L` holds every parameter with a leading `layers` axis of size L; `scan_layers` runs
such a stack under `jax.lax.scan`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import meta
from flax.core import spmd as core_spmd
from jax.ad_checkpoint import checkpoint_name

from mmjax.sharding import logical_to_spec

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

Names = tuple[str | None, ...]

# The platform the traced program targets (cpu, gpu, tpu). Outside a model call: "cpu", whose
# choices (standard-layout matmuls, fp32 activations) are correct on every platform.
_TARGET = contextvars.ContextVar("mmjax_target_platform", default="cpu")


@contextlib.contextmanager
def target(platform: str):
  """Traces the enclosed model code for `platform` (a resolved `model.platform`)."""
  token = _TARGET.set(platform)
  try:
    yield
  finally:
    _TARGET.reset(token)


def target_platform() -> str:
  return _TARGET.get()


def activation_dtype(dtype) -> jnp.dtype:
  """What matmuls return and the residual stream carries: fp32 on CPUs, `dtype` elsewhere."""
  return jnp.dtype(jnp.float32) if target_platform() == "cpu" else jnp.dtype(dtype)


def dtype_of(name: str) -> jnp.dtype:
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


def over_batch_shards(fn: Callable, batched: Sequence[jax.Array], replicated: Sequence[jax.Array],
                      *, summed: bool = False):
  """`fn(*batched, *replicated)` run on each shard of the batch (axis 0 of every `batched` array,
  split as the logical "batch" axis is) with whole copies of `replicated`; its outputs are split
  the same way, or with `summed` added up over the shards.

  For grouped matmuls (`ragged_dot`) over tokens sorted by group: sorting the whole batch's tokens
  and multiplying them in one ragged_dot leaves the SPMD partitioner no axis to split, so every
  chip would sort, gather and multiply every token of the global batch. Per shard, each chip
  sorts and multiplies its own. Without an active mesh and rules it is the plain call."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = core_spmd.get_logical_axis_rules()
  if mesh.empty or not rules:
    return fn(*batched, *replicated)
  axes = tuple(logical_to_spec(("batch",), tuple(rules), mesh, batched[0].shape))[:1]
  if not axes or axes[0] is None:
    return fn(*batched, *replicated)
  names = (axes[0],) if isinstance(axes[0], str) else tuple(axes[0])
  if all(mesh.shape[n] == 1 for n in names):  # one shard: the plain call
    return fn(*batched, *replicated)
  spec = jax.sharding.PartitionSpec

  def per_shard(*args):
    out = fn(*args)
    return jax.tree.map(lambda x: jax.lax.psum(x, names), out) if summed else out

  # check_vma=False: Pallas kernels inside (megablox's tgmm, the TPU grouped matmuls' weight
  # gradient) declare outputs without the varying-axes types the check needs.
  return jax.shard_map(per_shard, mesh=mesh,
                       in_specs=(*(spec(axes[0]) for _ in batched), *(spec() for _ in replicated)),
                       out_specs=spec() if summed else spec(axes[0]),
                       check_vma=False)(*batched, *replicated)


# ---------------------------------------------------------------------------------------------------
# Matmuls, linears and norms.


def einsum(spec: str, a: jax.Array, b: jax.Array, dtype, out_dtype=None) -> jax.Array:
  """`jnp.einsum(spec, a, b)` with inputs in the compute dtype and fp32 accumulation; the result in
  `out_dtype` (default: `activation_dtype(dtype)`; pass fp32 for logits that feed a softmax).

  Below fp32 the backward matmuls take compute-dtype inputs too: JAX's own transpose of a
  bf16 x bf16 -> fp32 einsum upcasts the bf16 operand to meet the fp32 cotangent, which runs two
  thirds of the training matmuls at the fp32 rate. Every index of an operand must appear in the
  other operand or the output (true of matmuls and attention).
  """
  a, b = a.astype(dtype), b.astype(dtype)
  out_dtype = jnp.dtype(activation_dtype(dtype) if out_dtype is None else out_dtype)
  if jnp.dtype(dtype) == jnp.float32:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(out_dtype)
  return _low_precision_einsum(spec, target_platform(), out_dtype, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _low_precision_einsum(spec: str, platform: str, out_dtype, a: jax.Array,
                          b: jax.Array) -> jax.Array:
  return _batched_matmul(spec, a, b, platform, out_dtype)


def _low_precision_einsum_fwd(spec, platform, out_dtype, a, b):
  return _batched_matmul(spec, a, b, platform, out_dtype), (a, b)


def _low_precision_einsum_bwd(spec, platform, out_dtype, residuals, g):
  del out_dtype
  a, b = residuals
  inputs, out = spec.split("->")
  spec_a, spec_b = inputs.split(",")
  g = g.astype(a.dtype)  # what JAX's transpose would round the operand's gradient to anyway
  da = _batched_matmul(f"{out},{spec_b}->{spec_a}", g, b, platform, jnp.float32)
  db = _batched_matmul(f"{spec_a},{out}->{spec_b}", a, g, platform, jnp.float32)
  return da.astype(a.dtype), db.astype(b.dtype)


def _batched_matmul(spec: str, a: jax.Array, b: jax.Array, platform: str, out_dtype) -> jax.Array:
  """The einsum with fp32 accumulation; on CPU as one [batch, M, K] @ [batch, K, N] matmul of
  materialised operands.

  XLA:CPU runs bf16 x bf16 -> fp32 only on operands in this standard layout; a transposed one
  (e.g. the attention backward's contraction over queries) fails with "Unsupported element type
  for DotThunk::Execute". TPUs and GPUs take any layout, so there the einsum stays as it is.
  """
  if platform != "cpu":
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(out_dtype)
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
  return jnp.transpose(y, [(batch + free_a + free_b).index(i) for i in out]).astype(out_dtype)


_low_precision_einsum.defvjp(_low_precision_einsum_fwd, _low_precision_einsum_bwd)


def matmul(x: jax.Array, w: jax.Array, contract: int, dtype, out_dtype=None) -> jax.Array:
  """Contracts the last `contract` axes of x with the first `contract` axes of w (`einsum`)."""
  letters = "abcdefghijklmnopqrstuvwxyz"
  keep, inner = x.ndim - contract, w.ndim - contract
  x_spec = letters[:x.ndim]
  w_spec = x_spec[keep:] + letters[x.ndim:x.ndim + inner]
  return einsum(f"{x_spec},{w_spec}->{x_spec[:keep]}{w_spec[contract:]}", x, w, dtype, out_dtype)


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
      y = y + self.bias[...].astype(y.dtype)
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
      h = jax.nn.silu(checkpoint_name(self.fc1(x), "mlpwi_0")) * checkpoint_name(self.fc3(x),
                                                                                  "mlpwi_1")
    else:
      h = jax.nn.gelu(checkpoint_name(self.fc1(x), "mlpwi"), approximate=False)
    return checkpoint_name(self.fc2(constrain(h, names)), "mlpwo")


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

# Remat policies by MaxText's names. The named ones save the tagged projections
# (`checkpoint_name`: query_proj, key_proj, value_proj, qkv_proj, out_proj, mlpwi*, mlpwo) and
# recompute the rest in the backward pass.
_QKV = ("query_proj", "key_proj", "value_proj", "qkv_proj")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names(*_QKV),
    "save_out_proj": jax.checkpoint_policies.save_only_these_names("out_proj"),
    "save_dot_except_mlp": jax.checkpoint_policies.save_only_these_names(*_QKV, "out_proj"),
    "save_dot_except_mlpwi": jax.checkpoint_policies.save_only_these_names(*_QKV, "out_proj",
                                                                          "mlpwo"),
}


def remat(fn: Callable, name: str) -> Callable:
  """`fn` under the named remat policy ("none": as it is)."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {name!r}; known: {sorted(REMAT_POLICIES)}")
  if name == "none":
    return fn
  return jax.checkpoint(fn, policy=REMAT_POLICIES[name], prevent_cse=False)


def scan_layers(stack: nnx.Module, carry: jax.Array, xs, body: Callable, remat_name: str,
                carry_dtype=None):
  """Runs `body(layer_module, carry, x) -> carry` over the leading `layers` axis of `stack`'s params.

  `xs` is a pytree of per-layer inputs with the same leading axis (or None). Under `remat_name` the
  body's activations are recomputed in the backward pass according to the named policy. The carry
  (the residual stream) travels in `carry_dtype` (default: its own).
  """
  graphdef, state = nnx.split(stack)
  carry_dtype = carry.dtype if carry_dtype is None else carry_dtype

  def step(c, inputs):
    layer_state, x = inputs
    return body(nnx.merge(graphdef, layer_state), c, x).astype(carry_dtype), None

  carry, _ = jax.lax.scan(remat(step, remat_name), carry.astype(carry_dtype), (state, xs))
  return carry
