"""`mmjax import fourm`: an ml-4m 4M checkpoint (safetensors + JSON config) into an mmjax workdir.

The reference layout (ml-4m `fourm/models/fm.py`, `fm_utils.py`, `encoder_embeddings.py`,
`decoder_embeddings.py`; the Hugging Face Hub checkpoints are `model.safetensors` + `config.json`
of the `FM` wrapper). D = dim, H = heads, K = D / H, F = MLP width, i = block index, m = modality:

  encoder.{i}.norm1.weight [D]            .bias [D] (a zero buffer when norm_bias is False)
  encoder.{i}.attn.qkv.weight [3D, D]     .bias [3D]   fused q, k, v; rows ordered (3, H, K)
  encoder.{i}.attn.q_norm.weight [K]      .bias [K]    } qk_norm models only (LayerNorm over K)
  encoder.{i}.attn.k_norm.weight [K]      .bias [K]    }
  encoder.{i}.attn.proj.weight [D, D]     .bias [D]
  encoder.{i}.norm2.weight [D]            .bias [D]
  encoder.{i}.mlp.fc1.weight [F, D]       .bias [F]    GELU: fc2(gelu(fc1 x))
  encoder.{i}.mlp.fc2.weight [D, F]       .bias [D]    SwiGLU: fc2(silu(fc1 x) * fc3 x)
  encoder.{i}.mlp.fc3.weight [F, D]       .bias [F]    (gated_mlp only)
  encoder_norm.weight [D]                 .bias [D]
  decoder_proj_context.weight [D, D]      .bias [D]    context = proj(encoder_norm(x)) + enc emb
  decoder.{i}.norm1 / query_norm / context_norm / norm2 .weight [D] .bias [D]
  decoder.{i}.self_attn.qkv / .proj       as the encoder's attn (and its q_norm, k_norm)
  decoder.{i}.cross_attn.q.weight [D, D]  .bias [D]
  decoder.{i}.cross_attn.kv.weight [2D, D] .bias [2D]  fused k, v of the context; rows (2, H, K)
  decoder.{i}.cross_attn.proj.weight [D, D] .bias [D]  (and its q_norm, k_norm)
  decoder.{i}.mlp.*                       as the encoder's
  decoder_norm.weight [D]                 .bias [D]
  mask_token [1, 1, D]                    the decoder input of image targets
  encoder_embeddings.{m}.token_emb.weight [V, D]   token modalities
  encoder_embeddings.{m}.proj.weight [D, C*P*P]    pixel modalities (patch (row, col, channel))
  encoder_embeddings.{m}.pos_emb [1, N, D]         sin-cos buffer, or learned
  encoder_embeddings.{m}.mod_emb [1, 1, D]
  decoder_embeddings.{m}.token_emb.weight [V, D]   sequences: teacher-forcing input; tied head
  decoder_embeddings.{m}.to_logits.weight [V, D]   output head (equal to token_emb when tied)
  decoder_embeddings.{m}.pos_emb [1, N, D]
  decoder_embeddings.{m}.mod_emb [1, 1, D]         shared with the encoder's (may be stored once)

How each lands in mmjax (models/fourm.py): the blocks are stacked on a leading layers axis; linear
weights are transposed to [in, out] and split into (3, H, K) / (2, H, K) / (H, K) axes; the context
norm stays a separate parameter (the model folds it into the kv weight itself). A bias the
reference lacks becomes zeros where mmjax has one (mmjax's `use_bias` covers qkv, projections and
norms together; the MLP has biases iff GELU); a reference bias mmjax has no place for must be zero.
Positions equal to mmjax's own sin-cos tables (1e-5) stay fixed; others become learned positions.
Heads: tied when every `to_logits` equals its `token_emb` (or is absent), else untied (mmjax
`heads[m]` = to_logits^T); an image modality's decoder `token_emb` is then unused by the reference's
forward and is dropped. Modality names drop their `@resolution` suffix (`tok_rgb@224` -> `tok_rgb`).
Not converted: register tokens (`num_register_tokens` > 0) and T5-embedding inputs
(`SequenceEmbEncoderEmbedding`); `--drop-modality` leaves such a modality out, by name.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np

from mmjax.convert.common import (
  ConvertError,
  Tensors,
  copy_tokenizer,
  read_json,
  read_safetensors,
  write_workdir,
)
from mmjax.generate import fourm_settings
from mmjax.models.layers import sincos_1d, sincos_2d

NORM_EPS = 1e-6  # every released 4M model: LayerNorm(eps=1e-6)
POSITION_ATOL = 1e-5


def _load_reference(source: str) -> tuple[dict[str, np.ndarray], dict[str, Any], str]:
  """(tensors, reference config, config path) of a checkpoint directory or file."""
  if os.path.isdir(source):
    config_path = os.path.join(source, "config.json")
  else:
    config_path = os.path.join(os.path.dirname(os.path.abspath(source)), "config.json")
  return read_safetensors(source), read_json(config_path), config_path


def _mmjax_name(name: str, all_names: list[str]) -> str:
  base = name.split("@", 1)[0]
  clash = sum(n.split("@", 1)[0] == base for n in all_names) > 1
  return name.replace("@", "_") if clash else base


class _Modality:
  """What the checkpoint says about one reference modality."""

  def __init__(self, name: str, mm_name: str, t: Tensors, ref: dict[str, Any]):
    self.name, self.mm_name = name, mm_name
    enc, dec = f"encoder_embeddings.{name}.", f"decoder_embeddings.{name}."
    self.in_encoder = f"{enc}mod_emb" in t
    self.in_decoder = f"{dec}mod_emb" in t
    if not self.in_encoder and not self.in_decoder:
      raise ConvertError(f"{t.where}: missing key {enc + 'mod_emb'!r} (modality {name!r} of the "
                         "config's domains_in/domains_out)")
    if any(k.startswith(f"{enc}emb_proj.") for k in t.names()):
      raise ConvertError(f"{t.where}: modality {name!r} is a T5-embedding input, which mmjax does "
                         f"not have; leave it out with --drop-modality {name}")
    self.pixels = f"{enc}proj.weight" in t
    pos_key = f"{enc}pos_emb" if f"{enc}pos_emb" in t else f"{dec}pos_emb"
    self.num_tokens = t.shape(pos_key)[1]
    if self.pixels:
      self.kind = "image_pixels"
    elif name.startswith("tok_") or "@" in name:
      self.kind = "image_tokens"
    else:
      self.kind = "sequence"
    vocab_key = f"{enc}token_emb.weight" if f"{enc}token_emb.weight" in t else \
        f"{dec}token_emb.weight"
    self.vocab_size = 0 if self.pixels else t.shape(vocab_key)[0]
    self.grid = (0, 0)
    if self.kind != "sequence":
      side = int(round(self.num_tokens ** 0.5))
      if side * side != self.num_tokens:
        raise ConvertError(f"{t.where}: key {pos_key!r} holds {self.num_tokens} positions; an "
                           "image modality needs a square grid")
      self.grid = (side, side)
    self.patch_size = int(ref.get("patch_size", 16))
    self.channels = 3
    if self.pixels:
      d, patch_dim = t.shape(f"{enc}proj.weight")
      self.channels = patch_dim // (self.patch_size * self.patch_size)
      if self.channels * self.patch_size ** 2 != patch_dim:
        raise ConvertError(f"{t.where}: key {enc + 'proj.weight'!r} has {patch_dim} inputs, not a "
                           f"multiple of patch_size^2 = {self.patch_size ** 2}")

  def fixed_positions(self, d: int) -> np.ndarray:
    if self.kind == "sequence":
      return sincos_1d(self.num_tokens, d)
    return sincos_2d(self.grid[0], self.grid[1], d)

  def section(self, base: Any) -> dict[str, Any]:
    """The mmjax modality section, keeping the base config's source and tokenizer of that name."""
    base = dict(base) if base is not None else {}
    out = dict(kind=self.kind, source=base.get("source", self.mm_name.removeprefix("tok_")))
    if base.get("tokenizer") and self.kind != "image_pixels":
      out["tokenizer"] = base["tokenizer"]
    if self.kind == "image_pixels":
      out.update(image_size=self.grid[0] * self.patch_size, patch_size=self.patch_size,
                 channels=self.channels)
    elif self.kind == "image_tokens":
      out.update(vocab_size=self.vocab_size, grid=self.grid)
    else:
      out.update(vocab_size=self.vocab_size, max_length=self.num_tokens)
    return out


def _model_section(ref: dict[str, Any], t: Tensors) -> dict[str, Any]:
  d = t.shape("mask_token")[-1]
  heads = int(ref.get("num_heads", 0))
  if heads <= 0 or d % heads:
    raise ConvertError(f"{t.where}: config num_heads {ref.get('num_heads')!r} must be a positive "
                       f"divisor of dim {d}")
  count = lambda prefix: len({n.split(".")[1] for n in t.names() if n.startswith(prefix)})  # noqa: E731
  enc_layers, dec_layers = count("encoder."), count("decoder.")
  for key, value in (("dim", d), ("encoder_depth", enc_layers), ("decoder_depth", dec_layers)):
    if key in ref and int(ref[key]) != value:
      raise ConvertError(f"{t.where}: config {key} is {ref[key]} but the tensors have {value}")
  gated = bool(ref.get("gated_mlp", "encoder.0.mlp.fc3.weight" in t))
  act = str(ref.get("act_layer", "SiLU" if gated else "GELU"))
  if (gated, act) not in ((True, "SiLU"), (False, "GELU")):
    raise ConvertError(f"{t.where}: config act_layer={act!r} with gated_mlp={gated}: mmjax has "
                       "SwiGLU (SiLU, gated) and GELU (not gated) MLPs")
  qkv_bias = bool(ref.get("qkv_bias", "encoder.0.attn.qkv.bias" in t))
  proj_bias = bool(ref.get("proj_bias", "encoder.0.attn.proj.bias" in t))
  norm_bias = bool(ref.get("norm_bias", True))
  return dict(
      d_model=d, num_heads=heads, encoder_layers=enc_layers, decoder_layers=dec_layers,
      mlp_type="swiglu" if gated else "gelu", mlp_hidden=t.shape("encoder.0.mlp.fc1.weight")[0],
      norm_type="layernorm", norm_eps=NORM_EPS, qk_norm=bool(ref.get("qk_norm", False)),
      use_bias=qkv_bias or proj_bias or norm_bias)


class _Mapper:
  """Takes reference tensors and produces mmjax leaves {name: array}."""

  def __init__(self, t: Tensors, model: dict[str, Any]):
    self.t, self.m = t, model
    self.d, self.h = model["d_model"], model["num_heads"]
    self.k, self.f = self.d // self.h, model["mlp_hidden"]
    self.out: dict[str, np.ndarray] = {}

  def bias(self, key: str, shape: tuple[int, ...], has_place: bool) -> np.ndarray | None:
    """The bias `key` when mmjax has a place for it (zeros if the reference has none); otherwise
    the reference's must be absent or zero."""
    if has_place:
      return self.t.take(key, shape) if key in self.t else np.zeros(shape, np.float32)
    self.t.take_zero(key, shape, "mmjax's model has no bias there (use_bias=False)")
    return None

  def put(self, name: str, value: np.ndarray | None) -> None:
    if value is not None:
      self.out[name] = value

  def norm(self, ref: str, mm: str, dim: int | None = None) -> None:
    dim = dim or self.d
    self.put(f"{mm}.scale.value", self.t.take(f"{ref}.weight", (dim,)))
    self.put(f"{mm}.bias.value", self.bias(f"{ref}.bias", (dim,), self.m["use_bias"]))

  def linear(self, ref: str, mm: str, out_shape: tuple[int, ...], in_shape: tuple[int, ...],
             with_bias: bool) -> None:
    """torch Linear [out, in] -> mmjax kernel [*in, *out] (+ bias [*out])."""
    n_out, n_in = int(np.prod(out_shape)), int(np.prod(in_shape))
    w = self.t.take(f"{ref}.weight", (n_out, n_in))
    self.put(f"{mm}.kernel.value", w.T.reshape(*in_shape, *out_shape))
    b = self.bias(f"{ref}.bias", (n_out,), with_bias)
    self.put(f"{mm}.bias.value", None if b is None else b.reshape(out_shape))

  def attention(self, ref: str, mm: str, cross: bool) -> None:
    d, h, k, bias = self.d, self.h, self.k, self.m["use_bias"]
    if cross:
      self.linear(f"{ref}.q", f"{mm}.q", (h, k), (d,), bias)
      self.linear(f"{ref}.kv", f"{mm}.kv", (2, h, k), (d,), bias)
    else:
      self.linear(f"{ref}.qkv", f"{mm}.qkv", (3, h, k), (d,), bias)
    self.linear(f"{ref}.proj", f"{mm}.proj", (d,), (h, k), bias)
    if self.m["qk_norm"]:
      self.norm(f"{ref}.q_norm", f"{mm}.qk_norm.q", k)
      self.norm(f"{ref}.k_norm", f"{mm}.qk_norm.k", k)

  def mlp(self, ref: str, mm: str) -> None:
    gelu = self.m["mlp_type"] == "gelu"
    d, f = self.d, self.f
    self.linear(f"{ref}.fc1", f"{mm}.fc1", (f,), (d,), gelu)
    self.linear(f"{ref}.fc2", f"{mm}.fc2", (d,), (f,), gelu)
    if not gelu:
      self.linear(f"{ref}.fc3", f"{mm}.fc3", (f,), (d,), False)

  def stack(self, prefix: str, layers: int, fill) -> None:
    """Runs `fill(ref_prefix, mm_prefix)` per block into a scratch map, then stacks the blocks."""
    outer, per_layer = self.out, []
    for i in range(layers):
      self.out = {}
      fill(f"{prefix}.{i}", prefix)
      per_layer.append(self.out)
    self.out = outer
    for name in per_layer[0]:
      outer[name] = np.stack([layer[name] for layer in per_layer])


def convert(source: str, base_config: ml_collections.ConfigDict, drop: tuple[str, ...] = ()
            ) -> tuple[ml_collections.ConfigDict, dict[str, np.ndarray]]:
  """(mmjax config, {mmjax param leaf: array}) of the reference checkpoint at `source`."""
  tensors, ref, config_path = _load_reference(source)
  t = Tensors(tensors, where=source)
  for name in drop:
    if not (t.skip(f"encoder_embeddings.{name}.") + t.skip(f"decoder_embeddings.{name}.")):
      raise ConvertError(f"--drop-modality {name}: the checkpoint has no modality of that name")
  if int(ref.get("num_register_tokens", 0)) > 0 or "register_tokens" in t:
    raise ConvertError(f"{source}: register tokens (num_register_tokens > 0) have no place in "
                       "mmjax")
  domains = [m for m in dict.fromkeys(list(ref.get("domains_in", [])) +
                                      list(ref.get("domains_out", []))) if m not in drop]
  if not domains:
    domains = sorted({n.split(".")[1] for n in t.names() if n.startswith(("encoder_embeddings.",
                                                                          "decoder_embeddings."))}
                     - set(drop))
  domains = sorted(domains)  # the reference's modality order (FM sorts the union)
  model = _model_section(ref, t)
  d = model["d_model"]
  mods = [_Modality(name, _mmjax_name(name, domains), t, ref) for name in domains]

  # Heads: tied iff every decoder head equals its token table (or is stored once).
  targets = [m for m in mods if m.in_decoder]
  tied = all(f"decoder_embeddings.{m.name}.to_logits.weight" not in t or np.array_equal(
      tensors[f"decoder_embeddings.{m.name}.to_logits.weight"],
      tensors.get(f"decoder_embeddings.{m.name}.token_emb.weight")) for m in targets)
  model["tie_heads"] = tied
  mapper = _Mapper(t, model)
  put = mapper.put

  # Embeddings.
  mod_emb, learned = [], {}
  for m in mods:
    enc, dec = f"encoder_embeddings.{m.name}.", f"decoder_embeddings.{m.name}."
    if not m.in_encoder:
      raise ConvertError(f"{source}: missing key {enc + 'mod_emb'!r}: mmjax embeds every "
                         f"modality as an input (modality {m.name!r} is only a decoder output)")
    if m.kind != "image_pixels" and not m.in_decoder:
      raise ConvertError(f"{source}: missing key {dec + 'mod_emb'!r}: every token modality is "
                         f"also a target in mmjax (modality {m.name!r} is only an input); leave it "
                         f"out with --drop-modality {m.name}")
    emb = t.take(f"{enc}mod_emb", (1, 1, d))[0, 0]
    if f"{dec}mod_emb" in t:
      dec_emb = t.take(f"{dec}mod_emb", (1, 1, d))[0, 0]
      if not np.array_equal(dec_emb, emb):
        raise ConvertError(f"{source}: key {dec + 'mod_emb'!r} differs from {enc + 'mod_emb'!r}: "
                           "mmjax shares one modality embedding (share_modality_embeddings)")
    mod_emb.append(emb)
    shape = (1, m.num_tokens, d)
    positions = [t.take(f"{enc}pos_emb", shape)[0]]
    if m.in_decoder:
      positions.append(t.take(f"{dec}pos_emb", shape)[0])
    fixed = m.fixed_positions(d)
    if any(not np.allclose(p, fixed, atol=POSITION_ATOL, rtol=0) for p in positions):
      learned[m.mm_name] = positions
    if m.pixels:
      put(f"enc_patch.{m.mm_name}.kernel.value",
          t.take(f"{enc}proj.weight", (d, m.channels * m.patch_size ** 2)).T)
    else:
      put(f"enc_tokens.{m.mm_name}.value", t.take(f"{enc}token_emb.weight", (m.vocab_size, d)))
    if m.in_decoder:
      table = t.take(f"{dec}token_emb.weight", (m.vocab_size, d))
      head_key = f"{dec}to_logits.weight"
      head = t.take(head_key, (m.vocab_size, d)) if head_key in t else table
      if tied or m.kind == "sequence":
        put(f"dec_tokens.{m.mm_name}.value", table)
      if not tied:
        put(f"heads.{m.mm_name}.value", head.T)
  put("mod_emb.value", np.stack(mod_emb))
  put("mask_token.value", t.take("mask_token", (1, 1, d))[0, 0])
  for name, positions in learned.items():
    put(f"enc_pos.{name}.value", positions[0])
    if len(positions) > 1:
      put(f"dec_pos.{name}.value", positions[1])

  # Encoder, context projection, decoder.
  def encoder_block(ref, mm):
    mapper.norm(f"{ref}.norm1", f"{mm}.norm1")
    mapper.attention(f"{ref}.attn", f"{mm}.attn", cross=False)
    mapper.norm(f"{ref}.norm2", f"{mm}.norm2")
    mapper.mlp(f"{ref}.mlp", f"{mm}.mlp")

  def decoder_block(ref, mm):
    mapper.norm(f"{ref}.norm1", f"{mm}.norm1")
    mapper.attention(f"{ref}.self_attn", f"{mm}.self_attn", cross=False)
    mapper.norm(f"{ref}.query_norm", f"{mm}.query_norm")
    mapper.norm(f"{ref}.context_norm", f"{mm}.context_norm")
    mapper.attention(f"{ref}.cross_attn", f"{mm}.cross_attn", cross=True)
    mapper.norm(f"{ref}.norm2", f"{mm}.norm2")
    mapper.mlp(f"{ref}.mlp", f"{mm}.mlp")

  mapper.stack("encoder", model["encoder_layers"], encoder_block)
  mapper.norm("encoder_norm", "encoder_norm")
  mapper.linear("decoder_proj_context", "context_proj", (d,), (d,), True)
  mapper.stack("decoder", model["decoder_layers"], decoder_block)
  mapper.norm("decoder_norm", "decoder_norm")
  t.check_consumed()

  config = _mmjax_config(base_config, model, mods, learned, config_path)
  return config, mapper.out


def _mmjax_config(base: ml_collections.ConfigDict, model: dict[str, Any], mods: list[_Modality],
                  learned: dict[str, Any], source: str) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(base.to_dict())
  base_modalities = base.get("modalities", {}) or {}
  sections = {}
  for m in mods:
    section = m.section(base_modalities.get(m.mm_name))
    if m.mm_name in learned:
      section["learned_positions"] = True
    sections[m.mm_name] = section
  config.modalities = ml_collections.ConfigDict(sections, sort_keys=False)
  if "generate" in config:
    config.generate = ml_collections.ConfigDict(
        fourm_settings.for_modalities(config.generate, list(sections)))
  config.model.update(model)
  config.imported_from = os.path.dirname(os.path.abspath(source))
  return config


def run_import(source: str, base_config: ml_collections.ConfigDict, workdir: str,
               drop: tuple[str, ...] = (), text_tokenizer: str = "") -> dict[str, Any]:
  """`mmjax import fourm`: converts and writes the workdir; returns a summary. `text_tokenizer`
  (4M's WordPiece tokenizer.json) is copied into the workdir and used by every sequence modality."""
  config, params = convert(source, base_config, drop)
  if text_tokenizer:
    path = copy_tokenizer(text_tokenizer, workdir)
    for m in config.modalities.values():
      if m.kind == "sequence":
        m.tokenizer = path
  summary = write_workdir(config, params, workdir, source)
  summary.update(modalities=list(config.modalities.keys()),
                 tie_heads=bool(config.model.tie_heads),
                 dropped=list(drop))
  return summary
