"""The chunked decoder loss equals the loss over whole [B, L, V] logits, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import decoder_loss as dl
from mmjax.models.configs import DecoderConfig


@pytest.mark.parametrize("spec", ["bld,dv->blv", "bld,vd->blv"])  # untied head, tied embedding
def test_chunked_cross_entropy_and_z_loss_equal_the_dense_ones(spec):
  b, l, d, v = 2, 11, 16, 300  # 11 positions in chunks of 4: the last chunk is padded
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (b, l, d))
  w = jax.random.normal(keys[1], (d, v) if spec.endswith("dv->blv") else (v, d))
  targets = jax.random.randint(keys[2], (b, l), 0, v)
  segment = jnp.asarray([[1] * 6 + [2] * 5, [1] * 8 + [0] * 3], jnp.int32)
  batch = dict(targets=targets, segment=segment,
               modality=jax.random.randint(keys[3], (b, l), 0, 2),
               loss_weight=(segment > 0).astype(jnp.float32))
  cfg = DecoderConfig(z_loss=1e-2, loss_weights=(("text", 2.0),))

  def dense(x, w):
    stats = dl.token_stats(jnp.einsum(spec, x, w), targets)
    return dl.decoder_loss(stats, batch, {}, cfg, ("text", "image"))

  def chunked(x, w):
    stats = dl.chunked_token_stats(x, w, spec, targets, jnp.float32, chunk=4)
    return dl.decoder_loss(stats, batch, {}, cfg, ("text", "image"))

  (loss, metrics), grads = jax.value_and_grad(dense, argnums=(0, 1), has_aux=True)(x, w)
  (loss_c, metrics_c), grads_c = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1),
                                                            has_aux=True))(x, w)
  assert float(metrics["z_loss"]) > 0
  for key in ("loss", "ce", "z_loss", "loss/text", "accuracy/image", "logz/text"):
    np.testing.assert_allclose(metrics_c[key], metrics[key], rtol=1e-5, atol=1e-7)
  for got, want in zip(grads_c, grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_the_chunked_loss_holds_no_whole_logits():
  """Compiled temporaries of the loss's gradient: the chunked form keeps one chunk of logits."""
  b, l, d, v = 2, 512, 64, 8192
  x = jax.ShapeDtypeStruct((b, l, d), jnp.float32)
  w = jax.ShapeDtypeStruct((d, v), jnp.float32)
  targets = jnp.zeros((b, l), jnp.int32)

  def temp_bytes(stats_fn):
    loss = lambda x, w: jnp.sum(stats_fn(x, w).logz_BL)  # noqa: E731
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  dense = temp_bytes(lambda x, w: dl.token_stats(jnp.einsum("bld,dv->blv", x, w), targets))
  chunked = temp_bytes(lambda x, w: dl.chunked_token_stats(x, w, "bld,dv->blv", targets,
                                                           jnp.float32, chunk=64))
  logits_bytes = b * l * v * 4
  assert dense >= logits_bytes and chunked < dense / 4  # measured: 64.0 MiB -> 10.5 MiB
