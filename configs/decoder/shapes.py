"""A mixed-modal decoder (Chameleon recipe) on the shapes data: captions and image tokens in one stream.

Run:
  mmjax train --config=configs/decoder/shapes.py:tiny --workdir=runs/decoder_shapes
  mmjax train --config=configs/decoder/shapes.py:tiny,sparsity=moma --workdir=runs/decoder_moma
Variants: `tiny` (D=256, 4 layers) for a CPU; `1B` and `7B` for scale (abstract init, AOT).
`sparsity` selects dense, mot, moma or moe at equal active compute. `runlocal` shrinks everything.
"""

import ml_collections

from mmjax import config as mmconfig
from mmjax import defaults

SIZES = {
    "tiny": dict(d_model=256, num_layers=4, num_heads=4),
    "1B": dict(d_model=2048, num_layers=22, num_heads=16, num_kv_heads=4),
    "7B": dict(d_model=4096, num_layers=32, num_heads=32),
}


def get_config(arg=None):
  arg = mmconfig.parse_arg(arg, variant="tiny", sparsity="dense", runlocal=False)
  if arg.variant not in SIZES:
    raise ValueError(f"variant must be one of {sorted(SIZES)}, got {arg.variant!r}")
  config = ml_collections.ConfigDict()
  config.objective = "decoder"
  config.seed = 0

  config.data = defaults.shapes_data()
  config.modalities = ml_collections.ConfigDict(sort_keys=False, initial_dictionary=dict(
      caption=dict(kind="sequence", source="caption", vocab_size=1024, max_length=48,
                   tokenizer="configs/tokenizers/shapes_text.py"),
      tok_rgb=dict(kind="image_tokens", source="rgb", vocab_size=1024, grid=(8, 8),
                   tokenizer="configs/tokenizers/shapes_rgb.py"),
  ))
  # Documents built from each record, with probabilities (Chameleon: image first half the time).
  config.sequences = ml_collections.ConfigDict(dict(
      templates=(("caption", "tok_rgb"), ("tok_rgb", "caption")),
      probabilities=(0.5, 0.5),
      image_blocks_bidirectional=False,  # True: attention inside an image is bidirectional
      # Keys of mmjax.data.sequences.SequencesConfig:
      loss_weights=dict(caption=1.0, tok_rgb=1.0),  # per modality of the target; unlisted: 1.0
      documents_per_record=1,     # documents drawn from each record (templates with replacement)
      drop_text_specials=True,    # drop the text tokenizer's PAD/BOS/EOS inside a text segment
      long_documents="truncate",  # a document longer than model.max_length: "truncate" or "error"
      pack_window=64,             # records packed together by first-fit decreasing
  ))

  config.model = ml_collections.ConfigDict(dict(SIZES[arg.variant]))
  config.model.sparsity = arg.sparsity
  config.model.max_length = 256

  config.train = defaults.train(steps=2000, batch_size=16, lr=1e-3, warmup_steps=200,
                                weight_decay=0.1, eps=1e-5, grad_clip=1.0)
  config.mesh = defaults.mesh()

  # `mmjax generate` (mmjax/generate/decoder_run.py): caption -> tok_rgb and image file -> caption.
  config.generate = ml_collections.ConfigDict(dict(
      temperature=1.0,  # softmax temperature; 0 = greedy
      top_k=0,          # keep the k most likely allowed ids; 0 = off
      top_p=0.9,        # nucleus: the most likely ids holding this much mass; 1 = off
      # Two-way classifier-free guidance on the input, uncond + s(cond - uncond); 1 = off.
      image_cfg_scale=3.0,  # caption -> image (Chameleon guides images with 3.0)
      text_cfg_scale=1.0,   # image -> caption
      text_first=4,     # lowest text id that may be sampled: skips the text tokenizer's PAD..EOS
  ))

  if arg.runlocal:
    config.data.num_train, config.data.num_val = 256, 32
    config.train.update(steps=20, batch_size=4, warmup_steps=2, log_every=5, checkpoint_every=10)
  return config
