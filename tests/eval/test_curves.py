"""Learning curves: the evaluation hook's config and the plot of metrics against steps."""

import json

import pytest

from mmjax import config as mmconfig
from mmjax.eval import curves


def test_the_curves_plot_metrics_with_their_chance_and_ceiling(tmp_path):
  rows = [{"step": 10, "loss": 5.0}, {"step": 10, "gen/rgb->caption/attr_acc": 0.2,
                                      "gen/rgb->caption/parsed": 0.5},
          {"step": 20, "loss": 4.0, "eval/loss": 4.2},
          {"step": 20, "gen/rgb->caption/attr_acc": 0.5, "gen/rgb->tok_depth/abs_rel": 0.1}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (tmp_path / curves.BOUNDS_FILE).write_text(json.dumps(
      {"ceiling": {"gen/rgb->caption/attr_acc": 1.0},
       "chance": {"gen/rgb->caption/attr_acc": 0.24}}))
  path = curves.plot_curves(str(tmp_path))
  assert path == str(tmp_path / curves.CURVES_FILE)
  assert (tmp_path / curves.CURVES_FILE).stat().st_size > 5000


def test_no_generation_metrics_no_curves(tmp_path):
  assert curves.plot_curves(str(tmp_path)) is None
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
  assert curves.plot_curves(str(tmp_path)) is None


@pytest.mark.parametrize("every, objective, expected", [
    (0, "fourm", False), (5, "fourm", True), (5, "decoder", True), (5, "tokenizer", False)])
def test_the_hook_follows_eval_every_steps(tmp_path, every, objective, expected):
  config = mmconfig.load("configs/fourm/shapes.py:tiny")
  with config.unlocked():
    config.eval.every_steps = every
    config.objective = objective
  hook = curves.make_training_eval(config, str(tmp_path))
  assert (hook is not None) == expected
  if hook:
    assert hook.every_steps == 5 and hook.task_names is None
