"""Grouped matmuls, MoT routing, MoMa expert choice and token-choice MoE against naive references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmjax import defaults, sharding
from mmjax.models import experts, grouped, layers


def _reference_grouped(x, w, sizes):
  group = np.repeat(np.arange(len(sizes)), sizes)
  out = np.zeros((x.shape[0], w.shape[2]), np.float32)
  out[: len(group)] = np.einsum("nk,nkf->nf", x[: len(group)], w[group])
  return out


# chunk 4: the chunked layout; chunk 64 > 23 rows: the per-row path of decoding steps.
@pytest.mark.parametrize("impl,chunk", [("chunked", 4), ("chunked", 64), ("ragged", 4)])
def test_grouped_matmul_matches_reference_and_zeroes_unused_rows(impl, chunk):
  rng = np.random.RandomState(0)
  x = rng.randn(23, 5).astype(np.float32)
  w = rng.randn(3, 5, 7).astype(np.float32)
  sizes = np.array([9, 0, 11], np.int32)  # 20 of 23 rows used; an empty group
  out = grouped.grouped_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes), impl=impl,
                               chunk=chunk)
  np.testing.assert_allclose(out, _reference_grouped(x, w, sizes), rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(out[20:]) == 0)

  # Gradients agree with the reference too.
  def f(xx, ww):
    return jnp.sum(jnp.sin(grouped.grouped_matmul(xx, ww, jnp.asarray(sizes), impl=impl,
                                                  chunk=chunk)))

  def g(xx, ww):
    group = jnp.asarray(np.repeat(np.arange(3), sizes))
    return jnp.sum(jnp.sin(jnp.einsum("nk,nkf->nf", xx[:20], ww[group])))

  for a, b in zip(jax.grad(f, (0, 1))(x, w), jax.grad(g, (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sizes", [[60, 0, 110, 0], [0, 200, 0, 0]])
def test_ragged_matmul_with_the_grouped_weight_gradient_matches_ragged_dot(sizes):
  """The TPU path (megablox `tgmm` for the weight gradient, here in Pallas's interpreter) against
  `ragged_dot`'s own gradient: uneven and empty groups, rows past the groups' end."""
  rng = np.random.RandomState(1)
  x = jnp.asarray(rng.randn(200, 40).astype(np.float32))
  w = jnp.asarray(rng.randn(4, 40, 50).astype(np.float32))
  sizes = jnp.asarray(np.array(sizes, np.int32))
  cotangent = jnp.asarray(rng.randn(200, 50).astype(np.float32))

  def run(grouped_weight_grad):
    def f(xx, ww):
      y = grouped.ragged_matmul(xx, ww, sizes, jnp.float32, grouped_weight_grad=grouped_weight_grad)
      return jnp.sum(y * cotangent), y
    return jax.jit(jax.grad(f, (0, 1), has_aux=True))(x, w)

  (dx, dw), y = run(True)
  (dx_ref, dw_ref), y_ref = run(False)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-4)
  assert np.all(np.asarray(dw)[np.asarray(sizes) == 0] == 0)


def test_grouped_weight_gradient_per_batch_shard_sums_over_the_shards():
  """As the model runs it on TPU: per batch shard (`layers.over_batch_shards`) with the weight
  replicated; the weight's gradient is the sum over the shards, as one device's ragged_dot gives."""
  rng = np.random.RandomState(2)
  x = jnp.asarray(rng.randn(2, 128, 16).astype(np.float32))
  w = jnp.asarray(rng.randn(3, 16, 24).astype(np.float32))
  sizes = jnp.asarray(np.array([[50, 0, 70], [0, 128, 0]], np.int32))

  def per_row(x_s, sizes_s, w_s, grouped_weight_grad):  # one row of the batch per shard
    return grouped.ragged_matmul(x_s[0], w_s, sizes_s[0], jnp.float32,
                                 grouped_weight_grad=grouped_weight_grad)[None]

  def loss(xx, ww, grouped_weight_grad):
    fn = lambda *a: per_row(*a, grouped_weight_grad)  # noqa: E731
    return jnp.sum(jnp.sin(layers.over_batch_shards(fn, (xx, sizes), (ww,))))

  def reference(xx, ww):
    return sum(jnp.sum(jnp.sin(per_row(xx[i:i + 1], sizes[i:i + 1], ww, False))) for i in range(2))

  expected = jax.grad(reference, (0, 1))(x, w)
  mesh_config = defaults.mesh(data=2, fsdp=1, tensor=4)
  mesh = sharding.make_mesh(mesh_config)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.logical_rules(mesh_config)):
    got = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)(x, w, True)
  for a, b in zip(got, expected):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_mot_linear_uses_each_tokens_modality_weight():
  lin = experts.ModalLinear((4,), (3,), ("embed", "mlp"), groups=3, impl="chunked", chunk=2,
                            dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 5, 4))
  modality = jnp.asarray([[0, 2, 2, 1, 0], [1, 1, 0, 2, 2]])
  y = lin(x, grouped.make_routing(modality, 3))
  w = lin.kernel[...]
  expected = jnp.einsum("bld,bldf->blf", x, w[modality])
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_slots_from_selection_is_expert_major_and_exact():
  selected = jnp.asarray([[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 1]], bool)
  slots = grouped.slots_from_selection(selected, 6)
  assert slots.token_S.tolist()[:4] == [1, 2, 0, 3]
  assert slots.expert_S.tolist()[:4] == [0, 0, 2, 2]
  assert slots.valid_S.tolist() == [True] * 4 + [False] * 2
  assert slots.sizes_E.tolist() == [2, 0, 2]


def test_expert_choice_capacity_and_modality_groups():
  rng = np.random.RandomState(0)
  n, per_group = 40, 3
  modality = jnp.asarray(rng.randint(0, 2, n))
  valid = jnp.asarray(rng.rand(n) > 0.2)
  scores = jnp.asarray(rng.randn(n, 2 * per_group).astype(np.float32))
  selected, capacity = experts.expert_choice(scores, modality, valid, per_group)
  selected, capacity = np.asarray(selected), np.asarray(capacity)
  counts = [int(np.sum(np.asarray(valid) & (np.asarray(modality) == m))) for m in range(2)]
  for e in range(2 * per_group):
    group = e // per_group
    assert capacity[e] == counts[group] // per_group
    assert selected[e].sum() == capacity[e]  # exactly its capacity
    taken = np.nonzero(selected[e])[0]
    assert np.all(np.asarray(modality)[taken] == group)  # only its modality's tokens
    assert np.all(np.asarray(valid)[taken])  # never padding
    # ...and the highest-scoring ones of the group.
    eligible = np.nonzero((np.asarray(modality) == group) & np.asarray(valid))[0]
    best = eligible[np.argsort(-np.asarray(scores)[eligible, e], kind="stable")[: capacity[e]]]
    assert set(taken) == set(best)


def _swiglu_ref(x, ew, e):
  h = jax.nn.silu(x @ ew.gate[...][e]) * (x @ ew.up[...][e])
  return h @ ew.down[...][e]


def test_moma_output_is_sigmoid_weighted_sum_over_taking_experts():
  per_group, d = 2, 8
  moma = experts.MoMaFFN(d, 16, num_modalities=2, experts_per_modality=per_group, aux_router=True,
                         aux_hidden=8, impl="chunked", chunk=4, dtype=jnp.float32,
                         param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (2, 6, d))
  modality = jnp.asarray([[0, 0, 1, 1, 1, 0], [1, 0, 0, 1, 1, 1]])
  valid = jnp.ones((2, 6), bool).at[1, 5].set(False)
  run = jax.jit(lambda m, causal: m(x, modality, valid, causal=causal), static_argnums=1)
  y, aux = run(moma, False)
  x_N = x.reshape(-1, d)
  scores = x_N @ moma.router[...]
  selected, _ = experts.expert_choice(scores, modality.reshape(-1), valid.reshape(-1), per_group)
  expected = jnp.zeros_like(x_N)
  for e in range(2 * per_group):
    contribution = jax.nn.sigmoid(scores[:, e])[:, None] * _swiglu_ref(x_N, moma.experts, e)
    expected += jnp.where(selected[e][:, None], contribution, 0.0)
  np.testing.assert_allclose(y.reshape(-1, d), expected, rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(y[1, 5]) == 0)  # padding reaches no expert
  assert 0.0 <= float(aux["moma_aux_router_acc"]) <= 1.0 and float(aux["moma_aux_router_bce"]) > 0

  # Causal mode: the auxiliary router's decision, restricted to the token's group.
  y_c, _ = run(moma, True)
  pred = (moma.aux_logits(x_N) > 0).T
  group = jnp.arange(2 * per_group) // per_group
  pred = pred & (group[:, None] == modality.reshape(-1)[None]) & valid.reshape(-1)[None]
  expected = jnp.zeros_like(x_N)
  for e in range(2 * per_group):
    contribution = jax.nn.sigmoid(scores[:, e])[:, None] * _swiglu_ref(x_N, moma.experts, e)
    expected += jnp.where(pred[e][:, None], contribution, 0.0)
  np.testing.assert_allclose(y_c.reshape(-1, d), expected, rtol=1e-4, atol=1e-5)


def test_moma_routing_rows_chooses_inside_each_group_of_rows():
  # routing_rows=1: each row is routed as if it were the whole batch; routing_rows=2 over two rows
  # equals the whole-batch choice. The auxiliary BCE is measured against the same decisions.
  d = 8
  make = lambda rows: experts.MoMaFFN(
      d, 16, num_modalities=2, experts_per_modality=2, aux_router=True, aux_hidden=8,
      impl="chunked", chunk=4, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0),
      routing_rows=rows)
  x = jax.random.normal(jax.random.key(3), (2, 6, d))
  modality = jnp.asarray([[0, 0, 1, 1, 1, 0], [1, 0, 0, 1, 1, 1]])
  valid = jnp.ones((2, 6), bool).at[1, 5].set(False)
  run = jax.jit(lambda m, x, mod, v: m(x, mod, v, causal=False))
  whole, whole_aux = run(make(0), x, modality, valid)
  by_row, _ = run(make(1), x, modality, valid)
  rows = [run(make(0), x[i:i + 1], modality[i:i + 1], valid[i:i + 1])[0] for i in range(2)]
  np.testing.assert_allclose(by_row, jnp.concatenate(rows), rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(by_row - whole).max()) > 1e-3  # per row is not the whole-batch choice
  two, two_aux = run(make(2), x, modality, valid)
  np.testing.assert_allclose(two, whole, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(two_aux["moma_aux_router_bce"], whole_aux["moma_aux_router_bce"],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="groups of 2 rows"):
    run(make(2), x[:1], modality[:1], valid[:1])


def test_token_choice_moe_top1_capacity_and_balance_loss():
  d, num = 8, 4
  moe = experts.TokenChoiceMoE(d, 16, num_experts=num, top_k=1, capacity_factor=1.0,
                               impl="chunked", chunk=4, dtype=jnp.float32, param_dtype=jnp.float32,
                               rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(3), (1, 12, d))
  valid = jnp.ones((1, 12), bool)
  run = jax.jit(lambda m, causal: m(x, valid, causal=causal), static_argnums=1)
  y, aux = run(moe, True)  # no drops
  x_N = x[0]
  probs = jax.nn.softmax(x_N @ moe.router[...])
  top = jnp.argmax(probs, axis=-1)
  expected = jnp.stack([probs[i, top[i]] * _swiglu_ref(x_N[i], moe.experts, int(top[i]))
                        for i in range(12)])
  np.testing.assert_allclose(y[0], expected, rtol=1e-4, atol=1e-5)
  # Switch balance loss: E · Σ_e fraction_e · mean_prob_e.
  fraction = np.bincount(np.asarray(top), minlength=num) / 12
  np.testing.assert_allclose(aux["moe_balance_loss"], num * np.sum(fraction * np.mean(probs, 0)),
                             rtol=1e-5)
  # Training mode: capacity 3 per expert; assignments past it (in token order) are dropped.
  y_t, aux_t = run(moe, False)
  kept = np.zeros(12, bool)
  seen = np.zeros(num, int)
  for i, e in enumerate(np.asarray(top)):
    kept[i] = seen[e] < 3
    seen[e] += 1
  np.testing.assert_allclose(y_t[0], np.where(kept[:, None], expected, 0.0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(aux_t["moe_dropped_fraction"], 1 - kept.mean(), rtol=1e-6)
