"""`mmjax generate` for 4M checkpoints: inputs -> tokens -> chained sampling -> decoded files.

  mmjax generate --config configs/fourm/shapes.py:tiny --workdir DIR \
      --input caption="a small red circle in the top left" --target tok_rgb --target det \
      [--config.generate.steps=12 --config.generate.cfg_scale=2 ...] [--allow-random-init]

Inputs: text for a sequence modality (tokenized by its text tokenizer; a `det` input is boxes as
text, "v0=3 v1=5 v2=20 v3=22 circle ..."), an image file for an image modality (raw pixels for the
`image_pixels` modality, tokenized by the image tokenizer for `tok_*`; depth as a grey image, bright
= near, spanning the tokenizer's depth range; semseg as a grey image of class ids). Tokenizers are read from
`data.tokenizers_dir` ("" = <data_dir>/tokenizers, data_dir "" = <workdir>/data).
A raw-pixel target (`--target rgb`, an input only) means the token modality of the same image
(`tok_rgb`) when exactly one exists; a note says so.
Outputs in out_dir, per sample i: `<target>_<i>.png` (images through the tokenizer's decoder; depth
and semseg coloured), `<target>_<i>.txt` (sequences), `det_<i>.png` (boxes drawn on the generated
or given image, else on a blank canvas) and `summary.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from PIL import Image, ImageDraw

from mmjax import grids
from mmjax import modalities as mod
from mmjax import paths as mmpaths
from mmjax.config import ConfigError
from mmjax.errors import UserError
from mmjax.generate import fourm as gen
from mmjax.generate import fourm_settings
from mmjax.objectives import tokenizer as tokenizer_objective
from mmjax.tokenizers import modality as mt
from mmjax.tokenizers import special
from mmjax.train.loop import load_model

_KIND_OF = {"rgb": "rgb", "depth": "depth", "semseg": "classes"}  # tokenizer kind -> grids kind


def _report(message: str) -> None:
  print(f"[generate] {message}", file=sys.stderr, flush=True)


def _check_names(registry: mod.Registry, inputs: Mapping[str, str],
                 targets: Sequence[str]) -> list[str]:
  """The targets, a raw-pixel name replaced by the one token modality of the same image."""
  known = ", ".join(registry.names)
  for name in list(inputs) + list(targets):
    if name not in registry:
      raise UserError(f"mmjax generate: unknown modality {name!r}; this config has: {known}")
  targets = list(targets)
  for i, name in enumerate(targets):
    m = registry[name]
    if m.can_be_target:
      continue
    same = [t.name for t in registry.targets()
            if t.kind == mod.IMAGE_TOKENS and t.source == m.source]
    if len(same) == 1:  # `--target rgb`: the tokens of that image are what can be generated
      _report(f"note: --target {name} is raw pixels, an input only; generating {same[0]}, the "
              f"token modality of the same {m.source} image")
      targets[i] = same[0]
      continue
    images = ", ".join(t.name for t in registry.targets() if t.is_image)
    which = (f"{len(same)} token modalities share its {m.source} image ({', '.join(same)})"
             if same else f"no token modality has its {m.source} image")
    raise UserError(f"mmjax generate: --target {name} is raw pixels, an input only, and {which}; "
                    f"generate an image-token modality instead ({images})")
  if len(set(targets)) != len(targets):
    raise UserError(f"mmjax generate: a --target is given twice: {list(targets)}")
  both = sorted(set(inputs) & set(targets))
  if both:
    raise UserError(f"mmjax generate: {', '.join(both)} is both an --input and a --target")
  return targets


def tokenizers_dir(config, workdir: str) -> str:
  data = config.get("data", {})
  data_dir = data.get("data_dir", "") or os.path.join(workdir, "data")
  return data.get("tokenizers_dir", "") or os.path.join(data_dir, "tokenizers")


def _read_image(path: str, size: int, mode: str, name: str) -> np.ndarray:
  """[size, size(, 3)] from an image file, resized (nearest for class maps) if needed."""
  if not os.path.isfile(path):
    raise UserError(f"mmjax generate: --input {name}={path}: no such image file")
  try:
    with Image.open(path) as im:
      im = im.convert(mode)
      if im.size != (size, size):
        _report(f"{name}: resizing {path} from {im.size[0]}x{im.size[1]} to {size}x{size}")
        im = im.resize((size, size), Image.NEAREST if mode == "L" else Image.BILINEAR)
      return np.asarray(im)
  except OSError as e:
    raise UserError(f"mmjax generate: --input {name}={path}: cannot read the image ({e})") from None


class _Tokenizers:
  """The modality tokenizers a run needs, loaded once."""

  def __init__(self, registry: mod.Registry, root: str):
    self.registry, self.root, self.loaded = registry, root, {}

  def __call__(self, name: str) -> mt.ModalityTokenizer:
    if name not in self.loaded:
      m = self.registry[name]
      try:
        self.loaded[name] = tokenizer_objective.load_modality_tokenizer(
            m, mt.tokenizer_dir_for(m, self.root), batch_size=8)
      except ConfigError as e:
        raise UserError(f"mmjax generate: {e}") from None
    return self.loaded[name]

  def text(self, name: str):
    return self(name).tokenizer  # the SentencePiece TextTokenizer behind a sequence modality


def _encode_inputs(layout: gen.EncoderLayout, ctx, registry, inputs, tokenizers, batch):
  given_images = {}
  for name, value in inputs.items():
    m = registry[name]
    if m.is_sequence:
      if not value.strip():
        raise UserError(f"mmjax generate: --input {name} is empty text")
      ids = tokenizers.text(name).encode(value)[:m.max_length - 1].tolist() + [special.EOS]
      ctx = layout.with_tokens(ctx, name, np.tile(np.asarray(ids, np.int32), (batch, 1)))
    elif m.kind == mod.IMAGE_PIXELS:
      image = _read_image(value, m.image_size, "RGB", name)
      given_images[name] = image
      ctx = layout.with_pixels(ctx, name, np.repeat(image[None], batch, axis=0))
    else:
      tok = tokenizers(name)
      kind = tok.kind
      image = _read_image(value, tok.size, "RGB" if kind == "rgb" else "L", name)
      raw = image
      if kind == "depth":  # grey PNG, near = bright (as grids.to_rgb draws depth), to metres
        cfg = tok.tokenizer.cfg
        raw = cfg.depth_max - image.astype(np.float32) / 255.0 * (cfg.depth_max - cfg.depth_min)
      if kind == "semseg" and raw.max() >= tok.tokenizer.cfg.num_classes:
        raise UserError(f"mmjax generate: --input {name}={value}: a class map needs values < "
                        f"{tok.tokenizer.cfg.num_classes}, got {int(raw.max())}")
      if kind == "rgb":
        given_images[name] = image
      ids = tok.encode_values([raw])[0]
      ctx = layout.with_tokens(ctx, name, np.tile(ids.reshape(1, -1), (batch, 1)))
  return ctx, given_images


def _draw_boxes(image: np.ndarray, boxes_K4: np.ndarray, labels: Sequence[str],
                scale: int = 4) -> np.ndarray:
  canvas = Image.fromarray(np.asarray(image, np.uint8)).resize(
      (image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
  draw = ImageDraw.Draw(canvas)
  w, h = canvas.size
  for (x0, y0, x1, y1), label in zip(np.asarray(boxes_K4, np.float64).reshape(-1, 4), labels):
    draw.rectangle([x0 * (w - 1), y0 * (h - 1), x1 * (w - 1), y1 * (h - 1)], outline=(255, 255, 0),
                   width=2)
    draw.text((x0 * (w - 1) + 3, y0 * (h - 1) + 2), label, fill=(255, 255, 0))
  return np.asarray(canvas)


def _save_png(path: str, image: np.ndarray) -> str:
  return mmpaths.write_png(path, image)


def generate_fourm(config, workdir: str, inputs: Mapping[str, str], targets: Sequence[str], *,
                   out_dir: str, seed: int = 0, num_samples: int = 1,
                   allow_random_init: bool = False) -> dict[str, Any]:
  """Generates `targets` (chained, in `generate.order`) from `inputs`; writes files to out_dir and
  returns the summary (also written as summary.json)."""

  registry = mod.from_config(config.modalities)
  targets = _check_names(registry, inputs, targets)
  if num_samples < 1:
    raise UserError(f"mmjax generate: --num-samples must be >= 1, got {num_samples}")
  gen_section = config.get("generate", None)
  order = fourm_settings.chain_order(gen_section, targets)
  settings = fourm_settings.target_settings(gen_section, order, registry.names)
  tokenizers = _Tokenizers(registry, tokenizers_dir(config, workdir))
  # Load every tokenizer first: a missing one should fail before minutes of sampling.
  for name in list(inputs) + order:
    if registry[name].kind != mod.IMAGE_PIXELS:
      tokenizers(name)
  sequences = [n for n in list(inputs) + order if registry[n].is_sequence]
  text = tokenizers.text(sequences[0]) if sequences else None
  num_sentinels = text.special.num_sentinels if text else config.get("masking", {}).get(
      "num_sentinels", 100)

  start = time.perf_counter()
  layout = gen.EncoderLayout(registry, tuple(inputs) + tuple(order))
  ctx, given_images = _encode_inputs(layout, layout.empty(num_samples), registry, inputs,
                                     tokenizers, num_samples)
  model, step = load_model(config, workdir, allow_random_init=allow_random_init)
  limits = {n: tokenizers(n).vocab_size for n in order}
  sampler = gen.FourMSampler(model, num_sentinels=num_sentinels, vocab_limits=limits)
  plan = [(n, settings[n]) for n in order]
  def progress(i, name):
    _report(f"target {i + 1}/{len(plan)}: {name} "
            f"({'autoregressive' if registry[name].is_sequence else settings[name].schedule})")

  sampling = time.perf_counter()
  results, _ = sampler.chain(layout, ctx, plan, jax.random.key(seed), progress=progress)
  sampling = time.perf_counter() - sampling

  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  files: dict[str, list[str]] = {}
  texts: dict[str, list[str]] = {}
  images: dict[str, list[np.ndarray]] = {}  # rgb views, for drawing boxes on
  for name in order:
    m, result = registry[name], results[name]
    tok = tokenizers(name)
    paths = []
    if m.is_image:
      raw = tok.decode_batch(list(result.tokens))
      for i, sample in enumerate(raw):
        view = grids.to_rgb(sample[m.source], _KIND_OF[tok.kind])
        if tok.kind == "rgb":
          images.setdefault(name, []).append(view)
        paths.append(_save_png(os.path.join(out_dir, f"{name}_{i}.png"), view))
    else:
      texts[name] = [tokenizers.text(name).decode(ids) for ids in result.ids]
      for i, t in enumerate(texts[name]):
        path = os.path.join(out_dir, f"{name}_{i}.txt")
        epath.Path(path).write_text(t + "\n")
        paths.append(path)
      if isinstance(tok, mt.DetModalityTokenizer):
        paths += _write_boxes(out_dir, name, tok, result.ids, images, given_images, registry,
                              num_samples)
    files[name] = paths
  summary = dict(
      objective="fourm", step=step, random_init=step == 0 and allow_random_init, seed=seed,
      num_samples=num_samples, inputs=dict(inputs), order=order, out_dir=out_dir, files=files,
      texts=texts, settings={n: _settings_dict(s, registry[n]) for n, s in settings.items()},
      seconds=round(time.perf_counter() - start, 2), sampling_seconds=round(sampling, 2))
  (epath.Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
  return summary


def _settings_dict(s: fourm_settings.TargetSettings, m: mod.Modality) -> dict[str, Any]:
  """The settings that applied to target `m` (sequences have no image schedule)."""
  out = dataclasses.asdict(s)
  if m.is_sequence:
    for key in ("token_schedule", "steps"):
      out.pop(key)
    out["schedule"] = "autoregressive"
  return out


def _write_boxes(out_dir, name, tok, ids, images, given_images, registry, num_samples):
  """det_<i>.png: decoded boxes on the generated rgb (or the given one, or a blank canvas)."""
  decoded = tok.decode_batch([np.asarray(i, np.int32) for i in ids])
  backgrounds = next(iter(images.values()), None)
  if backgrounds is None and given_images:
    backgrounds = [next(iter(given_images.values()))] * num_samples
  if backgrounds is None:
    side = max((m.image_size for m in registry if m.kind == mod.IMAGE_PIXELS), default=64)
    backgrounds = [np.zeros((side, side, 3), np.uint8)] * num_samples
  paths = []
  for i, d in enumerate(decoded):
    labels = [tok.class_names[c] for c in d["det_classes"]]
    drawn = _draw_boxes(backgrounds[i], d["det_boxes"], labels)
    paths.append(_save_png(os.path.join(out_dir, f"{name}_{i}.png"), drawn))
  return paths
