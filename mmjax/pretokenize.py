"""`mmjax prepare tokens`: a raw dataset -> pre-tokenized ArrayRecord shards (`tokens.records`).

  summary = run_prepare_tokens(config, workdir)   # config: modalities + data (+ optional tokens)

Raw datasets give samples of the raw schema (`data.shapes.world`): rgb, depth, semseg, caption,
det_boxes + det_classes, ground truth. Sources: the shapes tfds dataset (`data.name = "shapes"`, at
`data.data_dir` or <workdir>/data), a local folder (`data.name = "folder"`, `data.folder`), any other
tfds dataset with the same fields (`data.name` = its tfds name), or `sources={split: source}`.

Each modality's tokenizer sits behind one small interface (`load_modality_tokenizer`):
`encode_batch(samples) -> ids`, `decode_batch(ids) -> raw fields`, `.fingerprint`. Image tokenizers
encode on device, `batch_size` images per jitted call (the last batch padded: one compile).

The job is idempotent: split s is cut into shards of `shard_size` raw samples; each shard is written
atomically (temporary file + rename) and then entered in `manifest.json`. A re-run skips the shards
the manifest lists, so a killed job resumes and ends with the same files as an uninterrupted one.
The manifest records the job's signature (modalities, tokenizer fingerprints, source, shard size): a
re-run with different tokenizers or data is an error, not a silent mix. dataset_info.json comes last;
metadata.json lists every shard's size and sha256 (`tokens.records.verify_shards`).

Bad input: a sample whose field cannot be used (image of the wrong size or channel count, empty or
non-UTF-8 text, broken boxes, an id outside the modality's vocabulary, a missing required field, an
unreadable file) raises a `BadSample` naming the sample and field, or with `bad_samples = "skip"` is
left out and counted per field. Images from array sources are converted only where lossless and
unambiguous: grey [S, S] / [S, S, 1] is replicated to RGB, RGBA is composited over white; other
channel counts, other sizes and non-uint8 pixels are errors (the folder recipe resizes its files).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from array_record.python import array_record_module
from etils import epath

from mmjax import modalities as mod
from mmjax import paths
from mmjax.config import ConfigError, to_dataclass
from mmjax.data import sources as raw_sources
from mmjax.data.tokens import records as tokens_tfds
from mmjax.errors import UserError
from mmjax.progress import bar as progress_bar
from mmjax.objectives.tokenizer import load_modality_tokenizer
from mmjax.tokenizers.image import image_fingerprint  # noqa: F401 -- re-exported

# The modality tokenizer interface is re-exported here: callers of the job need nothing else.
from mmjax.tokenizers.modality import (  # noqa: F401
    DET_SOURCE, BadSample, DetModalityTokenizer, ImageModalityTokenizer, ModalityTokenizer,
    TextModalityTokenizer, as_rgb, as_text, has_fields, raw_fields, tokenizer_dir_for)

BAD_SAMPLE_MODES = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class TokensConfig:
  """The `tokens` section of a config (all optional; see configs/tokens/shapes.py)."""
  name: str = ""                  # dataset name under <out_dir>/mmjax_tokens/; "" = data.name
  out_dir: str = ""               # tfds data_dir to write into; "" = the workdir
  tokenizers_dir: str = ""        # <dir>/<tokenizer config stem>/ per tokenizer; "" = <workdir>/tokenizers
  splits: tuple[str, ...] = ("train", "validation")  # splits to prepare (absent ones are skipped)
  shard_size: int = 1024          # raw samples per shard: the unit of resumption
  batch_size: int = 64            # images per jitted image-tokenizer call
  bad_samples: str = "error"      # "error": stop at a bad sample; "skip": leave it out, count it
  max_reported: int = 20          # bad-sample messages kept in the summary and metadata

  def __post_init__(self):
    if self.bad_samples not in BAD_SAMPLE_MODES:
      raise ConfigError(f"tokens.bad_samples must be one of {BAD_SAMPLE_MODES}, got "
                        f"{self.bad_samples!r}")
    for key in ("shard_size", "batch_size"):
      if getattr(self, key) < 1:
        raise ConfigError(f"tokens.{key} must be positive, got {getattr(self, key)}")


# ---------------------------------------------------------------------------------------------
# The job.


def tokens_config(config) -> TokensConfig:
  """The config's `tokens` section (absent keys take TokensConfig's defaults)."""
  section = config.get("tokens", None)
  return to_dataclass(TokensConfig, dict(section) if section else {}, where="tokens")


def tokenizers_dir_of(config, workdir: str) -> str:
  return tokens_config(config).tokenizers_dir or os.path.join(workdir, "tokenizers")


def expected_fingerprints(config, workdir: str) -> dict[str, str]:
  """{modality: fingerprint} of the tokenizers a config uses: pass to check_tokenizer_versions."""
  registry = mod.from_config(config.modalities)
  tdir = tokenizers_dir_of(config, workdir)
  return {m.name: load_modality_tokenizer(m, tokenizer_dir_for(m, tdir)).fingerprint
          for m in registry if m.kind != mod.IMAGE_PIXELS}


check_tokenizer_versions = tokens_tfds.check_tokenizer_versions


class _BadLog:
  """Bad samples of one shard: raised (mode "error") or counted per field with a few messages."""

  def __init__(self, mode: str, max_reported: int):
    self.mode, self.max_reported = mode, max_reported
    self.count, self.by_field, self.messages = 0, {}, []

  def add(self, error: UserError, field: str) -> None:
    if self.mode == "error":
      raise error
    self.count += 1
    self.by_field[field] = self.by_field.get(field, 0) + 1
    if len(self.messages) < self.max_reported:
      self.messages.append(str(error))


@dataclasses.dataclass
class _Job:
  name: str
  registry: mod.Registry
  tokenizers: dict[str, ModalityTokenizer]
  available: frozenset[str]
  optional: frozenset[str]
  gt_fields: tuple[str, ...]
  features: Any
  cfg: TokensConfig


def _gt_value(job: _Job, field: str, value: Any, where: str) -> Any:
  feature = job.features[f"gt_{field}"]
  if field == "caption":
    if value is None:
      return ""
    if isinstance(value, (bytes, np.bytes_)):
      try:
        return bytes(value).decode("utf-8")
      except UnicodeDecodeError as e:
        raise BadSample(where, field, f"not valid UTF-8 (offset {e.start})") from None
    return str(value)
  shape = tuple(0 if d is None else d for d in feature.shape)
  if value is None:
    return np.zeros(shape, feature.np_dtype)
  a = np.asarray(value)
  if a.dtype.kind not in "iufb":
    raise BadSample(where, field, f"expected numbers, got {a.dtype}")
  return a.astype(feature.np_dtype)


def _sample_id(raw: Mapping[str, Any], split: str, index: int) -> str:
  value = raw.get("id")
  if isinstance(value, (bytes, np.bytes_)):
    value = bytes(value).decode("utf-8", "replace")
  return f"{split}/{index}" if value is None else str(value)


def _raw_index(raw: Mapping[str, Any], position: int) -> int:
  """The sample's own index in its raw split (shapes scenes carry theirs, which stays right when
  a filter such as data.max_objects skips scenes), else its position."""
  value = raw.get("index")
  return position if value is None else int(np.asarray(value).reshape(-1)[0])


def _check_sample(job: _Job, raw: Mapping[str, Any], where: str) -> dict[str, Any]:
  """{modality: validated raw value, or None where absent} of one raw sample."""
  values: dict[str, Any] = {}
  for m in job.registry:
    if m.name not in job.available:
      values[m.name] = None
      continue
    fields = raw_fields(m)
    if not has_fields(raw, fields):
      if m.name not in job.optional:
        absent = next(f for f in fields if raw.get(f) is None)
        raise BadSample(where, absent, f"missing (modality {m.name} is not in data.missing)")
      values[m.name] = None
    elif m.kind == mod.IMAGE_PIXELS:
      values[m.name] = as_rgb(raw[m.source], m.image_size, where, m.source)
    else:
      values[m.name] = job.tokenizers[m.name].check(raw, where)
  return values


def _encode_chunk(job: _Job, split: str, source: Any, indices: range, bad: _BadLog,
                  too_long: dict[str, int]) -> list[bytes]:
  """Serialized records of the good samples among `indices` (every tokenizer called once)."""
  rows = []  # (index, id, where, values, gt)
  for i in indices:
    where = f"{job.name} {split} sample {i}"
    try:
      raw = source[i]
      where = f"{where} ({_sample_id(raw, split, i)})"
      values = _check_sample(job, raw, where)
      gt = {f: _gt_value(job, f, raw.get(f), where) for f in job.gt_fields}
    except BadSample as e:
      bad.add(e, e.field)
      continue
    except UserError as e:  # the source could not read the sample (e.g. a corrupt image file)
      bad.add(BadSample(where, "<read>", str(e)), "<read>")
      continue
    rows.append((_raw_index(raw, i), _sample_id(raw, split, i), where, values, gt))

  ids: dict[str, list[Any]] = {}
  for name, tokenizer in job.tokenizers.items():
    have = [r for r, row in enumerate(rows) if row[3][name] is not None]
    encoded = tokenizer.encode_values([rows[r][3][name] for r in have]) if have else []
    ids[name] = [None] * len(rows)
    for r, e in zip(have, encoded):
      ids[name][r] = np.asarray(e)

  records = []
  for r, (i, sid, where, values, gt) in enumerate(rows):
    example: dict[str, Any] = {"id": sid, "index": i}
    present = np.zeros(len(job.registry), np.uint8)
    try:
      for k, m in enumerate(job.registry):
        value = values[m.name]
        if m.kind == mod.IMAGE_PIXELS:
          present[k] = value is not None
          example[m.name] = value if value is not None else np.zeros(
              (m.image_size, m.image_size, m.channels), np.uint8)
          continue
        dtype = tokens_tfds.token_dtype(m.vocab_size)
        a = ids[m.name][r] if m.name in ids else None
        if a is None:
          example[m.name] = np.zeros(0, dtype)
          continue
        a = a.reshape(-1)
        wrong = (a < 0) | (a >= m.vocab_size)
        if wrong.any():
          raise BadSample(where, m.name, f"id {int(a[wrong][0])} outside the vocabulary [0, "
                          f"{m.vocab_size}) of modality {m.name} (its tokenizer has "
                          f"{job.tokenizers[m.name].vocab_size} ids)")
        if m.is_image and a.size != m.num_tokens:
          raise BadSample(where, m.name, f"{a.size} tokens, expected {m.num_tokens}")
        if m.is_sequence and a.size > m.max_length - 1:
          too_long[m.name] = too_long.get(m.name, 0) + 1  # the pipeline truncates (EOS included)
        present[k] = 1
        example[m.name] = a.astype(dtype)
    except BadSample as e:
      bad.add(e, e.field)
      continue
    example["present"] = present
    example.update({f"gt_{f}": v for f, v in gt.items()})
    records.append(job.features.serialize_example(example))
  return records


def _signature(job: _Job, sources: Mapping[str, Any], described: Mapping[str, Any]) -> dict:
  """What the shards depend on: a re-run must agree with the manifest's to reuse them."""
  return {
      "format": f"{tokens_tfds.NAME} {tokens_tfds.VERSION}",
      "name": job.name,
      "modalities": tokens_tfds.modality_specs(job.registry),
      "available": sorted(job.available),
      "optional": sorted(job.optional),
      "fingerprints": {n: t.fingerprint for n, t in job.tokenizers.items()},
      "gt_fields": list(job.gt_fields),
      "source": dict(described),
      "source_sizes": {s: len(src) for s, src in sources.items()},
      "shard_size": job.cfg.shard_size,
  }


def _open_manifest(ds_dir: str, signature: dict) -> dict:
  path = os.path.join(ds_dir, tokens_tfds.MANIFEST)
  if not os.path.isfile(path):
    if tokens_tfds.is_complete(ds_dir) or any(f.endswith(".array_record") or "array_record-" in f
                                               for f in os.listdir(ds_dir)):
      raise UserError(f"{ds_dir} holds shards without a manifest: not made by this job; remove "
                      f"it or choose another workdir")
    return {"signature": signature, "shards": {}}
  manifest = tokens_tfds.read_json(path)
  old = manifest.get("signature", {})
  if old != signature:
    differ = sorted(k for k in set(old) | set(signature) if old.get(k) != signature.get(k))
    raise UserError(f"{ds_dir} holds shards of a different job (differs in: {', '.join(differ)}); "
                    f"remove that directory (or run with overwrite) or choose another workdir")
  return manifest


def _finished(ds_dir: str, entry: Mapping[str, Any] | None, filename: str) -> bool:
  """The manifest lists the shard and its file holds the listed number of records."""
  if not entry or entry.get("file") != filename:
    return False
  path = os.path.join(ds_dir, filename)
  if not os.path.isfile(path) or os.path.getsize(path) != entry.get("bytes", os.path.getsize(path)):
    return False
  reader = array_record_module.ArrayRecordReader(path)
  try:
    return reader.num_records() == entry["records"]
  finally:
    reader.close()


def run_prepare_tokens(config, workdir: str, *, sources: Mapping[str, Any] | None = None,
                       tokenizers: Mapping[str, ModalityTokenizer] | None = None,
                       overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
  """Pre-tokenizes config.data into <out_dir>/mmjax_tokens/<name>/1.0.0; resumes a killed run.

  `sources` ({split: random-access source of raw samples}) replaces config.data; `tokenizers`
  ({modality: ModalityTokenizer}) replaces loading from tokenizers_dir. Returns a summary: path,
  records per split, shards written / skipped, bad samples (total, per field, messages),
  fingerprints, absent modalities, sequences longer than max_length, seconds, samples/s.
  """
  start = time.perf_counter()
  cfg = tokens_config(config)
  registry = mod.from_config(config.modalities)
  data = config.get("data", None) or {}
  name = cfg.name or data.get("name", "") or "dataset"
  if sources is None:
    sources, described = raw_sources.open_sources(data, workdir, cfg.splits)
  else:
    described = {"kind": "given", "splits": sorted(sources)}  # the caller vouches for them
  sources = {s: src for s, src in sources.items() if len(src)}
  if not sources:
    raise UserError(f"prepare tokens: no samples in the splits {list(cfg.splits)} of {described}")

  fields = set().union(*(raw_sources.source_fields(src) for src in sources.values()))
  available = frozenset(m.name for m in registry if set(raw_fields(m)) <= fields)
  if not available:
    raise UserError(f"prepare tokens: the source's fields {sorted(fields)} feed none of the "
                    f"modalities {list(registry.names)}")
  optional = frozenset(n.strip() for n in str(data.get("missing", "")).split(",") if n.strip())
  given = dict(tokenizers or {})
  tdir = cfg.tokenizers_dir or os.path.join(workdir, "tokenizers")
  loaded = {}
  for m in registry:
    if m.name in available and m.kind != mod.IMAGE_PIXELS:
      loaded[m.name] = given.get(m.name) or load_modality_tokenizer(
          m, tokenizer_dir_for(m, tdir), batch_size=cfg.batch_size)
  gt_fields = tuple(f for f in tokens_tfds.GROUND_TRUTH if f in fields)
  job = _Job(name, registry, loaded, available, optional, gt_fields,
             tokens_tfds.make_features(registry, gt_fields), cfg)
  signature = _signature(job, sources, described)

  ds_dir = tokens_tfds.dataset_dir(cfg.out_dir or workdir, name)
  if overwrite and os.path.isdir(ds_dir):
    shutil.rmtree(ds_dir)
  os.makedirs(ds_dir, exist_ok=True)
  for f in os.listdir(ds_dir):  # leftovers of a killed run: never under a final name
    if ".tmp" in f:
      os.remove(os.path.join(ds_dir, f))
  manifest = _open_manifest(ds_dir, signature)
  manifest_path = os.path.join(ds_dir, tokens_tfds.MANIFEST)

  total = sum(len(src) for src in sources.values())
  bar = progress_bar(total, f"prepare tokens {name}", unit="samples", enabled=progress)
  written = skipped = processed = 0
  for split, source in sources.items():
    n = len(source)
    num_shards = math.ceil(n / cfg.shard_size)
    done = manifest["shards"].setdefault(split, {})
    for k in range(num_shards):
      lo, hi = k * cfg.shard_size, min(n, (k + 1) * cfg.shard_size)
      filename = tokens_tfds.shard_filename(split, k, num_shards)
      if _finished(ds_dir, done.get(str(k)), filename):
        skipped += 1
        bar.update(hi - lo)
        continue
      bad, too_long, records = _BadLog(cfg.bad_samples, cfg.max_reported), {}, []
      for b in range(lo, hi, cfg.batch_size):
        records += _encode_chunk(job, split, source, range(b, min(hi, b + cfg.batch_size)), bad,
                                 too_long)
        bar.update(min(hi, b + cfg.batch_size) - b)
        processed += min(hi, b + cfg.batch_size) - b
      tokens_tfds.write_shard(os.path.join(ds_dir, filename), records)
      done[str(k)] = {**tokens_tfds.shard_entry(ds_dir, filename, len(records)),
                      "samples": hi - lo,
                      "bad": bad.count, "bad_by_field": bad.by_field, "bad_messages": bad.messages,
                      "too_long": too_long}
      tokens_tfds.write_json(manifest_path, manifest)
      written += 1
  bar.close()

  summary = _summarize(job, manifest, sources, ds_dir, cfg)
  reused = written == 0 and tokens_tfds.is_complete(ds_dir)
  if not reused:
    metadata = {key: summary[key] for key in ("fingerprints", "absent_modalities", "gt_fields",
                                              "splits", "bad_samples", "too_long")}
    # The text tokenizers' sentinel counts: 4M's masking.num_sentinels is checked against them.
    sentinels = {n: int(t.tokenizer.special.num_sentinels) for n, t in job.tokenizers.items()
                 if registry[n].is_sequence}
    metadata.update(modalities=tokens_tfds.modality_specs(registry), source=dict(described),
                    shard_size=cfg.shard_size, num_sentinels=sentinels,
                    layout="one record per sample; sequences unpadded, without EOS; absent "
                           "modalities have present[k] = 0 and an empty field")
    lengths = {split: [manifest["shards"][split][str(k)]["records"]
                       for k in range(math.ceil(len(src) / cfg.shard_size))]
               for split, src in sources.items()}
    # Each shard's file, records, bytes and sha256: training compares sizes, `mmjax verify` both.
    metadata["shards"] = {split: [_shard_record(ds_dir, manifest["shards"][split][str(k)])
                                  for k in range(math.ceil(len(src) / cfg.shard_size))]
                          for split, src in sources.items()}
    tokens_tfds.write_info(ds_dir, name, job.features, lengths, metadata,
                           f"{name} tokenized from {described.get('name', described['kind'])}")
  seconds = time.perf_counter() - start
  summary.update(shards_written=written, shards_skipped=skipped, reused=reused, seconds=seconds,
                 samples_per_s=processed / seconds if processed else 0.0)
  return summary


def _shard_record(ds_dir: str, entry: Mapping[str, Any]) -> dict[str, Any]:
  """A manifest entry's file, records, bytes and sha256 (hashed now if an older job wrote it)."""
  if "sha256" not in entry:
    return tokens_tfds.shard_entry(ds_dir, entry["file"], entry["records"])
  return {key: entry[key] for key in ("file", "records", "bytes", "sha256")}


def _summarize(job: _Job, manifest: dict, sources: Mapping[str, Any], ds_dir: str,
               cfg: TokensConfig) -> dict[str, Any]:
  splits, by_field, messages, too_long, total_bad = {}, {}, [], {}, 0
  for split in sources:
    entries = manifest["shards"][split].values()
    records = sum(e["records"] for e in entries)
    bad = sum(e["bad"] for e in entries)
    splits[split] = {"records": records, "source_samples": len(sources[split]), "bad_samples": bad,
                     "shards": len(manifest["shards"][split])}
    total_bad += bad
    for e in entries:
      for f, c in e["bad_by_field"].items():
        by_field[f] = by_field.get(f, 0) + c
      for f, c in e["too_long"].items():
        too_long[f] = too_long.get(f, 0) + c
      messages += e["bad_messages"][:max(0, cfg.max_reported - len(messages))]
  return {
      "path": ds_dir,
      "name": job.name,
      "splits": splits,
      "fingerprints": {n: t.fingerprint for n, t in job.tokenizers.items()},
      "absent_modalities": [n for n in job.registry.names if n not in job.available],
      "gt_fields": list(job.gt_fields),
      "bad_samples": {"total": total_bad, "by_field": by_field, "messages": messages},
      "too_long": too_long,
  }
