"""The Grain input pipeline of the 4M objective: records -> batches, sharded per host, resumable.

    source (random access) -> tag (dataset, index) -> global shuffle by seed -> repeat over epochs
      [-> per-sample mixture of datasets by weight] -> this host's share [i::n] -> batch of records
      -> 4M masking (a random map seeded by (seed, host, batch index)) [-> worker processes]

Everything up to the masking is a Grain `MapDataset`, so batch k of host h is a pure function of
(seed, k, h, host count): the same on every run, with or without worker processes, and restorable
from the iterator state. Hosts take interleaved elements of one global stream, so within an epoch they
see disjoint records that together cover the data.

    it = make_iterator(config, [DatasetSpec("shapes", source)])
    batch = next(it)              # dict of mmjax.data.fourm_batch fields, numpy, this host's share
    state = it.get_state()        # JSON-able; new_it.set_state(state) continues bit for bit
    it.bad_records                # records skipped so far (config.data.bad_records = "skip")
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from mmjax import modalities
from mmjax.config import ConfigError
from mmjax.data import mixtures
from mmjax.data.fourm_transform import FourMTransform

_SEED_MOD = 2**32


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """One dataset of a mixture. `source` is random access (`__len__`, `__getitem__`) returning a
  record, or whatever `decode` turns into one; `missing` names modalities it may lack (empty then)."""
  name: str
  source: Any
  weight: float = 1.0
  missing: tuple[str, ...] = ()
  decode: Callable[[Any], Mapping[str, Any]] | None = None


class _Tag:
  """(index, record) -> (dataset id, index, record): the record keeps where it came from."""

  def __init__(self, dataset_id: int, size: int, decode):
    self.dataset_id, self.size, self.decode = dataset_id, size, decode

  def __call__(self, index: int, record: Any):
    # Repeated epochs index past the end (Grain wraps them); name the record by its source index.
    return self.dataset_id, index % self.size, self.decode(record) if self.decode else record


class _MaskBatch:
  """A batch of tagged records -> (4M batch, number of bad records skipped)."""

  def __init__(self, transform: FourMTransform, names: Sequence[str]):
    self.transform, self.names = transform, tuple(names)

  def __call__(self, tagged: Sequence[tuple[int, int, Any]], rng: np.random.Generator):
    dataset_B = [d for d, _, _ in tagged]
    where_B = [f"{self.names[d]!r} index {i}" for d, i, _ in tagged]
    return self.transform([r for _, _, r in tagged], rng, dataset_B=dataset_B, where_B=where_B)


def _as_list(records):
  return list(records)


def record_dataset(specs: Sequence[DatasetSpec], *, seed: int, process_index: int = 0,
                   process_count: int = 1, num_epochs: int | None = None) -> grain.MapDataset:
  """This host's stream of (dataset id, source index, record): each dataset shuffled by seed and
  repeated (reshuffled every epoch), mixed per sample by weight, then every process_count-th."""
  if not specs:
    raise ConfigError("data: no dataset to read")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside [0, {process_count})")
  parts = []
  for d, spec in enumerate(specs):
    if len(spec.source) == 0:
      raise ConfigError(f"dataset {spec.name!r} is empty")
    ds = grain.MapDataset.source(spec.source).map_with_index(_Tag(d, len(spec.source), spec.decode))
    ds = ds.shuffle(seed=(seed * 1_000_003 + d) % _SEED_MOD).repeat(num_epochs)
    parts.append(ds)
  if len(parts) == 1:
    ds = parts[0]
  else:
    weights = [s.weight for s in specs]
    if min(weights) <= 0:
      raise ConfigError(f"data: dataset weights must be positive, got {weights}")
    ds = grain.MapDataset.mix(parts, weights)
  return ds[process_index::process_count]


def build_dataset(specs: Sequence[DatasetSpec], transform: FourMTransform, *, batch_size: int,
                  seed: int, process_index: int = 0, process_count: int = 1,
                  num_epochs: int | None = None) -> grain.MapDataset:
  """The MapDataset of this host's batches (elements: (batch dict, bad-record count))."""
  ds = record_dataset(specs, seed=seed, process_index=process_index,
                      process_count=process_count, num_epochs=num_epochs)
  ds = ds.batch(batch_size, drop_remainder=True, batch_fn=_as_list)
  # The masking RNG of batch k on host h: distinct per host, so hosts do not mask alike.
  mask_seed = (seed * 7919 + 104729 * (process_index + 1)) % _SEED_MOD
  return ds.random_map(_MaskBatch(transform, [s.name for s in specs]), seed=mask_seed)


class BatchIterator(grain.DatasetIterator):
  """Yields 4M batches; counts skipped bad records; state = Grain's state + that count."""

  def __init__(self, dataset: grain.IterDataset):
    super().__init__()
    self._dataset = dataset
    self._it = dataset.__iter__()
    self.bad_records = 0

  def __next__(self) -> dict[str, np.ndarray]:
    batch, bad = next(self._it)
    self.bad_records += int(bad)
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"grain": self._it.get_state(), "bad_records": self.bad_records}

  def set_state(self, state: dict[str, Any]) -> None:
    self._it.set_state(state["grain"])
    self.bad_records = int(state["bad_records"])

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    if close is not None:
      close()


def transform_from_config(config, *, optional: Sequence[Sequence[str]] = ((),),
                          registry: modalities.Registry | None = None) -> FourMTransform:
  """The 4M transform of a config (registry, mixture, N/M, sentinels, bad-record policy); a given
  `registry` replaces the config's modalities."""
  registry = registry or modalities.from_config(config.modalities)
  mixture = mixtures.from_config(config.masking, registry)
  return FourMTransform(
      registry, mixture, config.model.num_input_tokens, config.model.num_target_tokens,
      num_sentinels=int(config.masking.get("num_sentinels", 100)),
      bad_records=str(config.data.get("bad_records", "error")), optional=optional)


def make_iterator(config, specs: Sequence[DatasetSpec], *, batch_size: int | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  num_workers: int | None = None, num_epochs: int | None = None,
                  registry: modalities.Registry | None = None) -> BatchIterator:
  """This host's iterator of 4M batches; the batch is `train.batch_size / process_count`."""
  if process_index is None or process_count is None:
    import jax  # late: the data side does not need jax otherwise
    process_index, process_count = jax.process_index(), jax.process_count()
  if batch_size is None:
    if config.train.batch_size % process_count:
      raise ConfigError(f"train.batch_size ({config.train.batch_size}) must divide over "
                        f"{process_count} hosts")
    batch_size = config.train.batch_size // process_count
  declared = [config.data.get("missing", "")]
  optional = [tuple(s.missing) + tuple(n for n in declared[0].split(",") if n) for s in specs]
  transform = transform_from_config(config, optional=optional, registry=registry)
  ds = build_dataset(specs, transform, batch_size=batch_size, seed=int(config.data.shuffle_seed),
                     process_index=process_index, process_count=process_count,
                     num_epochs=num_epochs)
  iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  workers = int(config.data.get("num_workers", 0) if num_workers is None else num_workers)
  if workers > 0:
    _parse_absl_flags()
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return BatchIterator(iter_ds)


def _parse_absl_flags() -> None:
  """Grain's worker processes read absl flags; parse them if nobody has (API_NOTES pitfall)."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1])
