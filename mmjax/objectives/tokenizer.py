"""The image-tokenizer objective: trains an `ImageTokenizer` with the shared trainer.

Registered as "tokenizer". The model updates its VQ codebook (EMA statistics, dead-code
restarts) inside `loss`; the train step carries that non-Param state out of the jitted step.

Data: with data.name = "shapes", scenes generated on demand (scene i of a split is a pure function
of (data.seed, split, i), the same scenes `mmjax prepare shapes` writes; faster than decoding the
tfds records, about 3k scenes/s per core). Any other data.name is a raw source of
`mmjax.data.sources`, the one `mmjax prepare tokens` reads: a folder of images (data.folder) or a
tfds dataset such as coco_captions (at data.data_dir), its images resized and centre-cropped to
data.image_size on the host; without a validation split its last data.num_val images are held out.
Either is read through a Grain MapDataset (in data.num_workers processes): random access,
deterministic order, and an iterator state that checkpoints record, so a resumed run sees the same
batches.

`run_image_tokenizer_train(config, workdir)` trains (resuming if the workdir has a checkpoint), then
evaluates the final model on `data.num_val` validation scenes and writes `tokenizer_eval.json` and
`reconstructions.png` (originals above reconstructions) into the workdir, and `tokenizer.json`
(`mmjax.tokenizers.modality.TRAINED_INFO`: the fingerprint of the newest checkpoint's weights and
the architecture) beside the checkpoints, which the data checks read instead of the weights.

`load_modality_tokenizer(modality, dir)` loads any modality's trained tokenizer behind the
`ModalityTokenizer` interface: text from its SentencePiece model, images from their checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from mmjax import config as mmconfig
from mmjax import defaults, grids, progress
from mmjax import modalities as mod
from mmjax.config import ConfigError
from mmjax.data import sources as raw_sources
from mmjax.data.pipeline.stream import in_workers
from mmjax.data.shapes import world as shapes
from mmjax.errors import UserError
from mmjax.tokenizers import image_metrics
from mmjax.tokenizers import modality as mt
from mmjax.tokenizers.image import (
  LOGICAL_RULES,
  ImageTokenizer,
  ImageTokenizerConfig,
  image_fingerprint,
)
from mmjax.train.loop import CONFIG_FILE, load_model, run_train
from mmjax.train.objective import register_objective

OBJECTIVE = "tokenizer"
# Default training steps of the shapes tokenizers (see configs/tokenizers/shapes_*.py for times).
STEPS = 4000  # ~8 minutes of an idle 2-core CPU
_SPLITS = {"train": "train", "val": "validation"}


def image_tokenizer_config(modality: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of configs/tokenizers/shapes_<modality>.py; `arg`: `vq`|`fsq`, `runlocal`."""
  arg = mmconfig.parse_arg(arg, quantizer="vq", runlocal=False)
  config = ml_collections.ConfigDict()
  config.objective = OBJECTIVE
  config.seed = 0  # parameter init, codebook restarts
  config.data = defaults.shapes_data()  # scenes are generated on demand; data_dir is not read
  # Sized for minutes of CPU training: a narrow, shallow ViT learns more per second here than the
  # 256-wide, 4+4-layer one (which made ~70 steps in 10 minutes on the shared 2-core machine).
  # VQ codes are 8-dim unit vectors (a low-dimensional lookup as ViT-VQGAN's factorized codes:
  # 90% of 1024 codes used after 300 steps where 32-dim codes used 42%) with a fast EMA.
  model = dict(modality=modality, quantizer=arg.quantizer, width=128, num_heads=4,
               encoder_layers=2, decoder_layers=2, code_dim=8, code_norm=True, ema_decay=0.95,
               local_codes=True)
  # Vocabularies match the modality registry of configs/fourm/shapes.py (rgb/depth 1024,
  # semseg 256); FSQ levels with about as many codes.
  if modality == "semseg":
    model.update(codebook_size=256, fsq_levels=(8, 6, 5), class_balance=0.5)
  else:
    model.update(codebook_size=1024, fsq_levels=(8, 5, 5, 5))
  config.model = ml_collections.ConfigDict(
      {f.name: getattr(ImageTokenizerConfig(**model), f.name)
       for f in ImageTokenizerConfig.__dataclass_fields__.values()})
  # Small batches, a high peak rate and a cosine to 0: the most progress per CPU second.
  config.train = defaults.train(steps=STEPS, batch_size=16, lr=2e-3, warmup_steps=100,
                                weight_decay=0.0, b2=0.99, log_every=50, checkpoint_every=1000,
                                keep_checkpoints=1)
  config.eval = ml_collections.ConfigDict(dict(
      batch_size=100,   # images per evaluation batch
      grid_images=8,    # columns of the originals-vs-reconstructions PNG
  ))
  config.mesh = defaults.mesh()
  config.mesh.rules = tuple(config.mesh.rules) + LOGICAL_RULES
  if arg.runlocal:
    config.data.update(num_train=256, num_val=32)
    config.model.update(width=64, encoder_layers=1, decoder_layers=1)
    if modality == "rgb":
      # Fewer codes make rgb tokens a model can learn to predict: the shapes background is grey
      # noise, and spare codes go to noise patterns. Measured after 2000 steps on 200 validation
      # scenes (codebook: caption->rgb attribute-accuracy ceiling, background codes and entropy):
      # 1024: 0.81, 480 codes, 5.9 nats; 256: 0.74, 68, 4.1; 128: 0.70, 29, 3.3; 64: 0.61, 12, 2.4.
      config.model.codebook_size = 128
    config.train.update(steps=20, batch_size=8, warmup_steps=2, log_every=5, checkpoint_every=10)
    config.eval.batch_size = 16
  return config


class TokenizerObjective:
  """`Objective` of an image-like tokenizer on the shapes scenes."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.cfg: ImageTokenizerConfig = mmconfig.to_dataclass(ImageTokenizerConfig, config.model)
    self.data = config.data
    self.batch_size = int(config.train.batch_size)
    self._raw: dict[str, Any] | None = None  # the raw source's splits, opened once
    if self.data.image_size != self.cfg.image_size:
      raise mmconfig.ConfigError(f"config keys data.image_size ({self.data.image_size}) and "
                                 f"model.image_size ({self.cfg.image_size}) must agree")

  def create_model(self, rngs: nnx.Rngs) -> ImageTokenizer:
    return ImageTokenizer(self.cfg, rngs=rngs)

  def loss(self, model: ImageTokenizer, batch: dict[str, jax.Array],
           rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    return model.loss(batch["image"], train=True, rng=rng)

  def batch_axes(self) -> dict[str, tuple[str | None, ...]]:
    spatial = (None, None, None) if self.cfg.modality == "rgb" else (None, None)
    return {"image": ("batch",) + spatial}

  def source(self, split: str):
    """Random-access samples of `split`: shapes scenes generated on demand, or the images of
    the configured raw source (`mmjax.data.sources`, e.g. a folder or coco_captions), whose
    last data.num_val training images are held out when it has no validation split."""
    if split not in _SPLITS:
      raise ValueError(f"tokenizer objective: unknown split {split!r}; use 'train' or 'val'")
    if self.data.get("name", "shapes") == "shapes":
      size = self.data.num_train if split == "train" else self.data.num_val
      return shapes.SceneSource(size, seed=self.data.seed, split=_SPLITS[split],
                                image_size=self.cfg.image_size)
    if self._raw is None:
      found, _ = raw_sources.open_sources(self.data, None, tuple(_SPLITS.values()))
      self._raw = raw_sources.with_holdout(found, int(self.data.num_val))
      fields = raw_sources.source_fields(self._raw["train"])
      if self.cfg.modality not in fields:
        raise ConfigError(f"model.modality is {self.cfg.modality!r}, but the data "
                          f"({self.data.name}) has only {', '.join(fields)}")
    return self._raw[_SPLITS[split]]

  def make_iterator(self, split: str, process_index: int, process_count: int):
    # Images are decoded, resized and cropped on the host as the source reads them.
    ds = grain.MapDataset.source(self.source(split))
    if split == "train":
      ds = ds.shuffle(seed=self.data.shuffle_seed).repeat(None)
    ds = ds[process_index::process_count].map(_Pick(self.cfg.modality))
    ds = ds.batch(self.batch_size // process_count, drop_remainder=True)
    return iter(in_workers(ds.to_iter_dataset(), self.data.get("num_workers", 0)))

  def synthetic_batch(self, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = self.cfg.image_size
    if self.cfg.modality == "rgb":
      image = rng.integers(0, 256, (batch_size, s, s, 3), dtype=np.uint8)
    elif self.cfg.modality == "depth":
      image = rng.uniform(1.0, 10.0, (batch_size, s, s)).astype(np.float32)
    else:
      image = rng.integers(0, self.cfg.num_classes, (batch_size, s, s), dtype=np.uint8)
    return {"image": image}

  def train_flops_per_sample(self) -> float:
    """Forward matmul FLOPs x 3: patch embeddings, blocks, code projections, the VQ lookup."""
    c = self.cfg
    tokens = c.grid[0] * c.grid[1]
    d, patch = c.width, c.patch_size ** 2
    block = 12 * d * d + 2 * tokens * d  # qkv, proj, 4x MLP; scores and weighted values
    per_token = ((c.encoder_layers + c.decoder_layers) * block
                 + patch * (c.in_channels + c.out_channels) * d + 2 * d * c.code_dim)
    if c.quantizer == "vq":
      per_token += c.code_dim * c.codebook_size
    return 3.0 * 2.0 * tokens * per_token

  def tokens_per_sample(self) -> int:
    return self.cfg.grid[0] * self.cfg.grid[1]


class _Pick:
  """A sample -> {"image": its field `modality`} (picklable, for worker processes)."""

  def __init__(self, modality: str):
    self.modality = modality

  def __call__(self, sample):
    return {"image": sample[self.modality]}


@register_objective("tokenizer")
def make_tokenizer_objective(config: ml_collections.ConfigDict) -> TokenizerObjective:
  return TokenizerObjective(config)


# ---------------------------------------------------------------------------------------------
# Train, then evaluate and draw.


def load_trained(config: ml_collections.ConfigDict, workdir: str) -> ImageTokenizer:
  """The tokenizer of the latest checkpoint in `workdir`, on the host's default device, with the
  architecture it was trained with (the model section of the run's config file), whatever
  `config.model` says: a tokenizer config argument such as `runlocal` need not be repeated."""
  return _load_trained(config, workdir)[0]


def _load_trained(config: ml_collections.ConfigDict, workdir: str) -> tuple[ImageTokenizer, int]:
  path = epath.Path(workdir) / CONFIG_FILE
  if path.is_file():
    trained = json.loads(path.read_text()).get("model", {})
    config = ml_collections.ConfigDict(config.to_dict())
    config.model = ml_collections.ConfigDict(
        {k: tuple(v) if isinstance(v, list) else v for k, v in trained.items()})
  return load_model(config, workdir)


def validation_images(config: ml_collections.ConfigDict, modality: str) -> np.ndarray:
  """The first data.num_val images of the validation split (held out of training)."""
  source = TokenizerObjective(config).source("val")
  return np.stack([source[i][modality] for i in range(min(len(source), config.data.num_val))])


def save_reconstruction_grid(path: str, model: ImageTokenizer, images: np.ndarray) -> str:
  recon = image_metrics.reconstructions(model, images)
  kind = {"rgb": "rgb", "depth": "depth", "semseg": "classes"}[model.cfg.modality]
  if kind == "depth":  # one depth scale for an original and its reconstruction
    rows = [[], []]
    for true, pred in zip(images, recon):
      both = grids.to_rgb(np.concatenate([true, pred], axis=1), "depth")
      rows[0].append(both[:, :true.shape[1]])
      rows[1].append(both[:, true.shape[1]:])
  else:
    rows = [[grids.to_rgb(x, kind) for x in images], [grids.to_rgb(x, kind) for x in recon]]
  return grids.save_grid(path, rows, row_titles=("original", "reconstruction"))


def run_image_tokenizer_train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains through the shared trainer, then evaluates on the validation split.

  Writes `tokenizer_eval.json` (metrics, training time, steps/s) and `reconstructions.png` into
  `workdir`; returns the trainer's summary with the evaluation under "tokenizer_eval".
  """
  summary = run_train(config, workdir)
  model, step = _load_trained(config, workdir)
  modality = model.cfg.modality
  images = validation_images(config, modality)
  with progress.phase(f"tokenizer: evaluating on {len(images)} validation images",
                      enabled=jax.process_index() == 0):
    metrics = image_metrics.evaluate_image_tokenizer(model, images,
                                                     batch_size=config.eval.batch_size)
  metrics_path = os.path.join(workdir, "tokenizer_eval.json")
  report = {"modality": modality, "quantizer": model.cfg.quantizer,
            "codebook_size": model.codebook_size, "steps": summary.get("step"),
            **{k: v for k, v in metrics.items()}}
  if jax.process_index() == 0:
    _write_info(workdir, model, step)
    epath.Path(metrics_path).write_text(json.dumps(report, indent=2))
    grid_path = save_reconstruction_grid(os.path.join(workdir, "reconstructions.png"), model,
                                         images[:config.eval.grid_images])
  else:
    grid_path = None
  return {**summary, "tokenizer_eval": report, "eval_file": metrics_path, "grid": grid_path}


# ---------------------------------------------------------------------------------------------
# Trained tokenizers: their record beside the checkpoints, and loading them.


def _write_info(workdir: str, model: ImageTokenizer, step: int) -> str:
  """tokenizer.json from the weights just restored from checkpoint `step`: the fingerprint is the
  same hash `ImageModalityTokenizer` takes of them when it tokenizes."""
  return mt.write_trained_info(workdir, {
      "fingerprint": image_fingerprint(model), "step": int(step),
      "modality": model.cfg.modality, "model": dataclasses.asdict(model.cfg)})


def run_write_info(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`mmjax tokenizer fingerprint`: (re)writes tokenizer.json of the tokenizer trained in `workdir`
  (one trained before tokenizers recorded it, or whose training stopped before writing it)."""
  model, step = _load_trained(config, workdir)
  path = _write_info(workdir, model, step)
  return {"path": path, **json.loads(epath.Path(path).read_text())}


def _load_image(modality: mod.Modality, tokenizer_dir: str) -> ImageTokenizer:
  """The trained image tokenizer in `tokenizer_dir`: the latest checkpoint of `mmjax tokenizer
  train --config <modality.tokenizer> --workdir <tokenizer_dir>` (the config names the objective;
  the architecture is the one the run recorded)."""
  if not (epath.Path(tokenizer_dir) / "checkpoints").is_dir():
    raise UserError(f"modality {modality.name}: no trained tokenizer in {tokenizer_dir} (train "
                    f"it with `mmjax tokenizer train --config {modality.tokenizer} --workdir "
                    f"{tokenizer_dir}`)")
  config = mmconfig.load(mt.resolve_config_path(modality.tokenizer))
  return load_trained(config, tokenizer_dir)


def load_modality_tokenizer(modality: mod.Modality, tokenizer_dir: str, *,
                            batch_size: int = 64) -> mt.ModalityTokenizer:
  """The tokenizer of `modality`, trained into `tokenizer_dir` (the --workdir of `mmjax tokenizer
  train --config <modality.tokenizer>`), behind the ModalityTokenizer interface."""
  if modality.kind == mod.IMAGE_PIXELS:
    raise ConfigError(f"modality {modality.name} is raw pixels: it has no tokenizer")
  if modality.is_sequence:
    return mt.load_text_modality_tokenizer(modality, tokenizer_dir)
  return mt.ImageModalityTokenizer(modality, _load_image(modality, tokenizer_dir), batch_size)
