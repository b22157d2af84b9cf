"""4M on the embedded shapes data: every modality to every other, small enough for a CPU.

Run, end to end on CPU (`:runlocal` image tokenizers are quick but blurry; pass the argument they
were trained with as `tokenizers=ARG`, and drop it for full-size ones):
  W=runs/fourm_shapes; T=$W/tokens; K=$T/tokenizers; C=configs/tokenizers
  mmjax prepare shapes --out $W/data --num-train 5000 --num-val 500
  mmjax tokenizer train --config $C/shapes_text.py --workdir $K/shapes_text
  mmjax tokenizer train --config $C/shapes_rgb.py:runlocal --workdir $K/shapes_rgb \
      --config.train.steps=300 --config.data.num_train=5000     # likewise depth, semseg
  mmjax prepare tokens --config configs/tokens/shapes.py:tokenizers=runlocal \
      --config.data.data_dir=$W/data --workdir $T
  mmjax train --config configs/fourm/shapes.py:tiny,tokenizers=runlocal --workdir $W/train \
      --config.data.data_dir=$T --config.train.steps=200 --config.train.batch_size=16 \
      --config.train.warmup_steps=20 --config.train.eval_every=50 --config.train.checkpoint_every=50
  mmjax eval --config configs/fourm/shapes.py:tiny,tokenizers=runlocal --workdir $W/train \
      --config.data.data_dir=$T --num-scenes 32       # metrics.json + PNG grids in $W/train/eval
  mmjax generate --config configs/fourm/shapes.py:tiny,tokenizers=runlocal --workdir $W/train \
      --config.data.data_dir=$T --input caption="a large red circle in the center" \
      --target tok_rgb --target det
  mmjax train --config=configs/fourm/shapes.py:tiny,runlocal --workdir=/tmp/smoke   # seconds
(an empty data.data_dir, as in the last line, reads runs/demo/tokens, which `mmjax demo` writes).
Re-running `mmjax train` on the workdir resumes from its latest checkpoint (SIGTERM saves one).
Measured with exactly these commands (2 CPU cores shared with ~6 jobs, load average ~20-30):
10-20 s per step; loss 6.86 -> 3.12 over 200 steps, validation loss 4.41 (step 50) -> 3.13 (200);
eval on 16 scenes: semseg mIoU 0.16 (pixel acc 0.88), depth abs-rel 0.19, caption->rgb attribute
accuracy 0.04, rgb->caption 0 (no caption parses yet) and rgb->det F1 0: 200 steps and `runlocal`
tokenizers are far from enough for text and boxes.
`mmjax demo` runs the same sequence at demo sizes. Training writes metrics.jsonl, TensorBoard
events (tb/) and loss.png into the workdir; `--config.eval.every_steps=K` adds the generation
metrics every K steps and curves.png (each metric against steps, with its chance level and
tokenizer ceiling).
Variants: `tiny` (D=192, 4+4 layers) and `small` (D=384, 6+6). `runlocal` shrinks steps and data;
`reference` sets the reference run's training sizes (`mmjax demo --reference` runs it end to end).
`tokenizers=ARG`: the config argument the image tokenizers were trained with (e.g. runlocal).
"""

import ml_collections

from mmjax import config as mmconfig
from mmjax import defaults
from mmjax.generate import fourm_settings
from mmjax.objectives.tokenizer import image_tokenizer_config

SIZES = {
    "tiny": dict(d_model=192, num_heads=3, encoder_layers=4, decoder_layers=4),
    "small": dict(d_model=384, num_heads=6, encoder_layers=6, decoder_layers=6),
}


def get_config(arg=None):
  arg = mmconfig.parse_arg(arg, variant="tiny", runlocal=False, tokenizers="", reference=False)
  if arg.variant not in SIZES:
    raise ValueError(f"variant must be one of {sorted(SIZES)}, got {arg.variant!r}")
  config = ml_collections.ConfigDict()
  config.objective = "fourm"
  config.seed = 0  # parameter init and dropout/sampling RNG

  config.data = defaults.shapes_data()
  # Modality ids follow this order. Image-like tokens come from the shapes tokenizers (8x8 grids
  # of 64x64 scenes); text-like ones share the shapes SentencePiece vocabulary.
  config.modalities = ml_collections.ConfigDict(sort_keys=False, initial_dictionary=dict(
      rgb=dict(kind="image_pixels", source="rgb", image_size=64, patch_size=8),
      tok_rgb=dict(kind="image_tokens", source="rgb", grid=(8, 8),
                   tokenizer="configs/tokenizers/shapes_rgb.py"),
      tok_depth=dict(kind="image_tokens", source="depth", grid=(8, 8),
                     tokenizer="configs/tokenizers/shapes_depth.py"),
      tok_semseg=dict(kind="image_tokens", source="semseg", grid=(8, 8),
                      tokenizer="configs/tokenizers/shapes_semseg.py"),
      caption=dict(kind="sequence", source="caption", vocab_size=1024, max_length=48,
                   tokenizer="configs/tokenizers/shapes_text.py"),
      det=dict(kind="sequence", source="det", vocab_size=1024, max_length=64,
               tokenizer="configs/tokenizers/shapes_text.py"),
  ))
  for m in config.modalities.values():
    if m.kind == "image_tokens":  # the tokenizer's config (and argument) sets the vocabulary
      if arg.tokenizers:  # the image tokenizers were trained with this config argument
        m.tokenizer = f"{m.tokenizer}:{arg.tokenizers}"
      m.vocab_size = image_tokenizer_config(m.source, arg.tokenizers or None).model.codebook_size
  config.masking = ml_collections.ConfigDict(dict(
      mixture="4m7",            # Dirichlet mixture: "4m7", "4m21", or a fixed "rgb->tok_semseg"
      input_alpha=0.5,          # all->all component concentration
      keep_scheme="random",     # span-masking keep probability: "random", "all" or "binary"
      rgb_modality="",          # plays "rgb" in rgb->all; "" = the image_pixels one, else tok rgb
      mixture_weights=(),       # component weights overriding the mixture's own; () = defaults
      num_sentinels=64,         # [S_0].. of the text vocabulary: = the text tokenizer's count
  ))

  config.model = ml_collections.ConfigDict(dict(SIZES[arg.variant]))
  config.model.num_input_tokens = 128
  config.model.num_target_tokens = 128
  config.model.dtype = "auto"  # bfloat16 on TPU/GPU, float32 on CPU
  # Untied heads here, unlike the reference's training, 4m.py and photo.py: the results above,
  # and the demo's were measured untied. --config.model.tie_heads=True ties.
  config.model.tie_heads = False
  config.model.update(defaults.model_target())

  config.train = defaults.train(steps=2000, batch_size=32, lr=5e-4, warmup_steps=200)
  config.mesh = defaults.mesh()
  # `mmjax generate`: sampler settings (every key commented in mmjax/generate/fourm_settings.py).
  # Captions, boxes, semseg and depth greedy (the model's best reading of the image: at
  # temperature 1 the demo's 800-step model scored rgb->caption attribute accuracy 0.24, greedy
  # 0.35, chance 0.23; the reference run's step 3000, 64 scenes: semseg mIoU 0.226 -> 0.243,
  # depth abs-rel 0.070 -> 0.056), and guidance 3 from a caption (a 900-step model's
  # caption->rgb: 0.09 unguided, 0.23 guided; at temperature 0.7 or with 16-64 MaskGIT steps the
  # images lose their objects: 0.00-0.01).
  # cfg_weights wins over cfg_scale: pass --config.generate.cfg_weights= to use cfg_scale.
  config.generate = fourm_settings.section(steps=8,
                                           temperature_per_modality=(
                                               "caption:0,det:0,tok_semseg:0,tok_depth:0"),
                                           cfg_weights="caption:3")
  # Generation metrics during training (learning curves: mmjax/eval/curves.py).
  config.eval = defaults.training_eval()

  if arg.reference:
    # The reference run (`mmjax demo --reference`: README, "Reference run"): the demo's mixture
    # (one third each of all->all at alpha 1, rgb->all and caption->all) and learning rate, for
    # 10x its steps, with every generation metric measured on the way.
    config.train.update(steps=10000, batch_size=16, lr=1e-3, warmup_steps=500, eval_every=1000,
                        checkpoint_every=1000, log_every=100, eval_batches=4)
    config.masking.update(mixture="4m21", mixture_weights=(0, 0, 1, 0, 1, 1))
    config.eval.update(every_steps=1000, num_scenes=64, tasks="")
  if arg.runlocal:
    config.data.num_train, config.data.num_val = 256, 32
    config.train.update(steps=20, batch_size=8, warmup_steps=2, log_every=5, checkpoint_every=10)
    config.model.update(num_input_tokens=64, num_target_tokens=64)
  return config
