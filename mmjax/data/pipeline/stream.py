"""The record stream under every objective's batches: which record of which dataset stands at each
position of this host's stream, read in batches, resumable.

    stream position -> (dataset, index): per-sample mixture of datasets by weight, each dataset
      shuffled by seed and repeated over epochs, this host's share [h::n]   (`IndexStream`, numpy)

The stream is a Grain `MapDataset` over positions (`record_dataset`), so element k of host h is a
pure function of (seed, k, h, host count): the same on every run, with or without worker
processes, and restorable from the iterator state. Hosts take interleaved elements of one global
stream, so within an epoch they see disjoint records that together cover the data.
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import operator
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from mmjax.config import ConfigError

SEED_MOD = 2**32


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """One dataset of a mixture. `source` is random access (`__len__`, `__getitem__`) returning a
  record, or whatever `decode` turns into one; `missing` names modalities it may lack (empty then)."""
  name: str
  source: Any
  weight: float = 1.0
  missing: tuple[str, ...] = ()
  decode: Callable[[Any], Mapping[str, Any]] | None = None


_MAX_PROPORTION = 1000  # dataset weights become integer proportions with this resolution
_EPOCHS_CACHED = 2      # permutations kept per dataset (a batch spans at most two epochs)


def _proportions(weights: Sequence[float]) -> np.ndarray:
  """Positive weights -> the smallest positive integers in (about) the same ratio: exact for
  ratios of small integers (0.6 : 0.2 : 0.2 -> 3 : 1 : 1), else rounded to 1/1000 of the largest."""
  w = np.asarray(weights, np.float64)
  ratios = [fractions.Fraction(float(x)).limit_denominator(_MAX_PROPORTION)
            for x in w / w.max()]
  scale = math.lcm(*(r.denominator for r in ratios))
  if scale > _MAX_PROPORTION:
    p = np.maximum(1, np.round(w / w.max() * _MAX_PROPORTION)).astype(np.int64)
  else:
    p = np.array([r.numerator * (scale // r.denominator) for r in ratios], np.int64)
  return p // np.gcd.reduce(p)


class IndexStream:
  """Which record stands at each position of a host's stream, computed for many positions at once.

  The global stream interleaves the datasets in a fixed pattern of period sum(p) (dataset d in
  p[d] of its slots, spread evenly); dataset d's k-th turn reads its record perm_{d,e}[k mod n_d]
  with e = k // n_d its epoch and perm_{d,e} a permutation drawn from (seed, d, e). Host h of H
  takes global positions h, h + H, h + 2H, ... A run over `num_epochs` epochs ends before any
  dataset would start epoch num_epochs + 1 (with one dataset: after exactly num_epochs epochs).

  Permutations are materialised per epoch (4 bytes a record, two epochs kept per dataset):
  numpy's permutation costs ~0.1 us a record, against ~30 us per element for Grain's index shuffle.
  """

  def __init__(self, sizes: Sequence[int], weights: Sequence[float], *, seed: int,
               process_index: int = 0, process_count: int = 1, num_epochs: int | None = None):
    self.sizes = np.asarray(sizes, np.int64)
    self.seed, self.process_index, self.process_count = seed, process_index, process_count
    props = _proportions(weights) if len(sizes) > 1 else np.ones(1, np.int64)
    period = int(props.sum())
    # Slot r of a period goes to the dataset whose turns are most overdue (smooth round robin).
    owner, credit = np.zeros(period, np.int64), np.zeros(len(props), np.int64)
    for r in range(period):
      credit += props
      owner[r] = d = int(np.argmax(credit))
      credit[d] -= period
    self.period, self.props, self.owner = period, props, owner
    self.turn = np.zeros(period, np.int64)  # how many slots of its dataset precede slot r
    for d in range(len(props)):
      self.turn[owner == d] = np.arange(props[d])
    if num_epochs is None:
      total = sys.maxsize // 2
    else:  # the global position of the first turn past the last epoch, of any dataset
      ends = []
      for d, (n, p) in enumerate(zip(self.sizes.tolist(), props.tolist())):
        turns = num_epochs * n
        ends.append((turns // p) * period + int(np.flatnonzero(owner == d)[turns % p]))
      total = min(ends)
    self.length = len(range(process_index, total, process_count))
    self._perms: dict[tuple[int, int], np.ndarray] = {}

  def __len__(self) -> int:
    return self.length

  def _perm(self, d: int, epoch: int) -> np.ndarray:
    key = (d, epoch)
    perm = self._perms.get(key)
    if perm is None:
      rng = np.random.default_rng([self.seed % SEED_MOD, d, epoch])
      perm = rng.permutation(int(self.sizes[d])).astype(np.int32)
      mine = [k for k in self._perms if k[0] == d]
      for old in mine[:max(0, len(mine) - _EPOCHS_CACHED + 1)]:  # the oldest epochs go
        del self._perms[old]
      self._perms[key] = perm
    return perm

  def __call__(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dataset ids, source indices) of this host's stream positions."""
    g = np.asarray(positions, np.int64) * self.process_count + self.process_index
    cycle, slot = np.divmod(g, self.period)
    dataset = self.owner[slot]
    turn = cycle * self.props[dataset] + self.turn[slot]
    epoch, within = np.divmod(turn, self.sizes[dataset])
    index = np.empty(len(g), np.int64)
    for d, e in set(zip(dataset.tolist(), epoch.tolist())):
      at = np.flatnonzero((dataset == d) & (epoch == e))
      index[at] = self._perm(d, e)[within[at]]
    return dataset, index


class ReadRecords:
  """Stream positions -> [(dataset id, source index, record)]: one batched read per dataset
  (`__getitems__` where the source has it), then the dataset's `decode`."""

  def __init__(self, specs: Sequence[DatasetSpec], stream: IndexStream):
    self.specs, self.stream = tuple(specs), stream

  def read(self, positions: np.ndarray) -> list[tuple[int, int, Any]]:
    dataset, index = self.stream(positions)
    out: list[Any] = [None] * len(index)
    for d in np.unique(dataset).tolist():
      at = np.flatnonzero(dataset == d)
      keys = index[at].tolist()
      spec = self.specs[d]
      many = getattr(spec.source, "__getitems__", None)
      records = many(keys) if many is not None else [spec.source[i] for i in keys]
      if spec.decode is not None:
        records = list(map(spec.decode, records))
      for i, key, record in zip(at.tolist(), keys, records):
        out[i] = (d, key, record)
    return out

  def __call__(self, position: int) -> tuple[int, int, Any]:
    return self.read(np.array([position]))[0]


def make_stream(specs: Sequence[DatasetSpec], *, seed: int, process_index: int,
                process_count: int, num_epochs: int | None) -> IndexStream:
  """The IndexStream of `specs` for this host, after checking the specs and host index."""
  if not specs:
    raise ConfigError("data: no dataset to read")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside [0, {process_count})")
  for spec in specs:
    if len(spec.source) == 0:
      raise ConfigError(f"dataset {spec.name!r} is empty")
  weights = [s.weight for s in specs]
  if min(weights) <= 0:
    raise ConfigError(f"data: dataset weights must be positive, got {weights}")
  return IndexStream([len(s.source) for s in specs], weights, seed=seed,
                     process_index=process_index, process_count=process_count,
                     num_epochs=num_epochs)


def record_dataset(specs: Sequence[DatasetSpec], *, seed: int, process_index: int = 0,
                   process_count: int = 1, num_epochs: int | None = None) -> grain.MapDataset:
  """This host's stream of (dataset id, source index, record), one element per record: each
  dataset shuffled by seed and repeated (reshuffled every epoch), mixed per sample by weight,
  then every process_count-th (`IndexStream`). The batches of `build_dataset` read this stream."""
  stream = make_stream(specs, seed=seed, process_index=process_index,
                       process_count=process_count, num_epochs=num_epochs)
  return grain.MapDataset.range(len(stream)).map(ReadRecords(specs, stream))


class BatchIterator(grain.DatasetIterator):
  """Yields the batches of (batch, bad-record count) elements (4M batches, or the decoder's packed
  rows); counts skipped bad records; state = Grain's state + that count."""

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


def in_workers(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
  """`ds` computed in `num_workers` Grain worker processes (`data.num_workers`; 0: in this one)."""
  try:
    workers = operator.index(num_workers)
  except TypeError:
    workers = -1
  if workers < 0:
    raise ConfigError(f"data.num_workers must be an integer >= 0, got {num_workers!r}")
  if workers == 0:
    return ds
  _parse_absl_flags()
  return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))


def _parse_absl_flags() -> None:
  """Grain's worker processes read absl flags; parse them if nobody has (API_NOTES pitfall)."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1])


untag = operator.itemgetter(2)  # (dataset id, source index, record) -> record; picklable
