"""The 4M encoder-decoder (specs/fourm.md) as a Flax NNX module over the batch of data/fourm_batch.py.

`FourM(cfg, registry, rngs=...)(batch)` returns the decoder's normalised output y [B, M, D] (fp32);
the output heads live here (`head_weight`) but are applied by the loss (models/fourm_loss.py), which
runs each head only on its own modality's target tokens. `logits(y, name)` applies one head densely
(for sampling and tests).

Layout of the work: the encoder and decoder stacks hold their blocks' parameters with a leading
`layers` axis and run under `jax.lax.scan` with a named remat policy. The decoder's cross-attention
keys and values of all blocks come from one matmul before the scan: each block's context norm is
`LN(ctx) * s_l (+ b_l)`, so its scale is folded into that block's kv weight
(`LN(ctx) @ (s_l * W_l) + b_l @ W_l`), and the normalisation itself is computed once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmjax.modalities import Registry
from mmjax.models.attention import Mask, attend, key_padding_mask, xla_attention
from mmjax.models.configs import FourMConfig
from mmjax.models.layers import (Linear, Mlp, Norm, activation_dtype, checkpoint_name, constrain,
                                 dtype_of, einsum, matmul, normalize, param, scan_layers, sincos_1d,
                                 sincos_2d, target)

EMBED_INIT = nnx.initializers.normal(0.02)
ACT = ("batch", "length", "embed")


def _targeted(method):
  """Traces a FourM entry point for the model's target platform (`model.platform`)."""
  @functools.wraps(method)
  def wrapper(self, *args, **kwargs):
    with target(self.cfg.platform):
      return method(self, *args, **kwargs)
  return wrapper


def _norm(cfg: FourMConfig, layers: int, rngs: nnx.Rngs, dim: int | None = None,
          names=("embed",)) -> Norm:
  return Norm(dim or cfg.d_model, kind=cfg.norm_type, eps=cfg.norm_eps, use_bias=cfg.use_bias,
              names=names, param_dtype=dtype_of(cfg.param_dtype), layers=layers, rngs=rngs)


def _linear_kw(cfg: FourMConfig, layers: int, rngs: nnx.Rngs, use_bias: bool | None = None) -> dict:
  return dict(use_bias=cfg.use_bias if use_bias is None else use_bias, dtype=dtype_of(cfg.dtype),
              param_dtype=dtype_of(cfg.param_dtype), layers=layers, rngs=rngs)


class QKNorm(nnx.Module):
  """Optional qk-norm: a norm over the head dim of q and of k."""

  def __init__(self, cfg: FourMConfig, layers: int, rngs: nnx.Rngs):
    self.q = _norm(cfg, layers, rngs, cfg.head_dim, ("kv",))
    self.k = _norm(cfg, layers, rngs, cfg.head_dim, ("kv",))


class SelfAttention(nnx.Module):
  """Fused-qkv multi-head self-attention."""

  def __init__(self, cfg: FourMConfig, layers: int, rngs: nnx.Rngs):
    d, h, k = cfg.d_model, cfg.num_heads, cfg.head_dim
    self.dtype, self.impl = dtype_of(cfg.dtype), cfg.attention_impl
    self.qkv = Linear((d,), (3, h, k), ("embed",), (None, "heads", "kv"), **_linear_kw(cfg, layers, rngs))
    self.proj = Linear((h, k), (d,), ("heads", "kv"), ("embed",), **_linear_kw(cfg, layers, rngs))
    self.qk_norm = QKNorm(cfg, layers, rngs) if cfg.qk_norm else None

  def _qkv(self, x_BLD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    qkv = checkpoint_name(self.qkv(x_BLD), "qkv_proj")
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.qk_norm is not None:
      q, k = self.qk_norm.q(q), self.qk_norm.k(k)
    return q, k, v

  def __call__(self, x_BLD: jax.Array, mask: Mask) -> jax.Array:
    q, k, v = self._qkv(x_BLD)
    out_BLHK = attend(q, k, v, mask, impl=self.impl, dtype=self.dtype)
    out = self.proj(constrain(out_BLHK, ("batch", "length", "heads", "kv")))
    return checkpoint_name(out, "out_proj")

  def cached(self, x_BTD: jax.Array, cache_k_BSHK: jax.Array, cache_v_BSHK: jax.Array,
             index: jax.Array, mask_BTS: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Self-attention of T new slots starting at slot `index`: their k, v are written into the
    caches [B, S, H, K] first, then the queries attend to the cached keys under `mask_BTS`."""
    q, k, v = self._qkv(x_BTD)
    cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k_BSHK, k.astype(cache_k_BSHK.dtype),
                                                  index, axis=1)
    cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v_BSHK, v.astype(cache_v_BSHK.dtype),
                                                  index, axis=1)
    scale = q.shape[-1] ** -0.5
    out_BTHK = xla_attention(q * scale, cache_k, cache_v, mask_BTS, self.dtype)
    return self.proj(out_BTHK), cache_k, cache_v


class CrossAttention(nnx.Module):
  """Cross-attention: q from the decoder; kv from the context (computed for all blocks at once)."""

  def __init__(self, cfg: FourMConfig, layers: int, rngs: nnx.Rngs):
    d, h, k = cfg.d_model, cfg.num_heads, cfg.head_dim
    self.dtype, self.impl = dtype_of(cfg.dtype), cfg.attention_impl
    self.q = Linear((d,), (h, k), ("embed",), ("heads", "kv"), **_linear_kw(cfg, layers, rngs))
    self.kv = Linear((d,), (2, h, k), ("embed",), (None, "heads", "kv"), **_linear_kw(cfg, layers, rngs))
    self.proj = Linear((h, k), (d,), ("heads", "kv"), ("embed",), **_linear_kw(cfg, layers, rngs))
    self.qk_norm = QKNorm(cfg, layers, rngs) if cfg.qk_norm else None

  def __call__(self, x_BLD: jax.Array, kv_BN2HK: jax.Array, mask: Mask,
               impl: str | None = None) -> jax.Array:
    q = checkpoint_name(self.q(x_BLD), "query_proj")
    k, v = kv_BN2HK[:, :, 0], kv_BN2HK[:, :, 1]
    if self.qk_norm is not None:
      q, k = self.qk_norm.q(q), self.qk_norm.k(k)
    out_BLHK = attend(q, k, v, mask, impl=impl or self.impl, dtype=self.dtype)
    out = self.proj(constrain(out_BLHK, ("batch", "length", "heads", "kv")))
    return checkpoint_name(out, "out_proj")


class EncoderBlocks(nnx.Module):
  """`layers` pre-norm encoder blocks, parameters stacked on a leading axis."""

  def __init__(self, cfg: FourMConfig, layers: int, rngs: nnx.Rngs):
    self.norm1 = _norm(cfg, layers, rngs)
    self.attn = SelfAttention(cfg, layers, rngs)
    self.norm2 = _norm(cfg, layers, rngs)
    self.mlp = Mlp(cfg.d_model, cfg.hidden, kind=cfg.mlp_type, use_bias=cfg.mlp_type == "gelu",
                   dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype), layers=layers,
                   rngs=rngs)

  def block(self, x_BLD: jax.Array, mask: Mask) -> jax.Array:
    x_BLD = x_BLD + self.attn(self.norm1(x_BLD), mask)
    x_BLD = x_BLD + self.mlp(self.norm2(x_BLD))
    return constrain(x_BLD, ACT)


class DecoderBlocks(nnx.Module):
  """`layers` pre-norm decoder blocks (self-attention, cross-attention, MLP), stacked."""

  def __init__(self, cfg: FourMConfig, layers: int, rngs: nnx.Rngs):
    self.norm1 = _norm(cfg, layers, rngs)
    self.self_attn = SelfAttention(cfg, layers, rngs)
    self.query_norm = _norm(cfg, layers, rngs)
    self.context_norm = _norm(cfg, layers, rngs)
    self.cross_attn = CrossAttention(cfg, layers, rngs)
    self.norm2 = _norm(cfg, layers, rngs)
    self.mlp = Mlp(cfg.d_model, cfg.hidden, kind=cfg.mlp_type, use_bias=cfg.mlp_type == "gelu",
                   dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype), layers=layers,
                   rngs=rngs)

  def context_kv(self, ctx_BND: jax.Array, dtype) -> jax.Array:
    """Cross-attention k, v of every block [L, B, N, 2, H, K]: one matmul, context norms folded in."""
    norm, kv = self.context_norm, self.cross_attn.kv
    w_LD2HK = kv.kernel[...] * norm.scale[...][:, :, None, None, None].astype(kv.kernel.dtype)
    ctx_hat = normalize(ctx_BND, norm.kind, norm.eps)
    out = einsum("bnd,ldthk->lbnthk", ctx_hat, w_LD2HK, dtype)
    bias = 0.0
    if norm.bias is not None:
      bias = jnp.einsum("ld,ldthk->lthk", norm.bias[...], kv.kernel[...])
    if kv.bias is not None:
      bias = bias + kv.bias[...]
    if norm.bias is not None or kv.bias is not None:
      out = out + bias[:, None, None].astype(jnp.float32)
    return out

  def block(self, x_BLD, kv_BN2HK, self_mask: Mask, cross_mask: Mask) -> jax.Array:
    x_BLD = x_BLD + self.self_attn(self.norm1(x_BLD), self_mask)
    x_BLD = x_BLD + self.cross_attn(self.query_norm(x_BLD), kv_BN2HK, cross_mask)
    x_BLD = x_BLD + self.mlp(self.norm2(x_BLD))
    return constrain(x_BLD, ACT)

  def block_cached(self, x_BTD, kv_BN2HK, cache_k, cache_v, index, self_mask_BTS, cross_mask_BN):
    """`block` for T new slots at `index`, reading and extending the self-attention K/V cache
    (XLA attention: a few query slots per step)."""
    attn, cache_k, cache_v = self.self_attn.cached(self.norm1(x_BTD), cache_k, cache_v, index,
                                                   self_mask_BTS)
    x_BTD = x_BTD + attn
    cross = key_padding_mask(x_BTD.shape[1], cross_mask_BN)
    x_BTD = x_BTD + self.cross_attn(self.query_norm(x_BTD), kv_BN2HK, cross, impl="xla")
    x_BTD = x_BTD + self.mlp(self.norm2(x_BTD))
    return x_BTD, cache_k, cache_v


def _position_table(modality, d: int) -> np.ndarray:
  if modality.is_image:
    return sincos_2d(modality.grid[0], modality.grid[1], d)
  return sincos_1d(modality.max_length, d)


class FourM(nnx.Module):
  """4M: per-modality embeddings, encoder, decoder, per-modality heads (applied by the loss)."""

  def __init__(self, cfg: FourMConfig, registry: Registry, *, rngs: nnx.Rngs):
    self.cfg, self.registry = cfg, registry
    d, pdt = cfg.d_model, dtype_of(cfg.param_dtype)
    self.dtype = dtype_of(cfg.dtype)
    if not registry.targets():
      raise ValueError("the registry has no modality that can be a target")
    emb = functools.partial(param, init=EMBED_INIT, dtype=pdt)
    # One mod_emb per modality, shared by its encoder and decoder embeddings.
    self.mod_emb = emb(rngs.params(), shape=(len(registry), d), names=(None, "embed"))
    self.mask_token = emb(rngs.params(), shape=(d,), names=("embed",))
    enc_tokens, enc_patch, enc_pos, dec_tokens, dec_pos, heads = {}, {}, {}, {}, {}, {}
    for m in registry:
      if m.kind == "image_pixels":
        enc_patch[m.name] = Linear((m.patch_dim,), (d,), (None,), ("embed",), use_bias=False,
                                   dtype=self.dtype, param_dtype=pdt, rngs=rngs)
      else:
        enc_tokens[m.name] = emb(rngs.params(), shape=(m.vocab_size, d), names=("vocab", "embed"))
      if m.learned_positions:
        enc_pos[m.name] = emb(rngs.params(), shape=(m.num_tokens, d), names=(None, "embed"))
      if not m.can_be_target:
        continue
      # Image targets read the mask token; their table only exists to be tied to the head.
      if m.is_sequence or cfg.tie_heads:
        dec_tokens[m.name] = emb(rngs.params(), shape=(m.vocab_size, d), names=("vocab", "embed"))
      if m.learned_positions:
        dec_pos[m.name] = emb(rngs.params(), shape=(m.num_tokens, d), names=(None, "embed"))
      if not cfg.tie_heads:
        heads[m.name] = param(rngs.params(), nnx.initializers.xavier_uniform(), (d, m.vocab_size),
                              ("embed", "vocab"), pdt)
    self.enc_tokens, self.enc_patch, self.enc_pos = nnx.Dict(enc_tokens), nnx.Dict(enc_patch), \
        nnx.Dict(enc_pos)
    self.dec_tokens, self.dec_pos, self.heads = nnx.Dict(dec_tokens), nnx.Dict(dec_pos), nnx.Dict(heads)
    self.encoder = EncoderBlocks(cfg, cfg.encoder_layers, rngs)
    self.encoder_norm = _norm(cfg, 0, rngs)
    self.context_proj = Linear((d,), (d,), ("embed",), ("embed",), **_linear_kw(cfg, 0, rngs, True))
    self.decoder = DecoderBlocks(cfg, cfg.decoder_layers, rngs)
    self.decoder_norm = _norm(cfg, 0, rngs)
    # Static per-modality facts, indexed by modality id (tuples: static, not state).
    self._is_image = tuple(m.is_image for m in registry)
    sizes = [m.num_tokens for m in registry]
    self._pos_size = tuple(sizes)
    self._pos_offset = tuple(int(o) for o in np.concatenate([[0], np.cumsum(sizes)[:-1]]))

  # ---- heads -------------------------------------------------------------------------------------

  def head_weight(self, name: str) -> tuple[jax.Array, bool]:
    """The output head of target modality `name`: ([D, V] weight, False) or, tied, ([V, D], True)."""
    if self.cfg.tie_heads:
      return self.dec_tokens[name][...], True
    return self.heads[name][...], False

  @_targeted
  def logits(self, y_BLD: jax.Array, name: str) -> jax.Array:
    """Dense logits [..., V] of modality `name`'s head at every given position (fp32)."""
    w, transposed = self.head_weight(name)
    return matmul(y_BLD, w.T if transposed else w, 1, self.dtype, out_dtype=jnp.float32)

  # ---- embeddings --------------------------------------------------------------------------------

  def _emb_table(self, learned: nnx.Dict) -> jax.Array:
    """[sum of num_tokens, D]: each modality's position table (+ its mod_emb), concatenated."""
    d = self.cfg.d_model
    mod_emb = self.mod_emb[...].astype(jnp.float32)
    parts = []
    for i, m in enumerate(self.registry):
      pos = learned[m.name][...].astype(jnp.float32) if m.name in learned else \
          jnp.asarray(_position_table(m, d))
      parts.append(pos + mod_emb[i])
    return jnp.concatenate(parts, axis=0)

  def _emb(self, table: jax.Array, modality: jax.Array, positions: jax.Array) -> jax.Array:
    size = jnp.asarray(self._pos_size)[modality]
    index = jnp.asarray(self._pos_offset)[modality] + jnp.clip(positions, 0, size - 1)
    return table[index]

  def _lookup(self, table: jax.Array, ids: jax.Array) -> jax.Array:
    return table[jnp.clip(ids, 0, table.shape[0] - 1)].astype(jnp.float32)

  def embed_encoder(self, batch) -> tuple[jax.Array, jax.Array]:
    """Content x and positional+modality emb of the encoder slots, each [B, N, D] (0 on padding)."""
    tokens, modality, valid = batch["enc_tokens"], batch["enc_modality"], batch["enc_valid"]
    x = jnp.zeros((*tokens.shape, self.cfg.d_model), jnp.float32)
    for i, m in enumerate(self.registry):
      if m.name in self.enc_patch:
        pixels = batch["enc_pixels"]
        if pixels.shape[1] == 0 or pixels.shape[2] != m.patch_dim:
          raise ValueError(f"modality {m.name!r} needs enc_pixels of shape [B, P>0, {m.patch_dim}], "
                           f"got {pixels.shape}")
        patches_BPD = self.enc_patch[m.name](pixels)
        index = jnp.clip(tokens, 0, pixels.shape[1] - 1)
        values = jnp.take_along_axis(patches_BPD, index[..., None], axis=1)
      else:
        values = self._lookup(self.enc_tokens[m.name][...], tokens)
      x = jnp.where((modality == i)[..., None], values, x)
    emb = self._emb(self._emb_table(self.enc_pos), modality, batch["enc_positions"])
    keep = valid[..., None]
    return jnp.where(keep, x, 0.0), jnp.where(keep, emb, 0.0)

  def embed_decoder(self, batch) -> tuple[jax.Array, jax.Array]:
    """Decoder queries: the mask token for image targets, the previous target token (teacher
    forcing: `dec_tokens`) for sequences; emb as in the encoder. Each [B, M, D], 0 on padding."""
    tokens, modality, valid = batch["dec_tokens"], batch["dec_modality"], batch["dec_valid"]
    x = jnp.zeros((*tokens.shape, self.cfg.d_model), jnp.float32)
    x = jnp.where(jnp.asarray(self._is_image)[modality][..., None],
                  self.mask_token[...].astype(jnp.float32), x)
    for i, m in enumerate(self.registry):
      if m.is_sequence and m.can_be_target:
        values = self._lookup(self.dec_tokens[m.name][...], tokens)
        x = jnp.where((modality == i)[..., None], values, x)
    emb = self._emb(self._emb_table(self.dec_pos), modality, batch["dec_positions"])
    keep = valid[..., None]
    return jnp.where(keep, x, 0.0), jnp.where(keep, emb, 0.0)

  # ---- masks -------------------------------------------------------------------------------------

  def decoder_self_mask(self, modality_BM: jax.Array, valid_BM: jax.Array) -> Mask:
    """[B, M, M]: same modality, both valid; bidirectional for images, causal for sequences.

    As segment ids (the modality; padding its own id): causal when every target is a sequence,
    full when every target is an image; a mix of both is no kernel mask type."""
    m = modality_BM.shape[1]
    same = modality_BM[:, :, None] == modality_BM[:, None, :]
    both = valid_BM[:, :, None] & valid_BM[:, None, :]
    causal = jnp.arange(m)[None, :] <= jnp.arange(m)[:, None]
    image_q = jnp.asarray(self._is_image)[modality_BM][:, :, None]
    dense = same & both & (image_q | causal[None])
    kinds = {m.is_image for m in self.registry.targets()}
    if len(kinds) > 1:
      return Mask(dense, why_not_segments="4M's decoder self-attention over both image "
                  "(bidirectional) and sequence (causal) targets")
    ids = jnp.where(valid_BM, modality_BM + 1, 0).astype(jnp.int32)
    return Mask(dense, causal=not kinds.pop(), q_segment_BQ=ids, kv_segment_BS=ids)

  # ---- forward -----------------------------------------------------------------------------------

  @_targeted
  def encode(self, batch) -> tuple[jax.Array, jax.Array]:
    """The context the decoder attends to, proj(encoder_norm(enc_out)) + enc_emb [B, N, D], and
    the keys the decoder may attend to, `enc_valid` [B, N]."""
    x, emb = self.embed_encoder(batch)
    h = constrain(x + emb, ACT)
    valid = batch["enc_valid"]
    mask = key_padding_mask(valid.shape[1], valid)
    h = scan_layers(self.encoder, h, None, lambda blk, c, _: blk.block(c, mask), self.cfg.remat,
                    activation_dtype(self.dtype))
    ctx = self.context_proj(self.encoder_norm(h)) + emb
    return constrain(ctx, ACT), valid

  def decode(self, batch, ctx_BND: jax.Array, enc_valid_BN: jax.Array) -> jax.Array:
    x, emb = self.embed_decoder(batch)
    return self.decode_inputs(x + emb, batch, ctx_BND, enc_valid_BN)

  @_targeted
  def decode_inputs(self, h_BMD: jax.Array, batch, ctx_BND: jax.Array,
                    enc_valid_BN: jax.Array) -> jax.Array:
    """The decoder stack and final norm from the decoder's block input (content + emb)."""
    y = constrain(h_BMD, ACT)
    self_mask = self.decoder_self_mask(batch["dec_modality"], batch["dec_valid"])
    cross_mask = key_padding_mask(y.shape[1], enc_valid_BN)
    kv_LBN2HK = self.decoder.context_kv(ctx_BND, self.dtype)
    kv_LBN2HK = constrain(kv_LBN2HK, ("layers", "batch", "length", None, "heads", "kv"))
    y = scan_layers(self.decoder, y, kv_LBN2HK,
                    lambda blk, c, kv: blk.block(c, kv, self_mask, cross_mask), self.cfg.remat,
                    activation_dtype(self.dtype))
    return constrain(self.decoder_norm(y), ACT)

  @_targeted
  def __call__(self, batch) -> jax.Array:
    """Normalised decoder output y [B, M, D] (fp32), ready for the heads."""
    ctx, mask = self.encode(batch)
    return self.decode(batch, ctx, mask)

  # ---- cached decoding (generation of sequences) -------------------------------------------------

  @_targeted
  def context_kv(self, ctx_BND: jax.Array) -> jax.Array:
    """Cross-attention k, v of every decoder block [L, B, N, 2, H, K]: computed once per context,
    then reused by every `decode_cached` step."""
    return self.decoder.context_kv(ctx_BND, self.dtype)

  def init_cache(self, batch: int, length: int, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """Empty self-attention K and V caches [L, B, length, H, K] for `decode_cached`."""
    shape = (self.cfg.decoder_layers, batch, length, self.cfg.num_heads, self.cfg.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)

  @_targeted
  def decode_cached(self, h_BTD: jax.Array, kv_LBN2HK: jax.Array, enc_valid_BN: jax.Array,
                    cache: tuple[jax.Array, jax.Array], index: jax.Array
                    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """The decoder for T new slots of one sequence target at slots [index, index + T) (block
    input h = content + emb), causal over the cache: the slots before `index` are read from the
    cache, not recomputed. Returns the normalised output [B, T, D] and the extended cache. Equals
    `decode_inputs` over the whole sequence at those slots (one sequence modality, no padding)."""
    t, s = h_BTD.shape[1], cache[0].shape[2]
    query_slot = index + jnp.arange(t)
    mask_BTS = (jnp.arange(s)[None, :] <= query_slot[:, None])[None]
    graphdef, state = nnx.split(self.decoder)

    def step(x, inputs):
      layer_state, kv, cache_k, cache_v = inputs
      blk = nnx.merge(graphdef, layer_state)
      x, cache_k, cache_v = blk.block_cached(x, kv, cache_k, cache_v, index, mask_BTS,
                                             enc_valid_BN)
      return x, (cache_k, cache_v)

    y, cache = jax.lax.scan(step, h_BTD.astype(jnp.float32), (state, kv_LBN2HK, *cache))
    return self.decoder_norm(y), cache
