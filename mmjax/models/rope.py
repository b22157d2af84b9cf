"""Rotary position embeddings with a configurable pair layout (checkpoints differ; specs/mixed_modal.md).

"rotate_half": dimension i pairs with i + K/2 (Llama/HF layout); "interleaved": 2i pairs with 2i+1
(Meta's original layout). Pair i rotates by angle position · theta^(-2i/K).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_angles(position_BL: jax.Array, head_dim: int, theta: float) -> jax.Array:
  """Angles [B, L, K/2] in fp32."""
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  return position_BL.astype(jnp.float32)[..., None] * inv_freq


def apply_rope(x_BLHK: jax.Array, position_BL: jax.Array, *, theta: float, layout: str) -> jax.Array:
  """Rotates q or k [B, L, H, K] by their positions; computed in fp32."""
  k = x_BLHK.shape[-1]
  if k % 2:
    raise ValueError(f"rope needs an even head dimension, got {k}")
  angles = rope_angles(position_BL, k, theta)[:, :, None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x = x_BLHK.astype(jnp.float32)
  if layout == "rotate_half":
    x1, x2 = x[..., : k // 2], x[..., k // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  if layout == "interleaved":
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
  raise ValueError(f"rope layout must be 'rotate_half' or 'interleaved', got {layout!r}")
