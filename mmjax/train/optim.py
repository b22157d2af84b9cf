"""Optimizer: AdamW with a learning-rate schedule, a weight-decay mask and global-norm clipping.

Schedules are functions of the 1-based step (the step that is being taken), so that the first
update of a warm-up already has a non-zero rate: `lr(s) = peak * s / warmup` for s <= warmup.
After the warm-up:
  cosine:   peak * (1 + cos(pi * (s - warmup) / (steps - warmup))) / 2, reaching 0 at `steps`;
  wsd:      peak until the last `decay_fraction * steps` steps, then linear to 0 at `steps`;
  rsqrt:    peak * sqrt(warmup / s) (warmup taken as 1 if 0);
  constant: peak.

Weight decay mask: a parameter is decayed iff it is a matrix-like weight. Decided per parameter
by (1) its path: no decay if the last name is `bias` or `scale`, or any name in the path contains
`norm`; and (2) its rank without a stacked-layers axis: the logical axis "layers" (scanned stacks)
does not count, and rank < 2 (biases, norm scales, scalars) is never decayed. Embeddings
and position tables are matrices and are decayed (as in 4M and the Chameleon recipe).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from mmjax.config import ConfigError
from mmjax.sharding import logical_names

SCHEDULES = ("cosine", "wsd", "rsqrt", "constant")


def schedule(train: ml_collections.ConfigDict) -> Callable[[jax.Array], jax.Array]:
  """lr as a function of the 1-based step."""
  kind, peak = train.schedule, float(train.lr)
  steps, warmup = int(train.steps), int(train.warmup_steps)
  if kind not in SCHEDULES:
    raise ConfigError(f"config key 'train.schedule' must be one of {SCHEDULES}, got {kind!r}")
  decay_fraction = float(train.get("decay_fraction", 0.2))
  if kind == "wsd" and not 0.0 <= decay_fraction <= 1.0:
    raise ConfigError(f"config key 'train.decay_fraction' must be in [0, 1], got {decay_fraction}")
  decay_start = steps - int(round(decay_fraction * steps))

  def lr(step: jax.Array) -> jax.Array:
    s = jnp.asarray(step, jnp.float32)
    ramp = s / warmup if warmup > 0 else jnp.ones_like(s)
    if kind == "cosine":
      span = max(steps - warmup, 1)
      frac = jnp.clip((s - warmup) / span, 0.0, 1.0)
      after = 0.5 * (1.0 + jnp.cos(math.pi * frac))
    elif kind == "wsd":
      span = max(steps - decay_start, 1)
      after = jnp.clip((steps - s) / span, 0.0, 1.0)
      after = jnp.where(s <= decay_start, 1.0, after)
    elif kind == "rsqrt":
      after = jnp.sqrt(max(warmup, 1) / jnp.maximum(s, 1.0))
    else:
      after = jnp.ones_like(s)
    return peak * jnp.where(s <= warmup, ramp, after)

  return lr


def _names(path: tuple[Any, ...]) -> list[str]:
  out = []
  for key in path:
    name = getattr(key, "key", None) or getattr(key, "name", None) or getattr(key, "idx", None)
    out.append(str(name if name is not None else key))
  return out


def decays(path_names: list[str], shape: tuple[int, ...],
           logical: tuple[str | None, ...] | None) -> bool:
  """Whether one parameter gets weight decay (see the module docstring)."""
  last = path_names[-1] if path_names else ""
  if last in ("bias", "scale") or any("norm" in n.lower() for n in path_names):
    return False
  rank = len(shape)
  if logical and "layers" in logical:
    rank -= 1
  return rank >= 2


def weight_decay_mask(params: Any) -> Any:
  """A tree like `params` with True where weight decay applies."""

  def one(path, leaf):
    if isinstance(leaf, nnx.Variable):
      return leaf.replace(decays(_names(path), tuple(leaf.get_value().shape), logical_names(leaf)))
    return decays(_names(path), tuple(jnp.shape(leaf)), None)

  return jax.tree_util.tree_map_with_path(one, params,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Clip (if `grad_clip` > 0) then AdamW with the schedule and the weight-decay mask."""
  lr = schedule(train)
  adamw = optax.adamw(lambda count: lr(count + 1), b1=train.b1, b2=train.b2, eps=train.eps,
                      weight_decay=train.weight_decay, mask=weight_decay_mask)
  if train.grad_clip < 0:
    raise ConfigError(f"config key 'train.grad_clip' must be >= 0, got {train.grad_clip}")
  if train.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(train.grad_clip), adamw)
  return adamw
