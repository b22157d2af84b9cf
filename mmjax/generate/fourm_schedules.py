"""Schedules and sampling rules of the 4M samplers (specs/fourm.md, "Generation").

Token schedules (host, numpy): how many of a row's masked tokens each MaskGIT / ROAR step fixes.
  cosine: after step k of S, a fraction cos(pi/2 * k/S) of the tokens is still masked (MaskGIT);
  linear: the same number every step.
Every step fixes at least one token while tokens remain, and the last step fixes the rest.

Temperature schedules (per step, for S steps):
  constant          T every step;
  linear            T * (1 - k/S): falls towards 0 as the tokens run out;
  onex:MIN:POWER    a one-over-x decay from T down to MIN: x runs over 1..100, t = x^-POWER is
                    rescaled to [MIN, T].
Filtering: top-k (0 = off) keeps the k largest logits, top-p (1 = off) the smallest set of tokens
whose probability reaches p; a temperature of 0 is greedy (argmax).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.config import ConfigError

TOKEN_SCHEDULES = ("cosine", "linear")
NEG = float(np.finfo(np.float32).min)


def token_schedule(kind: str, total_B: np.ndarray, steps: int) -> np.ndarray:
  """int32 [B, S]: tokens to fix at each step for rows with `total_B` masked tokens."""
  if kind not in TOKEN_SCHEDULES:
    raise ConfigError(f"generate.token_schedule must be one of {TOKEN_SCHEDULES}, got {kind!r}")
  if steps < 1:
    raise ConfigError(f"generate: steps must be >= 1, got {steps}")
  total = np.asarray(total_B, np.int64)[:, None]
  k = np.arange(1, steps + 1, dtype=np.float64)[None, :]
  if kind == "cosine":
    done = total - np.floor(total * np.cos(np.pi / 2 * k / steps))
  else:
    done = np.round(total * k / steps)
  # At least one token per step while any remain; everything fixed by the last step.
  done = np.minimum(np.maximum(done, np.minimum(k, total)), total)
  done = np.maximum.accumulate(done, axis=1)
  done[:, -1] = total[:, 0]
  return np.diff(np.concatenate([np.zeros_like(total), done], axis=1), axis=1).astype(np.int32)


def temperature_schedule(spec: str, temperature: float, steps: int) -> np.ndarray:
  """float32 [S]: the temperature of each step."""
  if temperature < 0:
    raise ConfigError(f"generate.temperature must be >= 0, got {temperature}")
  kind, *args = str(spec).split(":")
  k = np.arange(steps, dtype=np.float64)
  if kind == "constant" and not args:
    out = np.full(steps, temperature)
  elif kind == "linear" and not args:
    out = temperature * (1.0 - k / steps)
  elif kind == "onex" and len(args) == 2:
    try:
      low, power = float(args[0]), float(args[1])
    except ValueError:
      raise ConfigError(f"generate.temperature_schedule {spec!r}: onex:MIN:POWER takes two "
                        f"numbers") from None
    x = np.linspace(1.0, 100.0, steps) if steps > 1 else np.ones(1)
    t = x ** -power
    span = t[0] - t[-1]
    unit = (t - t[-1]) / span if span > 0 else np.ones_like(t)
    out = low + (temperature - low) * unit
  else:
    raise ConfigError(f"generate.temperature_schedule must be 'constant', 'linear' or "
                      f"'onex:MIN:POWER', got {spec!r}")
  return out.astype(np.float32)


def filter_logits(logits_BV: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Logits outside the top-k / top-p set set to the most negative finite value."""
  if top_k and top_k < logits_BV.shape[-1]:
    kth = jax.lax.top_k(logits_BV, top_k)[0][..., -1:]
    logits_BV = jnp.where(logits_BV < kth, NEG, logits_BV)
  if top_p < 1.0:
    sorted_desc = -jnp.sort(-logits_BV, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    keep = before < top_p                        # always keeps the most likely token
    cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < cutoff, NEG, logits_BV)
  return logits_BV


def sample(rng: jax.Array, logits_BV: jax.Array, temperature: jax.Array, top_k: int,
           top_p: float) -> jax.Array:
  """int32 ids: argmax at temperature 0, else a draw from softmax(filtered logits / T)."""
  logits_BV = filter_logits(logits_BV.astype(jnp.float32), top_k, top_p)
  greedy = jnp.argmax(logits_BV, axis=-1)
  t = jnp.maximum(temperature, 1e-6)
  drawn = jax.random.categorical(rng, logits_BV / t, axis=-1)
  return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)
