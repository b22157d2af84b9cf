"""A mixed-modal decoder (Chameleon recipe) on shapes: captions and image codes, one stream.

Run, end to end on CPU (the decoder reads the 4M token set of configs/tokens/shapes.py, which also
needs the depth and semseg tokenizers; `:runlocal` image tokenizers are quick but blurry):
  T=runs/dec/tokens; K=$T/tokenizers; C=configs/tokenizers
  mmjax prepare shapes --out $T/data --num-train 4000 --num-val 200
  mmjax tokenizer train --config $C/shapes_text.py --workdir $K/shapes_text
  mmjax tokenizer train --config $C/shapes_rgb.py:runlocal --workdir $K/shapes_rgb \
      --config.train.steps=300 --config.data.num_train=4000
  mmjax tokenizer train --config $C/shapes_depth.py:runlocal --workdir $K/shapes_depth
  mmjax tokenizer train --config $C/shapes_semseg.py:runlocal --workdir $K/shapes_semseg
  mmjax prepare tokens --config configs/tokens/shapes.py:tokenizers=runlocal --workdir $T
  mmjax train --config configs/decoder/shapes.py:tiny --workdir runs/dec/train \
      --config.data.data_dir=$T --config.train.steps=300 --config.train.batch_size=4 \
      --config.train.warmup_steps=30 --config.train.eval_every=100 \
      --config.train.checkpoint_every=100
  mmjax generate --config configs/decoder/shapes.py:tiny,tokenizers=runlocal \
      --workdir runs/dec/train --config.data.data_dir=$T --num-samples 4 \
      --input caption="a large red circle in the center" --target tok_rgb
  mmjax generate --config configs/decoder/shapes.py:tiny,tokenizers=runlocal \
      --workdir runs/dec/train --config.data.data_dir=$T --num-samples 4 \
      --input tok_rgb=runs/dec/train/generate/tok_rgb_0.png --target caption
  mmjax train --config=configs/decoder/shapes.py:tiny,sparsity=moma ...   # modality experts
Re-running `mmjax train` on the workdir resumes from its latest checkpoint (SIGTERM saves one).
Measured with the commands above (2 CPU cores shared with other jobs, load average 20-30): ~3.1 s
per step of 4 x 256 tokens (~330 tokens/s), compile ~50 s; loss 7.9 -> 3.1 over 300 steps (caption
7.4 -> 0.87, tok_rgb 8.1 -> 4.0), eval loss 3.13 (caption accuracy 0.58, tok_rgb 0.19). Captions
come out grammatical but not yet grounded in the image; images are mostly background with a few
coloured blocks: 300 steps of batch 4 only show that the pipeline works.
Variants: `tiny` (D=256, 4 layers) for a CPU; `1B` and `7B` for scale (abstract init, AOT).
`sparsity` selects dense, mot, moma or moe at equal active compute. `runlocal` shrinks everything.
`tokenizers=ARG`: the config argument the image tokenizers were trained with (e.g. runlocal), so
that generation restores them with the right architecture.
"""

import ml_collections

from mmjax import config as mmconfig
from mmjax import defaults
from mmjax.objectives.tokenizer import image_tokenizer_config

SIZES = {
    "tiny": dict(d_model=256, num_layers=4, num_heads=4),
    "1B": dict(d_model=2048, num_layers=22, num_heads=16, num_kv_heads=4),
    # Chameleon-7B (specs/mixed_modal.md): qk-norm, z-loss 1e-5, residual dropout 0.1 (7B only),
    # context 4096; norm re-ordering and GQA are 34B-only: pre-norm, full multi-head attention.
    "7B": dict(d_model=4096, num_layers=32, num_heads=32, qk_norm=True, z_loss=1e-5,
               residual_dropout=0.1, norm_order="pre", max_length=4096),
}


def get_config(arg=None):
  arg = mmconfig.parse_arg(arg, variant="tiny", sparsity="dense", runlocal=False, tokenizers="")
  if arg.variant not in SIZES:
    raise ValueError(f"variant must be one of {sorted(SIZES)}, got {arg.variant!r}")
  config = ml_collections.ConfigDict()
  config.objective = "decoder"
  config.seed = 0

  config.data = defaults.shapes_data()
  config.modalities = ml_collections.ConfigDict(sort_keys=False, initial_dictionary=dict(
      caption=dict(kind="sequence", source="caption", vocab_size=1024, max_length=48,
                   tokenizer="configs/tokenizers/shapes_text.py"),
      tok_rgb=dict(kind="image_tokens", source="rgb", grid=(8, 8),
                   tokenizer="configs/tokenizers/shapes_rgb.py"),
  ))
  for m in config.modalities.values():
    if m.kind == "image_tokens":  # the tokenizer's config (and argument) sets the vocabulary
      if arg.tokenizers:  # the image tokenizers were trained with this config argument
        m.tokenizer = f"{m.tokenizer}:{arg.tokenizers}"
      m.vocab_size = image_tokenizer_config(m.source, arg.tokenizers or None).model.codebook_size
  # Documents built from each record, with probabilities (Chameleon: image first half the time).
  config.sequences = ml_collections.ConfigDict(dict(
      templates=(("caption", "tok_rgb"), ("tok_rgb", "caption")),
      probabilities=(0.5, 0.5),
      image_blocks_bidirectional=False,  # True: attention inside an image is bidirectional
      # Keys of mmjax.data.sequences.documents.SequencesConfig:
      loss_weights=dict(caption=1.0, tok_rgb=1.0),  # per modality of the target; unlisted: 1.0
      documents_per_record=1,     # documents drawn from each record (templates with replacement)
      drop_text_specials=True,    # drop the text tokenizer's PAD/BOS/EOS inside a text segment
      long_documents="truncate",  # a document longer than model.max_length: "truncate" or "error"
      pack_window=64,             # records packed together by first-fit decreasing
  ))

  config.model = ml_collections.ConfigDict(dict(SIZES[arg.variant]))
  config.model.sparsity = arg.sparsity
  # MoMa's expert choice inside each row: each batch shard routes its own tokens (models/experts.py).
  config.model.moma_routing_rows = 1
  if "max_length" not in config.model:
    config.model.max_length = 256
  config.model.update(defaults.model_target())
  config.model.loss_chunk = 512  # the loss computes logits for this many positions at a time

  config.train = defaults.train(steps=2000, batch_size=16, lr=1e-3, warmup_steps=200,
                                weight_decay=0.1, eps=1e-5, grad_clip=1.0)
  config.mesh = defaults.mesh()

  # `mmjax generate` (mmjax/generate/decoder_run.py): caption -> tok_rgb, image file -> caption,
  # and caption + image file -> a target when a template starts with them.
  config.generate = ml_collections.ConfigDict(dict(
      temperature=1.0,  # softmax temperature of image tokens; 0 = greedy
      text_temperature=0.0,  # of text tokens: greedy captions, the model's best reading
      top_k=0,          # keep the k most likely allowed ids; 0 = off
      top_p=0.9,        # nucleus: the most likely ids holding this much mass; 1 = off
      # Two-way classifier-free guidance on the input, uncond + s(cond - uncond); 1 = off.
      image_cfg_scale=3.0,  # caption -> image (Chameleon guides images with 3.0)
      text_cfg_scale=1.0,   # image -> caption
      # Three-way guidance, a caption and an image input: copies full, image-only, unconditional,
      # uncond + si(img - uncond) + st(full - img); both 1 = off. Chameleon: 1.2 and 3.0.
      three_way_image_scale=1.2,  # si
      three_way_text_scale=3.0,   # st
      text_first=4,     # lowest text id that may be sampled: skips the text tokenizer's PAD..EOS
  ))

  # Generation metrics during training (learning curves: mmjax/eval/curves.py).
  config.eval = defaults.training_eval()

  if arg.runlocal:
    config.data.num_train, config.data.num_val = 256, 32
    config.train.update(steps=20, batch_size=4, warmup_steps=2, log_every=5, checkpoint_every=10)
  return config
