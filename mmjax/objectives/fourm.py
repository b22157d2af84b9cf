"""The 4M objective for the trainer (registered as "fourm"): model, loss, data, synthetic batches.

Data: the pre-tokenized records of `config.data` (`mmjax prepare tokens`; one dataset or the
weighted `data.mixture`) through the 4M masking pipeline (mmjax/data/pipeline/). Each dataset is
checked against the config when the iterator is made (modalities, vocabularies, tokenizer
fingerprints, masking.num_sentinels) and its records are parsed by its own modality order. FLOPs
per sample assume the decoder's M slots split evenly over the target modalities (the heads are a
small share of the total; see models/flops.py).
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from flax import nnx

from mmjax import modalities
from mmjax.data.fourm import batch as fourm_batch
from mmjax.data.pipeline import fourm as fourm_pipeline
from mmjax.models.configs import model_config
from mmjax.models.flops import fourm_flops
from mmjax.models.fourm import FourM
from mmjax.models.fourm_loss import fourm_loss
from mmjax.objectives.fourm_synthetic import REFERENCE_TEXT_TOKENS, masked_batch, synthetic_batch
from mmjax.train.objective import register_objective

# The trainer's split names -> the pre-tokenized dataset's (`mmjax prepare tokens` writes tfds names).
_SPLITS = {"train": "train", "val": "validation"}


class FourMObjective:
  """4M masked modeling: any subset of modalities' tokens predicts any other subset."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.cfg = model_config(config)
    self.registry = modalities.from_config(config.modalities)

  def create_model(self, rngs: nnx.Rngs) -> FourM:
    return FourM(self.cfg, self.registry, rngs=rngs)

  def loss(self, model: FourM, batch, rng: jax.Array):
    del rng  # no dropout in 4M
    return fourm_loss(model, batch)

  def batch_axes(self) -> dict[str, tuple[str | None, ...]]:
    return {name: ("batch", None, None) if name == "enc_pixels" else ("batch", "length")
            for name in fourm_batch.FIELDS}

  def make_iterator(self, split: str, process_index: int, process_count: int):
    # Late: token sets are read with tensorflow_datasets, seconds to import, and every command
    # that builds an objective (bench, aot, tokenizer training) imports this module.
    from mmjax.data.pipeline import token_sets  # noqa: PLC0415
    if split not in _SPLITS:
      raise ValueError(f"fourm objective: unknown split {split!r}; use 'train' or 'val'")
    # Serialized records parsed straight from the proto: tfds' Python decoding is ~5x slower.
    specs = token_sets.token_datasets(
        self.config, _SPLITS[split], self.registry, self.registry.names,
        num_sentinels=int(self.config.masking.get("num_sentinels", 100)))
    return fourm_pipeline.make_iterator(self.config, specs, process_index=process_index,
                                        process_count=process_count, registry=self.registry,
                                        num_epochs=None if split == "train" else 1)

  def synthetic_batch(self, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    return synthetic_batch(self.registry, batch_size, self.cfg.num_input_tokens,
                           self.cfg.num_target_tokens, seed)

  def masked_batch(self, batch_size: int, seed: int,
                   text_tokens: int = REFERENCE_TEXT_TOKENS) -> dict[str, np.ndarray]:
    """Random records through the training masking (`bench step --batch=masked`)."""
    transform = fourm_pipeline.transform_from_config(self.config, registry=self.registry)
    return masked_batch(transform, batch_size, seed, text_tokens)

  def flops(self) -> dict[str, float]:
    targets = self.registry.targets()
    counts = {t.name: self.cfg.num_target_tokens / len(targets) for t in targets}
    return fourm_flops(self.cfg, self.registry, counts)

  def train_flops_per_sample(self) -> float:
    return self.flops()["train"]

  def tokens_per_sample(self) -> int:
    return self.cfg.num_input_tokens + self.cfg.num_target_tokens


@register_objective("fourm")
def make_fourm(config: ml_collections.ConfigDict) -> FourMObjective:
  return FourMObjective(config)
