"""`mmjax bench decode`: tokens/s of the decoder sampler with its KV cache against uncached decoding.

The uncached reference recomputes the whole fixed-length buffer at every step; it lives here, not
beside the sampler (`mmjax.generate.decoder`), because only the benchmark uses it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmjax import modalities as mm
from mmjax import progress
from mmjax.data.sequences.documents import SharedVocab
from mmjax.generate.decoder import (SampleConfig, TokenLayout, without_image_sampling,
                                    allowed_tokens, build_prompts, generate, next_state,
                                    sample_logits)
from mmjax.models.configs import model_config
from mmjax.models.decoder import Decoder


# ---------------------------------------------------------------------------------------------
# Uncached reference decoding (benchmark baseline): every step recomputes the whole buffer.


@functools.partial(jax.jit, static_argnames=("graphdef", "layout", "sample", "new_tokens"))
def _generate_uncached(graphdef, state, prompt: dict, key, *, layout: TokenLayout,
                       sample: SampleConfig, new_tokens: int):
  model = nnx.merge(graphdef, state)
  rows, length = prompt["tokens"].shape
  total = length + new_tokens
  table = jnp.asarray(layout.modality_table, jnp.int32)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, new_tokens)))
  fields = {k: pad(prompt[k]) for k in ("tokens", "modality", "segment", "block", "position")}
  generated = prompt["position"][:, -1:] + 1 + jnp.arange(new_tokens, dtype=jnp.int32)
  fields["position"] = jnp.concatenate([prompt["position"], generated], axis=1)

  def step(carry, i):
    fields, st, cnt, key = carry
    key, sub = jax.random.split(key)
    logits, _, _ = model(fields, causal=True)
    last = jax.lax.dynamic_index_in_dim(logits, length + i - 1, axis=1, keepdims=False)
    allowed = allowed_tokens(st, cnt, jnp.full((rows,), total - (length + i)), layout)
    token = sample_logits(sub, jnp.where(allowed, last, -jnp.inf), sample).astype(jnp.int32)
    st, cnt = next_state(st, cnt, token, layout)
    at = (0, length + i)
    fields = dict(fields,
                  tokens=jax.lax.dynamic_update_slice(fields["tokens"], token[:, None], at),
                  modality=jax.lax.dynamic_update_slice(fields["modality"], table[token][:, None], at),
                  segment=jax.lax.dynamic_update_slice(fields["segment"],
                                                       jnp.ones((rows, 1), jnp.int32), at))
    return (fields, st, cnt, key), token

  carry = (fields, prompt["state"], prompt["count"], key)
  _, tokens = jax.lax.scan(step, carry, jnp.arange(new_tokens))
  return tokens.T


def generate_uncached(model: nnx.Module, prompts: Sequence[Sequence[int]], layout: TokenLayout, *,
                      new_tokens: int, sample: SampleConfig = SampleConfig(), seed: int = 0
                      ) -> np.ndarray:
  """`generate` without a KV cache and without guidance (the baseline of the decode benchmark)."""
  batch = build_prompts(prompts, layout)
  layout = without_image_sampling(batch, layout)
  graphdef, state = nnx.split(model)
  return np.asarray(_generate_uncached(graphdef, state, {k: jnp.asarray(v) for k, v in batch.items()},
                                       jax.random.key(seed), layout=layout, sample=sample,
                                       new_tokens=new_tokens))


def timed(fn, *args, repeats: int = 2, **kwargs) -> float:
  """Best wall time of `fn` after one compiling call."""
  jax.block_until_ready(fn(*args, **kwargs))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args, **kwargs))
    best = min(best, time.perf_counter() - start)
  return best


# ---------------------------------------------------------------------------------------------
# `mmjax bench decode`.


def run_bench_decode(config, *, image_grid: tuple[int, int] = (16, 16), batch: int = 1,
                     repeats: int = 2) -> dict:
  """Tokens/s of cached and uncached decoding of one image of `image_grid` codes.

  The prompt is BOS, eight caption ids and begin-image; the sampler then emits grid codes and
  end-image. The image modality's grid is overridden (shapes-tiny has 8×8 = 64; the benchmark
  measures a 16×16 = 256-code image) and model.max_length is raised to fit. Random weights:
  throughput does not depend on them. Uncached decoding recomputes the whole fixed-length buffer
  every step (static shapes), the reference cost that the KV cache removes.
  """
  config = config.copy_and_resolve_references()
  registry = mm.from_config(config.modalities)
  images = [m.name for m in registry if m.kind == mm.IMAGE_TOKENS]
  if not images:
    raise ValueError("bench decode needs an image_tokens modality in config.modalities")
  with config.unlocked():
    config.modalities[images[0]].grid = tuple(image_grid)
  registry = mm.from_config(config.modalities)
  vocab = SharedVocab.from_registry(registry)
  layout = TokenLayout.from_vocab(vocab, registry, images[0])
  prompt = [vocab.bos] + list(range(layout.text_first, layout.text_first + 8)) + [layout.begin_image]
  new_tokens = layout.image_tokens + 1
  with config.unlocked():
    config.model.max_length = max(int(config.model.max_length), len(prompt) + new_tokens)
  cfg = model_config(config)
  model = nnx.jit(lambda: Decoder(cfg, vocab_size=vocab.size, num_modalities=len(registry),
                                  rngs=nnx.Rngs(0)))()
  prompts = [prompt] * batch
  sample = SampleConfig(temperature=1.0, top_k=0)
  with progress.phase(f"bench decode: compiling and timing cached decoding ({new_tokens} tokens)"):
    cached = timed(generate, model, prompts, layout, new_tokens=new_tokens, sample=sample,
                   repeats=repeats)
  with progress.phase("bench decode: compiling and timing uncached decoding"):
    uncached = timed(generate_uncached, model, prompts, layout, new_tokens=new_tokens,
                     sample=sample, repeats=repeats)
  tokens = batch * new_tokens
  return {"bench": "decode", "sparsity": cfg.sparsity, "image_tokens": layout.image_tokens,
          "new_tokens_per_row": new_tokens, "batch": batch, "prompt_length": len(prompt),
          "cached_tokens_per_s": tokens / cached, "uncached_tokens_per_s": tokens / uncached,
          "cached_s": cached, "uncached_s": uncached, "speedup": uncached / cached,
          "backend": jax.default_backend()}
