"""The decoder sharded over a (data, tensor, expert) mesh of fake CPU devices equals one device."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mmjax import defaults, sharding

_spec = importlib.util.spec_from_file_location(
    "decoder_test_helpers", pathlib.Path(__file__).parent / "test_decoder.py")
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)


def test_sharded_moma_forward_equals_single_device():
  model = helpers.make_model(helpers.make_cfg(sparsity="moma", num_heads=4, num_kv_heads=2))
  batch = helpers.make_batch([[1] * 8, [1] * 5 + [2] * 3, [1] * 6 + [0] * 2, [1] * 8], seed=5)
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, b: nnx.merge(graphdef, s)(b, causal=False)[0])
  single = np.asarray(fwd(state, batch))

  mesh_config = defaults.mesh(data=2, fsdp=1, tensor=2, expert=2)
  mesh = sharding.make_mesh(mesh_config)
  rules = sharding.logical_rules(mesh_config)
  shardings = sharding.tree_shardings(state, mesh, rules)
  sharded_state = jax.device_put(state, shardings)
  gate = sharded_state["blocks"]["ffn"]["experts"]["gate"]
  assert gate.get_value().sharding.spec == PartitionSpec(None, "expert", "fsdp", "tensor")
  batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  sharded_batch = {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    out = fwd(sharded_state, sharded_batch)
  assert len(out.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(out), single, rtol=2e-5, atol=2e-5)


def _assert_sharded_step_equals_single_device(step, state, batch, mesh_config):
  """`step` (a jitted value_and_grad) on the mesh of `mesh_config` equals it on one device."""
  loss, grads = step(state, batch)
  mesh = sharding.make_mesh(mesh_config)
  rules = sharding.logical_rules(mesh_config)
  sharded_state = jax.device_put(state, sharding.tree_shardings(state, mesh, rules))
  batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  sharded_batch = {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    loss_s, grads_s = step(sharded_state, sharded_batch)
  np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
  for g_s, g in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads)):
    np.testing.assert_allclose(np.asarray(g_s), np.asarray(g), rtol=2e-4, atol=1e-6)


@pytest.mark.slow
def test_sharded_mot_gradients_equal_single_device():
  """MoT's grouped matmuls sort and multiply each batch shard's tokens on its own devices (not
  the whole batch on every device): values and gradients as on one device."""
  model = helpers.make_model(helpers.make_cfg(sparsity="mot", num_heads=4, num_kv_heads=2,
                                              grouped_impl="ragged"))
  batch = helpers.make_batch([[1] * 8, [1] * 5 + [2] * 3, [1] * 6 + [0] * 2, [2] * 8], seed=6)
  graphdef, state = nnx.split(model)
  step = jax.jit(jax.value_and_grad(
      lambda s, b: (nnx.merge(graphdef, s)(b, causal=True)[0] ** 2).mean()))
  _assert_sharded_step_equals_single_device(step, state, batch,
                                            defaults.mesh(data=2, fsdp=2, tensor=2))


@pytest.mark.slow
def test_sharded_moma_routed_by_rows_equals_single_device():
  """MoMa with expert choice inside each row (model.moma_routing_rows=1): each batch shard routes
  and multiplies its own tokens, with values and gradients as on one device."""
  model = helpers.make_model(helpers.make_cfg(sparsity="moma", num_heads=4, num_kv_heads=2,
                                              grouped_impl="ragged", moma_routing_rows=1))
  batch = helpers.make_batch([[1] * 8, [1] * 5 + [2] * 3, [1] * 6 + [0] * 2, [1] * 8], seed=7)
  graphdef, state = nnx.split(model)

  def loss_fn(s, b):
    logits, aux, _ = nnx.merge(graphdef, s)(b, causal=False)
    return (logits ** 2).mean() + jnp.sum(aux["moma_aux_router_bce"])

  step = jax.jit(jax.value_and_grad(loss_fn))
  _assert_sharded_step_equals_single_device(step, state, batch,
                                            defaults.mesh(data=2, fsdp=2, tensor=1, expert=2))
