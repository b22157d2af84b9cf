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
modality, the raw source, counts of bad samples. `check_tokenizer_versions` compares fingerprints;
`check_config` compares a dataset with the config that trains on it (modalities, fingerprints of the
tokenizers it can find, sentinels).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from tensorflow_datasets.proto import tf_example_pb2

from mmjax import modalities as mod
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


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


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


def is_complete(ds_dir: str) -> bool:
  return os.path.isfile(os.path.join(ds_dir, "dataset_info.json"))


def read_metadata(ds_dir: str | os.PathLike) -> dict[str, Any]:
  """The job metadata of a finished dataset (modalities, fingerprints, source, counts)."""
  ds_dir = os.fspath(ds_dir)
  path = os.path.join(ds_dir, "metadata.json")
  if not is_complete(ds_dir) or not os.path.isfile(path):
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
    feature = tf_example_pb2.Example.FromString(data).features.feature
    present = np.frombuffer(feature["present"].bytes_list.value[0], np.uint8)
    out: dict[str, Any] = {"id": feature["id"].bytes_list.value[0],
                           "index": int(feature["index"].int64_list.value[0]),
                           "present": present}
    for k, name, dtype, shape in self.fields:
      out[name] = (np.frombuffer(feature[name].bytes_list.value[0], dtype).reshape(shape)
                   if present[k] else None)
    return out


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
  if m.is_sequence:
    path = directory if os.path.isfile(directory) else os.path.join(directory, "text.model")
    return (path, os.stat(path).st_mtime_ns) if os.path.isfile(path) else None
  checkpoints = os.path.join(directory, "checkpoints")
  if not os.path.isdir(checkpoints):
    return None
  info = os.path.join(directory, info_file)
  return (checkpoints, os.stat(checkpoints).st_mtime_ns, tuple(sorted(os.listdir(checkpoints))),
          os.stat(info).st_mtime_ns if os.path.isfile(info) else None)


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
  key = (os.path.abspath(directory), m.kind, m.source, m.tokenizer, state)
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
