"""Frozen model configs: the only view of the config that model code gets.

`model_config(config)` is the boundary: it turns `config.model` into the dataclass of the config's
objective, so unknown keys fail here, by name, and modules never see the global ConfigDict.
"""

from __future__ import annotations

import dataclasses

from mmjax.config import ConfigDict, ConfigError, to_dataclass

PLATFORMS = ("cpu", "gpu", "tpu")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
# Remat policies of the scanned stacks, by MaxText's names (mmjax.models.layers.remat_policy).
REMAT_NAMES = ("none", "full", "minimal", "save_dots", "save_qkv_proj", "save_out_proj",
               "save_dot_except_mlp", "save_dot_except_mlpwi")


def platform_of(device_platform: str) -> str:
  """A JAX device's platform as a model target: cpu, gpu (cuda, rocm) or tpu."""
  name = device_platform.lower()
  return "gpu" if name in ("gpu", "cuda", "rocm") else name


def resolve_dtype_name(name: str, platform: str) -> str:
  """"auto" is bf16 on accelerators (TPU, GPU) and fp32 on CPUs, whose fp32 path is the default."""
  if name != "auto":
    return name
  return "float32" if platform == "cpu" else "bfloat16"


def _resolve_target(cfg) -> None:
  """Fixes `platform` ("auto": the platform of the default devices; the trainer and `mmjax aot`
  set it from the devices they compile for) and the compute dtype that follows from it."""
  platform = cfg.platform
  if platform == "auto":
    import jax  # noqa: PLC0415 -- only a config built without a target needs the devices
    platform = platform_of(jax.devices()[0].platform)
  if platform not in PLATFORMS:
    raise ConfigError(f"model.platform must be auto, cpu, gpu or tpu, got {cfg.platform!r}")
  object.__setattr__(cfg, "platform", platform)
  object.__setattr__(cfg, "dtype", resolve_dtype_name(cfg.dtype, platform))
  if cfg.attention_impl not in ATTENTION_IMPLS:
    raise ConfigError(f"model.attention_impl must be one of {ATTENTION_IMPLS}, "
                      f"got {cfg.attention_impl!r}")
  if cfg.remat not in REMAT_NAMES:
    raise ConfigError(f"model.remat must be one of {REMAT_NAMES}, got {cfg.remat!r}")


@dataclasses.dataclass(frozen=True)
class FourMConfig:
  """A 4M encoder-decoder (specs/fourm.md). Both stacks share the width."""
  d_model: int = 384
  num_heads: int = 6
  encoder_layers: int = 6
  decoder_layers: int = 6
  mlp_type: str = "swiglu"        # "swiglu" (released models) or "gelu" (with biases)
  mlp_hidden: int = 0             # 0: int(2 * 4 * d_model / 3) for swiglu, 4 * d_model for gelu
  norm_type: str = "layernorm"    # "layernorm" or "rmsnorm"
  norm_eps: float = 1e-6
  qk_norm: bool = False
  use_bias: bool = False          # biases in qkv, projections and norms (the context proj always has one)
  tie_heads: bool = False         # tie each output head to its decoder token table
  num_input_tokens: int = 128     # encoder slots N
  num_target_tokens: int = 128    # decoder slots M
  dtype: str = "auto"             # compute dtype; "auto": bfloat16 on TPU/GPU, float32 on CPU
  param_dtype: str = "float32"
  remat: str = "none"             # remat policy of the scanned blocks, by name (REMAT_NAMES)
  # Added for the model/loss (issue 5): output heads and loss options.
  heads_impl: str = "auto"        # "chunked" (CPU: modality-aligned chunks), "ragged" (ragged_dot), "auto"
  head_chunk: int = 128           # chunked heads: tokens per chunk (each chunk holds one modality)
  loss_weighting: str = "mod"     # "mod": mean per modality, then over modalities; "token": per token
  label_smoothing: float = 0.0    # spec default 0
  z_loss: float = 0.0             # weight of lse^2 per target token; spec default 0
  # Added for accelerator targets (issue 18):
  platform: str = "auto"          # target of every implementation choice: cpu, gpu, tpu ("auto")
  attention_impl: str = "auto"    # xla (einsum), cudnn (GPU), splash (TPU); "auto": by platform

  def __post_init__(self):
    _resolve_target(self)
    if self.heads_impl not in ("auto", "chunked", "ragged"):
      raise ConfigError(f"model.heads_impl must be 'auto', 'chunked' or 'ragged', "
                        f"got {self.heads_impl!r}")
    if self.loss_weighting not in ("mod", "token"):
      raise ConfigError(f"model.loss_weighting must be 'mod' or 'token', got {self.loss_weighting!r}")
    if self.head_chunk <= 0:
      raise ConfigError(f"model.head_chunk must be positive, got {self.head_chunk}")
    if self.d_model % self.num_heads:
      raise ConfigError(f"model.num_heads ({self.num_heads}) must divide model.d_model "
                        f"({self.d_model})")
    if self.mlp_type not in ("swiglu", "gelu"):
      raise ConfigError(f"model.mlp_type must be 'swiglu' or 'gelu', got {self.mlp_type!r}")
    if self.norm_type not in ("layernorm", "rmsnorm"):
      raise ConfigError(f"model.norm_type must be 'layernorm' or 'rmsnorm', got {self.norm_type!r}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def hidden(self) -> int:
    if self.mlp_hidden:
      return self.mlp_hidden
    return int(2 * 4 * self.d_model / 3) if self.mlp_type == "swiglu" else 4 * self.d_model


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """A mixed-modal decoder-only model on the Chameleon recipe (specs/mixed_modal.md)."""
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 0           # 0: as many as num_heads (no grouped-query attention)
  mlp_hidden: int = 0             # 0: int(2 * 4 * d_model / 3) rounded up to a multiple of 64
  max_length: int = 512           # sequence length the model is trained on
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_layout: str = "rotate_half"  # "rotate_half" or "interleaved" pairs
  qk_norm: bool = True
  norm_order: str = "pre"         # "pre": x + f(norm(x)); "post" (swin): x + norm(f(x))
  residual_dropout: float = 0.0
  tie_embeddings: bool = False
  z_loss: float = 1e-5
  sparsity: str = "dense"         # "dense", "mot", "moma" or "moe" (modality-agnostic token choice)
  experts_per_modality: int = 4   # moma: experts in each modality group
  num_experts: int = 8            # moe
  moe_top_k: int = 1              # moe
  balance_loss: float = 0.01      # moe load-balance loss weight
  dtype: str = "auto"             # compute dtype; "auto": bfloat16 on TPU/GPU, float32 on CPU
  param_dtype: str = "float32"
  remat: str = "none"             # remat policy of the scanned blocks, by name (REMAT_NAMES)
  # Added for the decoder model (issue 6):
  capacity_factor: float = 1.25   # moe: per-expert capacity ceil(cf * tokens * top_k / experts)
  expert_hidden: int = 0          # moma/moe expert width; 0: equal active compute with dense
  moma_routing_rows: int = 0      # moma: expert choice inside each group of this many rows (each
                                  # batch shard routes its own tokens); 0: over the whole batch
  moma_aux_router: bool = True    # moma: train a small sigmoid MLP to predict selection (causal decode)
  moma_aux_router_hidden: int = 0  # its width; 0: max(8, d_model // 8)
  aux_router_loss: float = 1.0    # moma: weight of the auxiliary routers' BCE (on detached inputs)
  loss_weights: tuple = ()        # per-modality loss weights as {name: weight}; missing names: 1.0
  grouped_impl: str = "auto"      # grouped matmuls: "ragged" (TPU/GPU), "chunked" (CPU), "auto"
  group_chunk: int = 64           # chunked: rows per chunk (padding is at most one chunk per group)
  # Added for accelerator targets (issue 18):
  platform: str = "auto"          # target of every implementation choice: cpu, gpu, tpu ("auto")
  attention_impl: str = "auto"    # xla (einsum), cudnn (GPU), splash (TPU); "auto": by platform
  loss_chunk: int = 512           # the loss computes logits for this many positions at a time

  def __post_init__(self):
    _resolve_target(self)
    if self.loss_chunk <= 0:
      raise ConfigError(f"model.loss_chunk must be positive, got {self.loss_chunk}")
    if self.d_model % self.num_heads:
      raise ConfigError(f"model.num_heads ({self.num_heads}) must divide model.d_model "
                        f"({self.d_model})")
    if self.grouped_impl not in ("auto", "ragged", "chunked"):
      raise ConfigError(f"model.grouped_impl must be auto, ragged or chunked, "
                        f"got {self.grouped_impl!r}")
    kv = self.num_kv_heads or self.num_heads
    if self.num_heads % kv:
      raise ConfigError(f"model.num_kv_heads ({kv}) must divide model.num_heads ({self.num_heads})")
    if self.rope_layout not in ("rotate_half", "interleaved"):
      raise ConfigError(f"model.rope_layout must be 'rotate_half' or 'interleaved', "
                        f"got {self.rope_layout!r}")
    if self.norm_order not in ("pre", "post"):
      raise ConfigError(f"model.norm_order must be 'pre' or 'post', got {self.norm_order!r}")
    if self.sparsity not in ("dense", "mot", "moma", "moe"):
      raise ConfigError(f"model.sparsity must be dense, mot, moma or moe, got {self.sparsity!r}")
    if self.moma_routing_rows < 0:
      raise ConfigError(f"model.moma_routing_rows must be >= 0, got {self.moma_routing_rows}")


MODEL_CONFIGS = {"fourm": FourMConfig, "decoder": DecoderConfig}


def model_config(config: ConfigDict):
  """The frozen model config of `config`, chosen by its objective."""
  objective = config.get("objective", "")
  if objective not in MODEL_CONFIGS:
    raise ConfigError(f"config key 'objective' must be one of {sorted(MODEL_CONFIGS)} to build a "
                      f"model, got {objective!r}")
  return to_dataclass(MODEL_CONFIGS[objective], config.model, where="model")
