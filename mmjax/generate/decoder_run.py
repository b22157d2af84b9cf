"""`mmjax generate` for decoder checkpoints: caption -> image and image file -> caption.

The prompt is the start of a training document (`mmjax.data.sequences`), cut where the target
begins; the sampler (`mmjax.generate.decoder`) writes the rest:

  caption -> tok_rgb:  BOS caption ids BOI_rgb | codes... EOI_rgb      (then decoded to a PNG)
  tok_rgb -> caption:  BOS BOI_rgb codes EOI_rgb | caption ids... EOS  (then decoded to text)

Only orders that one of `config.sequences.templates` starts with are accepted: the model has never
seen another. Classifier-free guidance (two-way, `generate.image_cfg_scale` or `text_cfg_scale`
!= 1) adds an unconditional copy of the prompt with the input removed (BOS BOI_rgb, or BOS): the
starts of the opposite template. The image tokenizer decodes codes to pixels and tokenizes input
images; the text tokenizer does the same for captions. Both are the trained ones under
`data.tokenizers_dir` ("" = <data.data_dir>/tokenizers), one directory per tokenizer config stem
(`mmjax.data.modality_tokenizers.tokenizer_dir_for`).
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

from mmjax import modalities as mm
from mmjax.config import to_dataclass
from mmjax.errors import UserError
from mmjax.generate import decoder as sampler

_SUPPORTED = "caption -> image (a sequence input, an image_tokens target) or image file -> caption"


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """`config.generate` of a decoder config (every key commented in configs/decoder/shapes.py)."""
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  image_cfg_scale: float = 1.0
  text_cfg_scale: float = 1.0
  text_first: int = 4


def generate_config(config) -> GenerateConfig:
  cfg = to_dataclass(GenerateConfig, config.get("generate", {}), where="generate")
  if cfg.temperature < 0 or cfg.top_k < 0 or not 0 < cfg.top_p <= 1:
    raise UserError(f"config section 'generate': need temperature >= 0, top_k >= 0 and top_p in "
                    f"(0, 1]; got {cfg.temperature}, {cfg.top_k}, {cfg.top_p}")
  for key in ("image_cfg_scale", "text_cfg_scale"):
    if getattr(cfg, key) < 0:
      raise UserError(f"config key 'generate.{key}' must be >= 0, got {getattr(cfg, key)}")
  return cfg


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
                   targets: Sequence[str]) -> tuple[mm.Modality, mm.Modality]:
  """(input modality, target modality) of a supported request, else a UserError saying why."""
  known = ", ".join(registry.names)
  for name in list(inputs) + list(targets):
    if name not in registry:
      raise UserError(f"mmjax generate: unknown modality {name!r}; the config's modalities are "
                      f"{known}")
  if len(inputs) != 1 or len(targets) != 1:
    raise UserError(f"mmjax generate: a decoder generates one target from one input ({_SUPPORTED})"
                    f"; got inputs {sorted(inputs) or 'none'} and targets {list(targets)}")
  source, target = registry[next(iter(inputs))], registry[targets[0]]
  if source.name == target.name:
    raise UserError(f"mmjax generate: {target.name!r} is both input and target")
  kinds = (source.kind, target.kind)
  if kinds not in ((mm.SEQUENCE, mm.IMAGE_TOKENS), (mm.IMAGE_TOKENS, mm.SEQUENCE)):
    raise UserError(f"mmjax generate: {source.name} ({source.kind}) -> {target.name} "
                    f"({target.kind}) is not supported by the decoder; supported: {_SUPPORTED}")
  if source.kind == mm.IMAGE_TOKENS and source.source != "rgb":
    raise UserError(f"mmjax generate: input {source.name!r} is a {source.source} modality; only "
                    f"rgb images can be read from files")
  if not any(tuple(t[:2]) == (source.name, target.name) for t in templates):
    raise UserError(f"mmjax generate: the decoder was trained on the templates "
                    f"{[list(t) for t in templates]} (config key 'sequences.templates'); none "
                    f"starts with {source.name} -> {target.name}")
  return source, target


def _load_tokenizer(modality: mm.Modality, root: str):
  from mmjax.data.modality_tokenizers import load_modality_tokenizer, tokenizer_dir_for
  return load_modality_tokenizer(modality, tokenizer_dir_for(modality, root), batch_size=8)


def _image_kind(modality: mm.Modality) -> str:
  return {"depth": "depth", "semseg": "classes"}.get(modality.source, "rgb")


def generate_decoder(config, workdir: str, inputs: Mapping[str, str], targets: Sequence[str], *,
                     out_dir: str, seed: int = 0, num_samples: int = 1,
                     allow_random_init: bool = False) -> dict[str, Any]:
  """Samples `num_samples` of the target from the input; writes files into `out_dir` and
  <out_dir>/summary.json, and returns the summary."""
  from mmjax.data.sequences import SharedVocab, sequences_config
  from mmjax.eval import grids
  from mmjax.train.checkpoint import load_model

  start = time.perf_counter()
  if num_samples < 1:
    raise UserError(f"mmjax generate: --num-samples must be >= 1, got {num_samples}")
  registry = mm.from_config(config.modalities)
  templates = sequences_config(config.sequences, registry).templates
  source, target = _check_request(registry, templates, inputs, targets)
  settings = generate_config(config)
  vocab = SharedVocab.from_registry(registry)
  image = source if source.kind == mm.IMAGE_TOKENS else target
  text = target if image is source else source
  layout = sampler.TokenLayout.from_vocab(vocab, registry, image.name,
                                          text_first=settings.text_first)

  root = tokenizers_dir(config)
  text_tok = _load_tokenizer(text, root)
  image_tok = _load_tokenizer(image, root)
  checked = _check_tokenizer_versions(config, {text.name: text_tok.fingerprint,
                                                image.name: image_tok.fingerprint})
  # The text tokenizer may have fewer pieces than the modality's vocabulary: never sample the rest.
  layout = dataclasses.replace(layout, text_end=min(layout.text_end, text_tok.vocab_size))

  value = inputs[source.name]
  outputs: dict[str, Any] = {}
  if source is text:
    ids = _caption_ids(text_tok, value, text)
    prompt = [vocab.bos, *ids, layout.begin_image]
    uncond = [vocab.bos, layout.begin_image]
    new_tokens = layout.image_tokens + 1  # the codes, then the forced end-image
  else:
    if not os.path.isfile(value):
      raise UserError(f"mmjax generate: input {source.name}: no image file at {value!r}")
    from mmjax.data.folder import load_image
    pixels = load_image(value, image_tok.size)
    codes = np.asarray(image_tok.encode_values([pixels])[0]).reshape(-1)
    prompt = [vocab.bos, layout.begin_image, *vocab.to_global(image.name, codes).tolist(),
              layout.end_image]
    uncond = [vocab.bos]
    new_tokens = target.max_length + 1  # caption ids, then EOS
    # A caption target is text only: no begin-image id can match, so no image is ever started.
    layout = dataclasses.replace(layout, begin_image=-1)
    recon = image_tok.decode_batch([codes])[0][image.source]
    outputs["input_image"] = _save_png(os.path.join(out_dir, "input.png"), pixels, "rgb")
    outputs["input_reconstruction"] = _save_png(os.path.join(out_dir, "input_reconstruction.png"),
                                                recon, "rgb")
  max_length = int(config.model.max_length)
  if len(prompt) + new_tokens > max_length:
    raise UserError(f"mmjax generate: the prompt ({len(prompt)} tokens) and {new_tokens} new "
                    f"tokens exceed model.max_length ({max_length})")

  _report(f"loading the decoder from {workdir}")
  model, step = load_model(config, workdir, allow_random_init=allow_random_init)
  scale = settings.image_cfg_scale if target is image else settings.text_cfg_scale
  guided = scale != 1.0
  sample = sampler.SampleConfig(
      temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
      guidance=sampler.two_way(scale) if guided else (1.0,))
  prompts = [prompt] * num_samples + ([uncond] * num_samples if guided else [])
  _report(f"sampling {num_samples} x {new_tokens} tokens of {target.name} (step {step})")
  sample_start = time.perf_counter()
  tokens = sampler.generate(model, prompts, layout, new_tokens=new_tokens, sample=sample,
                            seed=seed)
  sample_seconds = time.perf_counter() - sample_start

  os.makedirs(out_dir, exist_ok=True)
  if target is image:
    codes = tokens[:, :layout.image_tokens] - layout.image_first
    decoded = [d[image.source] for d in image_tok.decode_batch(list(codes))]
    kind = _image_kind(image)
    files = [_save_png(os.path.join(out_dir, f"{target.name}_{k}.png"), x, kind)
             for k, x in enumerate(decoded)]
    outputs[target.name] = files
    if num_samples > 1:
      outputs["grid"] = grids.save_grid(
          os.path.join(out_dir, f"{target.name}_grid.png"),
          [[grids.to_rgb(x, kind) for x in decoded]],
          column_titles=[f"sample {k}" for k in range(num_samples)], row_titles=[value])
  else:
    captions = [_caption_text(text_tok, row, vocab.eos) for row in tokens]
    path = os.path.join(out_dir, f"{target.name}.txt")
    with open(path, "w", encoding="utf-8") as f:
      f.write("".join(c + "\n" for c in captions))
    outputs[target.name] = path
    outputs["captions"] = captions
    if num_samples > 1:
      outputs["grid"] = grids.save_grid(
          os.path.join(out_dir, f"{target.name}_grid.png"), [[pixels]] * num_samples,
          row_titles=captions)

  summary = {
      "objective": "decoder", "workdir": workdir, "step": step, "input": source.name,
      "target": target.name, "seed": seed, "num_samples": num_samples,
      "prompt_tokens": len(prompt), "new_tokens": new_tokens,
      "sampling": dataclasses.asdict(settings), "cfg_scale": scale,
      "tokenizers_dir": root, "tokenizers_match_data": checked, "sample_seconds": sample_seconds,
      "tokens_per_s": num_samples * new_tokens / max(sample_seconds, 1e-9),
      "seconds": time.perf_counter() - start, "outputs": outputs,
  }
  summary_path = os.path.join(out_dir, "summary.json")
  with open(summary_path, "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2, default=str)
  summary["summary"] = summary_path
  return summary


def _check_tokenizer_versions(config, fingerprints: Mapping[str, str]) -> bool:
  """UserError when the pre-tokenized data at data.data_dir was made by other tokenizers (the
  decoder learned their codes: decoding with retrained ones gives garbage); False if no data."""
  from mmjax.data import tokens_tfds
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
  from PIL import Image

  from mmjax.eval import grids
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(grids.to_rgb(np.asarray(image), kind)).save(path)
  return path
