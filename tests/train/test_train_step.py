"""Sharded train steps equal single-device ones; accumulation equals one big batch; NaN guard."""

import jax
import numpy as np
import pytest

from mmjax import sharding as mmsharding
from mmjax.train import state as trainstate
from mmjax.train import step as trainstep
from mmjax.train import toy


_COMPILED = {}  # the program depends on the mesh and micro-batching only, not on the data


def _losses(config, devices, steps=4):
  objective = toy.ToyObjective(config)
  key = (tuple(config.mesh.shape.items()), config.train.microbatches, len(devices))
  if key not in _COMPILED:
    mesh = mmsharding.make_mesh(config.mesh, devices)
    mmsharding.check_batch(mesh, config.mesh, config.train.batch_size)
    setup = trainstate.make_setup(config, objective, mesh)
    _COMPILED[key] = setup, trainstep.jit_step(setup, config.train)
  setup, step = _COMPILED[key]
  state = trainstate.init_state(config, setup)
  it = objective.make_iterator("train", 0, 1)
  out = []
  with setup.context():
    for _ in range(steps):
      batch = mmsharding.global_batch(next(it), setup.batch_shardings)
      state, metrics = step(state, batch)
      out.append({k: float(v) for k, v in jax.device_get(metrics).items()})
  return out, state, setup


def _mesh_config(config, **shape):
  config.mesh.shape.update(dict(data=1, fsdp=1, tensor=1, expert=1))
  config.mesh.shape.update(shape)
  return config


@pytest.fixture(scope="module")
def single():
  config = _mesh_config(toy.toy_config(), data=1)
  return _losses(config, jax.devices()[:1])[0]


@pytest.mark.parametrize("shape", [dict(data=8), dict(fsdp=8), dict(data=2, fsdp=2, tensor=2)])
def test_sharded_equals_single_device(single, shape):
  config = _mesh_config(toy.toy_config(), **shape)
  metrics, state, setup = _losses(config, jax.devices())
  np.testing.assert_allclose([m["loss"] for m in metrics], [m["loss"] for m in single],
                             rtol=2e-5)
  np.testing.assert_allclose([m["grad_norm"] for m in metrics], [m["grad_norm"] for m in single],
                             rtol=1e-4)
  assert metrics[-1]["loss"] < metrics[0]["loss"]  # it learns
  kernel = state["params"]["hidden"]["kernel"].get_value()
  if shape.get("fsdp", 1) > 1 or shape.get("tensor", 1) > 1:  # parameters really are split
    assert kernel.addressable_shards[0].data.size < kernel.size
    assert setup.state_shardings["opt_state"][1][0].mu["hidden"]["kernel"].get_value().spec == (
        kernel.sharding.spec)


def test_microbatches_equal_one_big_batch(single):
  config = _mesh_config(toy.toy_config(microbatches=2), data=2, fsdp=2)
  metrics, _, _ = _losses(config, jax.devices()[:4])
  np.testing.assert_allclose([m["loss"] for m in metrics], [m["loss"] for m in single], rtol=2e-5)
  np.testing.assert_allclose([m["grad_norm"] for m in metrics], [m["grad_norm"] for m in single],
                             rtol=1e-4)


def test_nonfinite_loss_skips_the_update(single):
  config = _mesh_config(toy.toy_config(), data=1)
  config.toy.nan_at_step = 2
  metrics, state, _ = _losses(config, jax.devices()[:1], steps=3)
  clean = single
  assert np.isnan(metrics[1]["loss"]) and metrics[1]["finite"] == 0.0
  assert metrics[2]["skipped"] == 1.0 and int(state["skipped"]) == 1
  # Step 2 changed nothing: step 3 starts from step 1's params, so its param norm before the
  # update equals step 1's, and its learning rate is that of the optimizer's second update.
  assert metrics[1]["param_norm"] == metrics[0]["param_norm"]
  assert metrics[2]["lr"] == pytest.approx(clean[0]["lr"] * 2)
  assert np.isfinite(metrics[2]["loss"])
