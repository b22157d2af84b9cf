"""The training objective: what a model family gives the trainer. Injected, never branched on.

The 4M model, the mixed-modal decoder and the image tokenizers each implement `Objective` and
register a factory under the name their configs use in `config.objective`:

  @register_objective("fourm")
  def make_fourm(config: ml_collections.ConfigDict) -> Objective:
    return FourMObjective(config)

`get_objective(config)` finds it. The trainer imports no model code: on an unknown name it imports
the package `mmjax.objectives` (if it exists), whose `__init__` imports each objective module so
that they register; a name of the form `"some.module:name"` imports `some.module` first.

Contract (the trainer relies on exactly this):
- `create_model` is called under the mesh and the logical-axis rules, first abstractly
  (`nnx.eval_shape`), then inside a jitted init with output shardings. Parameters are `nnx.Param`s
  carrying logical axis names (`nnx.with_partitioning(init, ("embed", "mlp"))`); stacked layers put
  "layers" first. Any other variable (e.g. a buffer) is carried along; `loss` may update such
  variables in the forward pass (e.g. a VQ codebook's EMA statistics): the train step carries them
  out (not the evaluation step). Randomness comes only through `loss`'s `rng`.
- `loss` is traced inside the jitted step (with `batch` a slice of the global batch when gradient
  accumulation is on): it returns a scalar float32 loss, the mean over the (micro)batch, and a flat
  dict of scalar metrics (e.g. `loss/tok_rgb`, `acc/caption`), averaged over micro-batches.
- `batch_axes` names the logical axes of every batch field; the first is "batch".
- `make_iterator` returns a Grain `DatasetIterator` (has `get_state()` / `set_state()`) of this
  host's share of the global batch: `config.train.batch_size // process_count` samples per item.
  The "train" split repeats forever in a fixed order given its seed; the "val" split is read from
  its start each time the iterator is created.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import jax
import ml_collections
import numpy as np
from flax import nnx

from mmjax.config import ConfigError


@runtime_checkable
class Objective(Protocol):
  """A model family plus its loss and data, as the trainer sees it."""

  def create_model(self, rngs: nnx.Rngs) -> nnx.Module:
    """Builds the model; parameters carry logical axis names."""
    ...

  def loss(self, model: nnx.Module, batch: dict[str, jax.Array],
           rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(scalar mean loss, {metric name: scalar}) for one (micro-)batch."""
    ...

  def batch_axes(self) -> dict[str, tuple[str | None, ...]]:
    """Logical axis names of each batch field, "batch" first, e.g. {"tokens": ("batch", "length")}."""
    ...

  def make_iterator(self, split: str, process_index: int,
                    process_count: int) -> Iterator[dict[str, np.ndarray]]:
    """This host's batches of `split` ("train" or "val"): a Grain DatasetIterator."""
    ...

  def synthetic_batch(self, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    """A batch of the real layout and dtypes with random content (benchmarks, AOT compiles)."""
    ...

  def train_flops_per_sample(self) -> float:
    """Analytic model FLOPs of one training sample: forward matmuls x 3 (causal attention halved)."""
    ...

  def tokens_per_sample(self) -> int:
    """Tokens one sample contributes to tokens/s (e.g. input + target tokens)."""
    ...


ObjectiveFactory = Callable[[ml_collections.ConfigDict], Objective]
_REGISTRY: dict[str, ObjectiveFactory] = {}
# Imported on a registry miss: the collection of model objectives, then the trainer's toy one.
_COLLECTION_PACKAGES = ("mmjax.objectives", "mmjax.train.toy")


def register_objective(name: str) -> Callable[[ObjectiveFactory], ObjectiveFactory]:
  """Decorator: registers `factory(config) -> Objective` under `name`."""

  def decorate(factory: ObjectiveFactory) -> ObjectiveFactory:
    if name in _REGISTRY and _REGISTRY[name] is not factory:
      raise ValueError(f"objective {name!r} is registered twice ({_REGISTRY[name]} and {factory})")
    _REGISTRY[name] = factory
    return factory

  return decorate


def registered_objectives() -> list[str]:
  return sorted(_REGISTRY)


def get_objective(config: ml_collections.ConfigDict) -> Objective:
  """The objective named by `config.objective`, built from the config."""
  name = config.get("objective")
  if not name:
    raise ConfigError("config key 'objective' is missing: name the training objective, e.g. "
                      f"'fourm' (registered: {registered_objectives()})")
  if ":" in name:
    module, _, name = name.partition(":")
    try:
      importlib.import_module(module)
    except ModuleNotFoundError as e:
      raise ConfigError(f"config key 'objective': cannot import module {module!r}: {e}") from None
  for package in _COLLECTION_PACKAGES:
    if name in _REGISTRY:
      break
    try:
      importlib.import_module(package)
    except ModuleNotFoundError as e:
      if e.name != package:
        raise
  if name not in _REGISTRY:
    raise ConfigError(f"config key 'objective': unknown objective {name!r}; registered: "
                      f"{registered_objectives()}")
  objective = _REGISTRY[name](config)
  missing = [m for m in ("create_model", "loss", "batch_axes", "make_iterator", "synthetic_batch",
                         "train_flops_per_sample", "tokens_per_sample")
             if not callable(getattr(objective, m, None))]
  if missing:
    raise TypeError(f"objective {name!r} ({type(objective).__name__}) lacks {missing}")
  return objective


def config_get(section: Any, key: str, default: Any) -> Any:
  """`section.key` if the (possibly absent) config section has it, else `default`."""
  if section is None:
    return default
  return section.get(key, default)
