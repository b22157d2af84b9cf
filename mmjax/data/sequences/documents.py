"""Mixed-modal documents for decoder-only models: the shared vocabulary and the record transform.

A record (modality name -> token ids; text ids of any length, image grids of the registry's size)
becomes one or more documents, each laid out by a template drawn with the configured
probabilities (`config.sequences`):

  template ("caption", "tok_rgb"):  BOS  caption ids...  BOI_rgb  rgb codes...  EOI_rgb  EOS

Shared vocabulary (`SharedVocab`): the text ids first (all `sequence` modalities share one text
tokenizer), then each `image_tokens` modality's codes at an offset, in registry order, then the
specials: BOI/EOI of each image modality, then the document BOS and EOS.

Per token (mmjax/data/sequences/batch.py): `modality` is the token's own modality as the vocabulary
knows it, so a sampler can compute it from the id alone: text ids, BOS and EOS count as the text
modality (the first `sequence` modality), BOI/EOI as the image modality they wrap. `loss_weight` of a
slot is `loss_weights[m]` of the modality m whose segment the *target* belongs to (BOS/EOS belong to
the text modality), and 0 at the last token of a document. With bidirectional image blocks an image's
codes form one block (BOI/EOI stay causal); a slot whose target lies in its own block can see that
target, so its weight is 0: the image is then context, learned only through EOI.

A bad record (a field of the wrong dtype or length, an id outside its modality's vocabulary, no
template its modalities fit) is an error naming it, or with `bad_records="skip"`
(`data.bad_records`) gives no documents and is counted in `SequenceBuilder.skipped`.

Packing into fixed lengths lives in `mmjax.data.sequences.packing`.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmjax import modalities as mm
from mmjax.config import ConfigError, to_dataclass
from mmjax.data.record_keys import BAD_RECORD, DATASET_ID
from mmjax.errors import UserError
from mmjax.tokenizers import special

Document = dict[str, np.ndarray]  # tokens, targets, modality, block, position, loss_weight: [n]


@dataclasses.dataclass(frozen=True)
class SharedVocab:
  """Global ids of a mixed-modal decoder: (modality, local id) <-> global id, and each id's modality."""
  names: tuple[str, ...]           # registry names, in modality-id order
  text_size: int                   # text ids are global ids [0, text_size)
  text_modality: int               # modality id of text ids, BOS and EOS
  image_modalities: tuple[int, ...]  # modality ids of the image_tokens modalities
  image_offsets: tuple[int, ...]   # global id of each one's code 0
  image_sizes: tuple[int, ...]     # its codebook size

  @classmethod
  def from_registry(cls, registry: mm.Registry) -> SharedVocab:
    text = [m for m in registry if m.kind == mm.SEQUENCE]
    images = [m for m in registry if m.kind == mm.IMAGE_TOKENS]
    if not text and not images:
      raise ConfigError("modalities: a mixed-modal decoder needs a sequence or image_tokens modality")
    text_size = max((m.vocab_size for m in text), default=0)
    offsets, offset = [], text_size
    for m in images:
      offsets.append(offset)
      offset += m.vocab_size
    first = text[0] if text else images[0]
    return cls(names=registry.names, text_size=text_size, text_modality=registry.index(first.name),
               image_modalities=tuple(registry.index(m.name) for m in images),
               image_offsets=tuple(offsets), image_sizes=tuple(m.vocab_size for m in images))

  # Layout of the specials, after the last image code.
  @property
  def first_special(self) -> int:
    return self.text_size + sum(self.image_sizes)

  def _image_slot(self, name: str) -> int:
    modality = self._modality_id(name)
    if modality not in self.image_modalities:
      raise ConfigError(f"modality {name!r} is not an image_tokens modality of the vocabulary")
    return self.image_modalities.index(modality)

  def _modality_id(self, name: str) -> int:
    if name not in self.names:
      raise ConfigError(f"unknown modality {name!r}; known: {', '.join(self.names)}")
    return self.names.index(name)

  def begin_image(self, name: str) -> int:
    return self.first_special + 2 * self._image_slot(name)

  def end_image(self, name: str) -> int:
    return self.first_special + 2 * self._image_slot(name) + 1

  @property
  def bos(self) -> int:
    return self.first_special + 2 * len(self.image_modalities)

  @property
  def eos(self) -> int:
    return self.bos + 1

  @property
  def size(self) -> int:
    """The decoder's vocabulary size (embedding rows and output logits)."""
    return self.eos + 1

  def offset(self, name: str) -> int:
    """Global id of local id 0 of modality `name`."""
    modality = self._modality_id(name)
    if modality in self.image_modalities:
      return self.image_offsets[self.image_modalities.index(modality)]
    return 0

  def local_size(self, name: str) -> int:
    modality = self._modality_id(name)
    if modality in self.image_modalities:
      return self.image_sizes[self.image_modalities.index(modality)]
    return self.text_size

  def to_global(self, name: str, local_ids: np.ndarray) -> np.ndarray:
    """int32 global ids of `local_ids` of modality `name`; ValueError outside its vocabulary."""
    local_ids = np.asarray(local_ids)
    size = self.local_size(name)
    if local_ids.size and (local_ids.min() < 0 or local_ids.max() >= size):
      bad = local_ids[(local_ids < 0) | (local_ids >= size)].reshape(-1)[0]
      raise ValueError(f"id {int(bad)} outside the vocabulary [0, {size}) of {name!r}")
    return (local_ids + self.offset(name)).astype(np.int32)

  @property
  def modality_table(self) -> np.ndarray:
    """int32 [size]: the modality id of each global id."""
    table = np.full(self.size, self.text_modality, np.int32)
    for k, (m, o, n) in enumerate(zip(self.image_modalities, self.image_offsets, self.image_sizes)):
      table[o:o + n] = m
      table[self.first_special + 2 * k:self.first_special + 2 * k + 2] = m
    return table

  def modality_of(self, global_ids: np.ndarray) -> np.ndarray:
    return self.modality_table[self._checked(global_ids)]

  def to_local(self, global_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(modality id, local id) of each global id; specials have local id -1."""
    ids = self._checked(global_ids)
    modality = self.modality_table[ids]
    local = np.where(ids < self.text_size, ids, -1).astype(np.int32)
    for m, o, n in zip(self.image_modalities, self.image_offsets, self.image_sizes):
      inside = (ids >= o) & (ids < o + n)
      local = np.where(inside, ids - o, local)
    return modality, local

  def is_special(self, global_ids: np.ndarray) -> np.ndarray:
    return self._checked(global_ids) >= self.first_special

  def _checked(self, global_ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(global_ids)
    if ids.size and (ids.min() < 0 or ids.max() >= self.size):
      raise ValueError(f"global ids outside [0, {self.size}): {ids[(ids < 0) | (ids >= self.size)]}")
    return ids


@dataclasses.dataclass(frozen=True)
class SequencesConfig:
  """`config.sequences`: how records become documents and documents become packs."""
  templates: tuple[tuple[str, ...], ...] = ()
  probabilities: tuple[float, ...] = ()
  image_blocks_bidirectional: bool = False
  loss_weights: tuple[tuple[str, float], ...] = ()  # modality -> weight; unlisted modalities 1.0
  documents_per_record: int = 1       # documents drawn (with replacement) from each record
  drop_text_specials: bool = True     # drop the text tokenizer's PAD/BOS/EOS inside text segments
  long_documents: str = "truncate"    # a document longer than the sequence: "truncate" or "error"
  pack_window: int = 64               # records packed together (first-fit decreasing)


def sequences_config(section: Mapping[str, Any], registry: mm.Registry) -> SequencesConfig:
  """Validates `config.sequences` against the registry."""
  cfg = to_dataclass(SequencesConfig, section, where="sequences")
  where = "config key 'sequences"
  if not cfg.templates:
    raise ConfigError(f"{where}.templates' is empty: give at least one template")
  if len(cfg.probabilities) != len(cfg.templates):
    raise ConfigError(f"{where}.probabilities' has {len(cfg.probabilities)} entries for "
                      f"{len(cfg.templates)} templates")
  if min(cfg.probabilities) < 0 or sum(cfg.probabilities) <= 0:
    raise ConfigError(f"{where}.probabilities' must be >= 0 with a positive sum, got "
                      f"{cfg.probabilities}")
  for k, template in enumerate(cfg.templates):
    if not template:
      raise ConfigError(f"{where}.templates' entry {k} is empty")
    for name in template:
      if name not in registry:
        raise ConfigError(f"{where}.templates' entry {k} names unknown modality {name!r}; known: "
                          f"{', '.join(registry.names)}")
      if registry[name].kind not in (mm.SEQUENCE, mm.IMAGE_TOKENS):
        raise ConfigError(f"{where}.templates' entry {k}: modality {name!r} is "
                          f"{registry[name].kind}; a decoder needs sequence or image_tokens")
  for name, weight in cfg.loss_weights:
    if name not in registry:
      raise ConfigError(f"{where}.loss_weights' names unknown modality {name!r}")
    if weight < 0:
      raise ConfigError(f"{where}.loss_weights.{name}' must be >= 0, got {weight}")
  if cfg.documents_per_record < 1 or cfg.pack_window < 1:
    raise ConfigError(f"{where}.documents_per_record' and 'sequences.pack_window' must be >= 1")
  if cfg.long_documents not in ("truncate", "error"):
    raise ConfigError(f"{where}.long_documents' must be 'truncate' or 'error', got "
                      f"{cfg.long_documents!r}")
  return cfg


_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
  z = (z + 0x9E3779B97F4A7C15) & _MASK64
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
  return z ^ (z >> 31)


def record_uniforms(seed: int, record_number: int, n: int) -> list[float]:
  """`n` uniforms in [0, 1) that are a pure function of (seed, record number): a splitmix64 hash,
  ~1 us, where seeding a numpy Generator per record costs ~150 us."""
  base = _splitmix64(_splitmix64(int(seed) & _MASK64) ^ (int(record_number) & _MASK64))
  return [(_splitmix64(base + k) >> 11) * 2.0 ** -53 for k in range(n)]


@dataclasses.dataclass(frozen=True)
class _Slot:
  """What laying out one modality of a template needs, looked up once."""
  name: str
  is_image: bool
  vocab_size: int
  num_tokens: int
  grid: tuple[int, int]
  offset: int
  weight: float
  begin: int = -1
  end: int = -1


BAD_RECORD_MODES = ("error", "skip")


class SequenceBuilder:
  """Turns records into documents (one concern: layout; packing is `sequences.packing`)."""

  def __init__(self, registry: mm.Registry, config: SequencesConfig | Mapping[str, Any],
               max_length: int, *, bad_records: str = "error"):
    if bad_records not in BAD_RECORD_MODES:
      raise ConfigError(f"data.bad_records must be one of {BAD_RECORD_MODES}, got {bad_records!r}")
    self.bad_records = bad_records
    self.registry = registry
    self.config = (config if isinstance(config, SequencesConfig)
                   else sequences_config(config, registry))
    self.vocab = SharedVocab.from_registry(registry)
    self.max_length = int(max_length)
    if self.max_length < 2:
      raise ConfigError(f"sequence length must be >= 2, got {self.max_length}")
    weights = dict(self.config.loss_weights)
    vocab = self.vocab
    self._slots = {}
    for name in {n for t in self.config.templates for n in t}:
      m = registry[name]
      image = m.kind == mm.IMAGE_TOKENS
      self._slots[name] = _Slot(name, image, m.vocab_size, m.num_tokens, m.grid, vocab.offset(name),
                                float(weights.get(name, 1.0)),
                                vocab.begin_image(name) if image else -1,
                                vocab.end_image(name) if image else -1)
    self._text_weight = float(weights.get(vocab.names[vocab.text_modality], 1.0))
    self._modality_table = vocab.modality_table
    p = np.asarray(self.config.probabilities, np.float64)
    self._cumulative = np.cumsum(p / p.sum())
    self.truncated = 0  # documents cut to max_length so far
    self.skipped = 0    # bad records skipped so far (bad_records="skip")
    self.read_by_dataset: dict[int, int] = {}     # records read so far per dataset id
    self.skipped_by_dataset: dict[int, int] = {}  # of them skipped as bad

  def _segment(self, record: Mapping[str, Any], slot: _Slot, record_id: Any) -> np.ndarray | None:
    """Global ids of one modality of a record, checked; None when the record lacks it."""
    value = record.get(slot.name)
    if value is None:
      return None
    ids = np.asarray(value)
    if ids.size == 0:
      return None
    if ids.dtype.kind not in "iu":
      raise UserError(f"record {record_id}, field {slot.name!r}: token ids must be integers, got "
                      f"dtype {ids.dtype}")
    if slot.is_image and ids.size != slot.num_tokens:
      raise UserError(f"record {record_id}, field {slot.name!r}: {ids.size} image tokens (shape "
                      f"{ids.shape}), expected {slot.grid[0]}x{slot.grid[1]} = {slot.num_tokens}")
    ids = ids.reshape(-1).astype(np.int32)
    if ids.min() < 0 or ids.max() >= slot.vocab_size:
      k = int(np.argmax((ids < 0) | (ids >= slot.vocab_size)))
      raise UserError(f"record {record_id}, field {slot.name!r}: token {k} has id {int(ids[k])}, "
                      f"outside the modality's vocabulary [0, {slot.vocab_size})")
    if slot.is_image:
      return ids + slot.offset
    if self.config.drop_text_specials:
      ids = ids[(ids != special.PAD) & (ids != special.BOS) & (ids != special.EOS)]
    return ids

  @staticmethod
  def counts(by_dataset: Mapping[int, int], num_datasets: int) -> np.ndarray:
    """A {dataset id: count} map of this builder as an array [num_datasets]."""
    out = np.zeros(num_datasets, np.int64)
    for d, n in by_dataset.items():
      out[d] += n
    return out

  def documents(self, record: Mapping[str, Any], uniforms: Sequence[float],
                record_id: Any = "?") -> list[Document]:
    """The documents of one record: one per uniform in [0, 1) (see `record_uniforms`), each laid
    out by the template that uniform draws among the templates whose modalities the record has.
    A bad record raises a UserError naming it, or with bad_records="skip" gives none."""
    index = record.get("index")
    if index is not None and np.ndim(index) == 0:
      record_id = int(index)
    d = int(record.get(DATASET_ID, 0))
    self.read_by_dataset[d] = self.read_by_dataset.get(d, 0) + 1
    try:
      if BAD_RECORD in record:  # unreadable from its bytes: the reader named it
        raise UserError(f"bad record {record[BAD_RECORD]}")
      segments, cumulative = self._segments(record, record_id)
    except UserError:
      if self.bad_records == "error":
        raise
      self.skipped += 1
      self.skipped_by_dataset[d] = self.skipped_by_dataset.get(d, 0) + 1
      return []
    last = len(cumulative) - 1
    cumulative = cumulative.tolist()
    choices = [min(bisect.bisect_right(cumulative, u), last) for u in uniforms]
    return [self._document(self.config.templates[c], segments, record_id) for c in choices]

  def _segments(self, record: Mapping[str, Any],
                record_id: Any) -> tuple[dict[str, np.ndarray | None], np.ndarray]:
    """The record's checked segments and the cumulative template probabilities it can draw."""
    segments = {n: self._segment(record, slot, record_id) for n, slot in self._slots.items()}
    fits = [all(segments[n] is not None for n in t) for t in self.config.templates]
    if all(fits):
      cumulative = self._cumulative
    else:
      p = np.diff(self._cumulative, prepend=0.0) * fits
      if p.sum() <= 0:
        present = sorted(n for n, s in segments.items() if s is not None)
        raise UserError(f"record {record_id}: no template applies; it has {present or 'none'} of "
                        f"the templates' modalities {sorted(self._slots)}")
      cumulative = np.cumsum(p / p.sum())
    return segments, cumulative

  def _document(self, template: tuple[str, ...], segments: dict[str, np.ndarray],
                record_id: Any) -> Document:
    bidirectional = self.config.image_blocks_bidirectional
    pieces = [[self.vocab.bos]]
    spans = []  # (start, stop, weight, block) of each segment in the document
    n = 1
    for name in template:
      slot, ids = self._slots[name], segments[name]
      if slot.is_image:
        pieces += [[slot.begin], ids, [slot.end]]
        spans.append((n, n + len(ids) + 2, slot.weight, 0))
        if bidirectional:
          spans.append((n + 1, n + 1 + len(ids), slot.weight, len(spans) + 1))
        n += len(ids) + 2
      else:
        pieces.append(ids)
        spans.append((n, n + len(ids), slot.weight, 0))
        n += len(ids)
    pieces.append([self.vocab.eos])
    spans.append((n, n + 1, self._text_weight, 0))
    n += 1
    tokens_N = np.concatenate(pieces).astype(np.int32)
    weights_N = np.zeros(n, np.float32)  # BOS is never a target: weight 0
    block_N = np.zeros(n, np.int32)
    blocks = 0
    for start, stop, weight, block in spans:
      if block:
        blocks += 1
        block_N[start:stop] = blocks
      else:
        weights_N[start:stop] = weight
    if n > self.max_length:
      if self.config.long_documents == "error":
        raise UserError(f"record {record_id}: document {'+'.join(template)} has {n} tokens, more "
                        f"than the sequence length {self.max_length}")
      self.truncated += 1
      n = self.max_length
      tokens_N, weights_N, block_N = tokens_N[:n], weights_N[:n], block_N[:n]
    targets_N = np.zeros(n, np.int32)
    targets_N[:-1] = tokens_N[1:]
    loss_N = np.zeros(n, np.float32)
    loss_N[:-1] = weights_N[1:]
    if blocks:  # a slot inside a bidirectional block sees its target when it is in the same block
      loss_N[:-1][(block_N[:-1] > 0) & (block_N[:-1] == block_N[1:])] = 0.0
    return {
        "tokens": tokens_N,
        "targets": targets_N,
        "modality": self._modality_table[tokens_N],
        "block": block_N,
        "position": np.arange(n, dtype=np.int32),
        "loss_weight": loss_N,
    }


def builder_from_config(config: Mapping[str, Any]) -> SequenceBuilder:
  """The builder of a decoder config: its modalities, `sequences` section, model.max_length and
  data.bad_records."""
  registry = mm.from_config(config["modalities"])
  data = config.get("data", None) or {}
  return SequenceBuilder(registry, sequences_config(config["sequences"], registry),
                         int(config["model"]["max_length"]),
                         bad_records=str(data.get("bad_records", "error")))
