"""A tiny reference objective: the smallest complete implementation of `Objective`.

Kept in the package (not in tests/) because it is (a) the worked example the model families copy,
(b) importable from subprocesses that test kill/resume and SIGTERM, and (c) a model-free smoke
test of the trainer: `config.objective = "toy"`.

Task: each of `length` positions holds a token `t` of a `vocab`-sized alphabet; the label is
`(3 t + position) % vocab`. Positions in the first half count as modality "a", the rest as "b",
so per-modality metrics exist. Model: embedding -> LayerNorm -> ReLU MLP -> output projection,
with logical axes on every parameter so fsdp/tensor sharding is exercised. A NaN can be injected
at one step (`toy.nan_at_step`) through a `poison` batch field, and `toy.delay_s` slows the input
pipeline (for tests that must kill a run mid-way).
"""

from __future__ import annotations

import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mmjax import defaults
from mmjax.train.objective import register_objective


def toy_config(**train_overrides) -> ml_collections.ConfigDict:
  """A complete trainer config for the toy objective (tests and examples)."""
  config = ml_collections.ConfigDict()
  config.objective = "toy"
  config.seed = 0
  config.toy = ml_collections.ConfigDict(dict(
      vocab=64, embed=32, mlp=64, length=8,   # model and data sizes
      num_train=512, num_val=64,              # records per split
      data_seed=0,                            # order of the training stream
      nan_at_step=0,                          # >0: the loss of this step is NaN
      delay_s=0.0,                            # sleep per batch in the input pipeline
  ))
  config.model = ml_collections.ConfigDict(dict(dtype="float32"))
  config.train = defaults.train(steps=10, batch_size=16, lr=1e-2, warmup_steps=2, log_every=1,
                                checkpoint_every=5, keep_checkpoints=2)
  config.train.update(train_overrides)
  config.mesh = defaults.mesh()
  return config


class ToyMLP(nnx.Module):
  """Per-token classifier: vocab -> embed -> mlp -> vocab."""

  def __init__(self, vocab: int, embed: int, mlp: int, length: int, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.5)
    self.embed = nnx.Embed(vocab, embed, rngs=rngs,
                           embedding_init=nnx.with_partitioning(init, ("vocab", "embed")))
    self.position = nnx.Param(nnx.with_partitioning(init, ("length", "embed"))(
        rngs.params(), (length, embed)))
    self.norm = nnx.LayerNorm(embed, rngs=rngs,
                              scale_init=nnx.with_partitioning(nnx.initializers.ones, ("embed",)),
                              bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("embed",)))
    self.hidden = nnx.Linear(
        embed, mlp, rngs=rngs,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp")),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("mlp",)))
    self.out = nnx.Linear(
        mlp, vocab, rngs=rngs,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("mlp", "vocab")),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("vocab",)))

  def __call__(self, tokens_BL: jax.Array) -> jax.Array:
    x_BLD = self.embed(tokens_BL) + self.position[...][None]
    h_BLM = jax.nn.relu(self.hidden(self.norm(x_BLD)))
    return self.out(h_BLM)


class ToyObjective:
  """`Objective` for the toy task."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.c = config.toy
    self.batch_size = config.train.batch_size

  def create_model(self, rngs: nnx.Rngs) -> nnx.Module:
    return ToyMLP(self.c.vocab, self.c.embed, self.c.mlp, self.c.length, rngs=rngs)

  def loss(self, model, batch, rng):
    del rng  # deterministic model
    logits_BLV = model(batch["tokens"]).astype(jnp.float32)
    nll_BL = -jnp.take_along_axis(jax.nn.log_softmax(logits_BLV), batch["labels"][..., None],
                                  axis=-1)[..., 0]
    correct_BL = (jnp.argmax(logits_BLV, -1) == batch["labels"]).astype(jnp.float32)
    half = self.c.length // 2
    metrics = {"loss/a": nll_BL[:, :half].mean(), "loss/b": nll_BL[:, half:].mean(),
               "acc/a": correct_BL[:, :half].mean(), "acc/b": correct_BL[:, half:].mean()}
    return nll_BL.mean() + batch["poison"].mean(), metrics

  def batch_axes(self):
    return {"tokens": ("batch", "length"), "labels": ("batch", "length"), "poison": ("batch",)}

  def _record(self, split: str, index: int) -> dict[str, np.ndarray]:
    seed = (self.c.data_seed, 0 if split == "train" else 1, int(index))
    tokens = np.random.default_rng(seed).integers(0, self.c.vocab, self.c.length, dtype=np.int32)
    labels = (3 * tokens + np.arange(self.c.length, dtype=np.int32)) % self.c.vocab
    return {"tokens": tokens, "labels": labels.astype(np.int32)}

  def make_iterator(self, split, process_index, process_count):
    if split not in ("train", "val"):
      raise ValueError(f"toy objective: unknown split {split!r}")
    per_host = self.batch_size // process_count
    size = self.c.num_train if split == "train" else self.c.num_val
    ds = grain.MapDataset.range(size).map(lambda i: self._record(split, i))
    if split == "train":
      ds = ds.shuffle(seed=self.c.data_seed).repeat(None)
    ds = ds[process_index::process_count].batch(per_host, drop_remainder=True)
    nan_batch, delay = self.c.nan_at_step - 1, self.c.delay_s  # step s consumes batch s - 1

    def finish(index: int, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
      if delay:
        time.sleep(delay)
      poison = np.full((per_host,), np.nan if index == nan_batch and split == "train" else 0.0,
                       np.float32)
      return {**batch, "poison": poison}

    return iter(ds.map_with_index(finish).to_iter_dataset())

  def synthetic_batch(self, batch_size, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, self.c.vocab, (batch_size, self.c.length), dtype=np.int32)
    labels = rng.integers(0, self.c.vocab, (batch_size, self.c.length), dtype=np.int32)
    return {"tokens": tokens, "labels": labels, "poison": np.zeros((batch_size,), np.float32)}

  def train_flops_per_sample(self):
    c = self.c
    return 3.0 * 2.0 * c.length * (c.embed * c.mlp + c.mlp * c.vocab)

  def tokens_per_sample(self):
    return int(self.c.length)


@register_objective("toy")
def make_toy(config: ml_collections.ConfigDict) -> ToyObjective:
  return ToyObjective(config)
