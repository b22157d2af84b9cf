"""Predefined Dirichlet mixtures for 4M masking (specs/fourm.md, step 5), chosen by
`config.masking.mixture`:

  "4m7"        half rgb->all (input alpha: the rgb modality 1000, others 0; targets 0.5), half
               all->all (alpha `masking.input_alpha` in and out) -- 4M-7's mixture.
  "4m21"       all->all at alpha 0.01, 0.1, 1, 10; rgb->all; caption-biased (caption input alpha 5
               with keep "all", others 0.05; caption not a target) at half weight; a T5-caption-biased
               component too if a `t5_caption` modality exists -- the 4M-21 recipe.
  "all2all"    one all->all component with alpha `masking.input_alpha`.
  "rgb2all"    one rgb->all component.
  "a,b->c,d"   a fixed direction for transfer, e.g. "rgb->tok_semseg": alpha 1 for the named inputs
               and targets, 0 elsewhere (one input takes the whole input budget).
  "x+y+..."    the components of each part in turn, e.g. "all2all+rgb2all+caption->tok_rgb": a
               direction trained on purpose next to the any-to-any ones (weights default to each
               part's own; `masking.mixture_weights` lists one per component).

"rgb" means `masking.rgb_modality`, or if that is empty the `image_pixels` modality, else the
image-token modality whose source is "rgb". `masking.mixture_weights` (empty: the defaults above)
overrides the component weights. An `image_pixels` modality never gets a target alpha.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmjax.config import ConfigError
from mmjax.data.fourm.masking import KEEP_SCHEMES
from mmjax.modalities import IMAGE_PIXELS, Registry


@dataclasses.dataclass(frozen=True)
class Component:
  """One Dirichlet component: per-modality input/target alphas (absent = 0) and keep schemes."""
  name: str
  weight: float
  input_alpha: Mapping[str, float]
  target_alpha: Mapping[str, float]
  keep: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Mixture:
  """A mixture as arrays over (component C, modality K in registry order)."""
  names: tuple[str, ...]
  weights: np.ndarray      # [C], sums to 1
  input_alpha: np.ndarray  # [C, K]
  target_alpha: np.ndarray  # [C, K]
  keep: np.ndarray         # [C, K] KEEP_* codes (used for sequence modalities)


def rgb_modality(registry: Registry, preferred: str = "") -> str:
  """The modality that plays "rgb" in rgb->all components."""
  if preferred:
    return registry[preferred].name
  for m in registry:
    if m.kind == IMAGE_PIXELS:
      return m.name
  for m in registry:
    if m.is_image and m.source == "rgb":
      return m.name
  raise ConfigError("masking: no rgb modality for an rgb->all mixture (no image_pixels modality and "
                    "no image modality with source 'rgb'); set masking.rgb_modality")


def _uniform(names: Sequence[str], alpha: float) -> dict[str, float]:
  return {n: alpha for n in names}


def components(name: str, registry: Registry, *, input_alpha: float = 0.5,
               rgb: str = "") -> list[Component]:
  """The components of the mixture `name` for this registry."""
  if "+" in name:
    return [c for part in name.split("+")
            for c in components(part.strip(), registry, input_alpha=input_alpha, rgb=rgb)]
  all_names = registry.names
  target_names = [m.name for m in registry.targets()]
  if "->" in name:
    inputs, _, targets = name.partition("->")
    ins = [registry[n.strip()].name for n in inputs.split(",") if n.strip()]
    outs = [registry[n.strip()].name for n in targets.split(",") if n.strip()]
    if not ins and not outs:
      raise ConfigError(f"masking.mixture {name!r}: name input and target modalities")
    for n in outs:
      if not registry[n].can_be_target:
        raise ConfigError(f"masking.mixture {name!r}: {n} is an image_pixels modality, which "
                          f"can only be an input")
    return [Component(name, 1.0, _uniform(ins, 1.0), _uniform(outs, 1.0))]

  def rgb2all(weight=1.0):
    src = rgb_modality(registry, rgb)
    return Component("rgb2all", weight, {src: 1000.0}, _uniform(target_names, 0.5))

  def all2all(alpha, weight=1.0):
    return Component(f"all2all_a{alpha:g}", weight, _uniform(all_names, alpha),
                     _uniform(target_names, alpha))

  if name == "4m7":
    return [rgb2all(), all2all(input_alpha)]
  if name == "all2all":
    return [all2all(input_alpha)]
  if name == "rgb2all":
    return [rgb2all()]
  if name == "4m21":
    result = [all2all(a) for a in (0.01, 0.1, 1.0, 10.0)] + [rgb2all()]
    src = rgb_modality(registry, rgb)
    for biased, dropped in (("caption", "t5_caption"), ("t5_caption", "caption")):
      if biased not in registry:
        continue
      ins = {n: 0.05 for n in all_names if n not in (biased, dropped)}
      ins[biased] = 5.0
      ins[src] = 0.05
      outs = {n: 0.5 for n in target_names if n != biased}
      result.append(Component(f"{biased}_bias", 0.5, ins, outs, keep={biased: "all"}))
    return result
  raise ConfigError(f"masking.mixture must be '4m7', '4m21', 'all2all', 'rgb2all' or a direction "
                    f"like 'rgb->tok_semseg', got {name!r}")


def build(comps: Sequence[Component], registry: Registry, *, keep_scheme: str = "random",
          weights: Sequence[float] = ()) -> Mixture:
  """Arrays of the components; `keep_scheme` is the default for sequence modalities."""
  if keep_scheme not in KEEP_SCHEMES:
    raise ConfigError(f"masking.keep_scheme must be one of {sorted(KEEP_SCHEMES)}, "
                      f"got {keep_scheme!r}")
  names = registry.names
  C, K = len(comps), len(names)
  w = np.array([c.weight for c in comps] if not len(weights) else list(weights), np.float64)
  if len(w) != C or (w < 0).any() or w.sum() <= 0:
    raise ConfigError(f"masking.mixture_weights: need {C} non-negative weights with a positive "
                      f"sum for components {[c.name for c in comps]}, got {list(weights)}")
  a_in, a_tgt = np.zeros((C, K)), np.zeros((C, K))
  keep = np.full((C, K), KEEP_SCHEMES[keep_scheme], np.int64)
  for c, comp in enumerate(comps):
    for table, alphas in ((a_in, comp.input_alpha), (a_tgt, comp.target_alpha)):
      for mod, alpha in alphas.items():
        if alpha < 0:
          raise ConfigError(f"mixture component {comp.name}: alpha of {mod} is negative")
        table[c, names.index(registry[mod].name)] = alpha
    for mod, scheme in comp.keep.items():
      if scheme not in KEEP_SCHEMES:
        raise ConfigError(f"mixture component {comp.name}: keep scheme {scheme!r} of {mod}")
      keep[c, names.index(registry[mod].name)] = KEEP_SCHEMES[scheme]
  for k, m in enumerate(registry):
    if not m.can_be_target:
      a_tgt[:, k] = 0.0  # raw pixels are input-only
  return Mixture(tuple(c.name for c in comps), w / w.sum(), a_in, a_tgt, keep)


def from_config(masking: Mapping[str, Any], registry: Registry) -> Mixture:
  """The mixture a `config.masking` section selects."""
  comps = components(str(masking.get("mixture", "4m7")), registry,
                     input_alpha=float(masking.get("input_alpha", 0.5)),
                     rgb=str(masking.get("rgb_modality", "")))
  return build(comps, registry, keep_scheme=str(masking.get("keep_scheme", "random")),
               weights=tuple(masking.get("mixture_weights", ()) or ()))
