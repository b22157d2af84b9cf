"""4M at the reference sizes with the 4M-7-like modality set at 224 px.

Run (benchmark, synthetic batches of this layout):
  mmjax bench step --config=configs/fourm/4m.py:tiny
  mmjax aot --config=configs/fourm/4m.py:B --topology=v5p:2x2x2
Variants (specs/fourm.md): tiny (D=384, 6+6, 6 heads), small (512, 8+8, 8), B (768, 12+12, 12),
L (1024, 24+24, 16), XL (2048, 24+24, 32).
"""

import ml_collections

from mmjax import config as mmconfig
from mmjax import defaults
from mmjax.generate import fourm_settings

SIZES = {
    "tiny": (384, 6, 6),
    "small": (512, 8, 8),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (2048, 24, 32),
}


def get_config(arg=None):
  arg = mmconfig.parse_arg(arg, variant="tiny")
  if arg.variant not in SIZES:
    raise ValueError(f"variant must be one of {sorted(SIZES)}, got {arg.variant!r}")
  width, depth, heads = SIZES[arg.variant]
  config = ml_collections.ConfigDict()
  config.objective = "fourm"
  config.seed = 0

  config.data = defaults.shapes_data(image_size=224)
  config.modalities = ml_collections.ConfigDict(sort_keys=False, initial_dictionary=dict(
      rgb=dict(kind="image_pixels", source="rgb", image_size=224, patch_size=16),
      tok_rgb=dict(kind="image_tokens", source="rgb", vocab_size=16384, grid=(14, 14)),
      tok_depth=dict(kind="image_tokens", source="depth", vocab_size=8192, grid=(14, 14)),
      caption=dict(kind="sequence", source="caption", vocab_size=30000, max_length=256),
      det=dict(kind="sequence", source="det", vocab_size=30000, max_length=256),
  ))
  config.masking = ml_collections.ConfigDict(dict(
      mixture="4m7", input_alpha=0.5, keep_scheme="random",
      rgb_modality="",      # plays "rgb" in rgb->all; "" = the image_pixels modality
      mixture_weights=(),   # component weights overriding the mixture's own; () = defaults
      num_sentinels=200))   # the reference's [S_0]..[S_199]; max_length 256 needs 130

  config.model = ml_collections.ConfigDict(dict(
      d_model=width, num_heads=heads, encoder_layers=depth, decoder_layers=depth,
      num_input_tokens=128, num_target_tokens=128, dtype="auto",  # bf16 on TPU/GPU
      tie_heads=True))  # each output head is its decoder token table, as in the released models

  # The reference recipe: AdamW (0.9, 0.95), wd 0.05, base LR 1e-4 per 256 samples (2e-5 for XL).
  base_lr = 2e-5 if arg.variant == "XL" else 1e-4
  config.train = defaults.train(steps=100000, batch_size=16, lr=base_lr * 16 / 256,
                                warmup_steps=2000, grad_clip=3.0 if arg.variant == "XL" else 0.0)
  config.mesh = defaults.mesh()
  # `mmjax generate`: sampler settings (every key commented in mmjax/generate/fourm_settings.py).
  config.generate = fourm_settings.section(steps=12)
  return config
