"""Schedules at key steps (hand-computed) and the weight-decay mask."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmjax import defaults
from mmjax.config import ConfigError
from mmjax.train import optim, toy


def _lr(kind, step, **kw):
  train = defaults.train(schedule=kind, lr=1.0, steps=100, warmup_steps=10, **kw)
  return float(optim.schedule(train)(jnp.asarray(step)))


@pytest.mark.parametrize("kind", optim.SCHEDULES)
def test_warmup_is_linear_from_the_first_step(kind):
  assert _lr(kind, 1) == pytest.approx(0.1)
  assert _lr(kind, 5) == pytest.approx(0.5)
  assert _lr(kind, 10) == pytest.approx(1.0)


def test_schedule_values():
  assert _lr("cosine", 55) == pytest.approx(0.5)  # half-way through the 90 decay steps
  assert _lr("cosine", 40) == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)))
  assert _lr("cosine", 100) == pytest.approx(0.0, abs=1e-7)
  assert _lr("wsd", 80, decay_fraction=0.2) == pytest.approx(1.0)  # decay starts after 80
  assert _lr("wsd", 90, decay_fraction=0.2) == pytest.approx(0.5)
  assert _lr("wsd", 100, decay_fraction=0.2) == pytest.approx(0.0)
  assert _lr("rsqrt", 40) == pytest.approx(0.5)
  assert _lr("constant", 77) == pytest.approx(1.0)
  with pytest.raises(ConfigError, match="train.schedule"):
    optim.schedule(defaults.train(schedule="linear"))


def test_weight_decay_mask():
  model = toy.ToyObjective(toy.toy_config()).create_model
  with nnx.use_eager_sharding(False):
    params = nnx.state(nnx.eval_shape(lambda: model(nnx.Rngs(0))), nnx.Param)
  mask = nnx.to_pure_dict(optim.weight_decay_mask(params))
  assert mask["hidden"]["kernel"] and mask["out"]["kernel"]
  assert mask["embed"]["embedding"] and mask["position"]
  assert not mask["hidden"]["bias"] and not mask["out"]["bias"]
  assert not mask["norm"]["scale"] and not mask["norm"]["bias"]
  # Stacked layers: the "layers" axis does not count towards the rank; norms by path.
  assert optim.decays(["blocks", "mlp", "kernel"], (4, 8, 16), ("layers", "embed", "mlp"))
  assert not optim.decays(["blocks", "mlp", "b"], (4, 16), ("layers", "mlp"))
  assert not optim.decays(["blocks", "attn_norm", "w"], (4, 16, 16), None)


def test_weight_decay_only_touches_masked_params():
  train = defaults.train(lr=0.0, weight_decay=0.5, grad_clip=0.0, warmup_steps=0, schedule="constant")
  train.lr = 0.1
  tx = optim.make_optimizer(train)
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
  zero = {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros((2,))}
  updates, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates["bias"], 0.0)
