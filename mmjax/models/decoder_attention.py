"""Self-attention of the mixed-modal decoder: the mask from per-token fields, GQA, qk-norm, RoPE, KV cache.

The mask is `(causal OR same_block) AND same_segment AND valid` (specs/mixed_modal.md); causality is
over slot indices in the packed row, so packing, bidirectional image blocks and cached decoding are
one code path. The kernel (mmjax.models.attention) follows `model.attention_impl`; splash takes the
mask as segment ids and a causal mask when the rows have no bidirectional blocks.
"""

from __future__ import annotations

import jax
from flax import nnx

from mmjax.models.attention import Mask, attend
from mmjax.models.decoder_layers import HeadLayerNorm
from mmjax.models.experts import ModalLinear
from mmjax.models.grouped import Routing
from mmjax.models.layers import checkpoint_name
from mmjax.models.rope import apply_rope


def attention_mask(q_segment_BQ: jax.Array, q_block_BQ: jax.Array, q_index_BQ: jax.Array,
                   k_segment_BS: jax.Array, k_block_BS: jax.Array, k_index_BS: jax.Array
                   ) -> jax.Array:
  """Boolean [B, Q, S]: may query slot q attend to key slot s."""
  causal = k_index_BS[:, None, :] <= q_index_BQ[:, :, None]
  same_block = (q_block_BQ[:, :, None] == k_block_BS[:, None, :]) & (q_block_BQ[:, :, None] > 0)
  same_segment = q_segment_BQ[:, :, None] == k_segment_BS[:, None, :]
  valid = (q_segment_BQ[:, :, None] > 0) & (k_segment_BS[:, None, :] > 0)
  return (causal | same_block) & same_segment & valid


class Attention(nnx.Module):
  """Grouped-query attention; every weight per modality when groups > 1 (MoT)."""

  def __init__(self, *, d_model: int, num_heads: int, num_kv_heads: int, qk_norm: bool,
               norm_eps: float, rope_theta: float, rope_layout: str, groups: int, impl: str,
               chunk: int, dtype, param_dtype, rngs: nnx.Rngs):
    self.heads, self.kv_heads, self.head_dim = num_heads, num_kv_heads, d_model // num_heads
    self.rope_theta, self.rope_layout, self.dtype = rope_theta, rope_layout, dtype
    kw = dict(groups=groups, impl=impl, chunk=chunk, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    k = self.head_dim
    self.q = ModalLinear((d_model,), (num_heads, k), ("embed", "heads", "kv"), **kw)
    self.k = ModalLinear((d_model,), (num_kv_heads, k), ("embed", "heads", "kv"), **kw)
    self.v = ModalLinear((d_model,), (num_kv_heads, k), ("embed", "heads", "kv"), **kw)
    self.o = ModalLinear((num_heads, k), (d_model,), ("heads", "kv", "embed"), **kw)
    self.q_norm = self.k_norm = nnx.data(None)
    if qk_norm:
      nkw = dict(eps=norm_eps, groups=groups, param_dtype=param_dtype, rngs=rngs)
      self.q_norm = nnx.data(HeadLayerNorm(num_heads, k, **nkw))
      self.k_norm = nnx.data(HeadLayerNorm(num_kv_heads, k, **nkw))

  def __call__(self, x_BLD: jax.Array, position_BL: jax.Array, mask: Mask,
               routing: Routing | None, cache: tuple[jax.Array, jax.Array] | None = None,
               cache_index: jax.Array | None = None, impl: str = "xla"
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Returns the output and, with a cache, the cache with this call's keys/values written."""
    q_BLHK = checkpoint_name(self.q(x_BLD, routing), "query_proj")
    k_BLGK = checkpoint_name(self.k(x_BLD, routing), "key_proj")
    v_BLGK = checkpoint_name(self.v(x_BLD, routing), "value_proj")
    if self.q_norm is not None:
      q_BLHK, k_BLGK = self.q_norm(q_BLHK, routing), self.k_norm(k_BLGK, routing)
    rope = dict(theta=self.rope_theta, layout=self.rope_layout)
    q_BLHK = apply_rope(q_BLHK, position_BL, **rope)
    k_BLGK = apply_rope(k_BLGK, position_BL, **rope)
    new_cache = None
    if cache is not None:
      k_cache, v_cache = cache
      at = (0, cache_index, 0, 0)
      k_BSGK = jax.lax.dynamic_update_slice(k_cache, k_BLGK.astype(k_cache.dtype), at)
      v_BSGK = jax.lax.dynamic_update_slice(v_cache, v_BLGK.astype(v_cache.dtype), at)
      new_cache = (k_BSGK, v_BSGK)
    else:
      k_BSGK, v_BSGK = k_BLGK, v_BLGK
    out_BLHK = attend(q_BLHK, k_BSGK, v_BSGK, mask, impl=impl, dtype=self.dtype)
    return checkpoint_name(self.o(out_BLHK, routing), "out_proj"), new_cache
