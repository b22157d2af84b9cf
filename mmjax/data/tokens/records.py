"""Pre-tokenized datasets on disk: ArrayRecord shards with a tfds DatasetInfo (no TensorFlow).

Layout (written by `mmjax.pretokenize`, read by `tfds.data_source`):

  <data_dir>/mmjax_tokens/<name>/1.0.0/
    mmjax_tokens-<split>.array_record-0000k-of-0000n   one record per sample, in source order
    dataset_info.json, features.json                   tfds metadata (written last: a dataset
    metadata.json                                      without them is unfinished, unreadable)
    manifest.json                                      the job's resumable progress

  source = tfds.data_source("mmjax_tokens/shapes", data_dir=<data_dir>, split="train")
  record = decode_record(source[i], read_metadata(dataset_dir)["modalities"])

A record (tfds-decoded) holds:
  id            bytes           the sample's id (e.g. b"train/12", or an image's path in a folder)
  index         int             its position in the raw split
  present       uint8 [K]       1 where the record has modality k (registry order), 0 where the raw
                                sample lacked its source (a folder has no depth): its field is empty
  <modality>    token ids, uint8 / uint16 / int32 by vocabulary size (see `token_dtype`):
                  image_tokens [grid_h * grid_w] row-major; sequence [T] without EOS, unpadded
                  (T varies; the pipeline appends EOS and truncates to max_length)
                the raw pixels of an image_pixels modality: uint8 [S, S, channels]
  gt_<field>    ground truth kept for evaluation, as the raw dataset had it: gt_caption (text),
                gt_det_boxes [K, 4], gt_det_classes [K], gt_num_objects, gt_obj_* (shapes)

`metadata.json` records the job: modalities (name, kind, vocab, dtype), tokenizer fingerprints per
modality, the raw source, counts of bad samples, and each shard's file, record count, size and
sha256 (`shard_entry`): training compares the sizes at start (`verify_shards`), `mmjax verify`
the checksums too. `check_tokenizer_versions` compares fingerprints;
`check_config` compares a dataset with the config that trains on it (modalities, fingerprints of the
tokenizers it can find, sentinels).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from etils import epath
from tensorflow_datasets.proto import tf_example_pb2

from mmjax import modalities as mod
from mmjax import paths
from mmjax.config import ConfigError
from mmjax.errors import UserError

NAME = "mmjax_tokens"
VERSION = "1.0.0"
FILE_FORMAT = "array_record"
MANIFEST = "manifest.json"
_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"

# Ground-truth fields of the raw schema that records keep (as gt_<field>), when the source has them.
GROUND_TRUTH = {
    "caption": lambda: tfds.features.Text(doc="the raw caption"),
    "det_boxes": lambda: tfds.features.Tensor(shape=(None, 4), dtype=np.float32,
                                              doc="(xmin, ymin, xmax, ymax) in [0, 1]"),
    "det_classes": lambda: tfds.features.Tensor(shape=(None,), dtype=np.int32,
                                                doc="class id per box"),
    "num_objects": lambda: tfds.features.Scalar(np.int32, doc="objects in the scene"),
    "obj_shape": lambda: tfds.features.Tensor(shape=(None,), dtype=np.int32),
    "obj_color": lambda: tfds.features.Tensor(shape=(None,), dtype=np.int32),
    "obj_size": lambda: tfds.features.Tensor(shape=(None,), dtype=np.int32),
    "obj_position": lambda: tfds.features.Tensor(shape=(None,), dtype=np.int32),
    "obj_center": lambda: tfds.features.Tensor(shape=(None, 2), dtype=np.float32),
    "obj_depth": lambda: tfds.features.Tensor(shape=(None,), dtype=np.float32),
}


def token_dtype(vocab_size: int) -> np.dtype:
  """The smallest unsigned dtype that holds ids [0, vocab_size); int32 beyond 65536."""
  if vocab_size <= 256:
    return np.dtype(np.uint8)
  if vocab_size <= 65536:
    return np.dtype(np.uint16)
  return np.dtype(np.int32)


def modality_specs(registry: mod.Registry) -> list[dict[str, Any]]:
  """What records hold per modality, in registry order (stored in metadata.json)."""
  specs = []
  for m in registry:
    spec = {"name": m.name, "kind": m.kind, "source": m.source}
    if m.kind == mod.IMAGE_PIXELS:
      spec.update(dtype="uint8", shape=[m.image_size, m.image_size, m.channels])
    else:
      spec.update(dtype=token_dtype(m.vocab_size).name, vocab_size=m.vocab_size,
                  length=m.num_tokens)
    specs.append(spec)
  return specs


def make_features(registry: mod.Registry, gt_fields: Sequence[str]) -> tfds.features.FeaturesDict:
  """The record schema of a registry and the ground-truth fields a source has."""
  features: dict[str, Any] = {
      "id": tfds.features.Text(doc="sample id"),
      "index": tfds.features.Scalar(np.int64, doc="position in the raw split"),
      "present": tfds.features.Tensor(shape=(len(registry),), dtype=np.uint8, encoding="bytes",
                                      doc="1 where the modality (registry order) is present"),
  }
  for m in registry:
    if m.kind == mod.IMAGE_PIXELS:
      features[m.name] = tfds.features.Tensor(
          shape=(m.image_size, m.image_size, m.channels), dtype=np.uint8, encoding="bytes",
          doc=f"raw pixels of {m.source}")
    else:
      # Raw little-endian bytes: 1-2 bytes per id, and decoding is a buffer view.
      features[m.name] = tfds.features.Tensor(
          shape=(None,), dtype=token_dtype(m.vocab_size), encoding="bytes",
          doc=f"{m.kind} ids of {m.source}, vocab {m.vocab_size}")
  for field in gt_fields:
    features[f"gt_{field}"] = GROUND_TRUTH[field]()
  return tfds.features.FeaturesDict(features)


def dataset_dir(data_dir: str | os.PathLike, name: str) -> str:
  """Where dataset `name` lives under a tfds data_dir."""
  return os.path.join(os.fspath(data_dir), NAME, name, VERSION)


def shard_filename(split: str, k: int, num_shards: int) -> str:
  return f"{NAME}-{split}.{FILE_FORMAT}-{k:05d}-of-{num_shards:05d}"


def write_shard(path: str, serialized: Sequence[bytes]) -> None:
  """Writes an ArrayRecord file atomically: a temporary file renamed into place once complete,
  so a killed job leaves no half-written shard under the final name."""
  tmp = f"{path}.tmp{os.getpid()}"
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  try:
    for record in serialized:
      writer.write(record)
  finally:
    writer.close()
  with open(tmp, "rb+") as f:
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_json(path: str, value: Any) -> None:
  """JSON written atomically (temporary file + rename)."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
  return json.loads(epath.Path(path).read_text())


@contextlib.contextmanager
def _quiet():
  """tfds logs warnings about datasets it builds from files; the callers report what matters."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def write_info(ds_dir: str, name: str, features: tfds.features.FeaturesDict,
               shard_lengths: Mapping[str, Sequence[int]], metadata: Mapping[str, Any],
               description: str) -> None:
  """Writes dataset_info.json, features.json and metadata.json: the dataset becomes readable."""
  identity = tfds.core.DatasetIdentity(
      name=NAME, version=tfds.core.Version(VERSION), data_dir=ds_dir,
      module_name=__name__, config_name=name, config_description=description)
  info = tfds.core.DatasetInfo(
      builder=identity, description="Pre-tokenized multimodal records of mmjax: " + description,
      features=features, disable_shuffling=True,  # record i of a shard sequence is source order
      metadata=tfds.core.MetadataDict(json.loads(json.dumps(metadata))))
  splits = [tfds.core.SplitInfo(
      name=split, shard_lengths=[int(n) for n in lengths], num_bytes=_num_bytes(ds_dir, split),
      filename_template=tfds.core.ShardedFileTemplate(
          data_dir=ds_dir, template=_TEMPLATE, dataset_name=NAME, split=split,
          filetype_suffix=FILE_FORMAT)) for split, lengths in shard_lengths.items()]
  info.set_splits(tfds.core.SplitDict(splits))
  info.set_file_format(FILE_FORMAT)
  with _quiet():
    info.write_to_directory(ds_dir)


def _num_bytes(ds_dir: str, split: str) -> int:
  prefix = f"{NAME}-{split}.{FILE_FORMAT}-"
  return sum(os.path.getsize(os.path.join(ds_dir, f)) for f in os.listdir(ds_dir)
             if f.startswith(prefix) and ".tmp" not in f)


# ---------------------------------------------------------------------------------------------
# Integrity of the shards: sizes and checksums recorded when written, compared when read.

_HASH_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
  h = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
      h.update(chunk)
  return h.hexdigest()


def shard_entry(ds_dir: str, filename: str, records: int) -> dict[str, Any]:
  """What the metadata records of a written shard: file, records, bytes, sha256."""
  path = epath.Path(ds_dir) / filename
  return {"file": filename, "records": int(records), "bytes": path.stat().length,
          "sha256": file_sha256(path)}


def _fix_hint(ds_dir: str) -> str:
  return (f"restore the file, or rebuild the token set with `mmjax prepare tokens --overwrite` "
          f"(`mmjax verify {ds_dir}` checks every shard)")


def verify_shards(ds_dir: str | os.PathLike, meta: Mapping[str, Any] | None = None, *,
                  checksums: bool = False, splits: Sequence[str] | None = None) -> int:
  """Raises a UserError naming the first shard that is missing, of another size than the
  metadata records, or (with `checksums`) of another sha256. Returns the shards checked; a
  dataset written before shards were recorded has none to check (0)."""
  ds_dir = os.fspath(ds_dir)
  meta = read_metadata(ds_dir) if meta is None else meta
  checked = 0
  for split, entries in (meta.get("shards") or {}).items():
    if splits is not None and split not in splits:
      continue
    for entry in entries:
      path = epath.Path(ds_dir) / entry["file"]
      if not path.is_file():
        raise UserError(f"token shard {path} is missing; {_fix_hint(ds_dir)}")
      size = path.stat().length
      if size != entry["bytes"]:
        raise UserError(f"token shard {path} is {size} bytes, its metadata records "
                        f"{entry['bytes']} (truncated or overwritten); {_fix_hint(ds_dir)}")
      if checksums and file_sha256(path) != entry["sha256"]:
        raise UserError(f"token shard {path} has another sha256 than its metadata records "
                        f"(damaged); {_fix_hint(ds_dir)}")
      checked += 1
  return checked


def find_datasets(root: str | os.PathLike) -> list[str]:
  """The finished token sets at `root`: a dataset directory itself, or every
  <root>/mmjax_tokens/<name>/<version>/ (root a tfds data_dir, e.g. a `prepare tokens` workdir)."""
  root = os.fspath(root)
  if is_complete(root):
    return [root]
  base = os.path.join(root, NAME)
  if not os.path.isdir(base):
    return []
  return [os.path.join(base, n, v) for n in sorted(os.listdir(base))
          if os.path.isdir(os.path.join(base, n)) for v in sorted(os.listdir(os.path.join(base, n)))
          if is_complete(os.path.join(base, n, v))]


def verify_token_sets(root: str | os.PathLike) -> dict[str, Any]:
  """`mmjax verify DIR`: every shard of every token set at `root` (`find_datasets`) against the
  sizes and sha256 its metadata records. Raises a UserError naming the first bad shard."""
  found = find_datasets(root)
  if not found:
    raise UserError(f"{os.fspath(root)} holds no finished token set (a directory with "
                    f"dataset_info.json, or {NAME}/<name>/<version>/ under it)")
  checked = {}
  for ds_dir in found:
    meta = read_metadata(ds_dir)
    checked[ds_dir] = verify_shards(ds_dir, meta, checksums=True)
  unrecorded = [d for d, n in checked.items() if n == 0]
  return {"verified": {d: n for d, n in checked.items() if n}, "unrecorded": unrecorded}


class ShardLocator:
  """Record index of a split -> the shard file holding it (for messages about damaged files)."""

  def __init__(self, ds_dir: str, entries: Sequence[Mapping[str, Any]]):
    self.files = [os.path.join(ds_dir, e["file"]) for e in entries]
    self.ends = np.cumsum([int(e["records"]) for e in entries])

  def __call__(self, index: int) -> str | None:
    k = int(np.searchsorted(self.ends, index, side="right"))
    return self.files[k] if k < len(self.files) else None


def shard_locator(ds_dir: str, meta: Mapping[str, Any], split: str) -> ShardLocator | None:
  entries = (meta.get("shards") or {}).get(split)
  return ShardLocator(ds_dir, entries) if entries else None


def is_complete(ds_dir: str | os.PathLike) -> bool:
  return (epath.Path(ds_dir) / "dataset_info.json").is_file()


def read_metadata(ds_dir: str | os.PathLike) -> dict[str, Any]:
  """The job metadata of a finished dataset (modalities, fingerprints, source, counts)."""
  ds_dir = os.fspath(ds_dir)
  path = epath.Path(ds_dir) / "metadata.json"
  if not is_complete(ds_dir) or not path.is_file():
    raise UserError(f"{ds_dir} holds no finished pre-tokenized dataset (no dataset_info.json / "
                    f"metadata.json); build it with `mmjax prepare tokens --config ... "
                    f"--workdir ...`")
  return read_json(path)


def load_tokens(data_dir: str | os.PathLike, name: str, split: str):
  """Random-access source of a finished split: `tfds.data_source` (no TensorFlow, no builder)."""
  ds_dir = dataset_dir(data_dir, name)
  meta = read_metadata(ds_dir)
  if split not in meta.get("splits", {}):
    raise UserError(f"{ds_dir} has no split {split!r}; it has {sorted(meta.get('splits', {}))}")
  with _quiet():
    return tfds.data_source(f"{NAME}/{name}", data_dir=os.fspath(data_dir), split=split,
                            download=False)


def decode_record(record: Mapping[str, Any], specs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """A tfds record -> the pipeline's record (`mmjax.data.fourm.transform`): absent modalities
  become None, the rest (and id, index, gt_*) pass through."""
  out = dict(record)
  present = np.asarray(record["present"])
  for k, spec in enumerate(specs):
    if not present[k]:
      out[spec["name"]] = None
  return out


class RecordDecoder:
  """`decode_record` bound to a dataset's modality specs (picklable: a Grain map / DatasetSpec)."""

  def __init__(self, specs: Sequence[Mapping[str, Any]]):
    self.specs = [dict(s) for s in specs]

  def __call__(self, record: Mapping[str, Any]) -> dict[str, Any]:
    return decode_record(record, self.specs)


def load_token_bytes(data_dir: str | os.PathLike, name: str, split: str):
  """Like `load_tokens`, but its records are the serialized bytes, for `RecordParser`."""
  return load_tokens(data_dir, name, split).data_source


class RecordParser:
  """Serialized record -> the pipeline's record, read straight from the tf.train.Example proto
  (parsed in C) with one `np.frombuffer` per modality; tfds' numpy decoding walks every feature in
  Python and costs ~5x more per record. The same id, index, present and modality fields as
  `RecordDecoder(specs)(source[i])`; the ground-truth fields (gt_*) are left out (training does not
  read them). `specs` are the dataset's own (their order is that of `present`); `names`, if given,
  keeps only those modalities. Picklable: a `DatasetSpec.decode` over `load_token_bytes`."""

  def __init__(self, specs: Sequence[Mapping[str, Any]], names: Sequence[str] | None = None):
    self.fields = [(k, s["name"], np.dtype(s["dtype"]), tuple(s.get("shape", (-1,))))
                   for k, s in enumerate(specs) if names is None or s["name"] in names]

  def __call__(self, data: bytes) -> dict[str, Any]:
    try:
      feature = tf_example_pb2.Example.FromString(data).features.feature
    except Exception as e:  # noqa: BLE001 -- any undecodable bytes are one bad record
      raise RecordError("<record>", f"not a serialized record ({type(e).__name__})") from None
    present = self._bytes(feature, "present", np.uint8, (-1,))
    out: dict[str, Any] = {"id": self._bytes(feature, "id", None, None),
                           "index": self._int(feature, "index"), "present": present}
    for k, name, dtype, shape in self.fields:
      if k >= len(present):
        raise RecordError("present", f"{len(present)} flags, the dataset has more modalities")
      out[name] = self._bytes(feature, name, dtype, shape) if present[k] else None
    return out

  @staticmethod
  def _bytes(feature, name: str, dtype, shape):
    values = feature[name].bytes_list.value if name in feature else ()
    if len(values) != 1:
      raise RecordError(name, "missing" if not values else f"{len(values)} values, expected 1")
    if dtype is None:
      return values[0]
    try:
      return np.frombuffer(values[0], dtype).reshape(shape)
    except ValueError as e:
      raise RecordError(name, f"{len(values[0])} bytes do not make {dtype} {shape} ({e})") from None

  @staticmethod
  def _int(feature, name: str) -> int:
    values = feature[name].int64_list.value if name in feature else ()
    if len(values) != 1:
      raise RecordError(name, "missing" if not values else f"{len(values)} values, expected 1")
    return int(values[0])


class RecordError(UserError):
  """A record whose bytes lack a field or hold one that does not decode. The reader of the record
  stream (`mmjax.data.pipeline.stream.ReadRecords`) adds which dataset, split and record."""

  def __init__(self, field: str, what: str):
    super().__init__(f"field {field!r}: {what}")
    self.field, self.what = field, what


def _short(fingerprint: Any) -> str:
  return str(fingerprint)[:12] if fingerprint else "none"


def check_tokenizer_versions(ds_dir: str | os.PathLike, expected: Mapping[str, str], *,
                             where: Mapping[str, str] | None = None) -> None:
  """Raises a UserError unless the dataset's tokens were made by the `expected` tokenizers.

  `expected` maps modality name -> tokenizer fingerprint (`ModalityTokenizer.fingerprint`), `where`
  (optional) modality name -> the directory that tokenizer came from, for the message. A
  modality the dataset has no tokens of at all (its source was absent everywhere) has no
  fingerprint and matches anything; a modality the dataset does not declare is an error.
  """
  meta = read_metadata(ds_dir)
  stored = meta.get("fingerprints", {})
  declared = {s["name"] for s in meta.get("modalities", [])}
  where = where or {}
  problems = []
  for name, fingerprint in expected.items():
    if name not in declared:
      problems.append(f"{name}: not in the dataset (it has {', '.join(sorted(declared))})")
    elif name in stored and stored[name] != fingerprint:
      source = f" (in {where[name]})" if name in where else ""
      problems.append(f"{name}: tokens made by tokenizer {_short(stored[name])}, the config's is "
                      f"{_short(fingerprint)}{source}")
  if problems:
    raise UserError(f"pre-tokenized dataset {os.fspath(ds_dir)} does not match the tokenizers: "
                    + "; ".join(problems) + ". Re-run `mmjax prepare tokens` with the current "
                    "tokenizers (into a new workdir), or point the config at the tokenizers the "
                    "data was made with")


# ---------------------------------------------------------------------------------------------
# A dataset against the config that trains on it.


def token_modalities(meta: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """{name: spec} of the modalities a dataset has tokens of: its specs without the modalities
  whose source it lacked everywhere (`absent_modalities`)."""
  absent = set(meta.get("absent_modalities", ()))
  return {s["name"]: dict(s) for s in meta.get("modalities", []) if s["name"] not in absent}


def spec_differences(m: mod.Modality, spec: Mapping[str, Any]) -> list[str]:
  """How the dataset's `spec` of a modality differs from the config's modality `m`, as phrases
  "<key> <config's>, the data has <key> <dataset's>" (kind first: other keys follow from it)."""
  if spec.get("kind") != m.kind:
    return [f"kind {m.kind!r}, the data has kind {spec.get('kind')!r}"]
  mine: dict[str, Any] = {"source": m.source}
  theirs: dict[str, Any] = {"source": spec.get("source")}
  if m.kind == mod.IMAGE_PIXELS:
    mine["shape"], theirs["shape"] = [m.image_size, m.image_size, m.channels], spec.get("shape")
  else:
    mine["vocab_size"], theirs["vocab_size"] = m.vocab_size, spec.get("vocab_size")
    if m.kind == mod.IMAGE_TOKENS:  # sequences are truncated to max_length: any length reads
      mine["tokens"], theirs["tokens"] = m.num_tokens, spec.get("length")
  theirs = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in theirs.items()}
  return [f"{key} {mine[key]!r}, the data has {key} {theirs[key]!r}" for key in mine
          if theirs[key] is not None and mine[key] != theirs[key]]


# (directory, modality kind and source, tokenizer config, files' state) -> (fingerprint, sentinels)
_TOKENIZERS: dict[tuple, tuple[str, int | None]] = {}


def _tokenizer_state(m: mod.Modality, directory: str, info_file: str) -> tuple | None:
  """What identifies a trained tokenizer's files (changes when it is retrained); None if absent."""
  directory = epath.Path(directory)
  if m.is_sequence:
    path = directory if directory.is_file() else directory / "text.model"
    return (os.fspath(path), _stamp(path)) if path.is_file() else None
  checkpoints, info = directory / "checkpoints", directory / info_file
  if not checkpoints.is_dir():
    return None
  return (os.fspath(checkpoints), _stamp(checkpoints),
          tuple(sorted(p.name for p in checkpoints.iterdir())),
          _stamp(info) if info.is_file() else None)


def _stamp(path: epath.Path) -> tuple[int, int]:
  """(modification time, size): nanoseconds locally; an object store's seconds otherwise."""
  if paths.is_url(path):
    stat = path.stat()
    return stat.mtime, stat.length
  stat = os.stat(path)
  return stat.st_mtime_ns, stat.st_size


def find_tokenizer(m: mod.Modality, tokenizers_dir: str) -> tuple[str, str, int | None] | None:
  """(directory, fingerprint, sentinel count) of modality m's trained tokenizer under
  `tokenizers_dir` (`<dir>/<tokenizer config stem>`), None when it is not there. The sentinel
  count is a text tokenizer's [S_k] count, None for an image tokenizer, whose fingerprint is the
  one its training recorded beside its checkpoints (`tokenizer.json`): the weights are not read.
  Looked up once per process and state of its files."""
  # Late: the tokenizers import flax and sentencepiece (seconds), which Grain's worker processes,
  # that unpickle this module's record parsers, never need.
  from mmjax.tokenizers import modality as mt  # noqa: PLC0415
  if m.kind == mod.IMAGE_PIXELS or not m.tokenizer or not tokenizers_dir:
    return None
  directory = mt.tokenizer_dir_for(m, tokenizers_dir)
  state = _tokenizer_state(m, directory, mt.TRAINED_INFO)
  if state is None:
    return None
  key = (os.fspath(paths.resolve(directory)), m.kind, m.source, m.tokenizer, state)
  if key not in _TOKENIZERS:
    if not m.is_sequence:
      _TOKENIZERS[key] = (str(mt.read_trained_info(m, directory)["fingerprint"]), None)
    else:
      try:
        tok = mt.load_text_modality_tokenizer(m, directory)
      except Exception as e:  # noqa: BLE001 -- any failure to load it is reported the same way
        raise UserError(f"modality {m.name}: the tokenizer in {directory} could not be loaded to "
                        f"check the pre-tokenized data against it ({type(e).__name__}: {e}); fix "
                        f"modalities.{m.name}.tokenizer or data.tokenizers_dir, or set "
                        f"data.check_tokenizers=False") from None
      _TOKENIZERS[key] = (tok.fingerprint, tok.tokenizer.special.num_sentinels)
  return (directory, *_TOKENIZERS[key])


def _recorded_sentinels(meta: Mapping[str, Any], name: str) -> int | None:
  """The text tokenizer's sentinel count the metadata records for modality `name`, if any:
  `num_sentinels` as one count, or as {modality: count}."""
  value = meta.get("num_sentinels")
  if isinstance(value, Mapping):
    value = value.get(name)
  return None if value is None else int(value)


def check_config(ds_dir: str | os.PathLike, registry: mod.Registry, names: Sequence[str], *,
                 tokenizers_dir: str = "", num_sentinels: int | None = None) -> dict[str, Any]:
  """The metadata of a finished dataset, checked against the config's modalities `names`.

  For each of them the dataset has tokens of: the same kind, source, vocabulary and (image tokens)
  token count; the fingerprint the dataset records equals that of the config's tokenizer when
  that is found under `tokenizers_dir` (`find_tokenizer`; "" skips this); and if `num_sentinels`
  is given (4M masking), it equals the text tokenizer's sentinel count, as the metadata records it
  or the found tokenizer has it. Which modalities the dataset lacks is the caller's to judge
  (`token_modalities`). Raises a ConfigError (UserError for fingerprints) naming `ds_dir`, each
  modality and both values.
  """
  ds_dir = os.fspath(ds_dir)
  meta = read_metadata(ds_dir)
  have = token_modalities(meta)
  shared = [n for n in names if n in have]
  problems = [f"modalities.{n} has {d}" for n in shared
              for d in spec_differences(registry[n], have[n])]
  if problems:
    raise ConfigError(f"the pre-tokenized data {ds_dir} does not match the config: "
                      + "; ".join(problems))
  found = {}
  for n in shared:
    tok = find_tokenizer(registry[n], tokenizers_dir)
    if tok is not None:
      found[n] = tok
  check_tokenizer_versions(ds_dir, {n: f for n, (_, f, _) in found.items()},
                           where={n: d for n, (d, _, _) in found.items()})
  if num_sentinels is not None:
    for n in shared:
      if not registry[n].is_sequence:
        continue
      counts = [(f"the data {ds_dir} records", _recorded_sentinels(meta, n))]
      if n in found:
        counts.append((f"its tokenizer in {found[n][0]} has", found[n][2]))
      for who, count in counts:
        if count is not None and count != num_sentinels:
          raise ConfigError(f"masking.num_sentinels is {num_sentinels}, but for modality {n} "
                            f"{who} {count} sentinels ([S_0]..[S_{count - 1}] of the text "
                            f"tokenizer); set masking.num_sentinels={count}")
  return meta
