"""The mixed-modal decoder-only model (Chameleon recipe) with dense, MoT, MoMa or MoE layers.

Llama-2 base (RMSNorm eps 1e-5, SwiGLU, RoPE, no biases) with Chameleon's deviations: qk-norm,
optional norm re-ordering ("post": h = x + norm(f(x))), residual dropout, GQA, z-loss (in the loss).
Layers are stacked (leading `layers` axis) and run under `lax.scan` with a named remat policy.
`sparsity` (DecoderConfig) picks the layer type at equal active compute: "dense"; "mot" (every
non-embedding weight untied per modality, global attention); "moma" (expert-choice FFN experts in
modality groups); "moe" (modality-agnostic token-choice top-k).

Inputs are the per-token fields of `mmjax.data.sequences.batch`. The same call serves training,
prefill and cached decoding: with a cache, this call's keys/values are written at `cache_index`
and attention runs over the whole cache, masked by the cached segment/block fields.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax.models import grouped
from mmjax.models.attention import Mask
from mmjax.models.configs import DecoderConfig
from mmjax.models.decoder_attention import Attention, attention_mask
from mmjax.models.decoder_layers import RMSNorm, dropout, param
from mmjax.models.experts import MoMaFFN, SwiGLU, TokenChoiceMoE
from mmjax.models.layers import activation_dtype, constrain, dtype_of, remat, target


def ffn_hidden(cfg: DecoderConfig) -> int:
  """Dense FFN width: int(8/3 · D) rounded up to a multiple of 64 unless given."""
  if cfg.mlp_hidden:
    return cfg.mlp_hidden
  return -(-int(8 * cfg.d_model / 3) // 64) * 64


def expert_hidden(cfg: DecoderConfig) -> int:
  """Expert width at equal active compute: MoMa experts take N tokens in all (one per token on
  average), so they are as wide as the dense FFN; top-k MoE splits the width over its k experts."""
  if cfg.expert_hidden:
    return cfg.expert_hidden
  h = ffn_hidden(cfg)
  return h if cfg.sparsity == "moma" else max(1, h // cfg.moe_top_k)


class Block(nnx.Module):
  """One decoder layer: attention then FFN, pre- or post-norm, with residual dropout."""

  def __init__(self, cfg: DecoderConfig, num_modalities: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    groups = num_modalities if cfg.sparsity == "mot" else 1
    dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    common = dict(impl=grouped.resolve_impl(cfg.grouped_impl, cfg.platform), chunk=cfg.group_chunk,
                  dtype=dtype, param_dtype=pdtype, rngs=rngs)
    norm = lambda: RMSNorm(cfg.d_model, eps=cfg.norm_eps, groups=groups, param_dtype=pdtype,
                           rngs=rngs)
    self.attn_norm, self.ffn_norm = norm(), norm()
    self.attn = Attention(d_model=cfg.d_model, num_heads=cfg.num_heads,
                          num_kv_heads=cfg.num_kv_heads or cfg.num_heads, qk_norm=cfg.qk_norm,
                          norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                          rope_layout=cfg.rope_layout, groups=groups, **common)
    if cfg.sparsity in ("dense", "mot"):
      self.ffn = SwiGLU(cfg.d_model, ffn_hidden(cfg), groups=groups, **common)
    elif cfg.sparsity == "moma":
      self.ffn = MoMaFFN(cfg.d_model, expert_hidden(cfg), num_modalities=num_modalities,
                         experts_per_modality=cfg.experts_per_modality,
                         aux_router=cfg.moma_aux_router,
                         aux_hidden=cfg.moma_aux_router_hidden or max(8, cfg.d_model // 8),
                         routing_rows=cfg.moma_routing_rows, **common)
    else:
      self.ffn = TokenChoiceMoE(cfg.d_model, expert_hidden(cfg), num_experts=cfg.num_experts,
                                top_k=cfg.moe_top_k, capacity_factor=cfg.capacity_factor, **common)

  def _ffn(self, x, modality_BL, valid_BL, routing, causal):
    if self.cfg.sparsity in ("dense", "mot"):
      return self.ffn(x, routing), {}
    if self.cfg.sparsity == "moma":
      return self.ffn(x, modality_BL, valid_BL, causal=causal)
    return self.ffn(x, valid_BL, causal=causal)

  def __call__(self, x_BLD, position_BL, modality_BL, valid_BL, mask: Mask, routing, *, cache=None,
               cache_index=None, causal=False, key=None, attention_impl="xla"):
    keys = (None, None) if key is None else tuple(jax.random.split(key))
    rate = self.cfg.residual_dropout
    if self.cfg.norm_order == "pre":
      a, new_cache = self.attn(self.attn_norm(x_BLD, routing), position_BL, mask, routing,
                               cache, cache_index, attention_impl)
      h = x_BLD + dropout(a, rate, keys[0])
      f, aux = self._ffn(self.ffn_norm(h, routing), modality_BL, valid_BL, routing, causal)
      out = h + dropout(f, rate, keys[1])
    else:
      a, new_cache = self.attn(x_BLD, position_BL, mask, routing, cache, cache_index,
                               attention_impl)
      h = x_BLD + dropout(self.attn_norm(a, routing), rate, keys[0])
      f, aux = self._ffn(h, modality_BL, valid_BL, routing, causal)
      out = h + dropout(self.ffn_norm(f, routing), rate, keys[1])
    out = constrain(out, ("batch", "length", "embed"))
    # Chameleon: growth of output norms predicts divergence; log the mean over valid tokens.
    norms = jnp.sqrt(jnp.sum(jnp.square(out.astype(jnp.float32)), axis=-1))
    aux = dict(aux, layer_out_norm=jnp.sum(norms * valid_BL) / jnp.maximum(jnp.sum(valid_BL), 1))
    return out, aux, new_cache


class Decoder(nnx.Module):
  """Token embedding, a scanned stack of `Block`s, a final norm and the output head.

  `bidirectional_blocks`: whether rows may hold bidirectional image blocks
  (`sequences.image_blocks_bidirectional`); without them the attention mask is causal within
  segments, which the fused TPU kernel takes.
  """

  def __init__(self, cfg: DecoderConfig, *, vocab_size: int, num_modalities: int,
               bidirectional_blocks: bool = False, rngs: nnx.Rngs):
    self.cfg, self.vocab_size, self.num_modalities = cfg, vocab_size, num_modalities
    self.bidirectional_blocks = bidirectional_blocks
    self.groups = num_modalities if cfg.sparsity == "mot" else 1
    pdtype = dtype_of(cfg.param_dtype)
    std = cfg.d_model ** -0.5  # tied or not, logits start with unit scale
    self.embed = param(rngs.params(), nnx.initializers.normal(std), (vocab_size, cfg.d_model),
                       ("vocab", "embed"), pdtype)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(r):
      return Block(cfg, num_modalities, rngs=r)

    self.blocks = make_blocks(rngs)
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, groups=self.groups, param_dtype=pdtype,
                              rngs=rngs)
    self.head = nnx.data(None)
    if not cfg.tie_embeddings:
      self.head = param(rngs.params(), nnx.initializers.variance_scaling(1.0, "fan_in", "normal"),
                        (cfg.d_model, vocab_size), ("embed", "vocab"), pdtype)

  def init_cache(self, batch: int, length: int, dtype=jnp.float32) -> dict:
    """An empty KV cache of `length` slots (segment 0: nothing attends to unwritten slots)."""
    kv = self.cfg.num_kv_heads or self.cfg.num_heads
    shape = (self.cfg.num_layers, batch, length, kv, self.cfg.d_model // self.cfg.num_heads)
    return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                segment=jnp.zeros((batch, length), jnp.int32),
                block=jnp.zeros((batch, length), jnp.int32))

  def head_weight(self) -> tuple[jax.Array, str]:
    """The output head and its einsum with the final hidden states [B, L, D] into logits."""
    if self.head is None:
      return self.embed[...], "bld,vd->blv"
    return self.head[...], "bld,dv->blv"

  def __call__(self, batch: dict, **kwargs) -> tuple[jax.Array, dict, dict | None]:
    """Logits [B, L, V] in fp32, aux and the updated cache (`hidden`'s arguments)."""
    x_BLD, aux, cache = self.hidden(batch, **kwargs)
    w, spec = self.head_weight()
    with target(self.cfg.platform):
      logits = grouped.dot(spec, x_BLD, w, dtype_of(self.cfg.dtype), jnp.float32)
    return constrain(logits, ("batch", "length", "vocab")), aux, cache

  def hidden(self, batch: dict, *, cache: dict | None = None, cache_index=0, causal: bool = False,
             dropout_key: jax.Array | None = None, embeddings: jax.Array | None = None
             ) -> tuple[jax.Array, dict, dict | None]:
    """The final-normed hidden states [B, L, D] (the head's input), aux (MoE/MoMa losses, per-layer
    norms) and the updated cache.

    `embeddings` [B, L, D] replaces the token embedding lookup (gradient tests of the mask).
    `causal`: route MoMa with its auxiliary router and MoE without capacity drops, so a token's
    output depends only on itself and the past (decoding, and its full-recomputation reference).
    """
    with target(self.cfg.platform):
      return self._hidden(batch, cache, cache_index, causal, dropout_key, embeddings)

  def _attention_mask(self, batch: dict, cache: dict | None, cache_index) -> tuple[Mask, str]:
    """The mask and the attention kernel: the configured one for a whole row, XLA for a cache."""
    segment, block = batch["segment"], batch["block"]
    b, l = segment.shape
    q_index = jnp.broadcast_to(cache_index + jnp.arange(l, dtype=jnp.int32), (b, l))
    if cache is not None:
      s = cache["segment"].shape[1]
      k_index = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
      dense = attention_mask(segment, block, q_index, cache["segment"], cache["block"], k_index)
      return Mask(dense), "xla"
    dense = attention_mask(segment, block, q_index, segment, block, q_index)
    if self.bidirectional_blocks:
      mask = Mask(dense, why_not_segments="the decoder's bidirectional image blocks (they depend "
                  "on the data)")
    else:  # padding (segment 0) attends to padding only: its rows are never empty
      mask = Mask(dense, causal=True, q_segment_BQ=segment, kv_segment_BS=segment)
    return mask, self.cfg.attention_impl

  def _hidden(self, batch, cache, cache_index, causal, dropout_key, embeddings):
    cfg = self.cfg
    tokens, segment = batch["tokens"], batch["segment"]
    position, modality = batch["position"], batch["modality"]
    valid_BL = segment > 0
    if cache is not None:
      at = (0, cache_index)
      cache = dict(cache, segment=jax.lax.dynamic_update_slice(cache["segment"], segment, at),
                   block=jax.lax.dynamic_update_slice(cache["block"], batch["block"], at))
    mask, attention_impl = self._attention_mask(batch, cache, cache_index)
    routing = grouped.make_routing(modality, self.groups) if self.groups > 1 else None
    x_BLD = self.embed[...][tokens].astype(jnp.float32) if embeddings is None else embeddings
    x_BLD = constrain(x_BLD.astype(activation_dtype(dtype_of(cfg.dtype))),
                      ("batch", "length", "embed"))

    graphdef, state = nnx.split(self.blocks)
    keys = None if dropout_key is None else jax.random.split(dropout_key, cfg.num_layers)
    layer_caches = None if cache is None else (cache["k"], cache["v"])

    def body(x, xs):
      layer_state, key, layer_cache = xs
      blk = nnx.merge(graphdef, layer_state)
      y, aux, new_cache = blk(x, position, modality, valid_BL, mask, routing, cache=layer_cache,
                              cache_index=cache_index, causal=causal, key=key,
                              attention_impl=attention_impl)
      return y.astype(x.dtype), (aux, new_cache)

    x_BLD, (aux_layers, new_caches) = jax.lax.scan(remat(body, cfg.remat), x_BLD,
                                                   (state, keys, layer_caches))
    x_BLD = self.final_norm(x_BLD, routing)
    aux = {name: (v if name == "layer_out_norm" else jnp.mean(v)) for name, v in aux_layers.items()}
    if cache is not None:
      cache = dict(cache, k=new_caches[0], v=new_caches[1])
    return x_BLD, aux, cache
