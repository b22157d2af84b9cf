"""Pre-tokenized datasets on disk: ArrayRecord shards with a tfds DatasetInfo (no TensorFlow).

Layout (written by `mmjax.data.pretokenize`, read by `tfds.data_source`):

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
modality, the raw source, counts of bad samples. `check_tokenizer_versions` compares fingerprints.
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
  """A tfds record -> the pipeline's record (`mmjax.data.fourm_transform`): absent modalities
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
  read them). Picklable: a `DatasetSpec.decode` over `load_token_bytes`."""

  def __init__(self, specs: Sequence[Mapping[str, Any]]):
    self.fields = [(s["name"], np.dtype(s["dtype"]), tuple(s.get("shape", (-1,))))
                   for s in specs]

  def __call__(self, data: bytes) -> dict[str, Any]:
    feature = tf_example_pb2.Example.FromString(data).features.feature
    present = np.frombuffer(feature["present"].bytes_list.value[0], np.uint8)
    out: dict[str, Any] = {"id": feature["id"].bytes_list.value[0],
                           "index": int(feature["index"].int64_list.value[0]),
                           "present": present}
    for k, (name, dtype, shape) in enumerate(self.fields):
      out[name] = (np.frombuffer(feature[name].bytes_list.value[0], dtype).reshape(shape)
                   if present[k] else None)
    return out


def _short(fingerprint: Any) -> str:
  return str(fingerprint)[:12] if fingerprint else "none"


def check_tokenizer_versions(ds_dir: str | os.PathLike, expected: Mapping[str, str]) -> None:
  """Raises a UserError unless the dataset's tokens were made by the `expected` tokenizers.

  `expected` maps modality name -> tokenizer fingerprint (`ModalityTokenizer.fingerprint`). A
  modality the dataset has no tokens of at all (its source was absent everywhere) has no
  fingerprint and matches anything; a modality the dataset does not declare is an error.
  """
  meta = read_metadata(ds_dir)
  stored = meta.get("fingerprints", {})
  declared = {s["name"] for s in meta.get("modalities", [])}
  problems = []
  for name, fingerprint in expected.items():
    if name not in declared:
      problems.append(f"{name}: not in the dataset (it has {', '.join(sorted(declared))})")
    elif name in stored and stored[name] != fingerprint:
      problems.append(f"{name}: tokens made by tokenizer {_short(stored[name])}, the config's is "
                      f"{_short(fingerprint)}")
  if problems:
    raise UserError(f"pre-tokenized dataset {os.fspath(ds_dir)} does not match the tokenizers: "
                    + "; ".join(problems) + ". Re-run `mmjax prepare tokens` with the current "
                    "tokenizers (into a new workdir), or point the config at the tokenizers the "
                    "data was made with")
