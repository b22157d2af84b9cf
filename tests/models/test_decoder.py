"""The decoder model: mask semantics through gradients, packing, MoT ≡ dense, KV cache, loss values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmjax.models import rope
from mmjax.models.configs import DecoderConfig
from mmjax.models.decoder import Decoder
from mmjax.models.decoder_loss import decoder_loss, token_stats

V, M = 40, 2


def make_cfg(**kw):
  base = dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_hidden=64,
              experts_per_modality=2, num_experts=4, moe_top_k=1, group_chunk=8)
  base.update(kw)
  return DecoderConfig(**base)


def make_batch(segment, block=None, modality=None, seed=0):
  segment = np.asarray(segment, np.int32)
  b, l = segment.shape
  rng = np.random.RandomState(seed)
  position = np.zeros_like(segment)
  for i in range(b):
    for j in range(1, l):
      position[i, j] = position[i, j - 1] + 1 if segment[i, j] == segment[i, j - 1] else 0
  return dict(tokens=jnp.asarray(rng.randint(0, V, (b, l)), jnp.int32),
              targets=jnp.asarray(rng.randint(0, V, (b, l)), jnp.int32),
              modality=jnp.asarray(rng.randint(0, M, (b, l)) if modality is None else modality,
                                   jnp.int32),
              segment=jnp.asarray(segment), position=jnp.asarray(position, jnp.int32),
              block=jnp.asarray(np.zeros_like(segment) if block is None else block, jnp.int32),
              loss_weight=jnp.asarray(segment > 0, jnp.float32))


def make_model(cfg, seed=0, **kwargs):
  """The model with random parameters filled on the host: compiling the random initializers costs
  about a second each on this machine, and these tests only need some weights."""
  abstract = nnx.eval_shape(lambda: Decoder(cfg, vocab_size=V, num_modalities=M, rngs=nnx.Rngs(0),
                                            **kwargs))
  graphdef, state = nnx.split(abstract)
  rng = np.random.RandomState(seed)
  fill = lambda x: jnp.asarray(rng.normal(0.0, 0.3, x.shape), x.dtype)
  return nnx.merge(graphdef, jax.tree.map(fill, state))


@jax.jit
def forward(model, batch, causal=True):
  return model(batch, causal=True)[0]


def dependency(model, batch, causal):
  """dep[t, s]: does the output at slot t depend on the input at slot s (row 0 only)."""
  emb = model.embed[...][batch["tokens"]]
  r = jnp.asarray(np.random.RandomState(7).randn(V), jnp.float32)

  @jax.jit
  def grad_at(model, emb, t):
    f = lambda e: model(batch, embeddings=e, causal=causal)[0][0, t] @ r
    return jax.grad(f)(emb)[0]  # [L, D]

  length = emb.shape[1]
  return np.stack([np.abs(np.asarray(grad_at(model, emb, t))).sum(-1) > 0 for t in range(length)])


# Dense attention is the MoT path with one group; MoMa and MoE route causally here (decoding mode).
@pytest.mark.parametrize("sparsity", ["mot", "moe", "moma"])
def test_dependencies_follow_causal_block_segment_mask(sparsity):
  segment = [[1, 1, 1, 1, 1, 1, 2, 2, 2, 0]]
  block = [[0, 0, 1, 1, 1, 0, 0, 0, 0, 0]]  # slots 2..4: one bidirectional block
  batch = make_batch(segment, block)
  dep = dependency(make_model(make_cfg(sparsity=sparsity)), batch, causal=True)
  seg, blk = np.asarray(segment[0]), np.asarray(block[0])
  idx = np.arange(10)
  expected = (((idx[None] <= idx[:, None]) | ((blk[:, None] == blk[None]) & (blk[:, None] > 0)))
              & (seg[:, None] == seg[None]) & (seg[None] > 0))
  # Padding slots' outputs are unused; every real slot depends exactly on what the mask allows.
  np.testing.assert_array_equal(dep[:9], expected[:9])
  assert dep[2, 4] and not dep[1, 3] and dep[5, 4] and not dep[6, 5]


@pytest.mark.parametrize("sparsity", ["dense", "mot"])
def test_packed_forward_equals_separate_forwards(sparsity):
  model = make_model(make_cfg(sparsity=sparsity))
  packed = make_batch([[1, 1, 1, 1, 2, 2, 2, 2, 2, 0]], seed=1)
  logits = forward(model, packed)
  for lo, hi in ((0, 4), (4, 9)):
    alone = {k: jnp.zeros_like(v) for k, v in packed.items()}
    for k in packed:
      alone[k] = alone[k].at[0, : hi - lo].set(packed[k][0, lo:hi])
    alone["segment"] = alone["segment"].at[0, : hi - lo].set(1)
    np.testing.assert_allclose(forward(model, alone)[0, : hi - lo], logits[0, lo:hi],
                               rtol=2e-5, atol=2e-5)


def _broadcast_into(dense_value, mot_value):
  """Dense weight repeated along the modality axis that MoT inserts."""
  d, m = dense_value.shape, mot_value.shape
  if d == m:
    return dense_value
  for i in range(len(m)):
    if m[:i] + m[i + 1:] == d:
      return jnp.broadcast_to(jnp.expand_dims(dense_value, i), m)
  raise AssertionError(f"no modality axis maps {d} to {m}")


def test_mot_with_identical_modality_weights_equals_dense():
  # Three layers, so that the layer axis (3) and the modality axis (2) cannot be confused.
  dense = make_model(make_cfg(sparsity="dense", num_layers=3))
  mot = make_model(make_cfg(sparsity="mot", num_layers=3), seed=1)
  dense_pure = nnx.state(dense, nnx.Param).to_pure_dict()
  mot_state = nnx.state(mot, nnx.Param)
  nnx.replace_by_pure_dict(mot_state, jax.tree.map(_broadcast_into, dense_pure,
                                                   mot_state.to_pure_dict()))
  nnx.update(mot, mot_state)
  batch = make_batch([[1] * 8, [1] * 5 + [0] * 3], seed=2)
  np.testing.assert_allclose(forward(mot, batch), forward(dense, batch), rtol=1e-5, atol=1e-5)
  # ...and untied weights do change the result.
  assert not np.allclose(forward(make_model(make_cfg(sparsity="mot", num_layers=3)), batch),
                         forward(dense, batch))


# Dense and MoMa: tests/generate/test_decoder_generate.py through the sampler.
@pytest.mark.parametrize("sparsity", ["mot"])
def test_kv_cache_decode_reproduces_full_recomputation(sparsity):
  model = make_model(make_cfg(sparsity=sparsity))
  batch = make_batch([[1] * 9, [1] * 7 + [0] * 2], seed=3)
  full = forward(model, batch)
  prefill = 5
  cache = model.init_cache(2, 9)
  step = jax.jit(lambda m, b, c, i: m(b, cache=c, cache_index=i, causal=True))
  cut = lambda lo, hi: {k: v[:, lo:hi] for k, v in batch.items()}
  logits, _, cache = step(model, cut(0, prefill), cache, 0)
  got = [logits]
  for i in range(prefill, 9):
    logits, _, cache = step(model, cut(i, i + 1), cache, i)
    got.append(logits)
  got = jnp.concatenate(got, axis=1)
  np.testing.assert_allclose(got[0], full[0], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got[1, :7], full[1, :7], rtol=1e-4, atol=1e-4)


def test_fully_padded_rows_give_finite_gradients_and_remat_changes_nothing():
  batch = make_batch([[1] * 6, [0] * 6])
  results = []
  for remat in ("none", "full"):
    model = make_model(make_cfg(remat=remat))
    graphdef, params = nnx.split(model)

    def f(p, graphdef=graphdef, cfg=model.cfg):
      logits, aux, _ = nnx.merge(graphdef, p)(batch)
      stats = token_stats(logits, batch["targets"])
      return decoder_loss(stats, batch, aux, cfg, ("text", "image"))[0]

    results.append(jax.jit(jax.value_and_grad(f))(params))
  (loss, grads), (loss_remat, grads_remat) = results
  assert np.isfinite(float(loss))
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_remat), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_loss_matches_hand_computed_values():
  cfg = make_cfg(loss_weights=(("image", 2.0),), z_loss=1e-3)
  model = make_model(cfg)
  model.head[...] = jnp.zeros_like(model.head[...])  # logits 0: CE = log V, log Z = log V
  # Row: text text text image image | padding. Target modality = next slot's modality.
  batch = make_batch([[1, 1, 1, 1, 1, 0]], modality=[[0, 0, 0, 1, 1, 0]])
  logits, aux, _ = jax.jit(lambda m: m(batch))(model)
  loss, metrics = decoder_loss(token_stats(logits, batch["targets"]), batch, aux, cfg,
                               ("text", "image"))
  # target modalities of the 5 real slots: text, text, image, image, image.
  weights = np.array([1, 1, 2, 2, 2], np.float32)
  log_v = np.log(V)
  np.testing.assert_allclose(metrics["ce"], weights.sum() * log_v / 5, rtol=1e-5)
  np.testing.assert_allclose(metrics["z_loss"], 1e-3 * weights.sum() * log_v ** 2 / 5, rtol=1e-5)
  np.testing.assert_allclose(loss, metrics["ce"] + metrics["z_loss"], rtol=1e-6)
  np.testing.assert_allclose(metrics["loss/image"], log_v, rtol=1e-5)
  assert float(metrics["tokens/text"]) == 2 and float(metrics["tokens/image"]) == 3


def test_rope_layouts_are_permutations_of_each_other_and_relative():
  x = jnp.asarray(np.random.RandomState(0).randn(1, 3, 2, 8), jnp.float32)
  pos = jnp.asarray([[0, 5, 11]])
  perm = np.concatenate([np.arange(0, 8, 2), np.arange(1, 8, 2)])  # interleaved -> halves
  inter = rope.apply_rope(x, pos, theta=100.0, layout="interleaved")
  half = rope.apply_rope(x[..., perm], pos, theta=100.0, layout="rotate_half")
  np.testing.assert_allclose(inter[..., perm], half, rtol=1e-5, atol=1e-6)
  # q·k depends only on the distance: shift both positions by 7.
  q, k = x[:, :1], x[:, 1:2]
  dots = []
  for shift in (0, 7):
    rq = rope.apply_rope(q, pos[:, :1] + shift + 3, theta=100.0, layout="rotate_half")
    rk = rope.apply_rope(k, pos[:, :1] + shift, theta=100.0, layout="rotate_half")
    dots.append(jnp.sum(rq * rk))
  np.testing.assert_allclose(dots[0], dots[1], rtol=1e-5)


def test_variants_post_norm_tied_dropout_bf16():
  batch = make_batch([[1] * 6])
  tied = make_model(make_cfg(tie_embeddings=True, norm_order="post"))
  assert tied.head is None
  assert np.all(np.isfinite(forward(tied, batch)))
  drop = make_model(make_cfg(residual_dropout=0.5))
  with_key = jax.jit(lambda m, k: m(batch, dropout_key=k)[0])
  a, b = with_key(drop, jax.random.key(1)), with_key(drop, jax.random.key(2))
  assert not np.allclose(a, b) and not np.allclose(a, forward(drop, batch))
  fp32 = make_model(make_cfg())
  bf16 = make_model(make_cfg(dtype="bfloat16"))
  np.testing.assert_allclose(forward(bf16, batch), forward(fp32, batch), atol=0.1)


def test_train_flops_per_token_by_hand():
  from mmjax.models.decoder_flops import decoder_train_flops_per_token
  kw = dict(d_model=64, num_heads=4, num_kv_heads=2, mlp_hidden=128, num_layers=2,
            experts_per_modality=2, moma_aux_router_hidden=8)
  flops = lambda sp: decoder_train_flops_per_token(DecoderConfig(sparsity=sp, **kw), vocab_size=100,
                                                   num_modalities=2, seq_len=10)["total"]
  # Per layer: projections 2·64·(4+2·2)·16 + 2·4·16·64, causal scores 2·2·10·4·16/2, FFN 3·2·64·128;
  # head 2·64·100; training = 3 × forward.
  dense = 3 * (2 * (16384 + 8192 + 1280 + 49152) + 12800)
  assert flops("dense") == dense == 488448
  assert flops("mot") == dense  # untied weights, same FLOPs per token
  # MoMa: one expert per token on average, + router 2·64·4 and aux router 2·64·8 + 2·8·4 per layer.
  assert flops("moma") == dense + 3 * 2 * (512 + 1024 + 64)
