"""The Grain input pipeline of the 4M objective: records -> batches, sharded per host, resumable;
and the pre-tokenized datasets of a config, for both objectives (`token_datasets`).

    stream position -> (dataset, index): per-sample mixture of datasets by weight, each dataset
      shuffled by seed and repeated over epochs, this host's share [h::n]   (`IndexStream`, numpy)
    batch k = positions [k*B, (k+1)*B) -> one batched read per dataset -> decode
      -> 4M masking (a random map seeded by (seed, host, batch index)) [-> worker processes]

The batches are a Grain `MapDataset` over batch indices, so batch k of host h is a pure function of
(seed, k, h, host count): the same on every run, with or without worker processes, and restorable
from the iterator state. Hosts take interleaved elements of one global stream, so within an epoch
they see disjoint records that together cover the data.

    it = make_iterator(config, [DatasetSpec("shapes", source)])
    batch = next(it)              # dict of mmjax.data.fourm_batch fields, numpy, this host's share
    state = it.get_state()        # JSON-able; new_it.set_state(state) continues bit for bit
    it.bad_records                # records skipped so far (config.data.bad_records = "skip")

The pre-tokenized datasets of a config (`token_datasets`): `data.data_dir` / `data.name`, or a
weighted mixture of several, `data.mixture`:

    config.data.mixture = (dict(data_dir="runs/a/tokens", name="shapes", weight=3),
                           dict(data_dir="runs/b/tokens", name="captions", missing="tok_rgb"))

each entry a dict of data_dir and name (default: data.data_dir, data.name), weight (default 1) and
missing (modalities its records may lack, comma-separated). Each dataset is checked against the
config when the iterator is made (`tokens_tfds.check_config`) and decoded by its own modality
order. A configured modality a dataset has no tokens of is empty there if another dataset of the
mixture has it or `missing` (the entry's or data.missing) declares it; otherwise an error.
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import operator
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from mmjax import defaults, modalities
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
      rng = np.random.default_rng([self.seed % _SEED_MOD, d, epoch])
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


class _ReadRecords:
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


class _ReadBatch:
  """Batch k -> the tagged records at stream positions k * size ... (k + 1) * size - 1."""

  def __init__(self, reader: _ReadRecords, size: int):
    self.reader, self.size = reader, size

  def __call__(self, k: int) -> list[tuple[int, int, Any]]:
    return self.reader.read(np.arange(k * self.size, (k + 1) * self.size))


class _MaskBatch:
  """A batch of tagged records -> (4M batch, number of bad records skipped)."""

  def __init__(self, transform: FourMTransform, names: Sequence[str]):
    self.transform, self.names = transform, tuple(names)

  def __call__(self, tagged: Sequence[tuple[int, int, Any]], rng: np.random.Generator):
    dataset_B, index_B, records = zip(*tagged) if tagged else ((), (), ())
    return self.transform(records, rng, dataset_B=dataset_B,
                          where_B=_RecordNames(self.names, dataset_B, index_B))


class _RecordNames:
  """"'<dataset>' index <i>" of each record of a batch, made when an error message needs one."""

  def __init__(self, names: Sequence[str], dataset_B: Sequence[int], index_B: Sequence[int]):
    self.names, self.dataset_B, self.index_B = names, dataset_B, index_B

  def __getitem__(self, b: int) -> str:
    return f"{self.names[self.dataset_B[b]]!r} index {self.index_B[b]}"


def _stream(specs: Sequence[DatasetSpec], *, seed: int, process_index: int, process_count: int,
            num_epochs: int | None) -> IndexStream:
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
  stream = _stream(specs, seed=seed, process_index=process_index, process_count=process_count,
                   num_epochs=num_epochs)
  return grain.MapDataset.range(len(stream)).map(_ReadRecords(specs, stream))


def build_dataset(specs: Sequence[DatasetSpec], transform: FourMTransform, *, batch_size: int,
                  seed: int, process_index: int = 0, process_count: int = 1,
                  num_epochs: int | None = None) -> grain.MapDataset:
  """The MapDataset of this host's batches (elements: (batch dict, bad-record count)).

  Batch k holds positions [k * batch_size, (k + 1) * batch_size) of `record_dataset`'s stream,
  whose records are looked up with numpy and read in one batched call per dataset: Grain sees
  one element per batch, not per record (its per-record shuffle and bookkeeping cost more than
  the masking itself).
  """
  stream = _stream(specs, seed=seed, process_index=process_index, process_count=process_count,
                   num_epochs=num_epochs)
  ds = grain.MapDataset.range(len(stream) // batch_size)
  ds = ds.map(_ReadBatch(_ReadRecords(specs, stream), batch_size))
  # The masking RNG of batch k on host h: distinct per host, so hosts do not mask alike.
  mask_seed = (seed * 7919 + 104729 * (process_index + 1)) % _SEED_MOD
  return ds.random_map(_MaskBatch(transform, [s.name for s in specs]), seed=mask_seed)


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
  declared = _name_list(config.data.get("missing", "") or "", "data.missing")
  optional = [tuple(s.missing) + declared for s in specs]
  transform = transform_from_config(config, optional=optional, registry=registry)
  ds = build_dataset(specs, transform, batch_size=batch_size, seed=int(config.data.shuffle_seed),
                     process_index=process_index, process_count=process_count,
                     num_epochs=num_epochs)
  iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  workers = config.data.get("num_workers", 0) if num_workers is None else num_workers
  return BatchIterator(in_workers(iter_ds, workers))


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
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1])


untag = operator.itemgetter(2)  # (dataset id, source index, record) -> record; picklable


# ---------------------------------------------------------------------------------------------
# The pre-tokenized datasets of a config.


@dataclasses.dataclass(frozen=True)
class TokenSet:
  """One pre-tokenized dataset of a config: `<data_dir>/mmjax_tokens/<name>` (`tokens_tfds`)."""
  data_dir: str
  name: str
  weight: float = 1.0
  missing: tuple[str, ...] = ()


_ENTRY_KEYS = ("data_dir", "name", "weight", "missing")


def _name_list(value: Any, where: str) -> tuple[str, ...]:
  """Modality names given comma-separated or as a sequence."""
  if isinstance(value, str):
    return tuple(n.strip() for n in value.split(",") if n.strip())
  if isinstance(value, Sequence) and all(isinstance(n, str) for n in value):
    return tuple(n.strip() for n in value if n.strip())
  raise ConfigError(f"config key '{where}' must be comma-separated modality names, got {value!r}")


def use_demo_tokens_if_unset(config) -> None:
  """An empty data.data_dir (and no data.mixture) means the demo's token set when it exists, for
  training, evaluation and generation alike (which also find its tokenizers beside it)."""
  data = config.get("data")
  if data is None or data.get("data_dir", None) != "" or data.get("mixture", ()):
    return
  from mmjax.data import tokens_tfds  # late: tfds import is slow
  if os.path.isdir(tokens_tfds.dataset_dir(defaults.DEMO_TOKENS, str(data.get("name", "")))):
    data.data_dir = defaults.DEMO_TOKENS
    print(f"mmjax: data.data_dir is empty; reading the demo's tokens in {defaults.DEMO_TOKENS}/",
          flush=True)


def mixture_from_config(data) -> list[TokenSet]:
  """The datasets of `config.data`: its `mixture` entries, validated, or when that is empty the
  one dataset data.data_dir / data.name."""
  entries = data.get("mixture", ()) or ()
  if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Sequence):
    raise ConfigError(f"config key 'data.mixture' must be a tuple of dicts (data_dir, name, "
                      f"weight, missing), got {entries!r}")
  if not entries:
    if not data.get("data_dir"):
      raise ConfigError(
          f"config key 'data.data_dir' is empty and {defaults.DEMO_TOKENS}/ (the token set "
          "`mmjax demo` writes) holds no dataset: run `bash launch/local.sh` first, or point "
          "data.data_dir at the workdir of `mmjax prepare tokens` (configs/tokens/shapes.py), or "
          "list datasets in 'data.mixture'")
    return [TokenSet(str(data.data_dir), str(data.name))]
  sets, seen = [], {}
  for k, entry in enumerate(entries):
    where = f"data.mixture[{k}]"
    if not hasattr(entry, "keys"):
      raise ConfigError(f"config key '{where}' must be a dict of {', '.join(_ENTRY_KEYS)}, got "
                        f"{entry!r}")
    unknown = sorted(set(entry.keys()) - set(_ENTRY_KEYS))
    if unknown:
      raise ConfigError(f"config key '{where}' has unknown keys {unknown}; it takes "
                        f"{', '.join(_ENTRY_KEYS)}")
    data_dir = str(entry.get("data_dir", "") or data.get("data_dir", "") or "")
    name = str(entry.get("name", "") or data.get("name", "") or "")
    if not data_dir or not name:
      raise ConfigError(f"config key '{where}': give its data_dir and name (data.data_dir and "
                        f"data.name, the defaults, are {data.get('data_dir')!r} and "
                        f"{data.get('name')!r})")
    weight = entry.get("weight", 1.0)
    number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
    if not number or not math.isfinite(weight) or weight <= 0:
      raise ConfigError(f"config key '{where}.weight' must be a positive number, got {weight!r}")
    key = (os.path.abspath(data_dir), name)
    if key in seen:
      raise ConfigError(f"config key '{where}' repeats data.mixture[{seen[key]}] ({data_dir}, "
                        f"{name}): give one entry a larger weight instead")
    seen[key] = k
    sets.append(TokenSet(data_dir, name, float(weight),
                         _name_list(entry.get("missing", ""), f"{where}.missing")))
  return sets


def token_datasets(config, split: str, registry: modalities.Registry, names: Sequence[str], *,
                   num_sentinels: int | None = None) -> list[DatasetSpec]:
  """The DatasetSpecs of the config's pre-tokenized datasets (`mixture_from_config`) for `split`.

  Each dataset is checked against the config's modalities `names` (`tokens_tfds.check_config`:
  kinds, vocabularies, token counts, tokenizer fingerprints under data.tokenizers_dir or
  <its data_dir>/tokenizers unless data.check_tokenizers is False, and `num_sentinels` for 4M
  masking); datasets that record different fingerprints for one modality are not mixed. Records
  are parsed from their bytes by the dataset's own modality order (`tokens_tfds.RecordParser`).
  A modality of `names` a dataset has no tokens of goes into its `missing` if the mixture rules
  allow it (module docstring), else a ConfigError. In a mixture, splits other than "train" leave
  out the datasets without them (a text corpus may have no validation split).
  """
  from mmjax.data import tokens_tfds  # late: tfds import is slow
  data = config.data
  sets = mixture_from_config(data)
  declared = set(_name_list(data.get("missing", "") or "", "data.missing"))
  for n in sorted(declared | {n for s in sets for n in s.missing}):
    if n not in registry:
      raise ConfigError(f"data.missing / data.mixture: unknown modality {n!r}; known: "
                        f"{', '.join(registry.names)}")
  check = data.get("check_tokenizers", True)
  metas, dirs = [], []
  for s in sets:
    ds_dir = tokens_tfds.dataset_dir(s.data_dir, s.name)
    tokenizers_dir = (str(data.get("tokenizers_dir", "") or "")
                      or os.path.join(s.data_dir, "tokenizers")) if check else ""
    metas.append(tokens_tfds.check_config(ds_dir, registry, names, tokenizers_dir=tokenizers_dir,
                                          num_sentinels=num_sentinels))
    dirs.append(ds_dir)
  have = [tokens_tfds.token_modalities(m) for m in metas]
  _check_same_tokenizers(names, metas, dirs)
  mixed = len(sets) > 1
  lacking = []
  for s, ds_dir, tokens in zip(sets, dirs, have):
    absent = tuple(n for n in names if n not in tokens)
    for n in absent:
      elsewhere = [d for d, t in zip(dirs, have) if n in t]
      if n in declared or n in s.missing or elsewhere:
        continue
      if mixed:
        raise ConfigError(f"modality {n} is in none of the datasets of data.mixture "
                          f"({', '.join(dirs)}); declare it in data.missing (or an entry's "
                          f"missing) to train without it")
      raise ConfigError(f"modality {n} is not in the pre-tokenized data {ds_dir} (it has "
                        f"{', '.join(tokens) or 'no tokens'}); declare it in data.missing to "
                        f"train without it, or pre-tokenize it")
    lacking.append(absent)
  labels = [s.name for s in sets]
  if len(set(labels)) < len(labels):
    labels = dirs
  specs = []
  for s, ds_dir, meta, absent, label in zip(sets, dirs, metas, lacking, labels):
    if mixed and split != "train" and split not in meta.get("splits", {}):
      continue
    source = tokens_tfds.load_token_bytes(s.data_dir, s.name, split)
    parse = tokens_tfds.RecordParser(meta["modalities"], [n for n in names if n not in absent])
    specs.append(DatasetSpec(label, source, weight=s.weight,
                             missing=tuple(dict.fromkeys(absent + s.missing)), decode=parse))
  if not specs:
    raise ConfigError(f"none of the datasets of data.mixture ({', '.join(dirs)}) has a split "
                      f"{split!r}")
  return specs


def _check_same_tokenizers(names: Sequence[str], metas: Sequence[Mapping[str, Any]],
                           dirs: Sequence[str]) -> None:
  """ConfigError if two datasets' tokens of one modality come from different tokenizers: the same
  id would mean two things."""
  for n in names:
    made = [(d, m["fingerprints"][n]) for d, m in zip(dirs, metas)
            if n in m.get("fingerprints", {}) and m["fingerprints"][n]]
    for d, f in made[1:]:
      if f != made[0][1]:
        raise ConfigError(f"modality {n}: the data {made[0][0]} was tokenized by tokenizer "
                          f"{made[0][1][:12]}, the data {d} by {f[:12]}; one mixture needs one "
                          f"tokenizer per modality")
