"""Grouped matmuls: each row of a group-sorted token matrix times its group's weight, at dense cost.

Used by Mixture-of-Transformers (group = modality), MoMa and token-choice MoE (group = expert).
Two implementations with static shapes and dynamic group sizes:

- "ragged": `jax.lax.ragged_dot`. On TPU/GPU a true grouped matmul: 2·N·K·F FLOPs for N rows. On
  CPU XLA expands it to G dense matmuls over masked copies (G× the FLOPs), so it is not used there.
  Its weight gradient (rows ragged along the contracted axis) the TPU compiler also expands, to G
  dense matmuls over all N rows, so on TPU, where it runs per shard, `ragged_dot` takes a VJP
  (`ragged_matmul`) whose weight gradient is the Pallas megablox grouped kernel `tgmm`: 2·N·K·F.
- "chunked" (default on CPU): each group's rows are laid out from a chunk-aligned offset in a buffer
  of P = ceil(N/c)·c + G·c rows; every chunk of c rows then belongs to exactly one group and is
  multiplied by that group's weight (a scan over chunks, one [c, K] @ [K, F] matmul each).
  FLOPs 2·P·K·F = 2·(N + ≤G·c)·K·F: the dense cost plus at most one padded chunk per group.
  With fewer rows than one chunk (a decoding step) each row is multiplied by its own gathered
  weight instead: dense FLOPs, N·K·F weight reads.
"""

from __future__ import annotations

import functools
import importlib
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mmjax.models import layers


# einsum with inputs in the compute dtype, fp32 accumulation, the result in the activation dtype.
dot = layers.einsum


class Routing(NamedTuple):
  """Tokens grouped by modality (MoT). The decoder makes one for the whole batch (its modality_N
  gives every per-modality norm and linear its token's group); each grouped matmul makes its own for
  its shard of the batch (`layers.over_batch_shards`), so no device sorts the whole batch.

  modality_N: group id per flattened token; order_N sorts tokens by group (stable); inverse_N undoes
  the sort; sizes_G counts tokens per group.
  """
  modality_N: jax.Array
  order_N: jax.Array
  inverse_N: jax.Array
  sizes_G: jax.Array


def make_routing(modality_BL: jax.Array, num_groups: int) -> Routing:
  modality_N = jnp.clip(modality_BL.reshape(-1), 0, num_groups - 1)
  order_N = jnp.argsort(modality_N, stable=True)
  inverse_N = jnp.argsort(order_N)
  sizes_G = jnp.bincount(modality_N, length=num_groups).astype(jnp.int32)
  return Routing(modality_N, order_N, inverse_N, sizes_G)


def resolve_impl(impl: str, platform: str | None = None) -> str:
  """"auto": "chunked" on CPU, "ragged" on TPU/GPU (`platform`, default: the traced target)."""
  if impl == "auto":
    return "chunked" if (platform or layers.target_platform()) == "cpu" else "ragged"
  if impl not in ("ragged", "chunked"):
    raise ValueError(f"grouped matmul impl must be auto, ragged or chunked, got {impl!r}")
  return impl


def grouped_matmul(x_NK: jax.Array, w_GKF: jax.Array, sizes_G: jax.Array, *, impl: str = "auto",
                   chunk: int = 64, dtype=jnp.float32) -> jax.Array:
  """Rows [0, sizes[0]) use w[0], the next sizes[1] rows w[1], ...; rows past sum(sizes) give 0."""
  impl = resolve_impl(impl)
  if impl == "ragged":
    return ragged_matmul(x_NK, w_GKF, sizes_G, dtype).astype(layers.activation_dtype(dtype))
  n, k = x_NK.shape
  g, _, f = w_GKF.shape
  ends = jnp.cumsum(sizes_G)
  starts = ends - sizes_G
  row = jnp.arange(n)
  group = jnp.searchsorted(ends, row, side="right")
  inside = group < g
  group = jnp.minimum(group, g - 1)
  if n < chunk:
    # Fewer rows than a chunk (decoding steps): each row reads its own weight, n·K·F memory.
    out = dot("nk,nkf->nf", x_NK, w_GKF[group], dtype)
    return jnp.where(inside[:, None], out, 0.0)
  c = chunk
  num_chunks = -(-n // c) + g
  padded = -(-sizes_G // c) * c
  pends = jnp.cumsum(padded)
  pstarts = pends - padded
  dest = jnp.where(inside, pstarts[group] + row - starts[group], num_chunks * c)  # out of range
  buf = jnp.zeros((num_chunks * c, k), x_NK.dtype).at[dest].set(x_NK, mode="drop")
  chunk_group = jnp.minimum(jnp.searchsorted(pends, jnp.arange(num_chunks) * c, side="right"), g - 1)

  # A loop over chunks, each [c, K] @ w[its group]: measured on XLA:CPU (K=256, F=704, N=4096,
  # G=8) 1.3x a plain matmul forward+backward, where one batched einsum over per-chunk gathered
  # weights was 2.7x (the weight gather and its scatter-add backward dominate).
  def one_chunk(_, inputs):
    x_CK, group_id = inputs
    return None, dot("ck,kf->cf", x_CK, jax.lax.dynamic_index_in_dim(w_GKF, group_id, keepdims=False),
                     dtype)

  _, out = jax.lax.scan(one_chunk, None, (buf.reshape(num_chunks, c, k), chunk_group))
  out = out.reshape(num_chunks * c, f)
  return jnp.where(inside[:, None], out[jnp.minimum(dest, num_chunks * c - 1)], 0.0)


TGMM_SCOPE = "mmjax_tgmm"  # names the weight-gradient kernel for mmjax.train.hlo_flops


def ragged_matmul(x_NK: jax.Array, w_GKF: jax.Array, sizes_G: jax.Array, dtype, *,
                  grouped_weight_grad: bool | None = None) -> jax.Array:
  """`jax.lax.ragged_dot` in `dtype` with fp32 results. With `grouped_weight_grad` (default: when
  the target is a TPU and no mesh axis is left to the SPMD partitioner) its weight gradient is
  megablox's grouped `tgmm` instead of the compiler's per-group dense matmuls; elsewhere the
  kernel runs in Pallas's interpreter (the CPU tests). A Mosaic kernel cannot be partitioned
  automatically: it runs per shard (`layers.over_batch_shards`: MoT, the 4M heads), and where the
  partitioner splits the grouped matmul (MoMa's expert choice over the whole batch) ragged_dot's
  own gradient stays."""
  if grouped_weight_grad is None:
    grouped_weight_grad = layers.target_platform() == "tpu" and _all_axes_manual()
  if not grouped_weight_grad:
    return jax.lax.ragged_dot(x_NK.astype(dtype), w_GKF.astype(dtype), sizes_G,
                              preferred_element_type=jnp.float32)
  return _ragged_tgmm(x_NK, w_GKF, sizes_G.astype(jnp.int32), jnp.dtype(dtype),
                      layers.target_platform() != "tpu")


def _all_axes_manual() -> bool:
  """No mesh, or every mesh axis of more than one device is manual here (inside a shard_map)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return True
  return all(size == 1 or kind == jax.sharding.AxisType.Manual
             for size, kind in zip(mesh.axis_sizes, mesh.axis_types))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _ragged_tgmm(x_NK, w_GKF, sizes_G, dtype, interpret):
  del interpret
  return jax.lax.ragged_dot(x_NK.astype(dtype), w_GKF.astype(dtype), sizes_G,
                            preferred_element_type=jnp.float32)


def _ragged_tgmm_fwd(x_NK, w_GKF, sizes_G, dtype, interpret):
  return _ragged_tgmm(x_NK, w_GKF, sizes_G, dtype, interpret), (x_NK, w_GKF, sizes_G)


def _ragged_tgmm_bwd(dtype, interpret, residuals, dy_NF):
  x_NK, w_GKF, sizes_G = residuals
  # The input gradient is ragged along rows that are not contracted: a grouped matmul as it is.
  dx_NK = jax.lax.ragged_dot(dy_NF.astype(dtype), jnp.swapaxes(w_GKF, 1, 2).astype(dtype), sizes_G,
                             preferred_element_type=jnp.float32)
  # The weight gradient per group: x[group rows]^T dy[group rows]. The kernel tiles rows by tm,
  # so the rows are padded to a multiple of it (rows past sum(sizes) belong to no group).
  n, k = x_NK.shape
  f = dy_NF.shape[1]
  up = lambda a, b: -(-a // b) * b  # noqa: E731
  tiling = (min(512, up(n, 128)), min(512, up(k, 128)), min(512, up(f, 128)))
  rows = up(n, tiling[0])
  x_pad = jnp.pad(x_NK.astype(dtype), ((0, rows - n), (0, 0)))
  dy_pad = jnp.pad(dy_NF.astype(dtype), ((0, rows - n), (0, 0)))
  # The module by path: the package's `gmm` attribute is the function, and it exports no tgmm.
  megablox = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")
  with jax.named_scope(TGMM_SCOPE):
    dw_GKF = megablox.tgmm(x_pad.T, dy_pad, sizes_G, jnp.float32, tiling=tiling,
                           interpret=interpret)
  return dx_NK.astype(x_NK.dtype), dw_GKF.astype(w_GKF.dtype), None


_ragged_tgmm.defvjp(_ragged_tgmm_fwd, _ragged_tgmm_bwd)


class Slots(NamedTuple):
  """(token, expert) pairs laid out expert-major for a grouped matmul.

  token_S / expert_S: the pair in each slot; valid_S: False for unused slots at the end;
  sizes_E: slots per expert (the group sizes).
  """
  token_S: jax.Array
  expert_S: jax.Array
  valid_S: jax.Array
  sizes_E: jax.Array


def slots_from_selection(selected_EN: jax.Array, num_slots: int) -> Slots:
  """Packs the True entries of selected[E, N] into `num_slots` static slots, expert-major."""
  e, n = selected_EN.shape
  (flat,) = jnp.nonzero(selected_EN.reshape(-1), size=num_slots, fill_value=e * n)
  valid = flat < e * n
  flat = jnp.minimum(flat, e * n - 1)
  sizes = jnp.sum(selected_EN, axis=1).astype(jnp.int32)
  return Slots(flat % n, flat // n, valid, sizes)
