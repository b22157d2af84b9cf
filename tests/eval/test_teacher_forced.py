"""Teacher-forced validation metrics: the objective's loss averaged over validation batches."""

import numpy as np
import pytest

from mmjax.errors import UserError
from mmjax.eval import teacher_forced
from mmjax.train import toy
from mmjax.train.loop import load_model


def _objective_and_model(num_val: int, tmp_path):
  config = toy.toy_config(batch_size=8)
  config.toy.num_val = num_val
  model, _ = load_model(config, str(tmp_path), allow_random_init=True)
  return toy.make_toy(config), model


def test_metrics_are_the_mean_over_batches(tmp_path):
  objective, model = _objective_and_model(24, tmp_path)  # three batches of 8
  out = teacher_forced.validation_metrics(objective, model, max_batches=10, progress=False)
  assert out["val/batches"] == 3.0
  expected = []
  for batch in objective.make_iterator("val", 0, 1):
    loss, metrics = objective.loss(model, batch, None)
    expected.append((float(loss), float(metrics["acc/a"])))
  np.testing.assert_allclose(out["val/loss"], np.mean([e[0] for e in expected]), rtol=1e-5)
  np.testing.assert_allclose(out["val/acc/a"], np.mean([e[1] for e in expected]), rtol=1e-5)
  # A cap on the batches is honoured.
  capped = teacher_forced.validation_metrics(objective, model, max_batches=1, progress=False)
  assert capped["val/batches"] == 1.0
  np.testing.assert_allclose(capped["val/loss"], expected[0][0], rtol=1e-5)


def test_a_split_smaller_than_a_batch_is_an_error(tmp_path):
  objective, model = _objective_and_model(4, tmp_path)
  with pytest.raises(UserError, match="train.batch_size"):
    teacher_forced.validation_metrics(objective, model, max_batches=2, progress=False)
