"""One interface over every modality's tokenizer: raw samples <-> token ids, with a version.

  tok = load_text_modality_tokenizer(registry["caption"], "runs/tokenizers/shapes_text")
  ids = tok.encode_batch(samples)       # samples: dicts of the raw schema; one int32 array each
  raw = tok.decode_batch(ids)           # [{"caption": "a small red circle ..."}, ...]
  tok.fingerprint                       # recorded with pre-tokenized data

Adapters: text fields (SentencePiece), boxes as text (det_boxes + det_classes -> "v0=.. v1=.. v2=..
v3=.. class" -> SentencePiece), image-like fields (`mmjax.tokenizers.image.ImageTokenizer`, on
device, `batch_size` images per jitted call). `check(sample, where)` validates one sample's raw value
and raises `BadSample` naming the sample and field: images of the wrong size or channel count
(grey and RGBA are converted: replicated / composited over white), non-uint8 pixels, non-finite
depth, class maps outside the classes, empty or non-UTF-8 text, boxes that are not normalised.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from mmjax import modalities as mod
from mmjax import paths
from mmjax.config import ConfigError
from mmjax.errors import UserError
from mmjax.tokenizers import boxes
from mmjax.tokenizers.image import image_fingerprint
from mmjax.tokenizers.text import TextTokenizer

DET_SOURCE = "det"  # a sequence modality with this source is boxes as text, from det_boxes/classes


class BadSample(UserError):
  """A raw sample that cannot be tokenized; the message names the sample and the field."""

  def __init__(self, where: str, field: str, what: str):
    super().__init__(f"bad sample {where}: field {field!r}: {what}")
    self.field = field


# ---------------------------------------------------------------------------------------------
# Raw values.


def as_rgb(value: Any, size: int, where: str, field: str = "rgb") -> np.ndarray:
  """uint8 [size, size, 3]: grey replicated, RGBA composited over white, anything else an error."""
  a = np.asarray(value)
  if a.dtype != np.uint8:
    raise BadSample(where, field, f"pixels must be uint8, got {a.dtype}")
  if a.ndim == 2:
    a = a[..., None]
  if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
    raise BadSample(where, field, f"shape {list(a.shape)} is not an image with 1 (grey), 3 (RGB) "
                                  f"or 4 (RGBA) channels")
  if a.shape[:2] != (size, size):
    raise BadSample(where, field, f"image is {a.shape[0]}x{a.shape[1]}, expected {size}x{size} "
                                  f"(array sources are not resized)")
  if a.shape[-1] == 1:
    return np.repeat(a, 3, axis=-1)
  if a.shape[-1] == 4:
    alpha = a[..., 3:].astype(np.float32) / 255.0
    rgb = a[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    return np.rint(rgb).astype(np.uint8)
  return a


def as_text(value: Any, where: str, field: str) -> str:
  """A non-empty str from str or UTF-8 bytes."""
  if isinstance(value, (bytes, np.bytes_)):
    try:
      value = bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
      raise BadSample(where, field, f"not valid UTF-8 (byte 0x{e.object[e.start]:02x} at offset "
                                    f"{e.start})") from None
  if not isinstance(value, str):
    raise BadSample(where, field, f"expected text, got {type(value).__name__}")
  if not value.strip():
    raise BadSample(where, field, "empty text")
  return value


def raw_fields(m: mod.Modality) -> tuple[str, ...]:
  """The raw-schema fields a modality is made from."""
  if m.is_sequence and m.source == DET_SOURCE:
    return ("det_boxes", "det_classes")
  return (m.source,)


def has_fields(sample: Mapping[str, Any], fields: Sequence[str]) -> bool:
  return all(sample.get(f) is not None for f in fields)


# ---------------------------------------------------------------------------------------------
# Modality tokenizers: one interface over text, boxes-as-text and image tokenizers.


class ModalityTokenizer:
  """Raw samples of one modality <-> token ids.

  encode_batch(samples) -> list of int32 ids, one array per sample (raises BadSample)
  decode_batch(ids) -> list of dicts of the raw fields (`fields`) the ids stand for
  fingerprint: a version string; different tokens need a different fingerprint
  """
  modality: mod.Modality
  fingerprint: str
  vocab_size: int

  @property
  def fields(self) -> tuple[str, ...]:
    return raw_fields(self.modality)

  def check(self, sample: Mapping[str, Any], where: str) -> Any:
    """The sample's validated raw value for `encode_values`; BadSample if it cannot be used."""
    raise NotImplementedError

  def encode_values(self, values: Sequence[Any]) -> list[np.ndarray]:
    raise NotImplementedError

  def decode_batch(self, ids: Sequence[np.ndarray]) -> list[dict[str, Any]]:
    raise NotImplementedError

  def encode_batch(self, samples: Sequence[Mapping[str, Any]],
                   where: Sequence[str] | None = None) -> list[np.ndarray]:
    where = where or [f"#{i}" for i in range(len(samples))]
    return self.encode_values([self.check(s, w) for s, w in zip(samples, where)])


class TextModalityTokenizer(ModalityTokenizer):
  """A text field (caption) through the SentencePiece tokenizer; ids without BOS/EOS."""

  def __init__(self, modality: mod.Modality, tokenizer):
    self.modality, self.tokenizer = modality, tokenizer
    self.fingerprint = tokenizer.fingerprint
    self.vocab_size = tokenizer.vocab_size

  def check(self, sample, where):
    return as_text(sample.get(self.modality.source), where, self.modality.source)

  def encode_values(self, values):
    return self.tokenizer.encode_batch(list(values))

  def decode_batch(self, ids):
    return [{self.modality.source: text} for text in self.tokenizer.decode_batch(ids)]


class DetModalityTokenizer(ModalityTokenizer):
  """det_boxes + det_classes -> boxes as text (`tokenizers.boxes`) -> SentencePiece ids.

  Class ids index the text tokenizer's class names; coordinates use its coordinate bins."""

  def __init__(self, modality: mod.Modality, tokenizer):
    self.modality, self.tokenizer = modality, tokenizer
    self.bins = tokenizer.special.coord_bins
    self.class_names = tuple(tokenizer.special.class_names)
    if self.bins < 2 or not self.class_names:
      raise UserError(f"modality {modality.name}: the text tokenizer {tokenizer.path} has no "
                      f"coordinate bins or class names, so it cannot encode boxes")
    spec = f"det:{tokenizer.fingerprint}:{self.bins}:{'|'.join(self.class_names)}"
    self.fingerprint = hashlib.sha256(spec.encode()).hexdigest()
    self.vocab_size = tokenizer.vocab_size

  def check(self, sample, where):
    boxes_K4 = np.asarray(sample.get("det_boxes"), np.float64)
    classes_K = np.asarray(sample.get("det_classes"))
    if classes_K.size and classes_K.dtype.kind not in "iu":
      raise BadSample(where, "det_classes", f"class ids must be integers, got {classes_K.dtype}")
    if boxes_K4.size == 0 and classes_K.size == 0:
      return ""  # no objects: an empty det sequence
    try:
      return boxes.det_text(boxes_K4.reshape(-1, 4) if boxes_K4.size % 4 == 0 else boxes_K4,
                            classes_K, self.class_names, self.bins)
    except UserError as e:
      raise BadSample(where, "det_boxes", str(e)) from None

  def encode_values(self, values):
    return self.tokenizer.encode_batch(list(values))

  def decode_batch(self, ids):
    out = []
    for text in self.tokenizer.decode_batch(ids):
      decoded = boxes.text_to_boxes(text, self.bins, self.class_names)
      out.append({"det_boxes": decoded.boxes,
                  "det_classes": np.array([self.class_names.index(c) for c in decoded.classes],
                                          np.int32)})
    return out


class ImageModalityTokenizer(ModalityTokenizer):
  """An image-like field through an `mmjax.tokenizers.image.ImageTokenizer`, `batch_size` images
  per jitted call (the last batch padded, so one compile serves the whole job)."""

  def __init__(self, modality: mod.Modality, tokenizer, batch_size: int = 64):
    self.modality, self.tokenizer, self.batch_size = modality, tokenizer, int(batch_size)
    self.kind = tokenizer.cfg.modality  # rgb, depth or semseg: the raw format
    self.size = tokenizer.cfg.image_size
    if tuple(tokenizer.grid) != tuple(modality.grid):
      raise ConfigError(f"modalities.{modality.name}.grid is {tuple(modality.grid)} but its "
                        f"tokenizer makes a {tuple(tokenizer.grid)} grid")
    self.fingerprint = image_fingerprint(tokenizer)
    self.vocab_size = tokenizer.codebook_size

  def check(self, sample, where):
    field, value, s = self.modality.source, sample.get(self.modality.source), self.size
    if self.kind == "rgb":
      return as_rgb(value, s, where, field)
    a = np.asarray(value)
    if a.ndim == 3 and a.shape[-1] == 1:
      a = a[..., 0]
    if a.shape != (s, s):
      raise BadSample(where, field, f"shape {list(np.shape(value))}, expected [{s}, {s}]")
    if self.kind == "depth":
      if a.dtype.kind != "f" or not np.isfinite(a).all():
        raise BadSample(where, field, f"depth must be finite floats, got {a.dtype}"
                        + ("" if a.dtype.kind != "f" else " with NaN/inf"))
      return a.astype(np.float32)
    num_classes = self.tokenizer.cfg.num_classes
    if a.dtype.kind not in "iu" or (a.size and (a.min() < 0 or a.max() >= num_classes)):
      raise BadSample(where, field, f"class map must hold integers in [0, {num_classes}), got "
                      f"{a.dtype} in [{a.min()}, {a.max()}]")
    return a.astype(np.uint8)

  def _batched(self, fn, x: np.ndarray) -> np.ndarray:
    n, b = len(x), self.batch_size
    pad = (-n) % b
    if pad:
      x = np.concatenate([x, np.repeat(x[:1], pad, axis=0)])
    out = [np.asarray(fn(x[i:i + b])) for i in range(0, len(x), b)]
    return np.concatenate(out)[:n]

  def encode_values(self, values):
    if not values:
      return []
    ids = self._batched(self.tokenizer.tokenize, np.stack(values))
    return list(ids.astype(np.int32))

  def decode_batch(self, ids):
    if not len(ids):
      return []
    images = self._batched(self.tokenizer.detokenize, np.stack([np.asarray(i) for i in ids]))
    return [{self.modality.source: image} for image in images]


def load_text_tokenizer(tokenizer_dir: str) -> TextTokenizer:
  """The SentencePiece model of `mmjax tokenizer train --config configs/tokenizers/shapes_text.py`:
  `tokenizer_dir` is its workdir (holding text.model) or the model file itself."""
  path = tokenizer_dir if os.path.isfile(tokenizer_dir) else os.path.join(tokenizer_dir,
                                                                           "text.model")
  return TextTokenizer.load(path)


def load_text_modality_tokenizer(modality: mod.Modality, tokenizer_dir: str) -> ModalityTokenizer:
  """A sequence modality's tokenizer (text, or boxes as text) trained into `tokenizer_dir`.
  Image tokenizers are checkpoints of the trainer: `mmjax.objectives.tokenizer` loads them."""
  if not modality.is_sequence:
    raise ConfigError(f"modality {modality.name} is not a sequence: it has no text tokenizer")
  if modality.tokenizer.endswith(".json"):  # a Hugging Face tokenizer.json, used as it is
    from mmjax.tokenizers.hf_text import HFTextTokenizer  # late: it needs the tokenizers library
    text = HFTextTokenizer.load(resolve_config_path(modality.tokenizer))
  else:
    text = load_text_tokenizer(tokenizer_dir)
  if modality.source == DET_SOURCE:
    return DetModalityTokenizer(modality, text)
  return TextModalityTokenizer(modality, text)


def resolve_config_path(spec: str) -> str:
  """A tokenizer config spec `path[:arg]` with path relative to the working directory or, failing
  that, to the repository (configs/ beside the mmjax package)."""
  path, sep, arg = spec.partition(":")
  if not os.path.isfile(path):
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.isfile(os.path.join(repo, path)):
      path = os.path.join(repo, path)
  return path + sep + arg


# ---------------------------------------------------------------------------------------------
# What a trained image tokenizer records beside its checkpoints.

# Written by the tokenizer's training (`mmjax.objectives.tokenizer`) from the weights of its newest
# checkpoint: {"fingerprint": image_fingerprint of those weights, "step": that checkpoint's step,
# "modality": rgb|depth|semseg, "model": the architecture (ImageTokenizerConfig's fields)}. Data
# checks read it instead of restoring the weights through the trainer.
TRAINED_INFO = "tokenizer.json"


def checkpoint_steps(tokenizer_dir: str) -> list[int]:
  """The steps of the finished checkpoints in `<tokenizer_dir>/checkpoints`, oldest first."""
  directory = epath.Path(tokenizer_dir) / "checkpoints"
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def write_trained_info(tokenizer_dir: str, info: Mapping[str, Any]) -> str:
  """Writes `info` as <tokenizer_dir>/tokenizer.json atomically; returns its path."""
  path = epath.Path(tokenizer_dir) / TRAINED_INFO
  text = json.dumps(dict(info), indent=2)
  if paths.is_url(path):  # an object appears whole when its upload completes
    path.write_text(text)
  else:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)
  return os.fspath(path)


def read_trained_info(modality: mod.Modality, tokenizer_dir: str) -> dict[str, Any]:
  """The tokenizer.json of the image tokenizer trained into `tokenizer_dir`, checked to describe
  its newest checkpoint; a UserError saying how to (re)write it when it is absent or stale."""
  path = epath.Path(tokenizer_dir) / TRAINED_INFO
  regenerate = (f"write it with `mmjax tokenizer fingerprint --config {modality.tokenizer} "
                f"--workdir {tokenizer_dir}` (or retrain the tokenizer)")
  if not path.is_file():
    raise UserError(f"modality {modality.name}: the image tokenizer in {tokenizer_dir} has no "
                    f"{TRAINED_INFO} (it was trained before tokenizers recorded their "
                    f"fingerprint); {regenerate}")
  info = json.loads(path.read_text())
  steps = checkpoint_steps(tokenizer_dir)
  if not steps or info.get("step") != steps[-1]:
    raise UserError(f"modality {modality.name}: {path} describes checkpoint step "
                    f"{info.get('step')}, but the newest checkpoint in {tokenizer_dir} is step "
                    f"{steps[-1] if steps else 'none'} (training stopped before writing it?); "
                    f"{regenerate}")
  return info


def tokenizer_dir_for(modality: mod.Modality, tokenizers_dir: str) -> str:
  """<tokenizers_dir>/<stem of the modality's tokenizer config>, e.g. tokenizers/shapes_text."""
  if not modality.tokenizer:
    raise ConfigError(f"modalities.{modality.name}.tokenizer is empty: name the tokenizer config")
  stem = os.path.splitext(os.path.basename(modality.tokenizer.split(":", 1)[0]))[0]
  return os.path.join(tokenizers_dir, stem)
