"""Test helpers: an ml-4m checkpoint written from random tensors in the reference's key layout, and
a numpy forward pass with the reference's semantics (torch Linear [out, in] weights, fused qkv
rows (3, H, K), kv rows (2, H, K), pre-norm blocks, context = proj(encoder_norm(x)) + enc emb)."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from safetensors.numpy import save_file
from scipy.special import erf


@dataclasses.dataclass(frozen=True)
class Spec:
  dim: int = 32
  heads: int = 4
  enc_depth: int = 2
  dec_depth: int = 2
  gated: bool = True       # SwiGLU, else GELU
  qkv_bias: bool = False
  proj_bias: bool = False
  mlp_bias: bool = False
  norm_bias: bool = False
  qk_norm: bool = False
  tied: bool = True        # to_logits == token_emb (stored under both names)
  learned: tuple = ()      # modalities with learned (random) positions
  image_size: int = 32
  patch_size: int = 8
  # (reference name, kind, vocab, max_length); kind: "pixels", "image", "seq"
  modalities: tuple = (("caption", "seq", 40, 12), ("rgb@32", "pixels", 0, 0),
                       ("tok_rgb@32", "image", 24, 0))

  @property
  def hidden(self) -> int:
    return int(2 * 4 * self.dim / 3) if self.gated else 4 * self.dim


def _linear(rng, t, name, out_dim, in_dim, bias):
  t[f"{name}.weight"] = rng.normal(0, in_dim ** -0.5, (out_dim, in_dim)).astype(np.float32)
  if bias:
    t[f"{name}.bias"] = rng.normal(0, 0.1, (out_dim,)).astype(np.float32)


def _norm(rng, t, name, dim, bias):
  t[f"{name}.weight"] = (1 + rng.normal(0, 0.1, (dim,))).astype(np.float32)
  # Without a bias the reference's LayerNorm registers a zero buffer under the same name.
  t[f"{name}.bias"] = (rng.normal(0, 0.1, (dim,)) if bias else np.zeros(dim)).astype(np.float32)


def _attention(rng, t, name, s: Spec, cross: bool):
  d, k = s.dim, s.dim // s.heads
  if cross:
    _linear(rng, t, f"{name}.q", d, d, s.qkv_bias)
    _linear(rng, t, f"{name}.kv", 2 * d, d, s.qkv_bias)
  else:
    _linear(rng, t, f"{name}.qkv", 3 * d, d, s.qkv_bias)
  _linear(rng, t, f"{name}.proj", d, d, s.proj_bias)
  if s.qk_norm:
    _norm(rng, t, f"{name}.q_norm", k, s.norm_bias)
    _norm(rng, t, f"{name}.k_norm", k, s.norm_bias)


def _mlp(rng, t, name, s: Spec):
  _linear(rng, t, f"{name}.fc1", s.hidden, s.dim, s.mlp_bias)
  _linear(rng, t, f"{name}.fc2", s.dim, s.hidden, s.mlp_bias)
  if s.gated:
    _linear(rng, t, f"{name}.fc3", s.hidden, s.dim, s.mlp_bias)


def positions(s: Spec, kind: str, n: int) -> np.ndarray:
  """The reference's fixed tables: 1D [sin, cos]; 2D over a meshgrid(w, h, 'ij') flattened,
  [sin w, cos w, sin h, cos h], frequencies 1 / 10000^(i / (D/2 or D/4)); float32 like torch."""
  if kind == "seq":
    omega = 1.0 / 10000.0 ** (np.arange(s.dim // 2, dtype=np.float32) / (s.dim // 2))
    out = np.arange(n, dtype=np.float32)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32)
  side = int(round(n ** 0.5))
  grid_w, grid_h = np.meshgrid(np.arange(side, dtype=np.float32),
                               np.arange(side, dtype=np.float32), indexing="ij")
  omega = 1.0 / 10000.0 ** (np.arange(s.dim // 4, dtype=np.float32) / (s.dim // 4))
  out_w = grid_w.reshape(-1)[:, None] * omega[None]
  out_h = grid_h.reshape(-1)[:, None] * omega[None]
  return np.concatenate([np.sin(out_w), np.cos(out_w), np.sin(out_h), np.cos(out_h)],
                        axis=1).astype(np.float32)


def num_tokens(s: Spec, kind: str, max_length: int) -> int:
  return max_length if kind == "seq" else (s.image_size // s.patch_size) ** 2


def make_tensors(s: Spec, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  t: dict[str, np.ndarray] = {}
  d = s.dim
  for i in range(s.enc_depth):
    p = f"encoder.{i}"
    _norm(rng, t, f"{p}.norm1", d, s.norm_bias)
    _attention(rng, t, f"{p}.attn", s, cross=False)
    _norm(rng, t, f"{p}.norm2", d, s.norm_bias)
    _mlp(rng, t, f"{p}.mlp", s)
  _norm(rng, t, "encoder_norm", d, s.norm_bias)
  _linear(rng, t, "decoder_proj_context", d, d, True)
  for i in range(s.dec_depth):
    p = f"decoder.{i}"
    for n in ("norm1", "query_norm", "context_norm", "norm2"):
      _norm(rng, t, f"{p}.{n}", d, s.norm_bias)
    _attention(rng, t, f"{p}.self_attn", s, cross=False)
    _attention(rng, t, f"{p}.cross_attn", s, cross=True)
    _mlp(rng, t, f"{p}.mlp", s)
  _norm(rng, t, "decoder_norm", d, s.norm_bias)
  t["mask_token"] = rng.normal(0, 0.5, (1, 1, d)).astype(np.float32)
  for name, kind, vocab, length in s.modalities:
    n = num_tokens(s, kind, length)
    mod_emb = rng.normal(0, 0.5, (1, 1, d)).astype(np.float32)
    enc, dec = f"encoder_embeddings.{name}", f"decoder_embeddings.{name}"
    pos = positions(s, kind, n)[None]
    learned = name in s.learned
    t[f"{enc}.mod_emb"] = mod_emb
    t[f"{enc}.pos_emb"] = rng.normal(0, 0.5, pos.shape).astype(np.float32) if learned else pos
    if kind == "pixels":
      _linear(rng, t, f"{enc}.proj", d, 3 * s.patch_size ** 2, False)
      continue
    t[f"{enc}.token_emb.weight"] = rng.normal(0, 0.5, (vocab, d)).astype(np.float32)
    t[f"{dec}.mod_emb"] = mod_emb
    t[f"{dec}.pos_emb"] = rng.normal(0, 0.5, pos.shape).astype(np.float32) if learned else pos
    t[f"{dec}.token_emb.weight"] = rng.normal(0, 0.5, (vocab, d)).astype(np.float32)
    t[f"{dec}.to_logits.weight"] = t[f"{dec}.token_emb.weight"].copy() if s.tied else \
        rng.normal(0, 0.5, (vocab, d)).astype(np.float32)
  return t


def reference_config(s: Spec) -> dict:
  """The JSON config of the reference's Hub wrapper (`FM(config)`)."""
  names = [m[0] for m in s.modalities]
  return dict(domains_in=names, domains_out=[m[0] for m in s.modalities if m[1] != "pixels"],
              dim=s.dim, encoder_depth=s.enc_depth, decoder_depth=s.dec_depth, num_heads=s.heads,
              mlp_ratio=4.0, qkv_bias=s.qkv_bias, proj_bias=s.proj_bias, mlp_bias=s.mlp_bias,
              norm_bias=s.norm_bias, act_layer="SiLU" if s.gated else "GELU", gated_mlp=s.gated,
              qk_norm=s.qk_norm, image_size=s.image_size, patch_size=s.patch_size,
              decoder_causal_mask=False, decoder_sep_mask=True, num_register_tokens=0,
              share_modality_embeddings=True)


def write_checkpoint(directory: str, s: Spec, tensors: dict[str, np.ndarray] | None = None,
                     config: dict | None = None) -> dict[str, np.ndarray]:
  os.makedirs(directory, exist_ok=True)
  tensors = make_tensors(s) if tensors is None else tensors
  save_file(tensors, os.path.join(directory, "model.safetensors"))
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(reference_config(s) if config is None else config, f)
  return tensors


# ---- the reference forward, in numpy ---------------------------------------------------------


def _ln(t, name, x, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * t[f"{name}.weight"] + t[f"{name}.bias"]


def _lin(t, name, x):
  y = x @ t[f"{name}.weight"].T
  return y + t[f"{name}.bias"] if f"{name}.bias" in t else y


def _attend(t, name, s: Spec, q, k, v, mask):
  """q [B, Q, H, K], k/v [B, S, H, K], mask [B, Q, S] -> proj output [B, Q, D]."""
  if s.qk_norm:
    q, k = _ln(t, f"{name}.q_norm", q), _ln(t, f"{name}.k_norm", k)
  logits = np.einsum("bqhk,bshk->bhqs", q, k) * q.shape[-1] ** -0.5
  logits = np.where(mask[:, None], logits, -np.finfo(np.float32).max)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum("bhqs,bshk->bqhk", p, v)
  return _lin(t, f"{name}.proj", out.reshape(*out.shape[:2], -1))


def _self_attention(t, name, s, x, mask):
  b, n, _ = x.shape
  qkv = _lin(t, f"{name}.qkv", x).reshape(b, n, 3, s.heads, s.dim // s.heads)
  return _attend(t, name, s, qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask)


def _cross_attention(t, name, s, x, ctx, mask):
  b, n, _ = x.shape
  q = _lin(t, f"{name}.q", x).reshape(b, n, s.heads, s.dim // s.heads)
  kv = _lin(t, f"{name}.kv", ctx).reshape(b, ctx.shape[1], 2, s.heads, s.dim // s.heads)
  return _attend(t, name, s, q, kv[:, :, 0], kv[:, :, 1], mask)


def _mlp_forward(t, name, s, x):
  if s.gated:
    a = _lin(t, f"{name}.fc1", x)
    return _lin(t, f"{name}.fc2", a / (1 + np.exp(-a)) * _lin(t, f"{name}.fc3", x))
  a = _lin(t, f"{name}.fc1", x)
  return _lin(t, f"{name}.fc2", 0.5 * a * (1 + erf(a / np.sqrt(2))))


def forward(t: dict[str, np.ndarray], s: Spec, batch: dict, order: list[str]) -> np.ndarray:
  """The decoder's normalised output [B, M, D] for an mmjax batch; `order[i]` is the reference
  name of mmjax modality id i."""
  t = {k: v.astype(np.float64) for k, v in t.items()}
  kinds = {m[0]: m[1] for m in s.modalities}

  def embed(prefix, tokens, modality, pos, valid, decoder):
    b, n = tokens.shape
    x, emb = np.zeros((b, n, s.dim)), np.zeros((b, n, s.dim))
    for i, name in enumerate(order):
      sel = modality == i
      if not sel.any():
        continue
      e = f"{prefix}.{name}"
      table = t[f"{e}.pos_emb"][0]
      emb[sel] = table[np.clip(pos[sel], 0, table.shape[0] - 1)] + t[f"{e}.mod_emb"][0, 0]
      if kinds[name] == "pixels":
        x[sel] = batch["enc_pixels"][np.nonzero(sel)[0], tokens[sel]] @ t[f"{e}.proj.weight"].T
      elif decoder and kinds[name] == "image":
        x[sel] = t["mask_token"][0, 0]
      else:
        x[sel] = t[f"{e}.token_emb.weight"][tokens[sel]]
    keep = valid[..., None]
    return np.where(keep, x, 0.0), np.where(keep, emb, 0.0)

  x, enc_emb = embed("encoder_embeddings", batch["enc_tokens"], batch["enc_modality"],
                     batch["enc_positions"], batch["enc_valid"], False)
  enc_mask = np.broadcast_to(batch["enc_valid"][:, None, :], (x.shape[0], x.shape[1], x.shape[1]))
  h = x + enc_emb
  for i in range(s.enc_depth):
    p = f"encoder.{i}"
    h = h + _self_attention(t, f"{p}.attn", s, _ln(t, f"{p}.norm1", h), enc_mask)
    h = h + _mlp_forward(t, f"{p}.mlp", s, _ln(t, f"{p}.norm2", h))
  ctx = _lin(t, "decoder_proj_context", _ln(t, "encoder_norm", h)) + enc_emb

  y, dec_emb = embed("decoder_embeddings", batch["dec_tokens"], batch["dec_modality"],
                     batch["dec_positions"], batch["dec_valid"], True)
  mod, valid = batch["dec_modality"], batch["dec_valid"]
  m = mod.shape[1]
  is_image = np.array([kinds[n] != "seq" for n in order])[mod]
  self_mask = ((mod[:, :, None] == mod[:, None, :]) & valid[:, :, None] & valid[:, None, :]
               & (is_image[:, :, None] | np.tril(np.ones((m, m), bool))[None]))
  cross_mask = np.broadcast_to(batch["enc_valid"][:, None, :], (y.shape[0], m, ctx.shape[1]))
  y = y + dec_emb
  for i in range(s.dec_depth):
    p = f"decoder.{i}"
    y = y + _self_attention(t, f"{p}.self_attn", s, _ln(t, f"{p}.norm1", y), self_mask)
    y = y + _cross_attention(t, f"{p}.cross_attn", s, _ln(t, f"{p}.query_norm", y),
                             _ln(t, f"{p}.context_norm", ctx), cross_mask)
    y = y + _mlp_forward(t, f"{p}.mlp", s, _ln(t, f"{p}.norm2", y))
  return _ln(t, "decoder_norm", y)


def logits(t: dict[str, np.ndarray], y: np.ndarray, name: str) -> np.ndarray:
  return y @ t[f"decoder_embeddings.{name}.to_logits.weight"].astype(np.float64).T
