"""Quantizers of image-like tokenizers: VQ with an EMA, cosine-similarity codebook, and FSQ.

Both map continuous vectors `z_...D` to discrete ids and back, with the same interface:

  quantizer(z, train=..., rng=...) -> (z_q, ids, aux)   z_q: z's shape, straight-through gradients
  quantizer.encode(z) -> ids                            ints in [0, codebook_size)
  quantizer.decode_ids(ids) -> codes                    the vectors z_q is made of

`aux` holds `loss` (the quantizer's term of the training loss, already weighted) and scalar stats.

VQ (as 4M's tokenizers, specs/fourm.md): encoder outputs and codes are l2-normalised, so the
lookup is an argmax of cosine similarity. The codebook is not trained by gradients: it follows an
exponential moving average of the (normalised) encoder outputs assigned to each code, updated in
the forward pass in training mode. Its statistics are `CodebookStat` variables (not `nnx.Param`),
so optimizers never touch them and a train step must carry them out of `jit` (split/merge of the
whole model state).
Codes whose EMA usage falls below `dead_threshold` times the mean usage are restarted from encoder
outputs of the current batch, every training step.

FSQ (Mentzer et al. 2023): each of the d channels is bounded to a range with L_i levels by a tanh
and rounded (straight-through); the code of a vector is its mixed-radix number in the levels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax.config import ConfigError

Array = jax.Array


class CodebookStat(nnx.Variable):
  """Codebook state updated in the forward pass (EMA statistics), never by an optimizer."""


def _stat(value: Array, names: tuple[str | None, ...]) -> CodebookStat:
  """A codebook statistic with logical axis names (the trainer shards it after creation)."""
  return CodebookStat(value, out_sharding=names, eager_sharding=False)


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-6) -> Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


def straight_through(x: Array, q: Array) -> Array:
  """Value of `q`, gradient of the identity with respect to `x`."""
  return x + jax.lax.stop_gradient(q - x)


class VectorQuantizer(nnx.Module):
  """VQ with an l2-normalised codebook, cosine lookup, EMA updates and dead-code restarts."""

  def __init__(self, codebook_size: int, dim: int, *, decay: float = 0.99,
               commitment_weight: float = 1.0, dead_threshold: float = 0.03,
               rngs: nnx.Rngs):
    if codebook_size < 2 or dim < 1:
      raise ConfigError(f"VQ needs codebook_size >= 2 and dim >= 1, got {codebook_size}, {dim}")
    if not 0.0 <= decay < 1.0:
      raise ConfigError(f"VQ decay must be in [0, 1), got {decay}")
    self.codebook_size = codebook_size
    self.dim = dim
    self.decay = decay
    self.commitment_weight = commitment_weight
    self.dead_threshold = dead_threshold
    codes_KD = l2_normalize(jax.random.normal(rngs.params(), (codebook_size, dim)))
    # The codebook is always l2_normalize(ema_sum); it is kept to avoid renormalising per lookup.
    self.codebook = _stat(codes_KD, ("codes", "code_dim"))
    self.ema_sum = _stat(codes_KD, ("codes", "code_dim"))
    # Usage 0 at init: every code still unused after the first training step restarts from data.
    self.ema_count = _stat(jnp.zeros((codebook_size,)), ("codes",))

  # -- lookup --------------------------------------------------------------------------------------

  def _nearest(self, z_ND: Array) -> Array:
    sim_NK = z_ND @ self.codebook[...].T  # cosine similarity: both sides are unit vectors
    return jnp.argmax(sim_NK, axis=-1).astype(jnp.int32)

  def encode(self, z: Array) -> Array:
    """ids [...] of the codes most similar (cosine) to z [..., D]."""
    z_ND = l2_normalize(z.reshape(-1, self.dim).astype(jnp.float32))
    return self._nearest(z_ND).reshape(z.shape[:-1])

  def decode_ids(self, ids: Array) -> Array:
    """Unit-norm codes [..., D] of ids [...]."""
    return jnp.take(self.codebook[...], ids, axis=0)

  # -- training-mode state updates -----------------------------------------------------------------

  def update_ema(self, z_ND: Array, ids_N: Array) -> None:
    """EMA of each code's usage and of the sum of the vectors assigned to it; renormalises."""
    onehot_NK = jax.nn.one_hot(ids_N, self.codebook_size, dtype=z_ND.dtype)
    count_K = onehot_NK.sum(0)
    sum_KD = onehot_NK.T @ z_ND
    d = self.decay
    self.ema_count[...] = d * self.ema_count[...] + (1.0 - d) * count_K
    self.ema_sum[...] = d * self.ema_sum[...] + (1.0 - d) * sum_KD
    self.codebook[...] = l2_normalize(self.ema_sum[...])

  def dead_codes(self, num_vectors: int) -> Array:
    """bool [K]: codes whose EMA usage is below dead_threshold times the mean usage N / K."""
    mean_usage = num_vectors / self.codebook_size
    return self.ema_count[...] < self.dead_threshold * mean_usage

  def restart_dead_codes(self, z_ND: Array, rng: Array) -> Array:
    """Re-initialises dead codes from random rows of z_ND (unit vectors); returns the dead mask.

    A restarted code gets the threshold as its EMA count: unless the next batch uses it, it is
    dead again and re-drawn, so unused codes keep sampling the data until they catch some.
    """
    n = z_ND.shape[0]
    dead_K = self.dead_codes(n)
    pick_K = jax.random.randint(rng, (self.codebook_size,), 0, n)
    fresh_KD = jnp.take(z_ND, pick_K, axis=0)
    reset = self.dead_threshold * n / self.codebook_size
    self.ema_sum[...] = jnp.where(dead_K[:, None], fresh_KD * reset, self.ema_sum[...])
    self.ema_count[...] = jnp.where(dead_K, reset, self.ema_count[...])
    self.codebook[...] = jnp.where(dead_K[:, None], fresh_KD, self.codebook[...])
    return dead_K

  # -- forward -------------------------------------------------------------------------------------

  def __call__(self, z: Array, *, train: bool = False,
               rng: Array | None = None) -> tuple[Array, Array, dict[str, Array]]:
    """(z_q, ids, aux) of z [..., D]; in training mode also updates the codebook (needs `rng`)."""
    if z.shape[-1] != self.dim:
      raise ValueError(f"VQ input has {z.shape[-1]} channels, the codebook {self.dim}")
    z_ND = l2_normalize(z.reshape(-1, self.dim).astype(jnp.float32))
    ids_N = self._nearest(z_ND)
    q_ND = self.decode_ids(ids_N)  # the codebook before this step's update
    # Commitment: pull the encoder towards its (fixed) code; the codebook itself learns by EMA.
    commitment = jnp.mean(jnp.square(z_ND - jax.lax.stop_gradient(q_ND)))
    aux = {"loss": self.commitment_weight * commitment, "commitment": commitment}
    if train:
      if rng is None:
        raise ValueError("VQ in training mode needs an rng for dead-code restarts")
      z_sg_ND = jax.lax.stop_gradient(z_ND)
      self.update_ema(z_sg_ND, ids_N)
      aux["restarted"] = self.restart_dead_codes(z_sg_ND, rng).sum()
    z_q = straight_through(z_ND, q_ND).reshape(z.shape).astype(z.dtype)
    return z_q, ids_N.reshape(z.shape[:-1]), aux


class FSQ(nnx.Module):
  """Finite scalar quantization: channel i takes one of levels[i] values in [-1, 1]."""

  def __init__(self, levels: Sequence[int], *, eps: float = 1e-3):
    levels = tuple(int(l) for l in levels)
    if not levels or min(levels) < 2:
      raise ConfigError(f"FSQ levels must be integers >= 2, got {levels}")
    self.levels = levels
    self.dim = len(levels)
    self.codebook_size = math.prod(levels)
    self.eps = eps
    # Mixed radix: id = sum_i digit_i * prod(levels[:i]).
    self._basis = tuple(math.prod(levels[:i]) for i in range(len(levels)))

  def _consts(self) -> tuple[Array, Array, Array]:
    levels_D = jnp.asarray(self.levels, jnp.float32)
    half_D = jnp.floor(levels_D / 2)  # codes are digit - half, scaled by 1 / half
    basis_D = jnp.asarray(self._basis, jnp.int32)
    return levels_D, half_D, basis_D

  def bound(self, z: Array) -> Array:
    """Squashes z [..., D] so that rounding gives exactly levels[i] integers per channel.

    Odd L: tanh * (L - 1) / 2 spans [-(L-1)/2, (L-1)/2]. Even L: the range is shifted by 1/2
    (the tanh argument shifted so that 0 maps to 0 before the shift), giving -L/2 .. L/2 - 1.
    """
    levels_D, _, _ = self._consts()
    half_l_D = (levels_D - 1) * (1 + self.eps) / 2  # a hair wider: L = 2 keeps |shift| finite
    offset_D = jnp.where(levels_D % 2 == 0, 0.5, 0.0)
    shift_D = jnp.arctanh(offset_D / half_l_D)
    return jnp.tanh(z + shift_D) * half_l_D - offset_D

  def _codes_to_ids(self, rounded: Array) -> Array:
    _, half_D, basis_D = self._consts()
    digits = (rounded + half_D).astype(jnp.int32)
    return jnp.sum(digits * basis_D, axis=-1).astype(jnp.int32)

  def encode(self, z: Array) -> Array:
    """ids [...] of z [..., D]."""
    return self._codes_to_ids(jnp.round(self.bound(z.astype(jnp.float32))))

  def decode_ids(self, ids: Array) -> Array:
    """Codes [..., D] in [-1, 1] of ids [...]."""
    levels_D, half_D, basis_D = self._consts()
    digits = (ids[..., None] // basis_D) % levels_D.astype(jnp.int32)
    return (digits.astype(jnp.float32) - half_D) / half_D

  def __call__(self, z: Array, *, train: bool = False,
               rng: Array | None = None) -> tuple[Array, Array, dict[str, Array]]:
    del train, rng  # FSQ has no state and no auxiliary loss
    if z.shape[-1] != self.dim:
      raise ValueError(f"FSQ input has {z.shape[-1]} channels; levels {self.levels} need "
                       f"{self.dim}")
    _, half_D, _ = self._consts()
    bounded = self.bound(z.astype(jnp.float32))
    rounded = straight_through(bounded, jnp.round(bounded))
    z_q = (rounded / half_D).astype(z.dtype)
    ids = self._codes_to_ids(jax.lax.stop_gradient(rounded))
    return z_q, ids, {"loss": jnp.zeros((), jnp.float32)}


def make_quantizer(kind: str, *, codebook_size: int, dim: int, fsq_levels: Sequence[int],
                   decay: float, commitment_weight: float, dead_threshold: float,
                   rngs: nnx.Rngs) -> VectorQuantizer | FSQ:
  """The quantizer named by `kind` ("vq" or "fsq")."""
  if kind == "vq":
    return VectorQuantizer(codebook_size, dim, decay=decay, commitment_weight=commitment_weight,
                           dead_threshold=dead_threshold, rngs=rngs)
  if kind == "fsq":
    return FSQ(fsq_levels)
  raise ConfigError(f"model.quantizer must be 'vq' or 'fsq', got {kind!r}")
