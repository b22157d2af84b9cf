"""Per-modality heads: the chunked (CPU) and ragged_dot paths equal the naive reference that runs
every head at every position and gathers (the reference lives only in this test)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmjax.models import fourm_loss as fl
from tests.models import fourm_fixtures as fx


def naive_loss(model, batch):
  cfg = model.cfg
  y = model(batch)
  eps, zl = cfg.label_smoothing, cfg.z_loss
  names = [m.name for m in model.registry.targets()]
  sums = [[], [], [], []]
  for name in names:
    z = model.logits(y, name)  # every position
    lse = jax.nn.logsumexp(z, -1)
    labels = jnp.clip(batch["dec_targets"], 0, z.shape[-1] - 1)
    zy = jnp.take_along_axis(z, labels[..., None], -1)[..., 0]
    loss = lse - (1 - eps) * zy - eps * z.mean(-1) + zl * lse ** 2
    sel = batch["dec_loss_mask"] & (batch["dec_modality"] == model.registry.index(name))
    correct = zy >= z.max(-1)
    for acc, v in zip(sums, (loss, lse - zy, correct, jnp.ones_like(lse))):
      acc.append(jnp.sum(jnp.where(sel, v, 0.0)))
  return fl.combine(*(jnp.stack(s) for s in sums), names, cfg.loss_weighting)


@pytest.mark.parametrize("impl,overrides", [
    ("chunked", dict(label_smoothing=0.1, z_loss=1e-3, tie_heads=True)),
    ("ragged", dict(loss_weighting="token", z_loss=1e-3)),
])
def test_heads_equal_naive_reference(impl, overrides):
  cfg, reg = fx.config(**overrides), fx.registry()
  model = fx.model(cfg, reg)
  b = jax.tree.map(jnp.asarray, fx.batch(cfg, reg, size=4, seed=4))
  graphdef, state = nnx.split(model)

  def run(fn):
    return jax.jit(jax.value_and_grad(lambda s: fn(nnx.merge(graphdef, s), b), has_aux=True))(state)

  (loss, met), grads = run(lambda m, b: fl.fourm_loss(m, b, impl))
  (ref, ref_met), ref_grads = run(naive_loss)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  for k in ref_met:
    np.testing.assert_allclose(met[k], ref_met[k], rtol=1e-5, atol=1e-6, err_msg=k)
  fx.tree_allclose(grads, ref_grads, rtol=1e-4, atol=1e-6)
  heads = grads["dec_tokens"] if cfg.tie_heads else grads["heads"]
  assert all(float(jnp.abs(g[...]).sum()) > 0 for g in jax.tree.leaves(heads))

