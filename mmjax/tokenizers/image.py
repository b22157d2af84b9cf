"""Image-like tokenizers: ViT encoder -> quantizer (VQ or FSQ) -> ViT decoder, one per modality.

A 64x64 image becomes an 8x8 grid of code ids (downsampling 8, configurable). The modality fixes the
input/output handling and the reconstruction loss:

  rgb     uint8 [B, S, S, 3]  x / 127.5 - 1; 3 output channels; MSE.
  depth   float [B, S, S]     log-depth mapped affinely from [depth_min, depth_max] to [-1, 1];
                              1 output channel; smooth-L1. In log space an error is a relative error
                              (what abs-rel measures), alike for near and far objects.
  semseg  uint8 [B, S, S]     one-hot of num_classes classes (as +-1); num_classes logits;
                              cross-entropy.

`tokenize(images) -> ids [B, h*w]` (row-major grid) and `detokenize(ids) -> images` in the raw
format (uint8 rgb, float32 depth, uint8 class map) are jit-compiled (one compile per batch shape).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmjax.config import ConfigError
from mmjax.errors import UserError
from mmjax.tokenizers import quantizers

Array = jax.Array
MODALITIES = ("rgb", "depth", "semseg")
# Logical axis names of the tokenizer's parameters; the tokenizer configs map them (to replicated).
LOGICAL_RULES = (("patch", None), ("codes", None), ("code_dim", None))


@dataclasses.dataclass(frozen=True)
class ImageTokenizerConfig:
  """An image-like tokenizer (the `model` section of configs/tokenizers/shapes_*.py)."""
  modality: str = "rgb"             # "rgb", "depth" or "semseg": input/output handling and loss
  image_size: int = 64              # side of the square input
  num_classes: int = 6              # semseg: classes, background included
  patch_size: int = 8               # downsampling factor: one token per patch_size^2 pixels
  width: int = 256                  # ViT width of encoder and decoder
  num_heads: int = 4
  encoder_layers: int = 4
  decoder_layers: int = 4
  quantizer: str = "vq"             # "vq" (EMA, cosine codebook) or "fsq"
  codebook_size: int = 1024         # vq: number of codes (fsq: prod(fsq_levels))
  code_dim: int = 32                # vq: dimension of the codes (fsq: len(fsq_levels))
  fsq_levels: tuple[int, ...] = (8, 5, 5, 5)
  ema_decay: float = 0.99           # vq: codebook EMA decay
  commitment_weight: float = 1.0    # vq: weight of the commitment loss
  dead_threshold: float = 0.03      # vq: a code is dead below this fraction of the mean usage
  code_norm: bool = True            # LayerNorm on the decoder's code embedding (see Decoder)
  local_codes: bool = False         # encoder reads one patch at a time (no attention, no
                                    # positions): a code means the same content anywhere (Encoder)
  depth_min: float = 0.5            # depth: log-normalisation range (metres of the shapes world)
  depth_max: float = 16.0
  smooth_l1_beta: float = 0.05      # depth: quadratic below this error (in normalised units)
  class_balance: float = 0.0        # semseg: pixels weighted by their class's batch frequency to
                                    # the power -class_balance (0: plain cross-entropy)
  dtype: str = "float32"            # compute dtype

  def __post_init__(self):
    if self.modality not in MODALITIES:
      raise ConfigError(f"model.modality must be one of {MODALITIES}, got {self.modality!r}")
    if self.patch_size < 1 or self.image_size % self.patch_size:
      raise ConfigError(f"model.image_size ({self.image_size}) must be divisible by "
                        f"model.patch_size ({self.patch_size})")
    if self.width % self.num_heads or self.width % 4:
      raise ConfigError(f"model.width ({self.width}) must be divisible by 4 and by "
                        f"model.num_heads ({self.num_heads})")
    if self.quantizer == "fsq" and self.code_dim != len(self.fsq_levels):
      object.__setattr__(self, "code_dim", len(self.fsq_levels))
    if self.quantizer == "fsq":
      object.__setattr__(self, "codebook_size", math.prod(self.fsq_levels))
    if not 0 < self.depth_min < self.depth_max:
      raise ConfigError(f"model.depth_min ({self.depth_min}) and model.depth_max "
                        f"({self.depth_max}) must satisfy 0 < depth_min < depth_max")

  @property
  def downsample(self) -> int:
    return self.patch_size

  @property
  def grid(self) -> tuple[int, int]:
    side = self.image_size // self.downsample
    return side, side

  @property
  def in_channels(self) -> int:
    return {"rgb": 3, "depth": 1, "semseg": self.num_classes}[self.modality]

  @property
  def out_channels(self) -> int:
    return self.in_channels


# ---------------------------------------------------------------------------------------- layers --


def _linear(din: int, dout: int, names: tuple[str | None, str | None], *, rngs: nnx.Rngs,
            dtype, use_bias: bool = True, zero: bool = False) -> nnx.Linear:
  init = nnx.initializers.zeros_init() if zero else nnx.initializers.xavier_uniform()
  return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, kernel_init=init, rngs=rngs,
                    kernel_metadata={"out_sharding": names, "eager_sharding": False},
                    bias_metadata={"out_sharding": names[1:], "eager_sharding": False})


def _layernorm(dim: int, *, rngs: nnx.Rngs, dtype) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=1e-6, dtype=dtype, rngs=rngs,
                       scale_metadata={"out_sharding": ("embed",), "eager_sharding": False},
                       bias_metadata={"out_sharding": ("embed",), "eager_sharding": False})


def sincos_2d(h: int, w: int, dim: int) -> np.ndarray:
  """Fixed 2D sin-cos positions [h*w, dim]: [sin(rw), cos(rw), sin(cw), cos(cw)] (4M's layout)."""
  omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4))
  r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  r, c = r.reshape(-1, 1) * omega, c.reshape(-1, 1) * omega
  return np.concatenate([np.sin(r), np.cos(r), np.sin(c), np.cos(c)], axis=1).astype(np.float32)


class Block(nnx.Module):
  """Pre-norm transformer block: x += attn(norm(x)); x += mlp(norm(x)); bidirectional attention.
  Without `attention`, the MLP alone: each token is transformed on its own."""

  def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, dtype, attention: bool = True):
    self.heads = heads
    self.attention = attention
    if attention:
      self.norm1 = _layernorm(dim, rngs=rngs, dtype=dtype)
      self.qkv = _linear(dim, 3 * dim, ("embed", "heads"), rngs=rngs, dtype=dtype)
      self.proj = _linear(dim, dim, ("heads", "embed"), rngs=rngs, dtype=dtype)
    self.norm2 = _layernorm(dim, rngs=rngs, dtype=dtype)
    self.fc1 = _linear(dim, 4 * dim, ("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.fc2 = _linear(4 * dim, dim, ("mlp", "embed"), rngs=rngs, dtype=dtype)

  def __call__(self, x_BLD: Array) -> Array:
    if self.attention:
      x_BLD = self._attend(x_BLD)
    return x_BLD + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x_BLD))))

  def _attend(self, x_BLD: Array) -> Array:
    b, l, d = x_BLD.shape
    qkv = self.qkv(self.norm1(x_BLD)).reshape(b, l, 3, self.heads, d // self.heads)
    q_BLHK, k_BLHK, v_BLHK = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits_BHLL = jnp.einsum("blhk,bmhk->bhlm", q_BLHK, k_BLHK) / math.sqrt(d // self.heads)
    attn_BHLL = jax.nn.softmax(logits_BHLL.astype(jnp.float32), axis=-1).astype(x_BLD.dtype)
    o_BLD = jnp.einsum("bhlm,bmhk->blhk", attn_BHLL, v_BLHK).reshape(b, l, d)
    return x_BLD + self.proj(o_BLD)


def patchify(x_BHWC: Array, p: int) -> Array:
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], patches row-major, (row, col, channel) inside."""
  b, h, w, c = x_BHWC.shape
  x = x_BHWC.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x_BLP: Array, h: int, w: int, p: int) -> Array:
  """Inverse of patchify for a [h, w] grid of patches."""
  b = x_BLP.shape[0]
  c = x_BLP.shape[-1] // (p * p)
  x = x_BLP.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * p, w * p, c)


class Encoder(nnx.Module):
  """ViT: patches -> linear + 2D sin-cos -> blocks -> norm -> linear to code_dim.

  With `local_codes`, no positions and no attention: each patch's code is a function of that
  patch alone, as a convolutional encoder's is of its receptive field. Why: with the ViT encoder
  the code of a patch also depends on where it is and on the rest of the scene, so a model
  predicting tokens must learn one mapping per position. Measured on the demo's semseg tokens
  (1000 steps, 400 scenes): the all-background patch took 84 different codes (the commonest 5%),
  and the code given the exact 8x8 label patch still had 3.6 nats of entropy."""

  def __init__(self, cfg: ImageTokenizerConfig, *, rngs: nnx.Rngs, dtype):
    p, d = cfg.downsample, cfg.width
    self.patch = cfg.downsample
    self.positions = not cfg.local_codes
    self.embed = _linear(p * p * cfg.in_channels, d, ("patch", "embed"), rngs=rngs, dtype=dtype)
    self.blocks = nnx.List([Block(d, cfg.num_heads, rngs=rngs, dtype=dtype,
                                  attention=not cfg.local_codes)
                            for _ in range(cfg.encoder_layers)])
    self.norm = _layernorm(d, rngs=rngs, dtype=dtype)
    self.out = _linear(d, cfg.code_dim, ("embed", "code_dim"), rngs=rngs, dtype=dtype)

  def __call__(self, x_BHWC: Array) -> Array:
    b, h, w, _ = x_BHWC.shape
    x = self.embed(patchify(x_BHWC, self.patch))
    if self.positions:
      x = x + sincos_2d(h // self.patch, w // self.patch, self.embed.out_features)
    for block in self.blocks:
      x = block(x)
    z_BLD = self.out(self.norm(x))
    return z_BLD.reshape(b, h // self.patch, w // self.patch, -1)


class Decoder(nnx.Module):
  """ViT: linear from code_dim + 2D sin-cos -> blocks -> norm -> linear to pixels of each patch."""

  def __init__(self, cfg: ImageTokenizerConfig, *, rngs: nnx.Rngs, dtype):
    p, d = cfg.downsample, cfg.width
    self.patch = p
    self.embed = _linear(cfg.code_dim, d, ("code_dim", "embed"), rngs=rngs, dtype=dtype)
    # A low-dimensional unit code embeds with a std of ~0.1 per channel, the fixed positions with
    # ~0.7: without a norm the decoder first learns a position-only mean image and only slowly
    # starts reading the codes.
    self.code_norm = _layernorm(d, rngs=rngs, dtype=dtype) if cfg.code_norm else None
    self.blocks = nnx.List([Block(d, cfg.num_heads, rngs=rngs, dtype=dtype)
                            for _ in range(cfg.decoder_layers)])
    self.norm = _layernorm(d, rngs=rngs, dtype=dtype)
    self.out = _linear(d, p * p * cfg.out_channels, ("embed", "patch"), rngs=rngs, dtype=dtype)

  def __call__(self, z_BhwD: Array) -> Array:
    b, h, w, _ = z_BhwD.shape
    pos_LD = sincos_2d(h, w, self.embed.out_features)  # a constant: fixed positions
    x = self.embed(z_BhwD.reshape(b, h * w, -1))
    if self.code_norm is not None:
      x = self.code_norm(x)
    x = x + pos_LD
    for block in self.blocks:
      x = block(x)
    return unpatchify(self.out(self.norm(x)), h, w, self.patch).astype(jnp.float32)


def semseg_pixel_weights(labels: Array, num_classes: int, balance: float) -> Array:
  """Weights of the pixels of a batch of class maps: frequency of the pixel's class ** -balance.

  Background covers most pixels; plain cross-entropy (balance 0) first learns to predict it
  everywhere and reaches small shapes late. Balance 0.5 (inverse square root of frequency) makes
  shape pixels count more without making rare classes dominate. Not differentiated.
  """
  if balance == 0.0:
    return jnp.ones(labels.shape, jnp.float32)
  freq_C = jnp.bincount(labels.reshape(-1), length=num_classes) / labels.size
  weight_C = jnp.where(freq_C > 0, jnp.maximum(freq_C, 1e-6) ** -balance, 0.0)
  return jax.lax.stop_gradient(weight_C[labels])


# ------------------------------------------------------------------------------------- tokenizer --


@functools.partial(jax.jit, static_argnums=(0, 2))
def _apply(graphdef: nnx.GraphDef, state: nnx.State, method: str, *args: Array):
  """Runs `model.method(*args)` of an inference-mode model under jit."""
  return getattr(nnx.merge(graphdef, state), method)(*args)


class ImageTokenizer(nnx.Module):
  """Encoder -> quantizer -> decoder for one image-like modality (see the module docstring)."""

  def __init__(self, cfg: ImageTokenizerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = jnp.dtype(cfg.dtype)
    self.encoder = Encoder(cfg, rngs=rngs, dtype=dtype)
    self.quantizer = quantizers.make_quantizer(
        cfg.quantizer, codebook_size=cfg.codebook_size, dim=cfg.code_dim,
        fsq_levels=cfg.fsq_levels, decay=cfg.ema_decay, commitment_weight=cfg.commitment_weight,
        dead_threshold=cfg.dead_threshold, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs, dtype=dtype)

  @property
  def grid(self) -> tuple[int, int]:
    return self.cfg.grid

  @property
  def codebook_size(self) -> int:
    return self.quantizer.codebook_size

  # -- raw <-> network space -----------------------------------------------------------------------

  def check_images(self, images, where: str = "images") -> None:
    """UserError naming what is wrong unless `images` is a batch in the modality's raw format."""
    cfg, shape = self.cfg, tuple(np.shape(images))
    s = cfg.image_size
    want = (s, s, 3) if cfg.modality == "rgb" else (s, s)
    if len(shape) != len(want) + 1 or shape[1:] != want:
      raise UserError(f"{where}: {cfg.modality} images must have shape "
                      f"[batch, {', '.join(map(str, want))}], got {list(shape)}")
    dtype = np.dtype(getattr(images, "dtype", None) or np.asarray(images).dtype)
    if cfg.modality in ("rgb", "semseg") and not np.issubdtype(dtype, np.integer):
      raise UserError(f"{where}: {cfg.modality} images must be integers (uint8), got {dtype}")
    if cfg.modality == "depth" and not np.issubdtype(dtype, np.floating):
      raise UserError(f"{where}: depth maps must be floats, got {dtype}")

  def preprocess(self, images: Array) -> Array:
    """Raw images -> network input x [B, S, S, C_in] in about [-1, 1]."""
    cfg = self.cfg
    if cfg.modality == "rgb":
      return images.astype(jnp.float32) / 127.5 - 1.0
    if cfg.modality == "depth":
      return self.normalize_depth(images)[..., None]
    return 2.0 * jax.nn.one_hot(images, cfg.num_classes, dtype=jnp.float32) - 1.0

  def normalize_depth(self, depth: Array) -> Array:
    lo, hi = math.log(self.cfg.depth_min), math.log(self.cfg.depth_max)
    log_d = jnp.log(jnp.clip(depth.astype(jnp.float32), self.cfg.depth_min, self.cfg.depth_max))
    return 2.0 * (log_d - lo) / (hi - lo) - 1.0

  def denormalize_depth(self, x: Array) -> Array:
    lo, hi = math.log(self.cfg.depth_min), math.log(self.cfg.depth_max)
    return jnp.exp((jnp.clip(x, -1.0, 1.0) + 1.0) / 2.0 * (hi - lo) + lo)

  def postprocess(self, out_BHWC: Array) -> Array:
    """Network output -> raw format: uint8 rgb, float32 depth [B, S, S], uint8 classes [B, S, S]."""
    cfg = self.cfg
    if cfg.modality == "rgb":
      return jnp.round(jnp.clip((out_BHWC + 1.0) * 127.5, 0, 255)).astype(jnp.uint8)
    if cfg.modality == "depth":
      return self.denormalize_depth(out_BHWC[..., 0])
    return jnp.argmax(out_BHWC, axis=-1).astype(jnp.uint8)

  # -- forward and loss ----------------------------------------------------------------------------

  def __call__(self, images: Array, *, train: bool = False,
               rng: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """(decoder output [B, S, S, C_out], aux with ids [B, h, w] and the quantizer's terms)."""
    z_BhwD = self.encoder(self.preprocess(images))
    z_q, ids_Bhw, aux = self.quantizer(z_BhwD, train=train, rng=rng)
    return self.decoder(z_q), {**aux, "ids": ids_Bhw}

  def reconstruction_loss(self, out_BHWC: Array, images: Array) -> Array:
    cfg = self.cfg
    if cfg.modality == "rgb":
      return jnp.mean(jnp.square(out_BHWC - self.preprocess(images)))
    if cfg.modality == "depth":
      err = jnp.abs(out_BHWC[..., 0] - self.normalize_depth(images))
      beta = cfg.smooth_l1_beta
      return jnp.mean(jnp.where(err < beta, 0.5 * err * err / beta, err - 0.5 * beta))
    logp = jax.nn.log_softmax(out_BHWC, axis=-1)
    labels = images.astype(jnp.int32)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    weights = semseg_pixel_weights(labels, cfg.num_classes, cfg.class_balance)
    return jnp.sum(weights * nll) / jnp.sum(weights)

  def loss(self, images: Array, *, train: bool = False,
           rng: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """(total loss, metrics): reconstruction + the quantizer's (weighted) commitment term."""
    out, aux = self(images, train=train, rng=rng)
    recon = self.reconstruction_loss(out, images)
    total = recon + aux["loss"]
    metrics = {"loss": total, f"recon_{self.cfg.modality}": recon}
    for key in ("commitment", "restarted"):
      if key in aux:
        metrics[key] = aux[key].astype(jnp.float32)
    return total, metrics

  # -- tokens --------------------------------------------------------------------------------------

  def encode_ids(self, images: Array) -> Array:
    """ids [B, h*w] (int32, row-major grid) of raw images."""
    ids_Bhw = self.quantizer.encode(self.encoder(self.preprocess(images)))
    return ids_Bhw.reshape(ids_Bhw.shape[0], -1)

  def decode_ids(self, ids_BN: Array) -> Array:
    """Raw images of ids [B, h*w]."""
    h, w = self.grid
    codes = self.quantizer.decode_ids(ids_BN.reshape(ids_BN.shape[0], h, w).astype(jnp.int32))
    return self.postprocess(self.decoder(codes))

  def tokenize(self, images) -> Array:
    """ids [B, h*w] int32 of a batch of raw images; jit-compiled."""
    images = images if isinstance(images, jax.Array) else np.asarray(images)
    self.check_images(images)
    graphdef, state = nnx.split(self)
    return _apply(graphdef, state, "encode_ids", jnp.asarray(images))

  def detokenize(self, ids) -> Array:
    """Raw images (uint8 rgb [B,S,S,3], float32 depth [B,S,S], uint8 semseg [B,S,S]); jitted."""
    n = self.grid[0] * self.grid[1]
    ids = np.asarray(ids) if not isinstance(ids, jax.Array) else ids
    if ids.ndim != 2 or ids.shape[1] != n or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise UserError(f"ids must be integers of shape [batch, {n}], got {ids.dtype} "
                      f"{list(ids.shape)}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.codebook_size):
      raise UserError(f"ids must lie in [0, {self.codebook_size}), got values in "
                      f"[{int(ids.min())}, {int(ids.max())}]")
    graphdef, state = nnx.split(self)
    return _apply(graphdef, state, "decode_ids", jnp.asarray(ids, jnp.int32))

  def reconstruct(self, images) -> tuple[Array, Array]:
    """(ids [B, h*w], reconstructed raw images): tokenize then detokenize, one jitted call."""
    images = images if isinstance(images, jax.Array) else np.asarray(images)
    self.check_images(images)
    graphdef, state = nnx.split(self)
    return _apply(graphdef, state, "_roundtrip", jnp.asarray(images))

  def _roundtrip(self, images: Array) -> tuple[Array, Array]:
    ids = self.encode_ids(images)
    return ids, self.decode_ids(ids)


def create_tokenizer(cfg: ImageTokenizerConfig, seed: int = 0) -> ImageTokenizer:
  return ImageTokenizer(cfg, rngs=nnx.Rngs(seed))


def image_fingerprint(tokenizer: ImageTokenizer) -> str:
  """sha256 of an image tokenizer's config and weights (RNG state excluded)."""
  digest = hashlib.sha256(repr(tokenizer.cfg).encode())
  state = nnx.state(tokenizer, nnx.Not(nnx.RngState))
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    a = np.asarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape}".encode())
    digest.update(np.ascontiguousarray(a).tobytes())
  return digest.hexdigest()
