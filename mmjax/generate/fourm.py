"""4M samplers (specs/fourm.md, "Generation"): MaskGIT / ROAR for image tokens, autoregressive
decoding with a K/V cache for sequences, chained any-to-any targets, classifier-free guidance.

Encoder input: `EncoderLayout` gives every modality of a generation a fixed window of its
`num_tokens` slots (registry order); a window's `enc_valid` says which of its tokens are known. The
encoder attends only to valid keys, so a partly known image or a short text simply leaves slots
invalid, and the shape stays the same across all steps and all targets of a chain.

Every loop runs inside one jitted program (`lax.fori_loop` / `lax.while_loop`): one compile per
(target modality, batch, settings' static parts); schedules and temperatures are arrays.

  image target t (G cells), step k of S: the encoder sees the conditions and t's known cells; the
    decoder queries t's masked cells (MaskGIT) or a random subset of them of the step's size
    (ROAR); a token is sampled at each query; MaskGIT keeps the `n_k` most confident (log-prob of
    the sampled token), ROAR keeps all of its subset.
  sequence target: the encoder runs once; the decoder starts from [S_1] and feeds back each sampled
    token, one slot per step, reading the earlier slots' keys and values from the cache, until the
    final sentinel; predicted spans are merged back into the input at their sentinels.
  guidance: C copies of each row differ only in which conditioning slots are visible; the copies'
    logits are mixed (l_u + sum_g w_g (l_g - l_u)) and the token drawn from the mix goes to all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmjax.data.fourm.transform import patchify
from mmjax.generate import fourm_schedules as sched
from mmjax.generate.fourm_settings import TargetSettings
from mmjax.modalities import IMAGE_PIXELS, Registry
from mmjax.tokenizers import special

NEG = sched.NEG


# ---------------------------------------------------------------------------------------------
# Encoder input: one fixed window per modality.


@dataclasses.dataclass(frozen=True)
class EncoderLayout:
  """Encoder windows of the modalities `names` (kept in registry order), num_tokens slots each."""
  registry: Registry
  names: tuple[str, ...]

  def __post_init__(self):
    order = tuple(m.name for m in self.registry if m.name in self.names)
    object.__setattr__(self, "names", order)

  def window(self, name: str) -> tuple[int, int]:
    """(offset, size) of `name`'s slots."""
    offset = 0
    for n in self.names:
      size = self.registry[n].num_tokens
      if n == name:
        return offset, size
      offset += size
    raise KeyError(f"modality {name!r} has no encoder window; windows: {self.names}")

  @property
  def size(self) -> int:
    return sum(self.registry[n].num_tokens for n in self.names)

  def empty(self, batch: int) -> dict[str, np.ndarray]:
    """Every window present but invalid (nothing known yet)."""
    n = self.size
    modality = np.zeros(n, np.int32)
    positions = np.zeros(n, np.int32)
    for name in self.names:
      o, s = self.window(name)
      modality[o:o + s] = self.registry.index(name)
      positions[o:o + s] = np.arange(s)
    pixels = [m for m in self.registry if m.kind == IMAGE_PIXELS]
    p, c = (pixels[0].num_tokens, pixels[0].patch_dim) if pixels else (0, 0)
    return dict(enc_tokens=np.zeros((batch, n), np.int32),
                enc_modality=np.tile(modality, (batch, 1)),
                enc_positions=np.tile(positions, (batch, 1)),
                enc_valid=np.zeros((batch, n), bool),
                enc_pixels=np.zeros((batch, p, c), np.float32))

  def with_tokens(self, ctx: Mapping[str, Any], name: str, tokens_BL: np.ndarray,
                  valid_BL: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """`ctx` with `name`'s window holding `tokens_BL` (left-aligned; the rest invalid)."""
    o, s = self.window(name)
    tokens_BL = np.asarray(tokens_BL)
    b, length = tokens_BL.shape
    if length > s:
      raise ValueError(f"modality {name}: {length} tokens do not fit its {s} slots")
    valid = np.ones((b, length), bool) if valid_BL is None else np.asarray(valid_BL, bool)
    out = {k: np.array(v) for k, v in ctx.items()}
    out["enc_tokens"][:, o:o + s] = 0
    out["enc_tokens"][:, o:o + length] = tokens_BL
    out["enc_valid"][:, o:o + s] = False
    out["enc_valid"][:, o:o + length] = valid
    return out

  def with_pixels(self, ctx: Mapping[str, Any], name: str,
                  images_BHWC: np.ndarray) -> dict[str, np.ndarray]:
    """`ctx` with the raw-pixel modality `name` known: patches in enc_pixels, every slot valid."""
    m = self.registry[name]
    o, s = self.window(name)
    out = {k: np.array(v) for k, v in ctx.items()}
    out["enc_pixels"] = patchify(np.asarray(images_BHWC, np.uint8), m.patch_size)
    out["enc_tokens"][:, o:o + s] = np.arange(s)
    out["enc_valid"][:, o:o + s] = True
    return out

  def present(self, ctx: Mapping[str, Any]) -> tuple[str, ...]:
    """Modalities with at least one known slot in every row."""
    valid = np.asarray(ctx["enc_valid"])
    return tuple(n for n in self.names
                 if valid[:, slice(*_span(self.window(n)))].any(axis=1).all())


def _span(window: tuple[int, int]) -> tuple[int, int]:
  return window[0], window[0] + window[1]


# ---------------------------------------------------------------------------------------------
# Guidance copies.


def guidance(layout: EncoderLayout, ctx: Mapping[str, Any], target: str,
             settings: TargetSettings) -> tuple[np.ndarray, np.ndarray]:
  """(visible [C, N] bool, weights [C] float32): which encoder slots each copy sees and how the
  copies' logits are mixed. One copy when there is no guidance (scale 1, no per-modality weights).
  Copies: one per guided condition group, then the unconditional one (guided conditions hidden; the
  target's own known tokens and unguided conditions stay)."""
  n = layout.size
  conditions = [c for c in layout.present(ctx) if c != target]
  named = dict(settings.cfg_weights)
  if named:
    groups = [((c,), named[c]) for c in conditions if c in named]
  elif settings.cfg_scale != 1.0 and conditions:
    groups = [(tuple(conditions), settings.cfg_scale)]
  else:
    groups = []
  if not groups:
    return np.ones((1, n), bool), np.ones(1, np.float32)
  guided = {c for names, _ in groups for c in names}
  uncond = np.ones(n, bool)
  for c in guided:
    uncond[slice(*_span(layout.window(c)))] = False
  visible = []
  for names, _ in groups:
    v = uncond.copy()
    for c in names:
      v[slice(*_span(layout.window(c)))] = True
    visible.append(v)
  visible.append(uncond)
  weights = [w for _, w in groups]
  weights.append(1.0 - sum(weights))
  return np.stack(visible), np.asarray(weights, np.float32)


def _copies(ctx: Mapping[str, jax.Array], visible_CN: jax.Array) -> dict[str, jax.Array]:
  """The encoder input of C copy-major copies of every row [C * B, ...]."""
  c = visible_CN.shape[0]
  out = {k: jnp.concatenate([v] * c, axis=0) for k, v in ctx.items()}
  valid = ctx["enc_valid"][None] & visible_CN[:, None, :]
  out["enc_valid"] = valid.reshape(-1, valid.shape[-1])
  return out


def _mix(logits_CB: jax.Array, weights_C: jax.Array) -> jax.Array:
  c = weights_C.shape[0]
  logits = logits_CB.reshape(c, -1, *logits_CB.shape[1:])
  return jnp.einsum("c,cb...->b...", weights_C, logits)


def _rank(score_BG: jax.Array) -> jax.Array:
  """Rank of every entry of a row in descending order of score (0 = largest)."""
  order = jnp.argsort(-score_BG, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1, stable=True)


# ---------------------------------------------------------------------------------------------
# Compiled loops.


@dataclasses.dataclass(frozen=True)
class _ImageSpec:
  name: str
  modality: int
  offset: int
  size: int
  roar: bool
  top_k: int
  top_p: float
  vocab_limit: int


def _image_loop(graphdef, state, ctx, tokens_BG, known_BG, counts_BS, temps_S, visible_CN,
                weights_C, rng, spec: _ImageSpec):
  model = nnx.merge(graphdef, state)
  B, G = tokens_BG.shape
  c = weights_C.shape[0]
  base = _copies(ctx, visible_CN)
  o = spec.offset
  dec_static = dict(dec_tokens=jnp.zeros((c * B, G), jnp.int32),
                    dec_modality=jnp.full((c * B, G), spec.modality, jnp.int32),
                    dec_positions=jnp.broadcast_to(jnp.arange(G, dtype=jnp.int32), (c * B, G)))
  allowed = jnp.arange(model.registry[spec.name].vocab_size) < spec.vocab_limit

  def body(k, carry):
    tokens, known, step_of, rng = carry
    rng, r_select, r_sample = jax.random.split(rng, 3)
    masked = ~known
    n_B = counts_BS[:, k]
    enc = dict(base)
    enc["enc_tokens"] = base["enc_tokens"].at[:, o:o + G].set(jnp.tile(tokens, (c, 1)))
    enc["enc_valid"] = base["enc_valid"].at[:, o:o + G].set(jnp.tile(known, (c, 1)))
    if spec.roar:  # a random subset of the masked cells, all of which are kept
      score = jnp.where(masked, jax.random.uniform(r_select, (B, G)), -jnp.inf)
      chosen = masked & (_rank(score) < n_B[:, None])
      queries = chosen
    else:
      queries = masked
    dec = dict(dec_static, dec_valid=jnp.tile(queries, (c, 1)))
    ctx_BND, cross = model.encode(enc)
    y = model.decode(dec, ctx_BND, cross)
    logits = _mix(model.logits(y, spec.name), weights_C)
    logits = jnp.where(allowed, logits, NEG)
    sampled = sched.sample(r_sample, logits.reshape(B * G, -1), temps_S[k], spec.top_k,
                           spec.top_p).reshape(B, G)
    if not spec.roar:  # keep the n most confident samples
      logp = jax.nn.log_softmax(logits, axis=-1)
      conf = jnp.take_along_axis(logp, sampled[..., None], axis=-1)[..., 0]
      conf = jnp.where(masked, conf, -jnp.inf)
      chosen = masked & (_rank(conf) < n_B[:, None])
    tokens = jnp.where(chosen, sampled, tokens)
    step_of = jnp.where(chosen, k, step_of)
    return tokens, known | chosen, step_of, rng

  init = (tokens_BG, known_BG, jnp.full((B, G), -1, jnp.int32), rng)
  tokens, known, step_of, _ = jax.lax.fori_loop(0, counts_BS.shape[1], body, init)
  return tokens, known, step_of


_image_loop_jit = jax.jit(_image_loop, static_argnames=("graphdef", "spec"))


@dataclasses.dataclass(frozen=True)
class _SequenceSpec:
  name: str
  modality: int
  slots: int             # decoder slots: [S_1] + up to max_length generated tokens
  first_token: int       # [S_1]
  final_sentinel: int    # id of the sentinel that ends the target
  sentinel_end: int      # one past the last sentinel id
  top_k: int
  top_p: float
  vocab_limit: int
  return_logits: bool


def _sequence_loop(graphdef, state, ctx, temps_L, visible_CN, weights_C, rng, spec: _SequenceSpec):
  model = nnx.merge(graphdef, state)
  B = ctx["enc_tokens"].shape[0]
  c = weights_C.shape[0]
  enc = _copies(ctx, visible_CN)
  ctx_BND, cross = model.encode(enc)  # once: the context does not change while decoding
  kv = model.context_kv(ctx_BND)
  queries = spec.slots - 1
  cache = model.init_cache(c * B, queries)
  vocab = model.registry[spec.name].vocab_size
  ids = jnp.arange(vocab)
  # As in training targets: no PAD/UNK/BOS, and of the sentinels only [S_2] .. the final one.
  sentinel = (ids >= special.FIRST_SENTINEL) & (ids < spec.sentinel_end)
  allowed = (ids < spec.vocab_limit) & (ids != special.PAD) & (ids != special.UNK) & \
      (ids != special.BOS) & (~sentinel | ((ids > spec.first_token) & (ids <= spec.final_sentinel)))
  out = jnp.zeros((B, spec.slots), jnp.int32).at[:, 0].set(spec.first_token)
  history = jnp.zeros((B, queries if spec.return_logits else 0, vocab), jnp.float32)

  def cond(carry):
    j, _, done, *_ = carry
    return (j < queries) & ~jnp.all(done)

  def body(carry):
    j, out, done, cache, rng, history = carry
    rng, r_sample = jax.random.split(rng)
    token = jnp.tile(jax.lax.dynamic_slice_in_dim(out, j, 1, axis=1), (c, 1))
    dec = dict(dec_tokens=token, dec_modality=jnp.full((c * B, 1), spec.modality, jnp.int32),
               dec_positions=jnp.full((c * B, 1), j, jnp.int32),
               dec_valid=jnp.ones((c * B, 1), bool))
    x, emb = model.embed_decoder(dec)
    y, cache = model.decode_cached(x + emb, kv, cross, cache, j)
    logits = _mix(model.logits(y, spec.name)[:, 0], weights_C)
    logits = jnp.where(allowed, logits, NEG)
    nxt = sched.sample(r_sample, logits, temps_L[j], spec.top_k, spec.top_p)
    nxt = jnp.where(done, special.PAD, nxt)
    out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], j + 1, axis=1)
    done = done | (nxt == spec.final_sentinel)
    if spec.return_logits:
      history = jax.lax.dynamic_update_slice_in_dim(history, logits[:, None], j, axis=1)
    return j + 1, out, done, cache, rng, history

  init = (jnp.asarray(0, jnp.int32), out, jnp.zeros(B, bool), cache, rng, history)
  _, out, done, _, _, history = jax.lax.while_loop(cond, body, init)
  return out, done, history


_sequence_loop_jit = jax.jit(_sequence_loop, static_argnames=("graphdef", "spec"))


# ---------------------------------------------------------------------------------------------
# Sequences on the host: spans and merging.


def spans(ids: Sequence[int], ids_special: special.SpecialIds) -> dict[int, list[int]]:
  """{k: tokens} of a generated target `[S_a] span [S_b] span ...`: the tokens after [S_k] up to
  the next sentinel (padding dropped)."""
  out: dict[int, list[int]] = {}
  current = None
  for t in map(int, ids):
    if ids_special.is_sentinel(t):
      current = t - special.FIRST_SENTINEL
      out.setdefault(current, [])
    elif current is not None and t != special.PAD:
      out[current].append(t)
  return out


def merge_spans(input_ids: Sequence[int], generated: Mapping[int, Sequence[int]],
                ids_special: special.SpecialIds) -> list[int]:
  """The input sequence with every [S_k] replaced by span k; cut at the first EOS (excluded)."""
  merged: list[int] = []
  for t in map(int, input_ids):
    merged.extend(generated.get(t - special.FIRST_SENTINEL, [])
                  if ids_special.is_sentinel(t) else [t])
  if special.EOS in merged:
    merged = merged[:merged.index(special.EOS)]
  return merged


# ---------------------------------------------------------------------------------------------
# The sampler.


@dataclasses.dataclass
class ImageResult:
  tokens: np.ndarray      # int32 [B, G]
  step_of: np.ndarray     # int32 [B, G]: the step that fixed each cell (-1: known before)
  counts: np.ndarray      # int32 [B, S]: the schedule (cells to fix at each step)


@dataclasses.dataclass
class SequenceResult:
  raw: np.ndarray         # int32 [B, slots]: [S_1], the sampled tokens, then PAD after the end
  finished: np.ndarray    # bool [B]: the final sentinel was sampled
  ids: list[list[int]]    # per row: the merged sequence (without sentinels, cut before EOS)
  logits: np.ndarray | None = None  # [B, slots - 1, V] with return_logits


class FourMSampler:
  """Generation with one 4M model. `vocab_limits` caps a modality's ids below its tokenizer's
  size (the model's vocabulary may be larger); `num_sentinels` matches the text tokenizer."""

  def __init__(self, model, *, num_sentinels: int, vocab_limits: Mapping[str, int] | None = None):
    self.graphdef, self.state = nnx.split(model)
    self.registry: Registry = model.registry
    self.special = special.SpecialIds(num_sentinels=num_sentinels)
    self.vocab_limits = dict(vocab_limits or {})

  def _limit(self, name: str) -> int:
    return min(self.vocab_limits.get(name, self.registry[name].vocab_size),
               self.registry[name].vocab_size)

  def image(self, layout: EncoderLayout, ctx: Mapping[str, Any], target: str,
            settings: TargetSettings, rng: jax.Array, tokens_BG: np.ndarray | None = None,
            known_BG: np.ndarray | None = None) -> ImageResult:
    """Samples the masked cells of image target `target` (all of them unless `known_BG`)."""
    m = self.registry[target]
    if not m.is_image or not m.can_be_target:
      raise ValueError(f"modality {target} is not an image-token target")
    B, G = np.asarray(ctx["enc_tokens"]).shape[0], m.num_tokens
    tokens = np.zeros((B, G), np.int32) if tokens_BG is None else np.asarray(tokens_BG, np.int32)
    known = np.zeros((B, G), bool) if known_BG is None else np.asarray(known_BG, bool)
    counts = sched.token_schedule(settings.token_schedule, (~known).sum(axis=1), settings.steps)
    temps = sched.temperature_schedule(settings.temperature_schedule, settings.temperature,
                                       settings.steps)
    visible, weights = guidance(layout, ctx, target, settings)
    offset, _ = layout.window(target)
    spec = _ImageSpec(target, self.registry.index(target), offset, G,
                      settings.schedule == "roar", settings.top_k, settings.top_p,
                      self._limit(target))
    out, _, step_of = _image_loop_jit(self.graphdef, self.state, _device(ctx), tokens, known,
                                      counts, temps, visible, weights, rng, spec=spec)
    return ImageResult(np.asarray(out), np.asarray(step_of), counts)

  def sequence(self, layout: EncoderLayout, ctx: Mapping[str, Any], target: str,
               settings: TargetSettings, rng: jax.Array, *, return_logits: bool = False
               ) -> SequenceResult:
    """Decodes sequence target `target` autoregressively from [S_1]. If its encoder window holds
    an input with sentinels [S_1]..[S_k], the spans are predicted and merged there; otherwise the
    whole sequence is generated (`[S_1] text [EOS] [S_2]`)."""
    m = self.registry[target]
    if not m.is_sequence:
      raise ValueError(f"modality {target} is not a sequence")
    o, s = layout.window(target)
    inputs = np.asarray(ctx["enc_tokens"])[:, o:o + s]
    valid = np.asarray(ctx["enc_valid"])[:, o:o + s]
    runs = self.special.is_sentinel(np.where(valid, inputs, 0)).sum(axis=1)
    if len(set(runs.tolist())) > 1:
      raise ValueError(f"modality {target}: rows have different numbers of sentinels {runs}")
    final = max(int(runs[0]), 1) + 1
    slots = m.max_length + 1
    temps = sched.temperature_schedule(settings.temperature_schedule, settings.temperature,
                                       slots - 1)
    visible, weights = guidance(layout, ctx, target, settings)
    spec = _SequenceSpec(target, self.registry.index(target), slots, self.special.sentinel(1),
                         self.special.sentinel(final),
                         special.FIRST_SENTINEL + self.special.num_sentinels, settings.top_k,
                         settings.top_p, self._limit(target), return_logits)
    raw, done, history = _sequence_loop_jit(self.graphdef, self.state, _device(ctx), temps,
                                            visible, weights, rng, spec=spec)
    raw = np.asarray(raw)
    merged = []
    for b in range(raw.shape[0]):
      generated = spans(raw[b], self.special)
      given = inputs[b][valid[b]] if runs[0] else [self.special.sentinel(1)]
      merged.append(merge_spans(given, generated, self.special))
    return SequenceResult(raw, np.asarray(done), merged,
                          np.asarray(history) if return_logits else None)

  def chain(self, layout: EncoderLayout, ctx: Mapping[str, Any],
            plan: Sequence[tuple[str, TargetSettings]], rng: jax.Array,
            progress=None) -> tuple[dict[str, ImageResult | SequenceResult], dict[str, np.ndarray]]:
    """Generates the targets one after another; each finished one becomes an input (a condition)
    of the next. Returns the results and the final encoder input."""
    results: dict[str, ImageResult | SequenceResult] = {}
    ctx = {k: np.asarray(v) for k, v in ctx.items()}
    for i, (target, settings) in enumerate(plan):
      rng, key = jax.random.split(rng)
      if progress:
        progress(i, target)
      if self.registry[target].is_sequence:
        result = self.sequence(layout, ctx, target, settings, key)
        ctx = layout.with_tokens(ctx, target, *self.sequence_input(target, result.ids))
      else:
        result = self.image(layout, ctx, target, settings, key)
        ctx = layout.with_tokens(ctx, target, result.tokens)
      results[target] = result
    return results, ctx

  def sequence_input(self, target: str, ids: Sequence[Sequence[int]]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Generated sequences as an encoder input (tokens [B, L], valid [B, L]): each row's tokens +
    EOS (as in training), truncated to max_length, left-aligned."""
    m = self.registry[target]
    rows = [list(r)[:m.max_length - 1] + [special.EOS] for r in ids]
    tokens = np.zeros((len(rows), max(map(len, rows))), np.int32)
    valid = np.zeros(tokens.shape, bool)
    for b, r in enumerate(rows):
      tokens[b, :len(r)], valid[b, :len(r)] = r, True
    return tokens, valid


def _device(ctx: Mapping[str, Any]) -> dict[str, jax.Array]:
  return {k: jnp.asarray(v) for k, v in ctx.items()}
