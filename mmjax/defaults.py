"""Config sections that every training config shares, so config files state only what differs.

Every key is commented here once; config files override values, never copy the sections.
"""

from __future__ import annotations

import ml_collections

# Where `bash launch/local.sh` (`mmjax demo --workdir runs/demo`) writes its token set, relative to
# the checkout; configs whose data.data_dir is empty read it (mmjax/data/pipeline/demo_tokens.py).
DEMO_TOKENS = "runs/demo/tokens"


def train(**overrides) -> ml_collections.ConfigDict:
  """The optimisation and loop section (`config.train`)."""
  section = ml_collections.ConfigDict(dict(
      steps=1000,             # optimizer steps to run
      batch_size=64,          # global batch, over all hosts
      microbatches=1,         # gradient accumulation: batch_size / microbatches per forward pass
      lr=1e-4,                # peak learning rate
      schedule="cosine",      # "cosine" (warm-up then cosine to 0), "wsd", "rsqrt" or "constant"
      warmup_steps=100,       # linear warm-up from 0
      decay_fraction=0.2,     # wsd: fraction of steps spent decaying at the end
      b1=0.9,                 # AdamW betas and eps (4M: 0.9, 0.95, 1e-8)
      b2=0.95,
      eps=1e-8,
      weight_decay=0.05,      # not applied to norm weights and biases
      grad_clip=1.0,          # global-norm clipping; 0 disables
      nan_policy="stop",      # on a NaN/inf loss: "stop" (no save of the bad state) or "skip"
      log_every=10,           # steps between metric lines
      eval_every=0,           # steps between validation passes; 0: only at the end
      checkpoint_every=500,   # steps between checkpoints (always one at the end)
      keep_checkpoints=3,     # retention: the newest this many
      eval_batches=4,         # validation batches per evaluation
      param_dtype="float32",  # dtype of parameters and optimizer moments (compute dtype: model's)
      profile_steps="",       # "a,b": a jax.profiler trace of steps a..b into <workdir>/profile
  ))
  section.update(overrides)
  return section


def mesh(**shape) -> ml_collections.ConfigDict:
  """Device mesh (`config.mesh`): axis sizes, one of them -1 to be filled from the device count."""
  sizes = dict(data=-1, fsdp=1, tensor=1, expert=1)
  sizes.update(shape)
  return ml_collections.ConfigDict(dict(
      shape=sizes,
      batch_axes=("data", "fsdp"),  # mesh axes the global batch is split over
      # Logical axis -> mesh axes. One table for every model; unnamed logical axes are replicated.
      rules=(
          ("batch", ("data", "fsdp")),
          ("embed", "fsdp"),
          ("mlp", "tensor"),
          ("heads", "tensor"),
          ("kv", None),
          ("vocab", "tensor"),
          ("expert", "expert"),
          ("layers", None),
          ("length", None),
      ),
  ))


def shapes_data(**overrides) -> ml_collections.ConfigDict:
  """The embedded shapes dataset (`config.data`); `mmjax prepare shapes` writes it to `data_dir`."""
  section = ml_collections.ConfigDict(dict(
      name="shapes",          # tfds builder name
      data_dir="",            # where the prepared data lives; "": `mmjax prepare tokens` reads
                              # <workdir>/data, training reads the demo's tokens (`mmjax demo`
                              # writes them; mmjax/data/pipeline/demo_tokens.py)
      tokenizers_dir="",      # trained tokenizers, <dir>/<tokenizer config stem>, used to decode
                              # generated tokens; "" means <data_dir>/tokenizers
      image_size=64,          # side of the square scenes
      num_train=20000,        # scenes in the train split
      num_val=1000,           # scenes in the validation split
      max_objects=0,          # `mmjax prepare tokens`: keep only scenes with at most this many
                              # objects (their indices kept); 0 = every scene (1-4 objects)
      seed=0,                 # scene i of a split is a pure function of (seed, split, i)
      shuffle_seed=0,         # order of the training stream
      num_workers=0,          # grain multiprocessing workers; 0 reads in the main process
      bad_records="error",    # a bad record (missing/wrong-length field, id >= vocab): "error" names
                              # it and stops; "skip" pads its batch row and counts it
      max_bad_fraction=0.05,  # with "skip": stop when more than this share of a dataset's records
                              # read so far were bad (1.0: never)
      missing="",             # comma-separated modalities the dataset may lack (empty where absent)
      # Several pre-tokenized datasets mixed per sample by weight, instead of data_dir / name:
      # (dict(data_dir=..., name=..., weight=3, missing="tok_rgb"), ...); a modality one of them
      # lacks is empty there (mmjax/data/pipeline/). () = the one dataset at data_dir.
      mixture=(),
      check_tokenizers=True,  # at start, compare the data's tokenizer fingerprints with those of
                              # the config's tokenizers found in tokenizers_dir
  ))
  section.update(overrides)
  return section


def model_target() -> dict:
  """Model keys both families share: the target and how the step runs there (`config.model`;
  mmjax/models/configs.py)."""
  return dict(
      platform="auto",        # cpu, gpu or tpu; auto: the platform of the devices compiled for
      attention_impl="auto",  # xla (einsum), cudnn (GPU), splash (TPU); auto: by platform
      remat="none",           # remat of the scanned layers: none, full, minimal, save_dots,
  )                           # save_qkv_proj, save_out_proj, save_dot_except_mlp(wi)


def image_text_data(**overrides) -> ml_collections.ConfigDict:
  """Your own images and captions (`config.data` of the photo configs): a folder or a tfds dataset
  read by `mmjax.data.sources`, for tokenizer training and `mmjax prepare tokens`; training reads
  the token set `mmjax prepare tokens` wrote (data_dir / name, as with shapes_data)."""
  section = shapes_data(
      name="folder",          # "folder" (data.folder) or a tfds name, e.g. "coco_captions"
      image_size=128,         # images are resized on their shorter side and centre-cropped to this
      num_val=200,            # held-out images (or captions) that tokenizers report quality on
                              # (taken from the end of train when the source has no validation)
  )
  section.folder = ""         # data.name = "folder": images with same-stem .txt captions
  section.caption_index = 0   # tfds sources with several captions per image: which one
  for key in ("num_train", "seed"):  # shapes scene generation only
    del section[key]
  section.update(overrides)
  return section


def training_eval(**overrides) -> ml_collections.ConfigDict:
  """Generation metrics during training (`config.eval` of 4M and decoder configs; learning curves
  by `mmjax.eval.curves`)."""
  section = ml_collections.ConfigDict(dict(
      every_steps=0,   # generation metrics every this many training steps (and at the end); 0: off
      num_scenes=16,   # validation scenes they are measured on
      tasks="",        # comma-separated tasks, e.g. "rgb->caption,caption->tok_rgb"; "" = all
      grid_rows=4,     # rows of the PNG grids written at each evaluation (eval/step_<N>/)
  ))
  section.update(overrides)
  return section
