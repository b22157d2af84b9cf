"""`mmjax import chameleon` / `mmjax export chameleon`: HF Chameleon <-> a dense mmjax decoder.

The HF layout (transformers `models/chameleon`: `modeling_chameleon.py`,
`configuration_chameleon.py`; a directory of `config.json` + safetensors shards,
`model.safetensors.index.json` when sharded). D = hidden_size, H = num_attention_heads, G =
num_key_value_heads, K = D / H, F = intermediate_size, V = vocab_size, i = layer:

  model.embed_tokens.weight [V, D]
  model.layers.{i}.input_layernorm.weight [D]          RMSNorm (rms_norm_eps)
  model.layers.{i}.self_attn.q_proj.weight [H*K, D]    rows (H, K), rotate-half pair layout
  model.layers.{i}.self_attn.k_proj.weight [G*K, D]    rows (G, K)
  model.layers.{i}.self_attn.v_proj.weight [G*K, D]
  model.layers.{i}.self_attn.o_proj.weight [D, H*K]
  model.layers.{i}.self_attn.q_norm.weight [H, K]  .bias [H, K]   qk-norm: LayerNorm over K (eps
  model.layers.{i}.self_attn.k_norm.weight [G, K]  .bias [G, K]   1e-5), a weight and bias per head
  model.layers.{i}.post_attention_layernorm.weight [D]
  model.layers.{i}.mlp.gate_proj.weight [F, D]   .up_proj.weight [F, D]   .down_proj.weight [D, F]
  model.norm.weight [D]
  lm_head.weight [V, D]                                absent when tie_word_embeddings
  model.vqmodel.*                                      the VQ-GAN image tokenizer: not converted
  (*_proj.bias: only with attention_bias / mlp_bias; must be zero, mmjax's decoder has no biases)

Config: swin_norm (the 34B re-ordering, h = x + norm(f(x))) is mmjax `norm_order="post"`, with
input_layernorm as the attention norm and post_attention_layernorm as the FFN norm; rope_theta,
rms_norm_eps, GQA (G < H; kv head g serves q heads g*H/G ... in both) carry over. HF's q/k rows are
already in the rotate-half layout (its conversion script permuted Meta's interleaved pairs), which
is mmjax's `rope_layout="rotate_half"`; exporting an "interleaved" mmjax model permutes q, k and the
qk-norm parameters within each head into that layout.

Vocabulary: HF ids mix text and image tokens (`vocabulary_map`: image codes are the tokens named
`IMGIMG<digits as letters A-J>Z`; begin/end of image are `<racm3:break>` / `<eoss>`; BOS/EOS are
`bos_token_id` / `eos_token_id`). mmjax's shared decoder vocabulary
(data/sequences/documents.SharedVocab) is [text | image codes | begin-image, end-image | BOS, EOS]:
the import reorders embedding and head rows into it (text = every id but image codes and markers,
PAD, UNK, BOS, EOS first: the order of the tokenizer.json kind, mmjax/tokenizers/hf_text.py; the
four decoder specials are copies of their HF rows, so V grows by 2). A tokenizer.json beside the
weights is copied into the workdir and becomes the text modality's tokenizer. The export writes ids
in mmjax order with a vocabulary_map naming image codes and specials as above, plus
`mmjax_vocabulary` (the text size) so that the import keeps that order: import(export(x)) == x
exactly.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np
from safetensors.numpy import save_file

from mmjax.convert.common import (
  ConvertError,
  Tensors,
  config_from_json,
  copy_tokenizer,
  params_of_workdir,
  read_json,
  read_safetensors,
  write_workdir,
)
from mmjax.data.sequences.documents import SharedVocab
from mmjax.modalities import from_config
from mmjax.models.configs import model_config
from mmjax.models.decoder import ffn_hidden
from mmjax.tokenizers.hf_text import text_order

IMAGE_PREFIX = "IMGIMG"
BEGIN_IMAGE, END_IMAGE = "<racm3:break>", "<eoss>"
QK_NORM_EPS = 1e-5  # HF's ChameleonLayerNorm uses a fixed eps
VQ_DOWNSAMPLE = 16  # Chameleon's VQ-GAN: 5 resolution levels, 512 px -> 32 x 32 codes
MMJAX_LAYOUT = "mmjax_vocabulary"  # config key of an exported model: ids already in mmjax order
TOKENIZER_FILE = "tokenizer.json"


def _code_of(name: str) -> int | None:
  """The image code of a vocabulary name `IMGIMG<letters>Z` (A=0 ... J=9), else None."""
  if not (name.startswith(IMAGE_PREFIX) and name.endswith("Z")):
    return None
  digits = name[len(IMAGE_PREFIX):-1]
  if not digits or any(not "A" <= c <= "J" for c in digits):
    return None
  return int("".join(str(ord(c) - ord("A")) for c in digits))


def _name_of(code: int) -> str:
  return IMAGE_PREFIX + "".join(chr(ord("A") + int(c)) for c in str(code)) + "Z"


def vocabulary_order(hf: dict[str, Any], where: str) -> tuple[np.ndarray, int, int]:
  """(perm, text size, image codes): mmjax id j is HF id perm[j]."""
  vocab = int(hf["vocab_size"])
  mapping = hf.get("vocabulary_map") or {}
  codes = {}
  for name, index in mapping.items():
    code = _code_of(name)
    if code is not None:
      codes[code] = int(index)
  if not codes:
    raise ConvertError(f"{where}: config vocabulary_map names no image token ({IMAGE_PREFIX}...Z)")
  if sorted(codes) != list(range(len(codes))):
    raise ConvertError(f"{where}: the image tokens of vocabulary_map do not cover codes "
                       f"0..{len(codes) - 1}")
  specials = []
  for what, index in (("begin-image token " + BEGIN_IMAGE, mapping.get(BEGIN_IMAGE)),
                      ("end-image token " + END_IMAGE, mapping.get(END_IMAGE)),
                      ("bos_token_id", hf.get("bos_token_id")),
                      ("eos_token_id", hf.get("eos_token_id"))):
    if index is None or not 0 <= int(index) < vocab:
      raise ConvertError(f"{where}: config has no valid {what} (got {index!r})")
    specials.append(int(index))
  image_ids = [codes[c] for c in range(len(codes))]
  layout = hf.get(MMJAX_LAYOUT)
  if layout:  # written by `mmjax export chameleon`: ids are already in mmjax's order
    text_size = int(layout["text"])
    if image_ids + specials != list(range(text_size, vocab)):
      raise ConvertError(f"{where}: config {MMJAX_LAYOUT} says {text_size} text ids, but the image "
                         "and special ids do not follow them")
    return np.arange(vocab), text_size, len(image_ids)
  if set(image_ids) & {specials[0], specials[1]} or max(image_ids) >= vocab:
    raise ConvertError(f"{where}: image tokens and begin/end-image tokens of vocabulary_map "
                       f"overlap or lie outside vocab_size {vocab}")
  # Text: every id but the image codes and markers, with PAD, UNK, BOS, EOS first (the order of
  # the tokenizer kind of tokenizer.json, so its ids index these rows).
  text = text_order(mapping, vocab, bos=specials[2], eos=specials[3], where=where)
  return np.concatenate([text, image_ids, specials]), len(text), len(image_ids)


def _names(base: ml_collections.ConfigDict) -> tuple[str, str]:
  """The base config's text and image modality names (the imported model has one of each)."""
  text = image = None
  for name, m in (base.get("modalities", {}) or {}).items():
    if m.get("kind") == "sequence" and text is None:
      text = name
    if m.get("kind") == "image_tokens" and image is None:
      image = name
  return text or "text", image or "image"


def convert(source: str, base: ml_collections.ConfigDict
            ) -> tuple[ml_collections.ConfigDict, dict[str, np.ndarray]]:
  """(mmjax config, {mmjax leaf: array}) of the HF Chameleon directory `source`."""
  if not os.path.isdir(source):
    raise ConvertError(f"{source}: not a directory (an HF Chameleon checkpoint is a directory with "
                       "config.json and safetensors shards)")
  hf = read_json(os.path.join(source, "config.json"))
  where = source
  for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
              "intermediate_size"):
    if key not in hf:
      raise ConvertError(f"{os.path.join(source, 'config.json')}: missing config key {key!r}")
  if hf.get("hidden_act", "silu") != "silu":
    raise ConvertError(f"{where}: hidden_act {hf['hidden_act']!r}: mmjax's decoder is SwiGLU")
  d, layers = int(hf["hidden_size"]), int(hf["num_hidden_layers"])
  h, f, v = int(hf["num_attention_heads"]), int(hf["intermediate_size"]), int(hf["vocab_size"])
  g = int(hf.get("num_key_value_heads") or h)
  k = d // h
  perm, text_size, image_size = vocabulary_order(hf, where)
  t = Tensors(read_safetensors(source), where=where)
  vq_skipped = t.skip("model.vqmodel.")
  out: dict[str, np.ndarray] = {}
  out["embed.value"] = t.take("model.embed_tokens.weight", (v, d))[perm]
  tied = bool(hf.get("tie_word_embeddings", False))
  if not tied:
    out["head.value"] = t.take("lm_head.weight", (v, d))[perm].T
  out["final_norm.scale.value"] = t.take("model.norm.weight", (d,))

  def linear(name, n_out, n_in, shape):
    w = t.take(f"{name}.weight", (n_out, n_in))
    t.take_zero(f"{name}.bias", (n_out,), "mmjax's decoder has no biases")
    return w.T.reshape(shape)

  per_layer = []
  for i in range(layers):
    p = f"model.layers.{i}"
    a = f"{p}.self_attn"
    per_layer.append({
        "blocks.attn_norm.scale.value": t.take(f"{p}.input_layernorm.weight", (d,)),
        "blocks.ffn_norm.scale.value": t.take(f"{p}.post_attention_layernorm.weight", (d,)),
        "blocks.attn.q.kernel.value": linear(f"{a}.q_proj", h * k, d, (d, h, k)),
        "blocks.attn.k.kernel.value": linear(f"{a}.k_proj", g * k, d, (d, g, k)),
        "blocks.attn.v.kernel.value": linear(f"{a}.v_proj", g * k, d, (d, g, k)),
        "blocks.attn.o.kernel.value": linear(f"{a}.o_proj", d, h * k, (h, k, d)),
        "blocks.attn.q_norm.weight.value": t.take(f"{a}.q_norm.weight", (h, k)),
        "blocks.attn.q_norm.bias.value": t.take(f"{a}.q_norm.bias", (h, k)),
        "blocks.attn.k_norm.weight.value": t.take(f"{a}.k_norm.weight", (g, k)),
        "blocks.attn.k_norm.bias.value": t.take(f"{a}.k_norm.bias", (g, k)),
        "blocks.ffn.gate.kernel.value": linear(f"{p}.mlp.gate_proj", f, d, (d, f)),
        "blocks.ffn.up.kernel.value": linear(f"{p}.mlp.up_proj", f, d, (d, f)),
        "blocks.ffn.down.kernel.value": linear(f"{p}.mlp.down_proj", d, f, (f, d)),
    })
  for name in per_layer[0]:
    out[name] = np.stack([layer[name] for layer in per_layer])
  t.check_consumed()

  eps = float(hf.get("rms_norm_eps", 1e-5))
  if eps != QK_NORM_EPS:
    raise ConvertError(f"{where}: rms_norm_eps {eps} differs from the qk-norm's fixed "
                       f"{QK_NORM_EPS}; "
                       "mmjax's decoder uses one eps for both")
  vq = hf.get("vq_config") or {}
  levels = len(vq.get("channel_multiplier", [1, 1, 2, 2, 4]))
  side = int(vq.get("resolution", 512)) // 2 ** (levels - 1)
  text_name, image_name = _names(base)
  config = ml_collections.ConfigDict(base.to_dict())
  base_mods = base.get("modalities", {}) or {}
  text = dict(base_mods.get(text_name, {}) or {})
  text.update(kind="sequence", vocab_size=text_size)
  text.setdefault("max_length", int(hf.get("max_position_embeddings", 4096)))
  image = dict(base_mods.get(image_name, {}) or {})
  image.update(kind="image_tokens", vocab_size=image_size, grid=(side, side))
  config.modalities = ml_collections.ConfigDict({text_name: text, image_name: image},
                                                sort_keys=False)
  config.model.update(dict(
      d_model=d, num_layers=layers, num_heads=h, num_kv_heads=g, mlp_hidden=f, norm_eps=eps,
      max_length=int(hf.get("max_position_embeddings", config.model.get("max_length", 4096))),
      rope_theta=float(hf.get("rope_theta", 10000.0)), rope_layout="rotate_half", qk_norm=True,
      norm_order="post" if hf.get("swin_norm", False) else "pre", tie_embeddings=tied,
      sparsity="dense"))
  config.imported_from = os.path.abspath(source)
  config.imported_skipped = f"{len(vq_skipped)} model.vqmodel.* tensors (the VQ-GAN tokenizer)"
  return config, out


def run_import(source: str, base: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  config, params = convert(source, base)
  tokenizer = os.path.join(source, TOKENIZER_FILE)
  if os.path.isfile(tokenizer):  # the reference text tokenizer becomes the text modality's
    text_name = next(n for n, m in config.modalities.items() if m.kind == "sequence")
    config.modalities[text_name].tokenizer = copy_tokenizer(tokenizer, workdir)
  summary = write_workdir(config, params, workdir, source)
  summary.update(modalities=list(config.modalities.keys()), skipped=config.imported_skipped)
  return summary


# ---- export ------------------------------------------------------------------------------------


def workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained (or imported) with: its config.json."""
  return config_from_json(os.path.join(workdir, "config.json"))


def _rotate_half_order(k: int) -> np.ndarray:
  """Within-head index map: rotate-half dim j holds interleaved dim order[j]."""
  return np.concatenate([np.arange(0, k, 2), np.arange(1, k, 2)])


def export(config: ml_collections.ConfigDict, params: dict[str, np.ndarray]
           ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(HF config.json dict, {HF key: array}) of a dense mmjax decoder."""
  if config.get("objective") != "decoder":
    raise ConvertError(f"export chameleon: the config's objective is {config.get('objective')!r}; "
                       "only a mixed-modal decoder (objective 'decoder') exports to Chameleon")
  cfg = model_config(config)
  if cfg.sparsity != "dense":
    raise ConvertError(f"export chameleon: model.sparsity is {cfg.sparsity!r}; Chameleon is dense")
  if not cfg.qk_norm:
    raise ConvertError("export chameleon: model.qk_norm is False; Chameleon always applies qk-norm")
  if cfg.norm_eps != QK_NORM_EPS:
    raise ConvertError(f"export chameleon: model.norm_eps is {cfg.norm_eps}; HF Chameleon's "
                       "qk-norm "
                       f"eps is fixed at {QK_NORM_EPS}")
  registry = from_config(config.modalities)
  images = [m for m in registry if m.kind == "image_tokens"]
  if len(images) != 1:
    raise ConvertError(f"export chameleon: Chameleon has one image vocabulary; the config has "
                       f"{len(images)} image_tokens modalities")
  vocab = SharedVocab.from_registry(registry)
  d, h = cfg.d_model, cfg.num_heads
  g, k, f = cfg.num_kv_heads or h, d // h, ffn_hidden(cfg)
  v = vocab.size
  out = {"model.embed_tokens.weight": params["embed.value"],
         "model.norm.weight": params["final_norm.scale.value"]}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = params["head.value"].T
  order = _rotate_half_order(k) if cfg.rope_layout == "interleaved" else np.arange(k)
  for i in range(cfg.num_layers):
    p, a = f"model.layers.{i}", f"model.layers.{i}.self_attn"
    layer = {n: params[f"blocks.{n}.value"][i] for n in (
        "attn_norm.scale", "ffn_norm.scale", "attn.q.kernel", "attn.k.kernel", "attn.v.kernel",
        "attn.o.kernel", "attn.q_norm.weight", "attn.q_norm.bias", "attn.k_norm.weight",
        "attn.k_norm.bias", "ffn.gate.kernel", "ffn.up.kernel", "ffn.down.kernel")}
    out[f"{p}.input_layernorm.weight"] = layer["attn_norm.scale"]
    out[f"{p}.post_attention_layernorm.weight"] = layer["ffn_norm.scale"]
    out[f"{a}.q_proj.weight"] = layer["attn.q.kernel"][:, :, order].reshape(d, h * k).T
    out[f"{a}.k_proj.weight"] = layer["attn.k.kernel"][:, :, order].reshape(d, g * k).T
    out[f"{a}.v_proj.weight"] = layer["attn.v.kernel"].reshape(d, g * k).T
    out[f"{a}.o_proj.weight"] = layer["attn.o.kernel"].reshape(h * k, d).T
    for n in ("q_norm", "k_norm"):
      out[f"{a}.{n}.weight"] = layer[f"attn.{n}.weight"][:, order]
      out[f"{a}.{n}.bias"] = layer[f"attn.{n}.bias"][:, order]
    out[f"{p}.mlp.gate_proj.weight"] = layer["ffn.gate.kernel"].T
    out[f"{p}.mlp.up_proj.weight"] = layer["ffn.up.kernel"].T
    out[f"{p}.mlp.down_proj.weight"] = layer["ffn.down.kernel"].T
  out = {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in out.items()}

  image = images[0]
  offset = vocab.offset(image.name)
  names = {f"<text_{i}>": i for i in range(vocab.text_size)}
  names.update({_name_of(c): offset + c for c in range(image.vocab_size)})
  names.update({BEGIN_IMAGE: vocab.begin_image(image.name), END_IMAGE: vocab.end_image(image.name),
                "<s>": vocab.bos, "</s>": vocab.eos})
  hf = dict(
      architectures=["ChameleonForConditionalGeneration"], model_type="chameleon", vocab_size=v,
      hidden_size=d, intermediate_size=f, num_hidden_layers=cfg.num_layers, num_attention_heads=h,
      num_key_value_heads=g, hidden_act="silu", max_position_embeddings=cfg.max_length,
      rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, attention_bias=False, mlp_bias=False,
      attention_dropout=0.0, swin_norm=cfg.norm_order == "post",
      tie_word_embeddings=cfg.tie_embeddings, bos_token_id=vocab.bos, eos_token_id=vocab.eos,
      pad_token_id=None, model_parallel_size=1, initializer_range=0.02, torch_dtype="float32",
      vocabulary_map=names, **{MMJAX_LAYOUT: dict(text=vocab.text_size, image=image.vocab_size)},
      vq_config=dict(num_embeddings=image.vocab_size, resolution=image.grid[0] * VQ_DOWNSAMPLE,
                     channel_multiplier=[1, 1, 2, 2, 4]))
  return hf, out


def write_hf(out_dir: str, hf: dict[str, Any], tensors: dict[str, np.ndarray],
             max_shard_bytes: int = 4 << 30) -> list[str]:
  """Writes config.json and safetensors shards (with model.safetensors.index.json when more than
  one); returns the shard file names."""
  os.makedirs(out_dir, exist_ok=True)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensors[name]
    size += nbytes
  if len(shards) == 1:
    files = ["model.safetensors"]
  else:
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  for file, shard in zip(files, shards):
    save_file(shard, os.path.join(out_dir, file), metadata={"format": "pt"})
  if len(shards) > 1:
    index = dict(metadata=dict(total_size=int(sum(t.nbytes for t in tensors.values()))),
                 weight_map={n: file for file, shard in zip(files, shards) for n in shard})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
      json.dump(index, f, indent=2)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  return files


def run_export(config: ml_collections.ConfigDict, workdir: str, out_dir: str,
               max_shard_bytes: int = 4 << 30) -> dict[str, Any]:
  """`mmjax export chameleon`: the latest checkpoint of `workdir` as an HF Chameleon directory."""
  params, step = params_of_workdir(config, workdir)
  hf, tensors = export(config, params)
  files = write_hf(out_dir, hf, tensors, max_shard_bytes)
  return dict(out=out_dir, step=step, shards=files, vocab_size=hf["vocab_size"],
              tensors=len(tensors))
