"""4M on 8 fake CPU devices: loss and grads equal single-device under several mesh shapes."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mmjax import defaults, sharding
from mmjax.models.fourm_loss import fourm_loss
from tests.models import fourm_fixtures as fx

RULES = sharding.logical_rules(defaults.mesh())


def _step(graphdef, heads="auto"):
  return jax.jit(jax.value_and_grad(lambda s, b: fourm_loss(nnx.merge(graphdef, s), b, heads)[0]))


@pytest.fixture(scope="module")
def reference():
  cfg, reg = fx.config(num_heads=2), fx.registry()
  model = fx.model(cfg, reg)
  b = fx.batch(cfg, reg, size=8, seed=9)
  graphdef, state = nnx.split(model)
  with jax.default_device(jax.devices()[0]):
    loss, grads = _step(graphdef)(state, b)
  return graphdef, state, b, loss, grads


# "ragged" (the TPU/GPU heads) sorts and multiplies each batch shard's tokens on its own devices.
@pytest.mark.parametrize("shape, heads", [(dict(data=8), "auto"), (dict(data=2, fsdp=4), "auto"),
                                          (dict(data=4, tensor=2), "auto"),
                                          pytest.param(dict(data=2, fsdp=2, tensor=2), "ragged",
                                                       marks=pytest.mark.slow)])
def test_sharded_equals_single_device(reference, shape, heads):
  graphdef, state, b, loss, grads = reference
  mesh_cfg = defaults.mesh(**shape)
  mesh = sharding.make_mesh(mesh_cfg)
  state_sh = sharding.tree_shardings(state, mesh, RULES)
  batch_sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
    s = jax.device_put(state, state_sh)
    bb = {k: jax.device_put(v, batch_sh) for k, v in b.items()}
    loss_s, grads_s = _step(graphdef, heads)(s, bb)
  # Some parameters really are split (fsdp / tensor), so the test exercises sharding.
  if "fsdp" in shape or "tensor" in shape:
    specs = [x.sharding.spec for x in jax.tree.leaves(s)]
    assert any(any(e is not None for e in spec) for spec in specs)
  np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
  fx.tree_allclose(grads_s, grads, rtol=2e-4, atol=1e-6)
