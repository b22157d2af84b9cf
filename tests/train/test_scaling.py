"""Scaling-law fits recover known laws; the compute-optimal split; the plot."""

import numpy as np
import pytest

from mmjax.train import scaling


def test_power_law_recovers_its_parameters():
  x = np.geomspace(1e5, 1e8, 8)
  fit = scaling.fit_power_law(x, 1.7 + 400.0 * x ** -0.34)
  assert fit["E"] == pytest.approx(1.7, rel=1e-6)
  assert fit["A"] == pytest.approx(400.0, rel=1e-5)
  assert fit["alpha"] == pytest.approx(0.34, rel=1e-6)
  assert fit["rmse"] < 1e-9 and fit["points"] == 8


def test_power_law_under_noise_and_with_no_floor():
  x = np.geomspace(1e3, 1e7, 12)
  noise = 1 + 0.002 * np.random.default_rng(0).standard_normal(12)
  fit = scaling.fit_power_law(x, (2.0 + 50.0 * x ** -0.5) * noise)
  assert fit["E"] == pytest.approx(2.0, abs=0.02) and fit["alpha"] == pytest.approx(0.5, rel=0.1)
  # A pure power law: the floor E is held at 0 (not negative), alpha still found.
  pure = scaling.fit_power_law(x, 30.0 * x ** -0.2)
  assert pure["E"] >= 0 and pure["alpha"] == pytest.approx(0.2, rel=0.05)


def test_loss_nd_recovers_its_parameters_and_the_compute_optimal_split():
  n = np.repeat(np.geomspace(1e5, 1e7, 4), 4)
  d = np.tile(np.geomspace(1e6, 1e9, 4), 4)
  truth = {"E": 1.5, "A": 300.0, "alpha": 0.3, "B": 900.0, "beta": 0.25}
  fit = scaling.fit_loss_nd(n, d, scaling.loss_nd(truth, n, d))
  for key, value in truth.items():
    assert fit[key] == pytest.approx(value, rel=1e-4), key
  # The closed-form optimum equals a brute-force search along the iso-compute line C = 6 N D.
  compute = 1e18
  n_opt, d_opt = scaling.compute_optimal(fit, compute)
  grid = np.geomspace(n_opt / 100, n_opt * 100, 20001)
  brute = grid[np.argmin(scaling.loss_nd(truth, grid, compute / (6 * grid)))]
  assert n_opt == pytest.approx(brute, rel=1e-3) and n_opt * d_opt * 6 == pytest.approx(compute)


@pytest.mark.parametrize("x, y, message", [
    ([1.0, 2.0], [1.0, 0.5], "at least 3 points"),
    ([1.0, -2.0, 3.0], [1.0, 0.5, 0.3], "positive"),
    ([1.0, 2.0, 3.0], [1.0, np.nan, 0.3], "finite"),
])
def test_fit_rejects_bad_input(x, y, message):
  with pytest.raises(ValueError, match=message):
    scaling.fit_power_law(x, y)


def test_pareto_front():
  x = [1.0, 2.0, 3.0, 4.0, 5.0]
  y = [5.0, 4.0, 4.5, 3.0, 3.5]
  assert scaling.pareto_front(x, y).tolist() == [0, 1, 3]


def test_fit_results_and_plot(tmp_path):
  truth = {"E": 1.0, "A": 20.0, "alpha": 0.4, "B": 60.0, "beta": 0.3}
  rows = []
  for n in (1e4, 3e4, 1e5):
    for d in (1e6, 4e6, 1.6e7):
      rows.append({"params": n, "tokens": d, "train_flops": 6 * n * d,
                       "metric": float(scaling.loss_nd(truth, n, d))})
  fits = scaling.fit_results(rows, "metric")
  assert fits["loss_nd"]["alpha"] == pytest.approx(0.4, rel=1e-3)
  assert fits["compute_optimal"]["flops_per_param_token"] == pytest.approx(6.0)
  assert fits["compute_optimal"]["n_exponent"] == pytest.approx(0.3 / 0.7, rel=1e-3)
  assert fits["loss_vs_params"]["points"] == 3      # the largest token budget only
  path = scaling.plot_scaling(str(tmp_path / "s.png"), rows, fits, "metric", label="eval/loss")
  from PIL import Image
  with Image.open(path) as image:
    assert image.size[0] > 600
  assert "error" in scaling.fit_results([], "metric")
  two_budgets = scaling.fit_results([r for r in rows if r["tokens"] < 1e7], "metric")
  assert "3 distinct" in two_budgets["loss_nd_error"] and "loss_vs_params" in two_budgets
