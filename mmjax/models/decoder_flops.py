"""Analytic training FLOPs per token of the mixed-modal decoder (dense, MoT, MoMa, MoE).

Model FLOPs only (no padding or recomputation): 2 per multiply-add, forward matmuls × 3 for
training (forward + two backward matmuls), causal attention scores halved. Per token:

  attention projections  2·D·(H + 2·Hkv)·K + 2·H·K·D
  attention scores       2 · 2·L·H·K / 2            (QKᵀ and PV over L keys, causal half)
  FFN                    dense / MoT: 3·2·D·F   (MoT: each token runs its own modality's copy)
                         MoMa: expert choice fills Σ capacities ≈ N slots, so one expert of width
                           F_e per token on average, + the router 2·D·E and auxiliary router
                         MoE: top-k experts of width F_e, + the router 2·D·E
  output head            2·D·V

MoT therefore costs exactly the dense FLOPs with M× the parameters; MoMa and MoE cost the dense
FLOPs plus their small routers when F_e = F (MoMa) or k·F_e = F (MoE), the framework's defaults.
"""

from __future__ import annotations

from mmjax.models.configs import DecoderConfig
from mmjax.models.decoder import expert_hidden, ffn_hidden


def decoder_train_flops_per_token(cfg: DecoderConfig, *, vocab_size: int, num_modalities: int,
                                  seq_len: int | None = None) -> dict[str, float]:
  """Training FLOPs per token, by part and in total ("total"), for a sequence of `seq_len`."""
  d, h = cfg.d_model, cfg.num_heads
  kv, k = cfg.num_kv_heads or cfg.num_heads, cfg.d_model // cfg.num_heads
  length = seq_len or cfg.max_length
  per_layer = {
      "attention_projections": 2 * d * (h + 2 * kv) * k + 2 * h * k * d,
      "attention_scores": 2 * 2 * length * h * k / 2,
  }
  if cfg.sparsity in ("dense", "mot"):
    per_layer["ffn"] = 3 * 2 * d * ffn_hidden(cfg)
  elif cfg.sparsity == "moma":
    experts = num_modalities * cfg.experts_per_modality
    per_layer["ffn"] = 3 * 2 * d * expert_hidden(cfg)
    per_layer["router"] = 2 * d * experts
    if cfg.moma_aux_router:
      aux = cfg.moma_aux_router_hidden or max(8, d // 8)
      per_layer["aux_router"] = 2 * d * aux + 2 * aux * experts
  else:
    per_layer["ffn"] = cfg.moe_top_k * 3 * 2 * d * expert_hidden(cfg)
    per_layer["router"] = 2 * d * cfg.num_experts
  forward = {name: cfg.num_layers * v for name, v in per_layer.items()}
  forward["output_head"] = 2 * d * vocab_size
  result = {name: 3.0 * v for name, v in forward.items()}
  result["total"] = sum(result.values())
  return result


def decoder_params(cfg: DecoderConfig, *, vocab_size: int, num_modalities: int) -> dict[str, int]:
  """Parameter counts: total and active per token (embeddings included once if tied)."""
  d, h = cfg.d_model, cfg.num_heads
  kv, k = cfg.num_kv_heads or cfg.num_heads, cfg.d_model // cfg.num_heads
  attn = d * (h + 2 * kv) * k + h * k * d + (2 * (h + kv) * k if cfg.qk_norm else 0) + 2 * d
  groups = num_modalities if cfg.sparsity == "mot" else 1
  if cfg.sparsity in ("dense", "mot"):
    ffn_total = ffn_active = 3 * d * ffn_hidden(cfg)
  elif cfg.sparsity == "moma":
    e = num_modalities * cfg.experts_per_modality
    ffn_total, ffn_active = e * 3 * d * expert_hidden(cfg) + d * e, 3 * d * expert_hidden(cfg)
  else:
    e = cfg.num_experts
    ffn_total = e * 3 * d * expert_hidden(cfg) + d * e
    ffn_active = cfg.moe_top_k * 3 * d * expert_hidden(cfg)
  embed = vocab_size * d * (1 if cfg.tie_embeddings else 2)
  total = cfg.num_layers * groups * (attn + ffn_total) + groups * d + embed
  active = cfg.num_layers * (attn + ffn_active) + d + embed
  return {"total": int(total), "active": int(active)}
