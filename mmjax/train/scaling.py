"""Scaling-law fits with scipy, and their plot.

  L(N)         = E + A N^-alpha                           loss against parameters (or compute C)
  L(N, D)      = E + A N^-alpha + B D^-beta               parameters and training tokens
  L_ij(N, D_i, D_j) = [L_i(N, D_i) + L_j(N, D_j)] / 2 - C + A N^-alpha + B (D_i + D_j)^-beta
                                                          two modalities trained together, over the
                                                          unimodal laws L_i, L_j (Aghajanyan et al.
                                                          2023, "Scaling laws for generative
                                                          mixed-modal language models")

Each fit minimises a Huber loss (delta 1e-3) of the log residuals log L_hat - log L with
`scipy.optimize.least_squares`, as Hoffmann et al. (2022) do for Chinchilla: the robust loss keeps
one bad run from dragging the law, and log residuals weigh small and large losses alike. E, A and B
are fitted as logarithms (so they stay positive); C of the mixed-modal law is free in sign (> 0:
the modalities help each other, < 0: they compete). The problem has local minima, so the fit starts
from several initialisations: a grid of exponents, each with the coefficients that the linear
least-squares solve gives at those exponents, keeping the best few and then the best end point. x is
divided by its geometric mean first, so the coefficients stay well scaled.

`bootstrap=K` refits K resamples of the points (drawn with replacement) from the best fit and
reports 95 % percentile intervals of every parameter under "interval".

Compute-optimal frontier of L(N, D) with C = k N D (k ≈ 6 FLOPs per parameter per token): minimising
L at fixed C gives N_opt = G (C/k)^(beta/(alpha+beta)), D_opt = (C/k) / N_opt with
G = (alpha A / (beta B))^(1/(alpha+beta)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import optimize

from mmjax import paths

HUBER_DELTA = 1e-3                            # on log residuals, as in Hoffmann et al. (2022)
_EXPONENTS = np.geomspace(0.03, 2.0, 16)      # initial exponents (scaling exponents are ~0.05-1)
_STARTS = 4                                   # initialisations refined with least_squares
_LOG_BOUND = 60.0                             # |log E|, |log A|, |log B| (E -> 0 is exp(-60))
_MAX_EXPONENT = 5.0
_LEVEL = 0.95                                 # bootstrap interval coverage
SWEEP_BOOTSTRAP = 100                         # resamples behind the intervals of `mmjax sweep`


def _check(x: Sequence[float], y: Sequence[float], name: str, minimum: int):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1:
    raise ValueError(f"{name}: x and y must be 1-D of equal length, got {x.shape} and {y.shape}")
  if len(x) < minimum:
    raise ValueError(f"{name}: needs at least {minimum} points, got {len(x)}")
  if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(x > 0)):
    raise ValueError(f"{name}: x must be positive and x, y finite")
  if not np.all(y > 0):
    raise ValueError(f"{name}: losses must be positive (the fit is on log residuals)")
  return x, y


def _centred_log(x: np.ndarray) -> tuple[np.ndarray, float]:
  """(log x - mean log x, the geometric mean)."""
  log_x = np.log(x)
  return log_x - log_x.mean(), float(np.exp(log_x.mean()))


def _robust_fit(residuals: Callable[[np.ndarray, np.ndarray], np.ndarray],
                starts: Sequence[np.ndarray], bounds: tuple[np.ndarray, np.ndarray],
                index: np.ndarray) -> np.ndarray:
  """The best end point of Huber least squares on the log residuals from each start."""
  best, best_cost = None, math.inf
  for start in starts:
    start = np.clip(start, bounds[0], bounds[1])
    result = optimize.least_squares(residuals, start, args=(index,), bounds=bounds, loss="huber",
                                    f_scale=HUBER_DELTA, method="trf", x_scale="jac",
                                    xtol=1e-14, ftol=1e-14, gtol=1e-14, max_nfev=2000)
    if result.cost < best_cost:
      best, best_cost = result.x, result.cost
  return best


def _log_coefficient(value: float, floor: float) -> float:
  return math.log(max(float(value), floor))


def _best_starts(candidates: list[tuple[float, np.ndarray]]) -> list[np.ndarray]:
  candidates.sort(key=lambda c: c[0])
  return [theta for _, theta in candidates[:_STARTS]]


def _bootstrap(refit: Callable[[np.ndarray], dict[str, float]], points: int, resamples: int,
               seed: int, usable: Callable[[np.ndarray], bool]) -> dict[str, list[float]]:
  """Percentile intervals of every value `refit(indices)` returns, over `resamples` resamples."""
  rng = np.random.default_rng(seed)
  draws: dict[str, list[float]] = {}
  tries = 0
  while min((len(v) for v in draws.values()), default=0) < resamples and tries < 3 * resamples:
    tries += 1
    index = rng.integers(0, points, points)
    if not usable(index):  # too few distinct levels to identify the law
      continue
    for key, value in refit(index).items():
      draws.setdefault(key, []).append(value)
  tail = (1.0 - _LEVEL) / 2 * 100
  return {key: [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))]
          for key, v in draws.items()}


def fit_power_law(x: Sequence[float], y: Sequence[float], *, bootstrap: int = 0,
                  seed: int = 0) -> dict[str, Any]:
  """Fit of y = E + A x^-alpha: {"E", "A", "alpha", "rmse", "points"} (+ "interval")."""
  x, y = _check(x, y, "fit_power_law", 3)
  u, scale = _centred_log(x)
  log_y = np.log(y)

  def residuals(theta: np.ndarray, index: np.ndarray) -> np.ndarray:
    e, a, alpha = theta
    return np.logaddexp(e, a - alpha * u[index]) - log_y[index]

  floor = 1e-3 * float(y.min())
  candidates = []
  for alpha in _EXPONENTS:
    coef, norm = optimize.nnls(np.stack([np.ones_like(u), np.exp(-alpha * u)], axis=1), y)
    candidates.append((norm, np.array([_log_coefficient(coef[0], floor),
                                       _log_coefficient(coef[1], floor), alpha])))
  bounds = (np.array([-_LOG_BOUND, -_LOG_BOUND, 0.0]),
            np.array([_LOG_BOUND, _LOG_BOUND, _MAX_EXPONENT]))

  def params(theta: np.ndarray) -> dict[str, float]:
    e, a, alpha = (float(v) for v in theta)
    return {"E": math.exp(e), "A": math.exp(a) * scale ** alpha, "alpha": alpha}

  everything = np.arange(len(x))
  best = _robust_fit(residuals, _best_starts(candidates), bounds, everything)
  fit: dict[str, Any] = params(best)
  fit.update(rmse=_rmse(power_law(fit, x), y), points=len(y))
  if bootstrap:
    fit["interval"] = _bootstrap(
        lambda index: params(_robust_fit(residuals, [best], bounds, index)), len(x), bootstrap,
        seed, lambda index: len(np.unique(x[index])) >= 3)
  return fit


def _rmse(prediction: np.ndarray, y: np.ndarray) -> float:
  return float(np.sqrt(np.mean((prediction - y) ** 2)))


def power_law(fit: dict[str, float], x) -> np.ndarray:
  return fit["E"] + fit["A"] * np.asarray(x, np.float64) ** -fit["alpha"]


def fit_loss_nd(n: Sequence[float], d: Sequence[float], y: Sequence[float], *,
                bootstrap: int = 0, seed: int = 0) -> dict[str, Any]:
  """Fit of y = E + A N^-alpha + B D^-beta: {"E", "A", "alpha", "B", "beta", "rmse", "points"}
  (+ "interval", which also bounds the compute-optimal exponent "n_exponent")."""
  n, y = _check(n, y, "fit_loss_nd", 5)
  d, _ = _check(d, y, "fit_loss_nd", 5)
  # Each of A N^-alpha and B D^-beta is only identifiable from 3 levels (the floor E is shared).
  if len(np.unique(n)) < 3 or len(np.unique(d)) < 3:
    raise ValueError("fit_loss_nd: needs at least 3 distinct N and 3 distinct D")
  un, n_scale = _centred_log(n)
  ud, d_scale = _centred_log(d)
  log_y = np.log(y)

  def residuals(theta: np.ndarray, index: np.ndarray) -> np.ndarray:
    e, a, alpha, b, beta = theta
    terms = np.stack([np.full(len(index), e), a - alpha * un[index], b - beta * ud[index]])
    return np.logaddexp.reduce(terms, axis=0) - log_y[index]

  floor = 1e-3 * float(y.min())
  ones = np.ones_like(un)
  candidates = []
  for alpha in _EXPONENTS:
    for beta in _EXPONENTS:
      features = np.stack([ones, np.exp(-alpha * un), np.exp(-beta * ud)], axis=1)
      coef, norm = optimize.nnls(features, y)
      candidates.append((norm, np.array([
          _log_coefficient(coef[0], floor), _log_coefficient(coef[1], floor), alpha,
          _log_coefficient(coef[2], floor), beta])))
  bounds = (np.array([-_LOG_BOUND, -_LOG_BOUND, 0.0, -_LOG_BOUND, 0.0]),
            np.array([_LOG_BOUND, _LOG_BOUND, _MAX_EXPONENT, _LOG_BOUND, _MAX_EXPONENT]))

  def params(theta: np.ndarray) -> dict[str, float]:
    e, a, alpha, b, beta = (float(v) for v in theta)
    return {"E": math.exp(e), "A": math.exp(a) * n_scale ** alpha, "alpha": alpha,
            "B": math.exp(b) * d_scale ** beta, "beta": beta}

  everything = np.arange(len(y))
  best = _robust_fit(residuals, _best_starts(candidates), bounds, everything)
  fit: dict[str, Any] = params(best)
  fit.update(rmse=_rmse(loss_nd(fit, n, d), y), points=len(y))
  if bootstrap:
    def refit(index: np.ndarray) -> dict[str, float]:
      law = params(_robust_fit(residuals, [best], bounds, index))
      return {**law, "n_exponent": law["beta"] / (law["alpha"] + law["beta"])}
    fit["interval"] = _bootstrap(
        refit, len(y), bootstrap, seed,
        lambda index: len(np.unique(n[index])) >= 3 and len(np.unique(d[index])) >= 3)
  return fit


def loss_nd(fit: dict[str, float], n, d) -> np.ndarray:
  n, d = np.asarray(n, np.float64), np.asarray(d, np.float64)
  return fit["E"] + fit["A"] * n ** -fit["alpha"] + fit["B"] * d ** -fit["beta"]


def fit_mixed_modal(n: Sequence[float], d_i: Sequence[float], d_j: Sequence[float],
                    y: Sequence[float], law_i: dict[str, float], law_j: dict[str, float], *,
                    bootstrap: int = 0, seed: int = 0) -> dict[str, Any]:
  """Fit of the interaction between modalities i and j (Aghajanyan et al. 2023):

    y = [L_i(N, D_i) + L_j(N, D_j)] / 2 - C + A N^-alpha + B (D_i + D_j)^-beta

  where L_i, L_j are the unimodal L(N, D) laws (`fit_loss_nd` results) and y the loss of runs on
  both modalities with D_i and D_j tokens of each. Returns {"C", "A", "alpha", "B", "beta",
  "rmse", "points"} (+ "interval"); C > 0 means the modalities help each other at scale.
  """
  n, y = _check(n, y, "fit_mixed_modal", 6)
  d_i, _ = _check(d_i, y, "fit_mixed_modal", 6)
  d_j, _ = _check(d_j, y, "fit_mixed_modal", 6)
  total = d_i + d_j
  if len(np.unique(n)) < 3 or len(np.unique(total)) < 3:
    raise ValueError("fit_mixed_modal: needs at least 3 distinct N and 3 distinct D_i + D_j")
  un, n_scale = _centred_log(n)
  ud, d_scale = _centred_log(total)
  unimodal = (loss_nd(law_i, n, d_i) + loss_nd(law_j, n, d_j)) / 2
  log_y = np.log(y)
  tiny = 1e-6 * float(y.min())

  def residuals(theta: np.ndarray, index: np.ndarray) -> np.ndarray:
    c, a, alpha, b, beta = theta
    prediction = (unimodal[index] - c + np.exp(a - alpha * un[index])
                  + np.exp(b - beta * ud[index]))
    return np.log(np.maximum(prediction, tiny)) - log_y[index]

  floor = 1e-3 * float(y.min())
  ones = np.ones_like(un)
  candidates = []
  for alpha in _EXPONENTS:
    for beta in _EXPONENTS:
      features = np.stack([-ones, np.exp(-alpha * un), np.exp(-beta * ud)], axis=1)
      solve = optimize.lsq_linear(features, y - unimodal, bounds=([-np.inf, 0, 0], np.inf))
      c, a, b = solve.x
      candidates.append((solve.cost, np.array([c, _log_coefficient(a, floor), alpha,
                                               _log_coefficient(b, floor), beta])))
  bounds = (np.array([-np.inf, -_LOG_BOUND, 0.0, -_LOG_BOUND, 0.0]),
            np.array([np.inf, _LOG_BOUND, _MAX_EXPONENT, _LOG_BOUND, _MAX_EXPONENT]))

  def params(theta: np.ndarray) -> dict[str, float]:
    c, a, alpha, b, beta = (float(v) for v in theta)
    return {"C": c, "A": math.exp(a) * n_scale ** alpha, "alpha": alpha,
            "B": math.exp(b) * d_scale ** beta, "beta": beta}

  best = _robust_fit(residuals, _best_starts(candidates), bounds, np.arange(len(y)))
  fit: dict[str, Any] = params(best)
  fit.update(rmse=_rmse(mixed_modal_loss(fit, law_i, law_j, n, d_i, d_j), y), points=len(y))
  if bootstrap:
    fit["interval"] = _bootstrap(
        lambda index: params(_robust_fit(residuals, [best], bounds, index)), len(y), bootstrap,
        seed, lambda index: len(np.unique(n[index])) >= 3 and len(np.unique(total[index])) >= 3)
  return fit


def mixed_modal_loss(fit: dict[str, float], law_i: dict[str, float], law_j: dict[str, float],
                     n, d_i, d_j) -> np.ndarray:
  """L_ij(N, D_i, D_j) of a `fit_mixed_modal` result over the unimodal laws."""
  n, d_i, d_j = (np.asarray(v, np.float64) for v in (n, d_i, d_j))
  return ((loss_nd(law_i, n, d_i) + loss_nd(law_j, n, d_j)) / 2 - fit["C"]
          + fit["A"] * n ** -fit["alpha"] + fit["B"] * (d_i + d_j) ** -fit["beta"])


def compute_optimal(fit: dict[str, float], compute, flops_per_param_token: float = 6.0):
  """(N_opt, D_opt) minimising L(N, D) at compute C = k N D."""
  alpha, beta = fit["alpha"], fit["beta"]
  if fit["A"] <= 0 or fit["B"] <= 0:
    raise ValueError("compute_optimal: the fit has A or B = 0; no trade-off between N and D")
  budget = np.asarray(compute, np.float64) / flops_per_param_token
  g = (alpha * fit["A"] / (beta * fit["B"])) ** (1.0 / (alpha + beta))
  n_opt = g * budget ** (beta / (alpha + beta))
  return n_opt, budget / n_opt


def pareto_front(x: Sequence[float], y: Sequence[float]) -> np.ndarray:
  """Indices of the points with lower y than every point of smaller or equal x (by x)."""
  order = np.argsort(np.asarray(x), kind="stable")
  front, best = [], math.inf
  for i in order:
    if y[i] < best:
      front.append(int(i))
      best = y[i]
  return np.asarray(front, np.int64)


def plot_scaling(path: str, rows: Sequence[dict[str, Any]], fits: dict[str, Any],
                 key: str, label: str | None = None) -> str:
  """log-log loss (`row[key]`) vs parameters (by token budget) and vs compute, with the fits."""
  label = label or key
  import matplotlib  # noqa: PLC0415 -- late: a second to import, only for the PNG

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  import matplotlib.ticker  # noqa: PLC0415

  params = np.array([r["params"] for r in rows], np.float64)
  compute = np.array([r["train_flops"] for r in rows], np.float64)
  tokens = np.array([r["tokens"] for r in rows], np.float64)
  loss = np.array([r[key] for r in rows], np.float64)
  figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
  budgets = sorted(set(tokens.tolist()))
  colours = plt.cm.viridis(np.linspace(0.1, 0.9, max(len(budgets), 1)))
  for colour, budget in zip(colours, budgets):
    pick = tokens == budget
    order = np.argsort(params[pick])
    left.plot(params[pick][order], loss[pick][order], "o-", color=colour, alpha=0.8,
              label=f"D = {budget:.3g} tokens")
    if "loss_nd" in fits:
      grid = np.geomspace(params.min() / 1.5, params.max() * 1.5, 100)
      left.plot(grid, loss_nd(fits["loss_nd"], grid, budget), ":", color=colour)
  if "loss_vs_params" in fits:
    fit = fits["loss_vs_params"]
    grid = np.geomspace(params.min() / 1.5, params.max() * 1.5, 100)
    left.plot(grid, power_law(fit, grid), "k--", label=(
        f"L(N) = {fit['E']:.3g} + {fit['A']:.3g} N^-{fit['alpha']:.3g} (largest D)"))
  left.set(xscale="log", yscale="log", xlabel="parameters N", ylabel=label,
           title="loss vs parameters")
  left.legend(fontsize=7)
  front = pareto_front(compute, loss)
  right.scatter(compute, loss, c="tab:grey", s=18, label="runs")
  right.plot(compute[front], loss[front], "o", color="tab:red", label="frontier")
  if "loss_vs_compute" in fits:
    fit = fits["loss_vs_compute"]
    grid = np.geomspace(compute.min() / 1.5, compute.max() * 1.5, 100)
    right.plot(grid, power_law(fit, grid), "k--",
               label=f"L(C) = {fit['E']:.3g} + {fit['A']:.3g} C^-{fit['alpha']:.3g}")
  right.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel=label,
            title="loss vs compute")
  right.legend(fontsize=7)
  for axis in (left, right):  # minor-tick labels of a short log axis overlap: plain numbers
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
    axis.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
  figure.tight_layout()
  paths.save_figure(figure, path)
  plt.close(figure)
  return path


def fit_results(rows: Sequence[dict[str, Any]], metric: str) -> dict[str, Any]:
  """Every fit the rows allow: L(N) at the largest token budget, L(C) on the compute frontier,
  L(N, D) on all rows; a fit that cannot be made says why instead."""
  rows = [r for r in rows if r.get(metric) is not None and r.get("params")]
  fits: dict[str, Any] = {"metric": metric, "points": len(rows)}
  if not rows:
    fits["error"] = f"no finished run has {metric!r}"
    return fits
  tokens = np.array([r["tokens"] for r in rows], np.float64)
  largest = [r for r, t in zip(rows, tokens) if t == tokens.max()]
  loss = np.array([r[metric] for r in rows], np.float64)
  compute = np.array([r["train_flops"] for r in rows], np.float64)
  attempts = {
      "loss_vs_params": lambda: fit_power_law([r["params"] for r in largest],
                                              [r[metric] for r in largest]),
      "loss_vs_compute": lambda: fit_power_law(compute[pareto_front(compute, loss)],
                                               loss[pareto_front(compute, loss)]),
      "loss_nd": lambda: fit_loss_nd([r["params"] for r in rows], tokens, loss,
                                     bootstrap=SWEEP_BOOTSTRAP),
  }
  for name, attempt in attempts.items():
    try:
      fits[name] = attempt()
    except ValueError as e:
      fits[f"{name}_error"] = str(e)
  if "loss_nd" in fits:
    nd = fits["loss_nd"]
    k = float(np.median(compute / (np.array([r["params"] for r in rows]) * tokens)))
    fits["compute_optimal"] = {"flops_per_param_token": k,
                               "n_exponent": nd["beta"] / (nd["alpha"] + nd["beta"]),
                               "d_exponent": nd["alpha"] / (nd["alpha"] + nd["beta"])}
    if "n_exponent" in nd.get("interval", {}):
      fits["compute_optimal"]["n_exponent_interval"] = nd["interval"]["n_exponent"]
    try:
      n_opt, d_opt = compute_optimal(nd, compute.max(), k)
      fits["compute_optimal"].update(at_flops=float(compute.max()), params=float(n_opt),
                                     tokens=float(d_opt))
    except ValueError as e:
      fits["compute_optimal"]["error"] = str(e)
  return fits
