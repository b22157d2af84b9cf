"""The "fourm" objective: registered, builds the model, its synthetic batches train."""

import jax
import numpy as np
import pytest
from flax import nnx

from mmjax.config import ConfigError, load
from mmjax.data.fourm import batch as fourm_batch
from mmjax.train.objective import get_objective


def _config():
  config = load("configs/fourm/shapes.py:tiny")
  config.model.update(d_model=32, num_heads=2, encoder_layers=1, decoder_layers=1,
                      num_input_tokens=16, num_target_tokens=16)
  return config


def test_objective_synthetic_batch_and_loss():
  objective = get_objective(_config())
  b = objective.synthetic_batch(4, seed=0)
  expected = fourm_batch.shapes(4, 16, 16, 64, 192)
  assert {k: (v.dtype, v.shape) for k, v in b.items()} == expected
  assert set(objective.batch_axes()) == set(fourm_batch.FIELDS)
  # Layout invariants: valid slots first, grouped by modality in id order; loss mask within valid.
  for side in ("enc", "dec"):
    valid, mod = b[f"{side}_valid"], b[f"{side}_modality"]
    assert np.all(valid[:, :-1] >= valid[:, 1:])
    assert np.all(np.where(valid[:, 1:], np.diff(mod, axis=1) >= 0, True))
  assert np.all(b["dec_valid"] | ~b["dec_loss_mask"])
  graphdef, state = nnx.split(objective.create_model(nnx.Rngs(0)))
  loss, metrics = jax.jit(lambda s, b: objective.loss(nnx.merge(graphdef, s), b, None))(state, b)
  assert np.isfinite(loss) and "loss/caption" in metrics
  assert objective.train_flops_per_sample() > 0 and objective.tokens_per_sample() == 32


def test_make_iterator_needs_data_dir():
  objective = get_objective(_config())
  with pytest.raises(ConfigError, match="data.data_dir"):
    objective.make_iterator("train", 0, 1)
