"""A tiny 4M setup shared by the 4M tests: every modality kind, small widths."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from mmjax import modalities
from mmjax.models.configs import FourMConfig
from mmjax.models.fourm import FourM
from mmjax.objectives.fourm_synthetic import synthetic_batch

SECTION = dict(
    rgb=dict(kind="image_pixels", image_size=16, patch_size=8),
    tok_a=dict(kind="image_tokens", vocab_size=48, grid=(3, 3)),
    caption=dict(kind="sequence", vocab_size=40, max_length=10),
    glob=dict(kind="image_tokens", vocab_size=24, grid=(1, 4), learned_positions=True),
)


def registry(order=None) -> modalities.Registry:
  names = order or list(SECTION)
  return modalities.from_config({n: SECTION[n] for n in names})


def config(**kw) -> FourMConfig:
  base = dict(d_model=32, num_heads=2, encoder_layers=2, decoder_layers=2, mlp_hidden=64,
              num_input_tokens=12, num_target_tokens=16, head_chunk=8)
  base.update(kw)
  return FourMConfig(**base)


def model(cfg=None, reg=None, seed=0) -> FourM:
  return FourM(cfg or config(), reg or registry(), rngs=nnx.Rngs(seed))


def batch(cfg=None, reg=None, size=4, seed=0) -> dict[str, np.ndarray]:
  cfg = cfg or config()
  return synthetic_batch(reg or registry(), size, cfg.num_input_tokens, cfg.num_target_tokens, seed)


def replace(cfg: FourMConfig, **kw) -> FourMConfig:
  return dataclasses.replace(cfg, **kw)


def split(m: FourM):
  return nnx.split(m)


def tree_allclose(a, b, rtol=1e-5, atol=1e-6) -> None:
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)
