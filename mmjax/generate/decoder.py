"""Sampling from the mixed-modal decoder: KV cache, modality state machine, classifier-free guidance.

One jitted program per (batch, prompt length, new tokens) shape: a prefill of the (left-padded)
prompts writes the KV cache, then `lax.scan` decodes a fixed number of steps, one token per row.

State machine (Chameleon inference, specs/mixed_modal.md), per row:
  text mode:  text ids, EOS, and begin-image if at least image_tokens + 2 slots remain;
  image mode: exactly `image_tokens` image codes after begin-image, then end-image is forced;
  done:       after EOS only EOS is emitted.
Guidance: the batch holds C copies of each prompt (copy-major: rows [c·B, (c+1)·B)); the logits of
the copies are mixed with weights summing to 1 and the token sampled for the mix is fed to every
copy. `two_way(s)` = uncond + s(cond − uncond); `three_way(a, b)` = uncond + a(img − uncond) +
b(full − img), copies (full, image-only, unconditional). `guidance_prompts` builds the copies.
Bidirectional image blocks (`TokenLayout.image_blocks`, a model trained with
`sequences.image_blocks_bidirectional`): each prompt image's codes form one block, as in training;
such a model cannot sample image codes (they had loss weight 0), so it never starts or continues
an image.
MoMa decodes with its auxiliary routers and MoE without capacity drops (`causal=True`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

TEXT, IMAGE, DONE = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class TokenLayout:
  """The ids the state machine needs (from `mmjax.data.sequences.documents.SharedVocab`)."""
  vocab_size: int
  text_first: int            # text ids [text_first, text_end) may be sampled in text mode
  text_end: int
  image_first: int           # the image modality's codes [image_first, image_end)
  image_end: int
  begin_image: int
  end_image: int
  eos: int
  image_tokens: int          # codes per image (grid rows x cols)
  modality_table: tuple[int, ...]  # modality id of every global id
  image_blocks: bool = False  # trained with bidirectional image blocks: prompt images are blocks
  code_ranges: tuple[tuple[int, int], ...] = ()  # [first, end) of every image modality's codes;
                                                 # () = (image_first, image_end) only

  @classmethod
  def from_vocab(cls, vocab, registry, image: str, text_first: int = 4,
                 image_blocks: bool = False) -> "TokenLayout":
    """`text_first` skips the text tokenizer's PAD/UNK/BOS/EOS (documents use the global ones)."""
    offset = vocab.offset(image)
    ranges = tuple((int(o), int(o + n)) for o, n in zip(vocab.image_offsets, vocab.image_sizes))
    return cls(vocab_size=vocab.size, text_first=text_first, text_end=vocab.text_size,
               image_first=offset, image_end=offset + vocab.local_size(image),
               begin_image=vocab.begin_image(image), end_image=vocab.end_image(image),
               eos=vocab.eos, image_tokens=registry[image].num_tokens,
               modality_table=tuple(int(m) for m in vocab.modality_table),
               image_blocks=image_blocks, code_ranges=ranges)


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  temperature: float = 1.0   # 0: greedy
  top_k: int = 0             # 0: off
  top_p: float = 1.0         # 1: off
  guidance: tuple[float, ...] = (1.0,)  # weights of the prompt copies; sum to 1


def two_way(scale: float) -> tuple[float, float]:
  """Copies (conditional, unconditional): uncond + s·(cond − uncond)."""
  return (scale, 1.0 - scale)


def three_way(a: float, b: float) -> tuple[float, float, float]:
  """Copies (full, image-only, unconditional): uncond + a(img − uncond) + b(full − img)."""
  return (b, a - b, 1.0 - a)


def guidance_prompts(prefix: Sequence[int], conditions: Sequence[tuple[str, Sequence[int]]],
                     start: Sequence[int], copies: int) -> list[list[int]]:
  """The prompt of each guidance copy, in the order `two_way` / `three_way` weight them.

  A prompt is `prefix` (BOS), the conditions in document order ((kind, ids), kind "text" or
  "image", an image with its begin/end ids), then `start` (where the target begins, e.g. its
  begin-image). copies 1: (full); 2: (full, unconditional); 3: (full, image-only, unconditional).
  A dropped condition is removed whole, so every copy ends in the same sampler state.
  """
  kinds = [kind for kind, _ in conditions]
  if any(k not in ("text", "image") for k in kinds):
    raise ValueError(f"condition kinds must be 'text' or 'image', got {kinds}")
  if copies == 3 and not ("text" in kinds and "image" in kinds):
    raise ValueError(f"three-way guidance needs a text and an image condition, got {kinds}")
  if copies not in (1, 2, 3):
    raise ValueError(f"guidance has 1, 2 or 3 copies, got {copies}")
  keep = {1: [("text", "image")], 2: [("text", "image"), ()],
          3: [("text", "image"), ("image",), ()]}[copies]
  return [[*prefix, *(t for kind, ids in conditions if kind in kept for t in ids), *start]
          for kept in keep]


def allowed_tokens(state_B: jax.Array, count_B: jax.Array, remaining_B: jax.Array,
                   layout: TokenLayout) -> jax.Array:
  """Boolean [B, V]: the ids each row may emit next."""
  ids = jnp.arange(layout.vocab_size)
  text = (ids >= layout.text_first) & (ids < layout.text_end)
  codes = (ids >= layout.image_first) & (ids < layout.image_end)
  text_mode = text[None] | (ids == layout.eos)[None] | (
      (ids == layout.begin_image)[None] & (remaining_B >= layout.image_tokens + 2)[:, None])
  image_mode = jnp.where((count_B < layout.image_tokens)[:, None], codes[None],
                         (ids == layout.end_image)[None])
  done_mode = jnp.broadcast_to((ids == layout.eos)[None], text_mode.shape)
  state = state_B[:, None]
  return jnp.where(state == TEXT, text_mode, jnp.where(state == IMAGE, image_mode, done_mode))


def next_state(state_B, count_B, token_B, layout: TokenLayout):
  in_image = state_B == IMAGE
  state = jnp.where((state_B == TEXT) & (token_B == layout.begin_image), IMAGE, state_B)
  state = jnp.where(in_image & (token_B == layout.end_image), TEXT, state)
  state = jnp.where(token_B == layout.eos, DONE, state)
  count = jnp.where(state == IMAGE, jnp.where(in_image, count_B + 1, 0), 0)
  return state, count


def sample_logits(key: jax.Array, logits_BV: jax.Array, sample: SampleConfig) -> jax.Array:
  """Temperature, top-k and top-p (nucleus) sampling; disallowed ids must already be -inf."""
  if sample.temperature <= 0:
    return jnp.argmax(logits_BV, axis=-1)
  logits = logits_BV / sample.temperature
  if sample.top_k > 0:
    kth = jax.lax.top_k(logits, sample.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sample.top_p < 1.0:
    sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely ids
    keep = before < sample.top_p                 # the most likely id is always kept
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1)


def prompt_state(tokens: Sequence[int], layout: TokenLayout) -> tuple[int, int]:
  """(state, image codes so far) after a prompt, e.g. IMAGE with 0 codes after a begin-image."""
  state, count = TEXT, 0
  for t in tokens:
    if t == layout.eos:
      state, count = DONE, 0
    elif state == TEXT and t == layout.begin_image:
      state, count = IMAGE, 0
    elif state == IMAGE and t == layout.end_image:
      state, count = TEXT, 0
    elif state == IMAGE:
      count += 1
  return state, count


def image_block_ids(tokens: np.ndarray, layout: TokenLayout) -> np.ndarray:
  """Block ids as training gives them with bidirectional image blocks (data.sequences.documents): each
  run of image codes (one image, between its begin and end ids) is a block 1, 2, ...; the rest 0."""
  ranges = layout.code_ranges or ((layout.image_first, layout.image_end),)
  code = np.zeros(len(tokens), bool)
  for first, end in ranges:
    code |= (tokens >= first) & (tokens < end)
  starts = code & ~np.concatenate([[False], code[:-1]])
  return np.where(code, np.cumsum(starts), 0).astype(np.int32)


def build_prompts(prompts: Sequence[Sequence[int]], layout: TokenLayout) -> dict[str, np.ndarray]:
  """Left-padded prompt fields (padding: segment 0) plus the state machine's start per row."""
  length = max(len(p) for p in prompts)
  table = np.asarray(layout.modality_table, np.int32)
  out = {k: np.zeros((len(prompts), length), np.int32)
         for k in ("tokens", "modality", "segment", "block", "position")}
  state, count = np.zeros(len(prompts), np.int32), np.zeros(len(prompts), np.int32)
  for i, p in enumerate(prompts):
    p = np.asarray(p, np.int32)
    pad = length - len(p)
    out["tokens"][i, pad:] = p
    out["modality"][i, pad:] = table[p]
    out["segment"][i, pad:] = 1
    out["position"][i, pad:] = np.arange(len(p))
    if layout.image_blocks:
      out["block"][i, pad:] = image_block_ids(p, layout)
    state[i], count[i] = prompt_state(p.tolist(), layout)
  out["state"], out["count"] = state, count
  return out


@functools.partial(jax.jit, static_argnames=("graphdef", "layout", "sample", "new_tokens",
                                              "return_logits"))
def _generate(graphdef, state, prompt: dict, key: jax.Array, weights: jax.Array, *,
              layout: TokenLayout, sample: SampleConfig, new_tokens: int,
              return_logits: bool = False):
  # The guidance weights are traced (`sample.guidance` only gives their count): changing the
  # scales reuses the compiled program.
  model = nnx.merge(graphdef, state)
  rows, length = prompt["tokens"].shape
  copies = weights.shape[0]
  b = rows // copies
  table = jnp.asarray(layout.modality_table, jnp.int32)
  fields = {k: prompt[k] for k in ("tokens", "modality", "segment", "block", "position")}
  cache = model.init_cache(rows, length + new_tokens)
  logits, _, cache = model(fields, cache=cache, cache_index=0, causal=True)
  last_BV = logits[:, -1]
  max_slots = length + new_tokens

  def mix(logits_RV):  # guidance: one distribution per group of copies
    return jnp.einsum("c,cbv->bv", weights, logits_RV.reshape(copies, b, -1))

  def step(carry, i):
    cache, last, st, cnt, pos, key = carry
    key, sub = jax.random.split(key)
    remaining = max_slots - (length + i)
    allowed = allowed_tokens(st, cnt, jnp.full((b,), remaining), layout)
    mixed = jnp.where(allowed, mix(last), -jnp.inf)
    token_B = sample_logits(sub, mixed, sample).astype(jnp.int32)
    st, cnt = next_state(st, cnt, token_B, layout)
    token_R = jnp.tile(token_B, copies)
    # Sampled tokens are causal (block 0): image codes are never sampled with image blocks.
    step_fields = dict(tokens=token_R[:, None], modality=table[token_R][:, None],
                       segment=jnp.ones((rows, 1), jnp.int32), block=jnp.zeros((rows, 1), jnp.int32),
                       position=pos[:, None])
    logits, _, cache = model(step_fields, cache=cache, cache_index=length + i, causal=True)
    out = (token_B, mixed if return_logits else None)
    return (cache, logits[:, 0], st, cnt, pos + 1, key), out

  pos0 = prompt["position"][:, -1] + 1
  carry = (cache, last_BV, prompt["state"][:b], prompt["count"][:b], pos0, key)
  _, (tokens_TB, logits_TBV) = jax.lax.scan(step, carry, jnp.arange(new_tokens))
  tokens = tokens_TB.T
  return (tokens, jnp.swapaxes(logits_TBV, 0, 1)) if return_logits else tokens


def without_image_sampling(batch: dict, layout: TokenLayout) -> TokenLayout:
  """With image blocks: ValueError if a prompt ends inside an image, else a layout that never
  starts one (the model never learned to predict codes)."""
  if not layout.image_blocks:
    return layout
  if np.any(batch["state"] == IMAGE):
    raise ValueError("a model trained with bidirectional image blocks cannot sample image codes "
                     "(they had loss weight 0); a prompt ends inside an image")
  return dataclasses.replace(layout, begin_image=-1)


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], layout: TokenLayout, *,
             new_tokens: int, sample: SampleConfig = SampleConfig(), seed: int = 0,
             return_logits: bool = False):
  """Samples `new_tokens` ids after each prompt. With guidance of C copies, `prompts` holds C·B
  prompts, copy-major; the result has B rows. Returns tokens [B, new_tokens] (and the mixed,
  masked logits [B, new_tokens, V] before temperature with `return_logits`)."""
  copies = len(sample.guidance)
  if len(prompts) % copies:
    raise ValueError(f"{len(prompts)} prompts do not split into {copies} guidance copies")
  if abs(sum(sample.guidance) - 1.0) > 1e-6:
    raise ValueError(f"guidance weights must sum to 1, got {sample.guidance}")
  batch = build_prompts(prompts, layout)
  # Every copy of a prompt must leave the state machine where the first copy does: one token is
  # sampled for all of them.
  per_copy = np.stack([batch["state"], batch["count"]]).reshape(2, copies, -1)
  if np.any(per_copy != per_copy[:, :1]):
    raise ValueError("the guidance copies of a prompt end in different sampler states "
                     f"(state, codes so far per copy: {per_copy.transpose(2, 1, 0).tolist()})")
  layout = without_image_sampling(batch, layout)
  graphdef, state = nnx.split(model)
  static = dataclasses.replace(sample, guidance=(0.0,) * copies)
  out = _generate(graphdef, state, {k: jnp.asarray(v) for k, v in batch.items()},
                  jax.random.key(seed), jnp.asarray(sample.guidance, jnp.float32), layout=layout,
                  sample=static, new_tokens=new_tokens, return_logits=return_logits)
  return jax.tree.map(np.asarray, out)
