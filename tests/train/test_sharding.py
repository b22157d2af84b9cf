"""Mesh construction, logical rules and clear errors for meshes and batches that do not fit."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmjax import defaults
from mmjax import sharding as mmsharding
from mmjax.config import ConfigError
from mmjax.train import loop, toy


def test_mesh_fills_the_free_axis():
  mesh = mmsharding.make_mesh(defaults.mesh(fsdp=2, tensor=2))
  assert dict(mesh.shape) == dict(data=2, fsdp=2, tensor=2, expert=1)
  assert mesh.axis_types[0] == jax.sharding.AxisType.Auto


def test_mesh_that_does_not_match_the_devices():
  with pytest.raises(ConfigError, match=r"mesh.shape.*needs 6 devices but 8 are present"):
    mmsharding.make_mesh(defaults.mesh(data=3, fsdp=2))
  with pytest.raises(ConfigError, match=r"mesh.shape.data.*cannot be filled"):
    mmsharding.make_mesh(defaults.mesh(fsdp=3))
  bad = defaults.mesh()
  bad.shape["model"] = 1
  with pytest.raises(ConfigError, match="unknown mesh axes"):
    mmsharding.make_mesh(bad)


def test_batch_not_divisible_by_batch_axes():
  config = toy.toy_config(batch_size=12)
  config.mesh.shape.update(dict(data=-1))
  with pytest.raises(ConfigError, match=r"train.batch_size.*12.*divisible.*8 ways"):
    loop.build(config)
  config = toy.toy_config(batch_size=16, microbatches=4)
  with pytest.raises(ConfigError, match=r"microbatches.*divisible.*8 ways"):
    loop.build(config)


def test_logical_to_spec_rules():
  mesh = mmsharding.make_mesh(defaults.mesh(fsdp=2, tensor=2))
  rules = mmsharding.logical_rules(defaults.mesh())
  assert mmsharding.logical_to_spec(("embed", "mlp"), rules, mesh, (8, 8)) == P("fsdp", "tensor")
  assert mmsharding.logical_to_spec(("batch", "length"), rules, mesh) == P(("data", "fsdp"))
  # An axis that does not divide the dimension is dropped; unknown names are replicated.
  assert mmsharding.logical_to_spec(("vocab", "embed"), rules, mesh, (5, 8)) == P(None, "fsdp")
  assert mmsharding.logical_to_spec(("unknown", "layers"), rules, mesh, (4, 4)) == P()
  # A mesh axis is used once per array.
  assert mmsharding.logical_to_spec(("embed", "embed"), rules, mesh, (4, 4)) == P("fsdp")


def test_global_batch_is_assembled_sharded():
  mesh = mmsharding.make_mesh(defaults.mesh())
  shardings = mmsharding.batch_shardings({"x": ("batch", "length")}, mesh,
                                         mmsharding.logical_rules(defaults.mesh()))
  local = {"x": np.arange(32, dtype=np.int32).reshape(16, 2)}
  batch = mmsharding.global_batch(local, shardings)
  assert batch["x"].sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(np.asarray(batch["x"]), local["x"])
  with pytest.raises(ValueError, match="missing"):
    mmsharding.global_batch({}, shardings)


def test_objective_registry():
  from mmjax.train import objective as mmobjective

  config = toy.toy_config()
  assert isinstance(mmobjective.get_objective(config), mmobjective.Objective)
  config.objective = "nonesuch"
  with pytest.raises(ConfigError, match=r"unknown objective 'nonesuch'; registered: .*'toy'"):
    mmobjective.get_objective(config)
  config.objective = "mmjax.train.toy:toy"
  assert isinstance(mmobjective.get_objective(config), toy.ToyObjective)
