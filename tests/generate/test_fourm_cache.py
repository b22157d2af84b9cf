"""The 4M decoder's K/V-cached decoding equals the full decoder over the same sequence."""

import jax
import jax.numpy as jnp
import numpy as np

from tests.models import fourm_fixtures as fx


def _sequence_batch(model, ids_BT):
  """Encoder: the tok_a grid; decoder: one caption target over every slot, teacher forced."""
  B, T = ids_BT.shape
  reg = model.registry
  g = reg["tok_a"].num_tokens
  rng = np.random.default_rng(3)
  return dict(
      enc_tokens=jnp.asarray(rng.integers(0, 48, (B, g)), jnp.int32),
      enc_modality=jnp.full((B, g), reg.index("tok_a"), jnp.int32),
      enc_positions=jnp.broadcast_to(jnp.arange(g, dtype=jnp.int32), (B, g)),
      enc_valid=jnp.asarray(rng.random((B, g)) < 0.7).at[:, 0].set(True),
      enc_pixels=jnp.zeros((B, reg["rgb"].num_tokens, reg["rgb"].patch_dim), jnp.float32),
      dec_tokens=jnp.asarray(ids_BT, jnp.int32),
      dec_modality=jnp.full((B, T), reg.index("caption"), jnp.int32),
      dec_positions=jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
      dec_valid=jnp.ones((B, T), bool))


def _full_and_cached(model, batch, chunk):
  """Decoder outputs [B, T, D] of the full pass and of cached passes `chunk` slots at a time."""
  ctx, cross = model.encode(batch)
  full = model.decode(batch, ctx, cross)
  x, emb = model.embed_decoder(batch)
  kv = model.context_kv(ctx)
  B, T = batch["dec_tokens"].shape
  cache, outs = model.init_cache(B, T), []
  for start in range(0, T, chunk):
    y, cache = model.decode_cached((x + emb)[:, start:start + chunk], kv, cross, cache,
                                   jnp.asarray(start))
    outs.append(y)
  return full, jnp.concatenate(outs, axis=1)


def test_cached_decode_equals_full_decode():
  """Three slots at a time (one at a time: the next test), with qk-norm and biases."""
  model = fx.model(fx.config(qk_norm=True, use_bias=True))
  batch = _sequence_batch(model, np.random.default_rng(0).integers(4, 40, (2, 7)))
  full, cached = jax.jit(_full_and_cached, static_argnums=2)(model, batch, 3)
  np.testing.assert_allclose(cached, full, rtol=2e-5, atol=2e-5)


def test_cached_step_with_a_traced_index():
  """One compiled step serves every slot: the index is an array, not a constant."""
  model = fx.model()
  batch = _sequence_batch(model, np.random.default_rng(1).integers(4, 40, (2, 5)))
  full, _ = jax.jit(_full_and_cached, static_argnums=2)(model, batch, 5)

  def prepare(m, b):
    ctx, cross = m.encode(b)
    x, emb = m.embed_decoder(b)
    return x + emb, m.context_kv(ctx), cross

  h, kv, cross = jax.jit(prepare)(model, batch)
  step = jax.jit(lambda m, h, kv, c, i: m.decode_cached(h, kv, cross, c, i))
  cache = model.init_cache(2, 5)
  for j in range(5):
    y, cache = step(model, h[:, j:j + 1], kv, cache, jnp.asarray(j))
    np.testing.assert_allclose(y[:, 0], full[:, j], rtol=2e-5, atol=2e-5)
