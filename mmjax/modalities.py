"""The modality registry: the one place that says what each modality is.

A config declares its modalities in `config.modalities`, one section per modality:

    config.modalities.tok_rgb = dict(kind="image_tokens", source="rgb", vocab_size=1024,
                                     grid=(8, 8), tokenizer="configs/tokenizers/shapes_rgb.py")
    config.modalities.rgb = dict(kind="image_pixels", source="rgb", image_size=64, patch_size=8)
    config.modalities.caption = dict(kind="sequence", source="caption", vocab_size=2048,
                                     max_length=48, tokenizer="configs/tokenizers/shapes_text.py")

Data pipelines, models and evaluation read token counts, vocabularies and kinds from here and
nowhere else. The order of the section is the modality id order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from mmjax.config import ConfigError, to_dataclass

IMAGE_TOKENS = "image_tokens"  # a grid of discrete codes from an image-like tokenizer
IMAGE_PIXELS = "image_pixels"  # raw pixels cut into patches: an input, never a target
SEQUENCE = "sequence"          # text-like token ids (captions, boxes as text)
KINDS = (IMAGE_TOKENS, IMAGE_PIXELS, SEQUENCE)


@dataclasses.dataclass(frozen=True)
class Modality:
  """One modality: its kind, where its data comes from, its vocabulary and token count."""
  name: str
  kind: str
  source: str = ""              # raw dataset field it is made from; defaults to the name
  vocab_size: int = 0           # token kinds only
  grid: tuple[int, int] = (0, 0)  # image kinds: tokens (or patches) per column and row
  max_length: int = 0           # sequences: maximum tokens, EOS included
  image_size: int = 0           # image_pixels: side of the square input image
  patch_size: int = 0           # image_pixels: side of a square patch
  channels: int = 3             # image_pixels
  tokenizer: str = ""           # config of the tokenizer that produces the ids
  learned_positions: bool = False  # global-feature tokens use learned, not sin-cos, positions

  def __post_init__(self):
    where = f"modalities.{self.name}"
    if self.kind not in KINDS:
      raise ConfigError(f"{where}.kind must be one of {KINDS}, got {self.kind!r}")
    if not self.source:
      object.__setattr__(self, "source", self.name)
    if self.kind != IMAGE_PIXELS and self.vocab_size <= 0:
      raise ConfigError(f"{where}.vocab_size must be positive, got {self.vocab_size}")
    if self.kind == SEQUENCE and self.max_length <= 0:
      raise ConfigError(f"{where}.max_length must be positive, got {self.max_length}")
    if self.kind == IMAGE_PIXELS:
      if self.image_size <= 0 or self.patch_size <= 0 or self.image_size % self.patch_size:
        raise ConfigError(f"{where}: image_size ({self.image_size}) must be a positive multiple "
                          f"of patch_size ({self.patch_size})")
      side = self.image_size // self.patch_size
      object.__setattr__(self, "grid", (side, side))
    if self.is_image and (len(self.grid) != 2 or min(self.grid) <= 0):
      raise ConfigError(f"{where}.grid must be two positive sizes, got {self.grid}")

  @property
  def is_image(self) -> bool:
    return self.kind in (IMAGE_TOKENS, IMAGE_PIXELS)

  @property
  def is_sequence(self) -> bool:
    return self.kind == SEQUENCE

  @property
  def can_be_target(self) -> bool:
    return self.kind != IMAGE_PIXELS

  @property
  def num_tokens(self) -> int:
    """Token slots the modality can fill: grid cells, patches, or the maximum sequence length."""
    if self.is_image:
      return self.grid[0] * self.grid[1]
    return self.max_length

  @property
  def patch_dim(self) -> int:
    """Values per raw-pixel patch, flattened in (patch_row, patch_col, channel) order."""
    return self.patch_size * self.patch_size * self.channels


@dataclasses.dataclass(frozen=True)
class Registry:
  """The ordered modalities of one config; a modality's position is its id."""
  modalities: tuple[Modality, ...]

  def __post_init__(self):
    names = [m.name for m in self.modalities]
    if len(set(names)) != len(names):
      raise ConfigError(f"modalities: duplicate names in {names}")

  def __iter__(self) -> Iterator[Modality]:
    return iter(self.modalities)

  def __len__(self) -> int:
    return len(self.modalities)

  def __getitem__(self, name: str) -> Modality:
    for modality in self.modalities:
      if modality.name == name:
        return modality
    raise ConfigError(f"unknown modality {name!r}; known: {', '.join(self.names)}")

  def __contains__(self, name: str) -> bool:
    return name in self.names

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(m.name for m in self.modalities)

  def index(self, name: str) -> int:
    """The modality id of `name`."""
    return self.names.index(self[name].name)

  def targets(self) -> tuple[Modality, ...]:
    return tuple(m for m in self.modalities if m.can_be_target)


def from_config(section: Mapping[str, Any]) -> Registry:
  """Builds the registry from a config's `modalities` section."""
  if not section:
    raise ConfigError("config section 'modalities' is empty: declare at least one modality")
  modalities = []
  for name, spec in section.items():
    fields = dict(spec)
    fields.setdefault("name", name)
    modalities.append(to_dataclass(Modality, fields, where=f"modalities.{name}"))
  return Registry(tuple(modalities))


def name_list(value: Any, where: str) -> tuple[str, ...]:
  """Modality names given comma-separated or as a sequence."""
  if isinstance(value, str):
    return tuple(n.strip() for n in value.split(",") if n.strip())
  if isinstance(value, Sequence) and all(isinstance(n, str) for n in value):
    return tuple(n.strip() for n in value if n.strip())
  raise ConfigError(f"config key '{where}' must be comma-separated modality names, got {value!r}")
