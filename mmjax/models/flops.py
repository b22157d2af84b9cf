"""Analytic model FLOPs (multiply-adds x 2) per sample; training = 3 x forward (matmuls only).

4M: attention is counted dense over all N (or M) slots, as it is computed; the decoder's self-attention
mask (bidirectional within images) is not halved. Output heads cost 2 D V_m per target token of
modality m, since each token runs only its own head (chunked / grouped); `heads_all_positions` is the
cost of running every head at every decoder position, for comparison.
"""

from __future__ import annotations

from collections.abc import Mapping

from mmjax.config import load
from mmjax.modalities import Registry
from mmjax.modalities import from_config
from mmjax.models.configs import FourMConfig
from mmjax.models.configs import model_config


def _mlp(cfg: FourMConfig, tokens: int) -> float:
  mats = 3 if cfg.mlp_type == "swiglu" else 2
  return 2.0 * tokens * cfg.d_model * cfg.hidden * mats


def fourm_flops(cfg: FourMConfig, registry: Registry, target_counts: Mapping[str, float],
                num_input: int | None = None, num_target: int | None = None) -> dict[str, float]:
  """FLOPs of one sample with N input slots, M target slots and `target_counts` loss tokens per
  target modality (e.g. the expected counts of the masking mixture)."""
  n = cfg.num_input_tokens if num_input is None else num_input
  m = cfg.num_target_tokens if num_target is None else num_target
  d = cfg.d_model
  unknown = [k for k in target_counts if k not in registry or not registry[k].can_be_target]
  if unknown:
    raise ValueError(f"target_counts names modalities that are not targets: {unknown}")
  enc_layer = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + _mlp(cfg, n)
  dec_layer = (2 * m * d * 3 * d + 2 * 2 * m * m * d + 2 * m * d * d          # self-attention
               + 2 * m * d * d + 2 * n * d * 2 * d + 2 * 2 * m * n * d + 2 * m * d * d  # cross
               + _mlp(cfg, m))
  patches = sum(2.0 * mod.num_tokens * mod.patch_dim * d for mod in registry
                if mod.kind == "image_pixels")
  context = 2.0 * n * d * d
  heads = sum(2.0 * d * registry[k].vocab_size * c for k, c in target_counts.items())
  heads_all = 2.0 * d * m * sum(t.vocab_size for t in registry.targets())
  forward = (cfg.encoder_layers * enc_layer + cfg.decoder_layers * dec_layer + patches + context
             + heads)
  return dict(forward=forward, train=3.0 * forward, heads=heads, heads_all_positions=heads_all,
              trunk=forward - heads - patches)


def main() -> None:
  """Prints the figures of configs/fourm/4m.py:B at 128/128 with targets split evenly."""
  config = load("configs/fourm/4m.py:B")
  cfg, reg = model_config(config), from_config(config.modalities)
  targets = reg.targets()
  counts = {t.name: cfg.num_target_tokens / len(targets) for t in targets}
  f = fourm_flops(cfg, reg, counts)
  print({k: f"{v / 1e9:.2f} GFLOP" for k, v in f.items()}, "counts", counts)


if __name__ == "__main__":
  main()
