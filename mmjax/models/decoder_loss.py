"""The decoder's training loss: next-token cross-entropy, per-modality weights, z-loss, MoE aux losses.

Every slot's weight is `loss_weight · w[target modality]`; the loss is Σ weight·CE / Σ loss_weight,
so a modality weight scales that modality's share. The target modality of a slot is the modality of
the next slot of the same document (the token it predicts; the last slot of a document keeps its own).
z-loss `z · log²Z` is computed in fp32 on the same weights (Chameleon: z = 1e-5).

The logits are never held whole: `chunked_token_stats` computes them [B, c, V] (fp32) for c
positions at a time under remat, keeping only log Z, the target's logit and whether the argmax hit
it; the backward pass recomputes each chunk's logits. At 4096 positions and a 65k vocabulary that
is 1 GiB of fp32 logits per sequence not kept (nor its gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mmjax.config import ConfigError
from mmjax.models import layers
from mmjax.models.configs import DecoderConfig


class TokenStats(NamedTuple):
  """Per position [B, L]: log Z of the logits, the target's logit, 1.0 where argmax == target."""
  logz_BL: jax.Array
  target_logit_BL: jax.Array
  correct_BL: jax.Array


def token_stats(logits_BLV: jax.Array, targets_BL: jax.Array) -> TokenStats:
  logits = logits_BLV.astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits, targets_BL[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == targets_BL).astype(jnp.float32)
  return TokenStats(jax.nn.logsumexp(logits, axis=-1), target_logit, correct)


def chunked_token_stats(x_BLD: jax.Array, w: jax.Array, spec: str, targets_BL: jax.Array, dtype,
                        chunk: int) -> TokenStats:
  """`token_stats(einsum(spec, x, w))` for `chunk` positions at a time, recomputed backward."""
  b, l, d = x_BLD.shape
  c = min(chunk, l)
  n = -(-l // c)
  pad = n * c - l
  x = jnp.pad(x_BLD, ((0, 0), (0, pad), (0, 0))).reshape(b, n, c, d).swapaxes(0, 1)
  t = jnp.pad(targets_BL, ((0, 0), (0, pad))).reshape(b, n, c).swapaxes(0, 1)

  @jax.checkpoint
  def one(x_BcD, t_Bc):
    logits = layers.einsum(spec, x_BcD, w, dtype, out_dtype=jnp.float32)
    return token_stats(layers.constrain(logits, ("batch", "length", "vocab")), t_Bc)

  stats = jax.lax.map(lambda xt: one(*xt), (x, t))
  return TokenStats(*(v.swapaxes(0, 1).reshape(b, n * c)[:, :l] for v in stats))


def modality_weights(cfg: DecoderConfig, names: Sequence[str]) -> jax.Array:
  """[M] loss weight per modality id from `model.loss_weights` ({name: weight}; default 1)."""
  given = dict(cfg.loss_weights)
  unknown = sorted(set(given) - set(names))
  if unknown:
    raise ConfigError(f"model.loss_weights names unknown modalities {unknown}; known: {list(names)}")
  return jnp.asarray([float(given.get(n, 1.0)) for n in names], jnp.float32)


def target_modality(modality_BL: jax.Array, segment_BL: jax.Array) -> jax.Array:
  nxt_mod = jnp.concatenate([modality_BL[:, 1:], modality_BL[:, -1:]], axis=1)
  nxt_seg = jnp.concatenate([segment_BL[:, 1:], jnp.zeros_like(segment_BL[:, :1])], axis=1)
  return jnp.where(nxt_seg == segment_BL, nxt_mod, modality_BL)


def decoder_loss(stats: TokenStats, batch: dict, aux: dict, cfg: DecoderConfig,
                 names: Sequence[str]) -> tuple[jax.Array, dict]:
  """Scalar loss and metrics (per-modality loss, accuracy, log Z and token counts included) from
  the per-position statistics of the logits (`token_stats` or `chunked_token_stats`)."""
  logz_BL, correct_BL = stats.logz_BL, stats.correct_BL
  ce_BL = logz_BL - stats.target_logit_BL
  tmod_BL = jnp.clip(target_modality(batch["modality"], batch["segment"]), 0, len(names) - 1)
  lw_BL = batch["loss_weight"].astype(jnp.float32)
  w_BL = lw_BL * modality_weights(cfg, names)[tmod_BL]
  denom = jnp.maximum(jnp.sum(lw_BL), 1e-9)
  ce = jnp.sum(w_BL * ce_BL) / denom
  z = cfg.z_loss * jnp.sum(w_BL * jnp.square(logz_BL)) / denom
  loss = ce + z
  metrics = {"ce": ce, "z_loss": z}
  if "moe_balance_loss" in aux:
    loss = loss + cfg.balance_loss * aux["moe_balance_loss"]
  if "moma_aux_router_bce" in aux:
    loss = loss + cfg.aux_router_loss * aux["moma_aux_router_bce"]
  for name, value in aux.items():
    if value.ndim == 0:
      metrics[name] = value
    else:  # per-layer values (output norms): one scalar per layer
      metrics.update({f"{name}/{i}": value[i] for i in range(value.shape[0])})
  for m, name in enumerate(names):
    sel = lw_BL * (tmod_BL == m)
    count = jnp.sum(sel)
    safe = jnp.maximum(count, 1e-9)
    metrics[f"loss/{name}"] = jnp.sum(sel * ce_BL) / safe
    metrics[f"accuracy/{name}"] = jnp.sum(sel * correct_BL) / safe
    metrics[f"logz/{name}"] = jnp.sum(sel * logz_BL) / safe
    metrics[f"tokens/{name}"] = count
  metrics["loss"] = loss
  return loss, metrics
