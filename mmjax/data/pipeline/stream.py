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
from mmjax.data.record_keys import BAD_RECORD, DATASET_ID
from mmjax.errors import UserError

SEED_MOD = 2**32


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """One dataset of a mixture. `source` is random access (`__len__`, `__getitem__`) returning a
  record, or whatever `decode` turns into one; `missing` names modalities it may lack (empty then).
  `split` and `locate` (record index -> its file) only serve messages about unreadable records."""
  name: str
  source: Any
  weight: float = 1.0
  missing: tuple[str, ...] = ()
  decode: Callable[[Any], Mapping[str, Any]] | None = None
  split: str = ""
  locate: Callable[[int], str | None] | None = None


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
  (`__getitems__` where the source has it), then the dataset's `decode`.

  A source that fails to read (a damaged file) is a UserError naming the file. A record `decode`
  refuses with a UserError (a missing or undecodable field) becomes {BAD_RECORD: message naming
  it}, which the batch builders treat as a bad record (an error, or skipped and counted)."""

  def __init__(self, specs: Sequence[DatasetSpec], stream: IndexStream):
    self.specs, self.stream = tuple(specs), stream

  def read(self, positions: np.ndarray) -> list[tuple[int, int, Any]]:
    dataset, index = self.stream(positions)
    out: list[Any] = [None] * len(index)
    for d in np.unique(dataset).tolist():
      at = np.flatnonzero(dataset == d)
      keys = index[at].tolist()
      spec = self.specs[d]
      records = _read_source(spec, keys)
      if spec.decode is not None:
        records = [_decode(spec, key, record) for key, record in zip(keys, records)]
      for i, key, record in zip(at.tolist(), keys, records):
        out[i] = (d, key, record)
    return out

  def __call__(self, position: int) -> tuple[int, int, Any]:
    return self.read(np.array([position]))[0]


def _label(spec: DatasetSpec, key: int) -> str:
  split = f" split {spec.split}" if spec.split else ""
  path = spec.locate(key) if spec.locate is not None else None
  return f"{spec.name!r}{split} record {key}" + (f" ({path})" if path else "")


def _read_source(spec: DatasetSpec, keys: list[int]) -> list[Any]:
  many = getattr(spec.source, "__getitems__", None)
  try:
    return many(keys) if many is not None else [spec.source[i] for i in keys]
  except (UserError, KeyboardInterrupt):
    raise
  except Exception as e:  # noqa: BLE001 -- which file is damaged matters, not the reader's stack
    failed, error = keys[0], e
    for key in keys:  # the first record that fails alone names the file
      try:
        spec.source[key]
      except Exception as e_key:  # noqa: BLE001
        failed, error = key, e_key
        break
    path = spec.locate(failed) if spec.locate is not None else None
    where = f"token shard {path}" if path else f"dataset {spec.name!r}"
    detail = str(error).strip().splitlines()
    raise UserError(f"{where} cannot be read at record {failed} ({type(error).__name__}: "
                    f"{detail[0][:160] if detail else ''}): the file is damaged; restore it or "
                    f"rebuild the token set (`mmjax verify` checks every shard)") from None


def _decode(spec: DatasetSpec, key: int, record: Any) -> Mapping[str, Any]:
  try:
    return spec.decode(record)
  except UserError as e:
    return {"index": key, BAD_RECORD: f"{_label(spec, key)}: {e}"}


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


class RecordCounts:
  """Records read and bad records skipped, per dataset name: what each batch element carries
  beside its batch, and what `BatchIterator` sums."""

  def __init__(self, seen: Mapping[str, int] | None = None, bad: Mapping[str, int] | None = None):
    self.seen, self.bad = dict(seen or {}), dict(bad or {})

  def add(self, other: RecordCounts) -> None:
    for mine, theirs in ((self.seen, other.seen), (self.bad, other.bad)):
      for name, n in theirs.items():
        mine[name] = mine.get(name, 0) + int(n)

  @classmethod
  def of_rows(cls, names: Sequence[str], dataset_B: Sequence[int],
              bad_B: Sequence[bool]) -> RecordCounts:
    """The counts of one batch: dataset_B[b] is row b's dataset id, bad_B[b] whether it was bad."""
    dataset_B, bad_B = np.asarray(dataset_B, np.int64), np.asarray(bad_B, bool)
    seen = np.bincount(dataset_B, minlength=len(names))
    bad = np.bincount(dataset_B[bad_B], minlength=len(names))
    return cls({n: int(c) for n, c in zip(names, seen)}, {n: int(c) for n, c in zip(names, bad)})


class BatchIterator(grain.DatasetIterator):
  """Yields the batches of (batch, RecordCounts) elements (4M batches, or the decoder's packed
  rows); sums the records read and skipped per dataset; state = Grain's state + those sums.

  With `max_bad_fraction` < 1, a dataset whose skipped records exceed that fraction of its
  records read so far stops the run (a UserError naming it)."""

  def __init__(self, dataset: grain.IterDataset, *, max_bad_fraction: float = 1.0):
    super().__init__()
    self._dataset = dataset
    self._it = dataset.__iter__()
    self.counts = RecordCounts()
    self.max_bad_fraction = float(max_bad_fraction)

  @property
  def bad_records(self) -> int:
    """Bad records skipped so far, all datasets together."""
    return sum(self.counts.bad.values())

  @property
  def bad_by_dataset(self) -> dict[str, int]:
    return dict(self.counts.bad)

  def __next__(self) -> dict[str, np.ndarray]:
    batch, counts = next(self._it)
    self.counts.add(counts)
    self._check_fraction()
    return batch

  def _check_fraction(self) -> None:
    for name, bad in self.counts.bad.items():
      seen = self.counts.seen.get(name, 0)
      if bad and seen and bad / seen > self.max_bad_fraction:
        raise UserError(f"data: {bad} of the {seen} records read from dataset {name!r} were bad "
                        f"and skipped, more than data.max_bad_fraction={self.max_bad_fraction:g}; "
                        f"fix or rebuild the data (`mmjax verify` checks its shards), or raise "
                        f"data.max_bad_fraction")

  def get_state(self) -> dict[str, Any]:
    return {"grain": self._it.get_state(), "bad_records": self.bad_records,
            "bad_by_dataset": dict(self.counts.bad), "read_by_dataset": dict(self.counts.seen)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._it.set_state(state["grain"])
    bad = state.get("bad_by_dataset")
    if bad is None:  # a state of before per-dataset counts: one total
      bad = {"all": int(state["bad_records"])} if int(state["bad_records"]) else {}
    self.counts = RecordCounts(state.get("read_by_dataset", {}), bad)

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    if close is not None:
      close()


def max_bad_fraction(data) -> float:
  """data.max_bad_fraction, checked: the share of a dataset's records that may be skipped as bad
  (data.bad_records="skip") before the run stops."""
  value = data.get("max_bad_fraction", 1.0)
  number = isinstance(value, (int, float)) and not isinstance(value, bool)
  if not number or not 0 <= value <= 1:
    raise ConfigError(f"config key 'data.max_bad_fraction' must be a number in [0, 1], got "
                      f"{value!r}")
  return float(value)


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


class Untag:
  """(dataset id, source index, record) -> the record, which keeps its dataset id under
  DATASET_ID (for per-dataset counts downstream). Picklable."""

  def __call__(self, tagged: tuple[int, int, Any]) -> Any:
    d, _, record = tagged
    if isinstance(record, dict):
      record[DATASET_ID] = d
    return record


untag = Untag()
