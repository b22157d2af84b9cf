"""The Grain input pipeline of the 4M objective: records -> 4M batches, sharded per host, resumable.

    batch k = positions [k*B, (k+1)*B) of the record stream (`stream.IndexStream`) -> one batched
      read per dataset -> decode -> 4M masking (a random map seeded by (seed, host, batch index))
      [-> worker processes]

The batches are a Grain `MapDataset` over batch indices, so batch k of host h is a pure function of
(seed, k, h, host count): the same on every run, with or without worker processes, and restorable
from the iterator state.

    it = make_iterator(config, [DatasetSpec("shapes", source)])
    batch = next(it)              # dict of mmjax.data.fourm.batch fields, numpy, this host's share
    state = it.get_state()        # JSON-able; new_it.set_state(state) continues bit for bit
    it.bad_records                # records skipped so far (config.data.bad_records = "skip")
    it.bad_by_dataset             # the same per dataset name
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np

from mmjax import modalities
from mmjax.config import ConfigError
from mmjax.data.fourm import mixtures
from mmjax.data.fourm.transform import FourMTransform
from mmjax.data.pipeline.stream import (
  SEED_MOD,
  BatchIterator,
  DatasetSpec,
  ReadRecords,
  RecordCounts,
  in_workers,
  make_stream,
  max_bad_fraction,
)


class _ReadBatch:
  """Batch k -> the tagged records at stream positions k * size ... (k + 1) * size - 1."""

  def __init__(self, reader: ReadRecords, size: int):
    self.reader, self.size = reader, size

  def __call__(self, k: int) -> list[tuple[int, int, Any]]:
    return self.reader.read(np.arange(k * self.size, (k + 1) * self.size))


class _MaskBatch:
  """A batch of tagged records -> (4M batch, its RecordCounts: records and skipped ones per
  dataset)."""

  def __init__(self, transform: FourMTransform, names: Sequence[str]):
    self.transform, self.names = transform, tuple(names)

  def __call__(self, tagged: Sequence[tuple[int, int, Any]], rng: np.random.Generator):
    dataset_B, index_B, records = zip(*tagged) if tagged else ((), (), ())
    batch, bad_B = self.transform(records, rng, dataset_B=dataset_B,
                                  where_B=_RecordNames(self.names, dataset_B, index_B))
    return batch, RecordCounts.of_rows(self.names, dataset_B, bad_B)


class _RecordNames:
  """"'<dataset>' index <i>" of each record of a batch, made when an error message needs one."""

  def __init__(self, names: Sequence[str], dataset_B: Sequence[int], index_B: Sequence[int]):
    self.names, self.dataset_B, self.index_B = names, dataset_B, index_B

  def __getitem__(self, b: int) -> str:
    return f"{self.names[self.dataset_B[b]]!r} index {self.index_B[b]}"


def build_dataset(specs: Sequence[DatasetSpec], transform: FourMTransform, *, batch_size: int,
                  seed: int, process_index: int = 0, process_count: int = 1,
                  num_epochs: int | None = None) -> grain.MapDataset:
  """The MapDataset of this host's batches (elements: (batch dict, bad-record count)).

  Batch k holds positions [k * batch_size, (k + 1) * batch_size) of `record_dataset`'s stream,
  whose records are looked up with numpy and read in one batched call per dataset: Grain sees
  one element per batch, not per record (its per-record shuffle and bookkeeping cost more than
  the masking itself).
  """
  stream = make_stream(specs, seed=seed, process_index=process_index,
                       process_count=process_count, num_epochs=num_epochs)
  ds = grain.MapDataset.range(len(stream) // batch_size)
  ds = ds.map(_ReadBatch(ReadRecords(specs, stream), batch_size))
  # The masking RNG of batch k on host h: distinct per host, so hosts do not mask alike.
  mask_seed = (seed * 7919 + 104729 * (process_index + 1)) % SEED_MOD
  return ds.random_map(_MaskBatch(transform, [s.name for s in specs]), seed=mask_seed)


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
    process_index, process_count = jax.process_index(), jax.process_count()
  if batch_size is None:
    if config.train.batch_size % process_count:
      raise ConfigError(f"train.batch_size ({config.train.batch_size}) must divide over "
                        f"{process_count} hosts")
    batch_size = config.train.batch_size // process_count
  declared = modalities.name_list(config.data.get("missing", "") or "", "data.missing")
  optional = [tuple(s.missing) + declared for s in specs]
  transform = transform_from_config(config, optional=optional, registry=registry)
  ds = build_dataset(specs, transform, batch_size=batch_size, seed=int(config.data.shuffle_seed),
                     process_index=process_index, process_count=process_count,
                     num_epochs=num_epochs)
  iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  workers = config.data.get("num_workers", 0) if num_workers is None else num_workers
  return BatchIterator(in_workers(iter_ds, workers),
                       max_bad_fraction=max_bad_fraction(config.data))

