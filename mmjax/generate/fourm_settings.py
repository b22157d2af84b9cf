"""Sampler settings of 4M generation: the `config.generate` section, per-target settings.

The section (every key commented in `section`) holds the defaults of every target;
`steps_per_modality`, `temperature_per_modality`, `cfg_weights` and `order` are short strings, so
that the command line can override them:
  --config.generate.steps_per_modality=tok_rgb:12,tok_semseg:4
  --config.generate.temperature_per_modality=caption:0,det:0
  --config.generate.cfg_weights=caption:3,tok_depth:1
  --config.generate.order=tok_rgb,det
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from mmjax.config import ConfigError
from mmjax.generate import fourm_schedules

IMAGE_SCHEDULES = ("maskgit", "roar")


def section(**overrides) -> ml_collections.ConfigDict:
  """`config.generate` of a 4M config."""
  out = ml_collections.ConfigDict(dict(
      order="",                    # chained order of the targets ("a,b"); "" = --target order
      image_schedule="maskgit",    # image targets: "maskgit" (keep the most confident) or "roar"
      token_schedule="cosine",     # tokens fixed per step: "cosine" (MaskGIT) or "linear"
      steps=8,                     # MaskGIT / ROAR steps per image target
      steps_per_modality="",       # per-target steps, e.g. "tok_rgb:12,tok_semseg:4"
      temperature=1.0,             # sampling temperature; 0 = greedy
      temperature_per_modality="", # per-target temperatures, e.g. "caption:0" (greedy captions)
      temperature_schedule="constant",  # "constant", "linear" (to ~0) or "onex:MIN:POWER"
      top_k=0,                     # keep the k most likely tokens; 0 = off
      top_p=1.0,                   # nucleus filtering; 1 = off
      cfg_scale=1.0,               # guidance: l_u + s (l_c - l_u); 1 = plain conditional
      cfg_weights="",              # multi-condition guidance per conditioning modality,
                                   # "caption:3,tok_rgb:1": l_u + sum_i w_i (l_c_i - l_u)
  ))
  out.update(overrides)
  return out


@dataclasses.dataclass(frozen=True)
class TargetSettings:
  """How one target modality is sampled."""
  schedule: str = "maskgit"          # images: maskgit | roar (sequences are autoregressive)
  token_schedule: str = "cosine"
  steps: int = 8
  temperature: float = 1.0
  temperature_schedule: str = "constant"
  top_k: int = 0
  top_p: float = 1.0
  cfg_scale: float = 1.0
  cfg_weights: tuple[tuple[str, float], ...] = ()

  def __post_init__(self):
    if self.schedule not in IMAGE_SCHEDULES:
      raise ConfigError(f"generate.image_schedule must be one of {IMAGE_SCHEDULES}, "
                        f"got {self.schedule!r}")
    if self.token_schedule not in fourm_schedules.TOKEN_SCHEDULES:
      raise ConfigError(f"generate.token_schedule must be one of "
                        f"{fourm_schedules.TOKEN_SCHEDULES}, got {self.token_schedule!r}")
    if self.steps < 1:
      raise ConfigError(f"generate.steps must be >= 1, got {self.steps}")
    if self.top_k < 0:
      raise ConfigError(f"generate.top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ConfigError(f"generate.top_p must be in (0, 1], got {self.top_p}")
    fourm_schedules.temperature_schedule(self.temperature_schedule, self.temperature, 1)


def parse_map(text: str, key: str, value_type=float) -> dict[str, Any]:
  """"a:1,b:2" -> {"a": 1, "b": 2}; an error names the config key."""
  out = {}
  for item in filter(None, (s.strip() for s in str(text).split(","))):
    name, sep, value = item.partition(":")
    try:
      if not sep or not name:
        raise ValueError
      out[name.strip()] = value_type(value)
    except ValueError:
      raise ConfigError(f"config key 'generate.{key}': expected NAME:VALUE pairs separated by "
                        f"commas, got {text!r}") from None
  return out


PER_MODALITY = ("steps_per_modality", "temperature_per_modality", "cfg_weights")


def for_modalities(gen: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
  """`gen` with its per-modality entries limited to the modalities `names`: a config derived from
  another with fewer modalities (e.g. by `mmjax import`) keeps the settings of the others."""
  out = dict(gen)
  for key in PER_MODALITY:
    if key in out:
      out[key] = ",".join(item for item in str(out[key]).split(",")
                          if item.partition(":")[0].strip() in names)
  return out


def target_settings(gen: Mapping[str, Any], targets: Sequence[str],
                    known: Sequence[str]) -> dict[str, TargetSettings]:
  """Per-target settings from `config.generate` (defaults when the config has no section)."""
  gen = dict(section().items()) | dict(gen or {})
  steps = parse_map(gen["steps_per_modality"], "steps_per_modality", int)
  temperatures = parse_map(gen["temperature_per_modality"], "temperature_per_modality", float)
  weights = parse_map(gen["cfg_weights"], "cfg_weights", float)
  for key, names in (("steps_per_modality", steps), ("temperature_per_modality", temperatures),
                     ("cfg_weights", weights)):
    for name in names:
      if name not in known:
        raise ConfigError(f"config key 'generate.{key}' names modality {name!r}; known: "
                          f"{', '.join(known)}")
  return {t: TargetSettings(
      schedule=gen["image_schedule"], token_schedule=gen["token_schedule"],
      steps=int(steps.get(t, gen["steps"])), temperature=float(temperatures.get(t, gen["temperature"])),
      temperature_schedule=gen["temperature_schedule"], top_k=int(gen["top_k"]),
      top_p=float(gen["top_p"]), cfg_scale=float(gen["cfg_scale"]),
      cfg_weights=tuple(sorted(weights.items()))) for t in targets}


def chain_order(gen: Mapping[str, Any] | None, targets: Sequence[str]) -> list[str]:
  """The targets in generation order: `generate.order` if given (a permutation of them)."""
  order = [s.strip() for s in str((gen or {}).get("order", "")).split(",") if s.strip()]
  if not order:
    return list(targets)
  if sorted(order) != sorted(targets):
    raise ConfigError(f"config key 'generate.order' ({','.join(order)}) must list exactly the "
                      f"targets ({','.join(targets)})")
  return order
