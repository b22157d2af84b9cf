"""`mmjax generate` for decoder checkpoints: caption -> image, image file -> caption, and a caption
plus an image file -> a target.

The prompt is the start of a training document (`data.sequences.documents`), cut where the target
begins; the sampler (`mmjax.generate.decoder`) writes the rest:

  caption -> tok_rgb:  BOS caption ids BOI_rgb | codes... EOI_rgb      (then decoded to a PNG)
  tok_rgb -> caption:  BOS BOI_rgb codes EOI_rgb | caption ids... EOS  (then decoded to text)
  caption + tok_rgb -> tok_depth:  BOS caption ids BOI_rgb codes EOI_rgb BOI_depth | codes...

Only orders that one of `config.sequences.templates` starts with are accepted: the model has never
seen another (with two inputs, the template's order of them is used). Classifier-free guidance
adds copies of the prompt with inputs removed (`mmjax.generate.decoder.guidance_prompts`): the
guided copies are the starts of other templates. One input: two-way, `generate.image_cfg_scale` or
`text_cfg_scale` != 1, with an unconditional copy (BOS BOI_rgb, or BOS). A text and an image input:
three-way (Chameleon), copies full, image-only and unconditional mixed as uncond +
`three_way_image_scale` (img - uncond) + `three_way_text_scale` (full - img); both 1 = off.
A decoder trained with `sequences.image_blocks_bidirectional` sees each prompt image as one
bidirectional block, as in training, and cannot sample images (their codes had loss weight 0).
The image tokenizer decodes codes to pixels and tokenizes input images; the text tokenizer does
the same for captions. Both are the trained ones under `data.tokenizers_dir` ("" =
<data.data_dir>/tokenizers), one directory per tokenizer config stem
(`mmjax.tokenizers.modality.tokenizer_dir_for`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from mmjax import grids
from mmjax import modalities as mm
from mmjax import paths as mmpaths
from mmjax.config import to_dataclass
from mmjax.data.folder import load_image
from mmjax.data.sequences.documents import SharedVocab, sequences_config
from mmjax.data.tokens import records as tokens_tfds
from mmjax.errors import UserError
from mmjax.generate import decoder as sampler
from mmjax.objectives.tokenizer import load_modality_tokenizer
from mmjax.tokenizers.modality import tokenizer_dir_for
from mmjax.train.loop import load_model

_SUPPORTED = ("caption -> image (a sequence input, an image_tokens target), image file -> caption, "
              "or a caption and an image file -> a target")


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """`config.generate` of a decoder config (every key commented in configs/decoder/shapes.py)."""
  temperature: float = 1.0
  text_temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  image_cfg_scale: float = 1.0
  text_cfg_scale: float = 1.0
  three_way_image_scale: float = 1.0
  three_way_text_scale: float = 1.0
  text_first: int = 4


_SCALES = ("image_cfg_scale", "text_cfg_scale", "three_way_image_scale", "three_way_text_scale")


def generate_config(config) -> GenerateConfig:
  cfg = to_dataclass(GenerateConfig, config.get("generate", {}), where="generate")
  if min(cfg.temperature, cfg.text_temperature) < 0 or cfg.top_k < 0 or not 0 < cfg.top_p <= 1:
    raise UserError(f"config section 'generate': need temperature and text_temperature >= 0, "
                    f"top_k >= 0 and top_p in (0, 1]; got {cfg.temperature}, "
                    f"{cfg.text_temperature}, {cfg.top_k}, {cfg.top_p}")
  for key in _SCALES:
    if getattr(cfg, key) < 0:
      raise UserError(f"config key 'generate.{key}' must be >= 0, got {getattr(cfg, key)}")
  return cfg


def sample_config(settings: GenerateConfig, target: mm.Modality,
                  weights: tuple[float, ...]) -> sampler.SampleConfig:
  """How the target's tokens are drawn: text at `text_temperature`, images at `temperature`."""
  temperature = settings.text_temperature if target.is_sequence else settings.temperature
  return sampler.SampleConfig(temperature=temperature, top_k=settings.top_k,
                              top_p=settings.top_p, guidance=weights)


def guidance_weights(settings: GenerateConfig, sources: Sequence[mm.Modality],
                     target: mm.Modality) -> tuple[str, tuple[float, ...], Any]:
  """(form, weights of the copies, scale(s)) of a request: "none", "two_way" or "three_way"."""
  if len(sources) == 2:
    scales = (settings.three_way_image_scale, settings.three_way_text_scale)
    if scales == (1.0, 1.0):
      return "none", (1.0,), list(scales)
    return "three_way", sampler.three_way(*scales), list(scales)
  scale = settings.image_cfg_scale if target.kind == mm.IMAGE_TOKENS else settings.text_cfg_scale
  if scale == 1.0:
    return "none", (1.0,), scale
  return "two_way", sampler.two_way(scale), scale


def _report(message: str) -> None:
  print(f"mmjax generate: {message}", file=sys.stderr, flush=True)


def tokenizers_dir(config) -> str:
  """`data.tokenizers_dir`, or <data.data_dir>/tokenizers when it is empty."""
  data = config.data
  if data.get("tokenizers_dir"):
    return str(data.tokenizers_dir)
  if not data.get("data_dir"):
    raise UserError("config keys 'data.tokenizers_dir' and 'data.data_dir' are both empty: give "
                    "the directory of the trained tokenizers (--config.data.tokenizers_dir=DIR)")
  return os.path.join(str(data.data_dir), "tokenizers")


def _check_request(registry: mm.Registry, templates, inputs: Mapping[str, str],
                   targets: Sequence[str]) -> tuple[tuple[mm.Modality, ...], mm.Modality]:
  """(input modalities in template order, target modality) of a supported request, else a
  UserError saying why."""
  known = ", ".join(registry.names)
  for name in list(inputs) + list(targets):
    if name not in registry:
      raise UserError(f"mmjax generate: unknown modality {name!r}; the config's modalities are "
                      f"{known}")
  if len(inputs) not in (1, 2) or len(targets) != 1:
    raise UserError(f"mmjax generate: a decoder generates one target from one input or from a "
                    f"text and an image input ({_SUPPORTED}); got inputs "
                    f"{sorted(inputs) or 'none'} and targets {list(targets)}")
  sources, target = [registry[n] for n in inputs], registry[targets[0]]
  if target.name in inputs:
    raise UserError(f"mmjax generate: {target.name!r} is both input and target")
  if len(sources) == 1:
    kinds = (sources[0].kind, target.kind)
    if kinds not in ((mm.SEQUENCE, mm.IMAGE_TOKENS), (mm.IMAGE_TOKENS, mm.SEQUENCE)):
      raise UserError(f"mmjax generate: {sources[0].name} ({sources[0].kind}) -> {target.name} "
                      f"({target.kind}) is not supported by the decoder; supported: {_SUPPORTED}")
  elif (sorted(m.kind for m in sources) != sorted((mm.SEQUENCE, mm.IMAGE_TOKENS))
        or target.kind not in (mm.SEQUENCE, mm.IMAGE_TOKENS)):
    raise UserError(f"mmjax generate: two inputs must be one sequence and one image_tokens "
                    f"modality and the target one of either kind; got "
                    f"{', '.join(f'{m.name} ({m.kind})' for m in sources)} -> {target.name} "
                    f"({target.kind})")
  for m in sources:
    if m.kind == mm.IMAGE_TOKENS and m.source != "rgb":
      raise UserError(f"mmjax generate: input {m.name!r} is a {m.source} modality; only rgb "
                      f"images can be read from files")
  k = len(sources)
  for t in templates:
    if len(t) > k and set(t[:k]) == set(inputs) and t[k] == target.name:
      return tuple(registry[n] for n in t[:k]), target
  given = " and ".join(inputs) + (" (in either order)" if k > 1 else "")
  raise UserError(f"mmjax generate: the decoder was trained on the templates "
                  f"{[list(t) for t in templates]} (config key 'sequences.templates'); none "
                  f"starts with {given} -> {target.name}")


def _load_tokenizer(modality: mm.Modality, root: str):
  return load_modality_tokenizer(modality, tokenizer_dir_for(modality, root), batch_size=8)


def _image_kind(modality: mm.Modality) -> str:
  return {"depth": "depth", "semseg": "classes"}.get(modality.source, "rgb")


def generate_decoder(config, workdir: str, inputs: Mapping[str, str], targets: Sequence[str], *,
                     out_dir: str, seed: int = 0, num_samples: int = 1,
                     allow_random_init: bool = False) -> dict[str, Any]:
  """Samples `num_samples` of the target from the inputs; writes files into `out_dir` and
  <out_dir>/summary.json, and returns the summary."""

  start = time.perf_counter()
  if num_samples < 1:
    raise UserError(f"mmjax generate: --num-samples must be >= 1, got {num_samples}")
  registry = mm.from_config(config.modalities)
  sequences = sequences_config(config.sequences, registry)
  sources, target = _check_request(registry, sequences.templates, inputs, targets)
  bidirectional = sequences.image_blocks_bidirectional
  if bidirectional and target.kind == mm.IMAGE_TOKENS:
    raise UserError(f"mmjax generate: the decoder was trained with bidirectional image blocks "
                    f"(config key 'sequences.image_blocks_bidirectional' is True): its image codes "
                    f"were context with loss weight 0, never predicted, so {target.name} cannot be "
                    f"sampled autoregressively. Generate text from an image, or train with "
                    f"sequences.image_blocks_bidirectional=False")
  settings = generate_config(config)
  vocab = SharedVocab.from_registry(registry)
  image = target if target.kind == mm.IMAGE_TOKENS else next(
      m for m in sources if m.kind == mm.IMAGE_TOKENS)
  layout = sampler.TokenLayout.from_vocab(vocab, registry, image.name,
                                          text_first=settings.text_first,
                                          image_blocks=bidirectional)

  root = tokenizers_dir(config)
  tokenizers = {m.name: _load_tokenizer(m, root) for m in (*sources, target)}
  checked = _check_tokenizer_versions(config, {n: t.fingerprint for n, t in tokenizers.items()})
  # The text tokenizer may have fewer pieces than the modality's vocabulary: never sample the rest.
  text_sizes = [tokenizers[m.name].vocab_size for m in (*sources, target) if m.is_sequence]
  layout = dataclasses.replace(layout, text_end=min(layout.text_end, *text_sizes))

  conditions = []  # (kind, ids) in template order
  outputs: dict[str, Any] = {}
  pixels, title = None, ""
  for m in sources:
    value, tok = inputs[m.name], tokenizers[m.name]
    if m.is_sequence:
      conditions.append(("text", _caption_ids(tok, value, m)))
      title = value
      continue
    if not os.path.isfile(value):
      raise UserError(f"mmjax generate: input {m.name}: no image file at {value!r}")
    pixels = load_image(value, tok.size)
    codes = np.asarray(tok.encode_values([pixels])[0]).reshape(-1)
    ids = vocab.to_global(m.name, codes).tolist()
    conditions.append(("image", [vocab.begin_image(m.name), *ids, vocab.end_image(m.name)]))
    title = title or value
    recon = tok.decode_batch([codes])[0][m.source]
    outputs["input_image"] = _save_png(os.path.join(out_dir, "input.png"), pixels, "rgb")
    outputs["input_reconstruction"] = _save_png(os.path.join(out_dir, "input_reconstruction.png"),
                                                recon, "rgb")
  if target is image:
    begin = [layout.begin_image]
    new_tokens = layout.image_tokens + 1  # the codes, then the forced end-image
  else:
    begin = []
    new_tokens = target.max_length + 1  # caption ids, then EOS
    # A text target is text only: no begin-image id can match, so no image is ever started.
    layout = dataclasses.replace(layout, begin_image=-1)
  form, weights, scale = guidance_weights(settings, sources, target)
  copies = sampler.guidance_prompts([vocab.bos], conditions, begin, len(weights))
  prompt = copies[0]
  max_length = int(config.model.max_length)
  if len(prompt) + new_tokens > max_length:
    raise UserError(f"mmjax generate: the prompt ({len(prompt)} tokens) and {new_tokens} new "
                    f"tokens exceed model.max_length ({max_length})")

  _report(f"loading the decoder from {workdir}")
  model, step = load_model(config, workdir, allow_random_init=allow_random_init)
  sample = sample_config(settings, target, weights)
  prompts = [c for c in copies for _ in range(num_samples)]  # copy-major
  _report(f"sampling {num_samples} x {new_tokens} tokens of {target.name} (step {step}, "
          f"guidance {form})")
  sample_start = time.perf_counter()
  tokens = sampler.generate(model, prompts, layout, new_tokens=new_tokens, sample=sample,
                            seed=seed)
  sample_seconds = time.perf_counter() - sample_start

  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  if target is image:
    codes = tokens[:, :layout.image_tokens] - layout.image_first
    decoded = [d[image.source] for d in tokenizers[image.name].decode_batch(list(codes))]
    kind = _image_kind(image)
    files = [_save_png(os.path.join(out_dir, f"{target.name}_{k}.png"), x, kind)
             for k, x in enumerate(decoded)]
    outputs[target.name] = files
    if num_samples > 1:
      outputs["grid"] = grids.save_grid(
          os.path.join(out_dir, f"{target.name}_grid.png"),
          [[grids.to_rgb(x, kind) for x in decoded]],
          column_titles=[f"sample {k}" for k in range(num_samples)], row_titles=[title])
  else:
    text_tok = tokenizers[target.name]
    captions = [_caption_text(text_tok, row, vocab.eos) for row in tokens]
    path = os.path.join(out_dir, f"{target.name}.txt")
    epath.Path(path).write_text("".join(c + "\n" for c in captions), encoding="utf-8")
    outputs[target.name] = path
    outputs["captions"] = captions
    if num_samples > 1:
      outputs["grid"] = grids.save_grid(
          os.path.join(out_dir, f"{target.name}_grid.png"), [[pixels]] * num_samples,
          row_titles=captions)

  summary = {
      "objective": "decoder", "workdir": workdir, "step": step,
      "input": "+".join(m.name for m in sources), "target": target.name, "seed": seed,
      "num_samples": num_samples, "prompt_tokens": len(prompt), "new_tokens": new_tokens,
      "sampling": dataclasses.asdict(settings), "guidance": form, "cfg_scale": scale,
      "guidance_weights": list(weights), "image_blocks_bidirectional": bidirectional,
      "tokenizers_dir": root, "tokenizers_match_data": checked, "sample_seconds": sample_seconds,
      "tokens_per_s": num_samples * new_tokens / max(sample_seconds, 1e-9),
      "seconds": time.perf_counter() - start, "outputs": outputs,
  }
  summary_path = os.path.join(out_dir, "summary.json")
  epath.Path(summary_path).write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
  summary["summary"] = summary_path
  return summary


def _check_tokenizer_versions(config, fingerprints: Mapping[str, str]) -> bool:
  """UserError when the pre-tokenized data at data.data_dir was made by other tokenizers (the
  decoder learned their codes: decoding with retrained ones gives garbage); False if no data."""
  data = config.data
  if not data.get("data_dir"):
    return False
  ds_dir = tokens_tfds.dataset_dir(str(data.data_dir), str(data.name))
  if not tokens_tfds.is_complete(ds_dir):
    return False
  tokens_tfds.check_tokenizer_versions(ds_dir, fingerprints)
  return True


def _caption_ids(tokenizer, caption: str, modality: mm.Modality) -> list[int]:
  """Text ids as the pre-tokenizer wrote them (no BOS/EOS), checked against the modality."""
  if not caption.strip():
    raise UserError(f"mmjax generate: input {modality.name} is empty: give the text, e.g. "
                    f"--input {modality.name}=\"a red circle\"")
  ids = tokenizer.encode_values([caption])[0].tolist()
  if len(ids) > modality.max_length:
    raise UserError(f"mmjax generate: input {modality.name} has {len(ids)} tokens, more than "
                    f"modalities.{modality.name}.max_length ({modality.max_length})")
  return ids


def _caption_text(tokenizer, row: np.ndarray, eos: int) -> str:
  """The text of one sampled row: the ids before the first EOS."""
  ids = np.asarray(row)
  stop = np.flatnonzero(ids == eos)
  ids = ids[:stop[0]] if stop.size else ids
  return tokenizer.decode_batch([ids])[0][tokenizer.modality.source]


def _save_png(path: str, image: np.ndarray, kind: str) -> str:
  return mmpaths.write_png(path, grids.to_rgb(np.asarray(image), kind))
