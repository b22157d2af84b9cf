"""The decoder's training loss: next-token cross-entropy, per-modality weights, z-loss, MoE aux losses.

Every slot's weight is `loss_weight · w[target modality]`; the loss is Σ weight·CE / Σ loss_weight,
so a modality weight scales that modality's share. The target modality of a slot is the modality of
the next slot of the same document (the token it predicts; the last slot of a document keeps its own).
z-loss `z · log²Z` is computed in fp32 on the same weights (Chameleon: z = 1e-5).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mmjax.config import ConfigError
from mmjax.models.configs import DecoderConfig


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


def decoder_loss(logits_BLV: jax.Array, batch: dict, aux: dict, cfg: DecoderConfig,
                 names: Sequence[str]) -> tuple[jax.Array, dict]:
  """Scalar loss and metrics (per-modality loss, accuracy, log Z and token counts included)."""
  logits = logits_BLV.astype(jnp.float32)
  targets = batch["targets"]
  logz_BL = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  ce_BL = logz_BL - target_logit
  correct_BL = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
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
