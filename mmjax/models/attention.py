"""Attention kernels behind one entry point, `attend`, chosen by `model.attention_impl` and target.

- "xla": softmax(q k^T / sqrt(d)) v as two einsums over a dense boolean mask; materialises the
  fp32 [B, H, Q, S] logits. Masked logits take fp32's most negative finite value (never -inf), so
  a fully masked row is uniform, not NaN. The CPU path, and every mask's fallback.
- "cudnn" (GPU): `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused flash
  attention, with the dense mask (it becomes cuDNN's additive bias) and its causal mask type.
- "splash" (TPU): Pallas splash attention with segment ids (packed rows, padding) and a static
  causal or full mask; a kernel per batch row (vmap) inside a shard_map over the batch and heads.
  Only masks of the form `same segment id AND (causal | full)` fit; others (4M's decoder
  self-attention over both image and sequence targets, the decoder's bidirectional image blocks)
  fall back to "xla" with one logged line saying why.

"auto" is splash on TPU, cuDNN on GPU and xla on CPU. Rows whose mask is empty (padding) differ
between kernels; nothing downstream reads them.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import spmd as core_spmd

from mmjax.models.layers import einsum, target_platform
from mmjax.sharding import logical_to_spec

MASK_VALUE = float(jnp.finfo(jnp.float32).min)
AUTO_IMPL = {"tpu": "splash", "gpu": "cudnn", "cpu": "xla"}
SPLASH_BLOCK = 128  # splash tiles: sequence lengths are padded to a multiple of this
SPLASH_SCOPE = "mmjax_splash_"
ATTENTION_SCOPE = "mmjax_attention"
_log = logging.getLogger("mmjax")
_logged: set[str] = set()


class Mask(NamedTuple):
  """Which key slot each query slot may attend to, in the forms the kernels take.

  dense_BQS: the boolean mask (xla, cudnn). q_segment_BQ / kv_segment_BS: segment ids such that,
  on every row with a non-empty mask, `dense == (same id) AND (causal if causal)`; None when no such
  ids exist, with `why_not_segments` saying why.
  """
  dense_BQS: jax.Array
  causal: bool = False
  q_segment_BQ: jax.Array | None = None
  kv_segment_BS: jax.Array | None = None
  why_not_segments: str | None = None


def key_padding_mask(q_len: int, kv_valid_BS: jax.Array) -> Mask:
  """Every query attends to the valid keys (4M's encoder and cross-attention)."""
  b, s = kv_valid_BS.shape
  dense = jnp.broadcast_to(kv_valid_BS[:, None, :], (b, q_len, s))
  return Mask(dense, False, jnp.ones((b, q_len), jnp.int32), kv_valid_BS.astype(jnp.int32))


def resolve_impl(impl: str, mask: Mask) -> str:
  """The kernel that runs: `impl` ("auto": by target platform), or "xla" where the mask does not
  fit the kernel (logged once per reason)."""
  if impl == "auto":
    impl = AUTO_IMPL[target_platform()]
  if impl not in ("xla", "cudnn", "splash"):
    raise ValueError(f"unknown attention implementation {impl!r}")
  if impl == "splash" and mask.why_not_segments:
    message = f"mmjax: splash attention cannot express {mask.why_not_segments}; using XLA attention"
    if message not in _logged:
      _logged.add(message)
      _log.warning(message)
    return "xla"
  return impl


def attend(q_BQHK: jax.Array, k_BSGK: jax.Array, v_BSGK: jax.Array, mask: Mask, *, impl: str,
           dtype) -> jax.Array:
  """Attention output [B, Q, H, K]; G key/value heads serve H = G * R query heads (GQA)."""
  impl = resolve_impl(impl, mask)
  scale = q_BQHK.shape[-1] ** -0.5
  # The scope names these ops in XLA's metadata: `bench step` counts their time as attention.
  with jax.named_scope(ATTENTION_SCOPE):
    if impl == "xla":
      return xla_attention(q_BQHK * scale, k_BSGK, v_BSGK, mask.dense_BQS, dtype)
    if impl == "cudnn":
      return jax.nn.dot_product_attention(**cudnn_arguments(q_BQHK, k_BSGK, v_BSGK, mask, dtype),
                                          implementation="cudnn")
    return splash_attention(q_BQHK * scale, k_BSGK, v_BSGK, mask, dtype,
                            interpret=target_platform() != "tpu")


def xla_attention(q_BQHK: jax.Array, k_BSGK: jax.Array, v_BSGK: jax.Array, mask_BQS: jax.Array,
                  dtype) -> jax.Array:
  """The einsum path over pre-scaled queries; logits and softmax in fp32."""
  b, lq, h, d = q_BQHK.shape
  g = k_BSGK.shape[2]
  if g == h:
    logits = einsum("bqhk,bshk->bhqs", q_BQHK, k_BSGK, dtype, out_dtype=jnp.float32)
    logits = jnp.where(mask_BQS[:, None], logits, MASK_VALUE)
    return einsum("bhqs,bshk->bqhk", jax.nn.softmax(logits, axis=-1), v_BSGK, dtype)
  q_BQGRK = q_BQHK.reshape(b, lq, g, h // g, d)
  logits = einsum("blgrk,bsgk->bgrls", q_BQGRK, k_BSGK, dtype, out_dtype=jnp.float32)
  logits = jnp.where(mask_BQS[:, None, None], logits, MASK_VALUE)
  out = einsum("bgrls,bsgk->blgrk", jax.nn.softmax(logits, axis=-1), v_BSGK, dtype)
  return out.reshape(b, lq, h, d)


def cudnn_arguments(q_BQHK, k_BSGK, v_BSGK, mask: Mask, dtype) -> dict:
  """Arguments of `jax.nn.dot_product_attention` for cuDNN (any implementation takes them)."""
  return dict(query=q_BQHK.astype(dtype), key=k_BSGK.astype(dtype), value=v_BSGK.astype(dtype),
              mask=mask.dense_BQS[:, None], is_causal=mask.causal,
              scale=float(q_BQHK.shape[-1] ** -0.5))


def _splash_kernel(q_len: int, kv_len: int, heads: int, causal: bool, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # noqa: PLC0415

  shape = (q_len, kv_len)
  one = sa.CausalMask(shape) if causal else sa.FullMask(shape)
  # The fused backward: one dk/dv kernel also writes dq (a partial per key block, summed after),
  # so QK^T and dO V^T are computed once per block pair, not once in each of a dq and a dk/dv
  # kernel: 5 matmuls of the scores' size in the backward instead of 3 + 4.
  blocks = sa.BlockSizes(block_q=SPLASH_BLOCK, block_kv=SPLASH_BLOCK,
                         block_kv_compute=SPLASH_BLOCK, block_q_dkv=SPLASH_BLOCK,
                         block_kv_dkv=SPLASH_BLOCK, block_kv_dkv_compute=SPLASH_BLOCK,
                         use_fused_bwd_kernel=True)
  kernel = sa.make_splash_mha(sa.MultiHeadMask([one] * heads), head_shards=1, q_seq_shards=1,
                              block_sizes=blocks, interpret=interpret)
  return kernel, sa.SegmentIds


def _pad(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  extra = size - x.shape[axis]
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def splash_attention(q_BQHK: jax.Array, k_BSGK: jax.Array, v_BSGK: jax.Array, mask: Mask, dtype, *,
                     interpret: bool) -> jax.Array:
  """Splash attention over pre-scaled queries; `interpret` runs the kernel's Pallas interpreter
  (any platform: the tests on CPU)."""
  b, lq, h, d = q_BQHK.shape
  s = k_BSGK.shape[1]
  up = lambda n: -(-n // SPLASH_BLOCK) * SPLASH_BLOCK  # noqa: E731
  pq, ps = up(lq), up(s)
  # Padded queries repeat the last real query's id, so their rows are never empty (an empty row
  # makes the kernel's softmax 0/0); padded keys take an id no query has.
  q_seg = mask.q_segment_BQ.astype(jnp.int32)
  q_seg = jnp.concatenate([q_seg, jnp.repeat(q_seg[:, -1:], pq - lq, axis=1)], axis=1)
  kv_seg = _pad(mask.kv_segment_BS.astype(jnp.int32), 1, ps, np.iinfo(np.int32).min)
  q_BHQK = jnp.transpose(_pad(q_BQHK.astype(dtype), 1, pq), (0, 2, 1, 3))
  k_BGSK = jnp.transpose(_pad(k_BSGK.astype(dtype), 1, ps), (0, 2, 1, 3))
  v_BGSK = jnp.transpose(_pad(v_BSGK.astype(dtype), 1, ps), (0, 2, 1, 3))

  def run(q, k, v, qs, ks):
    kernel, segment_ids = _splash_kernel(pq, ps, q.shape[1], mask.causal, interpret)
    return jax.vmap(kernel)(q, k, v, segment_ids=segment_ids(qs, ks))

  # The scope names the mask in the compiled program's metadata, where FLOP counts read it
  # (mmjax.train.hlo_flops: XLA does not count a custom kernel's FLOPs).
  with jax.named_scope(f"{SPLASH_SCOPE}{'causal' if mask.causal else 'full'}"):
    out_BHQK = _sharded_over_batch_and_heads(run, q_BHQK, k_BGSK, v_BGSK, q_seg, kv_seg)
  return jnp.transpose(out_BHQK, (0, 2, 1, 3))[:, :lq]


def _sharded_over_batch_and_heads(fn, q_BHQK, k_BGSK, v_BGSK, q_seg_BQ, kv_seg_BS):
  """`fn` per shard of the batch (and heads) under the active mesh and logical rules: a Pallas
  kernel is opaque to the SPMD partitioner, which would otherwise gather its operands."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = core_spmd.get_logical_axis_rules()
  if mesh.empty or not rules:
    return fn(q_BHQK, k_BGSK, v_BGSK, q_seg_BQ, kv_seg_BS)
  rules = tuple(rules)
  spec = lambda x, names: logical_to_spec(names, rules, mesh, x.shape)  # noqa: E731
  q_spec = spec(q_BHQK, ("batch", "heads", None, None))
  kv_spec = spec(k_BGSK, ("batch", "heads", None, None))
  if tuple(q_spec)[1:2] != tuple(kv_spec)[1:2]:  # heads split differently: split the batch only
    q_spec = kv_spec = spec(q_BHQK, ("batch",))
  batch_spec = jax.sharding.PartitionSpec(*tuple(q_spec)[:1])
  return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, batch_spec, batch_spec),
                       out_specs=q_spec, check_vma=False)(q_BHQK, k_BGSK, v_BGSK, q_seg_BQ,
                                                         kv_seg_BS)
