"""The pre-tokenized datasets of a config, for both objectives (`token_datasets`).

`data.data_dir` / `data.name`, or a weighted mixture of several, `data.mixture`:

    config.data.mixture = (dict(data_dir="runs/a/tokens", name="shapes", weight=3),
                           dict(data_dir="runs/b/tokens", name="captions", missing="tok_rgb"))

each entry a dict of data_dir and name (default: data.data_dir, data.name), weight (default 1) and
missing (modalities its records may lack, comma-separated). Each dataset is checked against the
config when the iterator is made (`mmjax.data.tokens.records.check_config`) and decoded by its own
modality order. A configured modality a dataset has no tokens of is empty there if another dataset
of the mixture has it or `missing` (the entry's or data.missing) declares it; otherwise an error.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from mmjax import defaults, modalities, paths
from mmjax.config import ConfigError
from mmjax.data.pipeline import demo_tokens
from mmjax.data.pipeline.stream import DatasetSpec
from mmjax.data.tokens import records as tokens_tfds


@dataclasses.dataclass(frozen=True)
class TokenSet:
  """One pre-tokenized dataset of a config: `<data_dir>/mmjax_tokens/<name>` (`tokens.records`)."""
  data_dir: str
  name: str
  weight: float = 1.0
  missing: tuple[str, ...] = ()


_ENTRY_KEYS = ("data_dir", "name", "weight", "missing")


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
          f"config key 'data.data_dir' is empty and "
          f"{demo_tokens.location() or defaults.DEMO_TOKENS}/ (the token set `mmjax demo` "
          "writes) holds no dataset: run `bash launch/local.sh` first, or point data.data_dir at "
          "the workdir of `mmjax prepare tokens` (configs/tokens/shapes.py), or list datasets in "
          "'data.mixture'")
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
    key = (os.fspath(paths.resolve(data_dir)), name)
    if key in seen:
      raise ConfigError(f"config key '{where}' repeats data.mixture[{seen[key]}] ({data_dir}, "
                        f"{name}): give one entry a larger weight instead")
    seen[key] = k
    sets.append(TokenSet(data_dir, name, float(weight),
                         modalities.name_list(entry.get("missing", ""), f"{where}.missing")))
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
  data = config.data
  sets = mixture_from_config(data)
  declared = set(modalities.name_list(data.get("missing", "") or "", "data.missing"))
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
    # Sizes only (a stat per shard): a truncated or replaced shard stops the run here, naming it.
    tokens_tfds.verify_shards(ds_dir, meta, splits=[split])
    source = tokens_tfds.load_token_bytes(s.data_dir, s.name, split)
    parse = tokens_tfds.RecordParser(meta["modalities"], [n for n in names if n not in absent])
    specs.append(DatasetSpec(label, source, weight=s.weight,
                             missing=tuple(dict.fromkeys(absent + s.missing)), decode=parse,
                             split=split, locate=tokens_tfds.shard_locator(ds_dir, meta, split)))
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
