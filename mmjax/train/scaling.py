"""Scaling-law fits by least squares, in numpy alone, and their plot.

  L(N)    = E + A N^-alpha                  loss against parameters (or compute C)
  L(N, D) = E + A N^-alpha + B D^-beta      loss against parameters and training tokens

Both are linear in the coefficients (E, A, B) once the exponents are fixed, so the fit is a search
over the exponents (a log-spaced grid, then golden-section / coordinate refinement) whose objective
is the residual of the linear least-squares solve for the coefficients (variable projection); the
coefficients are kept non-negative. x is divided by its geometric mean before fitting so the
exponentials stay well scaled.

Compute-optimal frontier of L(N, D) with C = k N D (k ≈ 6 FLOPs per parameter per token): minimising
L at fixed C gives N_opt = G (C/k)^(beta/(alpha+beta)), D_opt = (C/k) / N_opt with
G = (alpha A / (beta B))^(1/(alpha+beta)).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

_GRID = np.geomspace(0.02, 3.0, 121)   # exponents searched (scaling exponents are ~0.05-1)
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _nonneg_lstsq(features_PK: np.ndarray, y_P: np.ndarray) -> tuple[np.ndarray, float]:
  """min |F c - y|^2 with c >= 0, by trying every subset of free columns (K <= 3)."""
  k = features_PK.shape[1]
  coef, *_ = np.linalg.lstsq(features_PK, y_P, rcond=None)
  if np.all(coef >= 0):  # the usual case: the unconstrained optimum is feasible
    return coef, float(np.sum((features_PK @ coef - y_P) ** 2))
  best_coef, best_sse = np.zeros(k), float(np.sum(y_P ** 2))
  for size in range(1, k):
    for columns in itertools.combinations(range(k), size):
      coef_sub, *_ = np.linalg.lstsq(features_PK[:, columns], y_P, rcond=None)
      if np.any(coef_sub < 0):
        continue
      coef = np.zeros(k)
      coef[list(columns)] = coef_sub
      sse = float(np.sum((features_PK @ coef - y_P) ** 2))
      if sse < best_sse:
        best_coef, best_sse = coef, sse
  return best_coef, best_sse


def _golden(f, lo: float, hi: float, iters: int = 60) -> float:
  """Minimiser of a unimodal f on [lo, hi] (searched in log space)."""
  a, b = math.log(lo), math.log(hi)
  c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
  fc, fd = f(math.exp(c)), f(math.exp(d))
  for _ in range(iters):
    if fc < fd:
      b, d, fd = d, c, fc
      c = b - _GOLDEN * (b - a)
      fc = f(math.exp(c))
    else:
      a, c, fc = c, d, fd
      d = a + _GOLDEN * (b - a)
      fd = f(math.exp(d))
  return math.exp((a + b) / 2)


def _check(x: Sequence[float], y: Sequence[float], name: str, minimum: int):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1:
    raise ValueError(f"{name}: x and y must be 1-D of equal length, got {x.shape} and {y.shape}")
  if len(x) < minimum:
    raise ValueError(f"{name}: needs at least {minimum} points, got {len(x)}")
  if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(x > 0)):
    raise ValueError(f"{name}: x must be positive and x, y finite")
  return x, y


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
  """Least-squares fit of y = E + A x^-alpha (E, A >= 0): {"E", "A", "alpha", "rmse", "points"}."""
  x, y = _check(x, y, "fit_power_law", 3)
  scale = float(np.exp(np.mean(np.log(x))))
  u = x / scale

  def solve(alpha: float) -> tuple[np.ndarray, float]:
    return _nonneg_lstsq(np.stack([np.ones_like(u), u ** -alpha], axis=1), y)

  sse = [solve(a)[1] for a in _GRID]
  i = int(np.argmin(sse))
  alpha = _golden(lambda a: solve(a)[1], _GRID[max(i - 1, 0)], _GRID[min(i + 1, len(_GRID) - 1)])
  if solve(alpha)[1] > sse[i]:
    alpha = float(_GRID[i])
  (e, a_scaled), best = solve(alpha)
  return {"E": float(e), "A": float(a_scaled * scale ** alpha), "alpha": float(alpha),
          "rmse": math.sqrt(best / len(y)), "points": len(y)}


def power_law(fit: dict[str, float], x) -> np.ndarray:
  return fit["E"] + fit["A"] * np.asarray(x, np.float64) ** -fit["alpha"]


def fit_loss_nd(n: Sequence[float], d: Sequence[float], y: Sequence[float]) -> dict[str, float]:
  """Least-squares fit of y = E + A N^-alpha + B D^-beta (E, A, B >= 0)."""
  n, y = _check(n, y, "fit_loss_nd", 5)
  d, _ = _check(d, y, "fit_loss_nd", 5)
  # Each of A N^-alpha and B D^-beta is only identifiable from 3 levels (the floor E is shared).
  if len(np.unique(n)) < 3 or len(np.unique(d)) < 3:
    raise ValueError("fit_loss_nd: needs at least 3 distinct N and 3 distinct D")
  n_scale, d_scale = float(np.exp(np.mean(np.log(n)))), float(np.exp(np.mean(np.log(d))))
  un, ud = n / n_scale, d / d_scale
  ones = np.ones_like(un)

  def solve(alpha: float, beta: float) -> tuple[np.ndarray, float]:
    return _nonneg_lstsq(np.stack([ones, un ** -alpha, ud ** -beta], axis=1), y)

  grid = _GRID[::4]
  sse = _grid_sse(np.stack([ones, un, ud], axis=1), y, grid)
  if not np.isfinite(sse).any():  # no exponent pair has a non-negative unconstrained fit
    sse = np.array([[solve(a, b)[1] for b in grid] for a in grid])
  i, j = np.unravel_index(int(np.argmin(sse)), sse.shape)
  alpha, beta = float(grid[i]), float(grid[j])
  best = float(sse[i, j])
  # Coordinate refinement: golden-section along each exponent in turn, within a shrinking bracket.
  width = float(grid[1] / grid[0]) ** 1.5
  for _ in range(6):
    new_alpha = _golden(lambda a, b=beta: solve(a, b)[1], max(alpha / width, 1e-3),
                        alpha * width, 40)
    new_beta = _golden(lambda b, a=new_alpha: solve(a, b)[1], max(beta / width, 1e-3),
                       beta * width, 40)
    value = solve(new_alpha, new_beta)[1]
    if value <= best:
      alpha, beta, best = new_alpha, new_beta, value
    width = math.sqrt(width)
  (e, a_scaled, b_scaled), best = solve(alpha, beta)
  return {"E": float(e), "A": float(a_scaled * n_scale ** alpha), "alpha": alpha,
          "B": float(b_scaled * d_scale ** beta), "beta": beta,
          "rmse": math.sqrt(best / len(y)), "points": len(y)}


def _grid_sse(base_PK: np.ndarray, y_P: np.ndarray, grid: np.ndarray) -> np.ndarray:
  """Residuals of the unconstrained fits of y = E + A u^-a + B v^-b over a grid of (a, b), by
  batched normal equations; inf where a coefficient comes out negative."""
  powers_G = -grid
  f_n = base_PK[None, :, 1] ** powers_G[:, None]                 # [G, P]
  f_d = base_PK[None, :, 2] ** powers_G[:, None]
  ones = np.ones((len(grid), len(grid), len(y_P)))
  features = np.stack([ones, np.broadcast_to(f_n[:, None], ones.shape),
                       np.broadcast_to(f_d[None, :], ones.shape)], axis=-1)   # [G, G, P, 3]
  gram = np.einsum("abpk,abpl->abkl", features, features)
  rhs = np.einsum("abpk,p->abk", features, y_P)
  with np.errstate(all="ignore"):
    coef = np.linalg.solve(gram + 1e-12 * np.eye(3), rhs[..., None])[..., 0]
    sse = np.sum((np.einsum("abpk,abk->abp", features, coef) - y_P) ** 2, axis=-1)
  sse[np.any(coef < 0, axis=-1) | ~np.isfinite(sse)] = np.inf
  return sse


def loss_nd(fit: dict[str, float], n, d) -> np.ndarray:
  n, d = np.asarray(n, np.float64), np.asarray(d, np.float64)
  return fit["E"] + fit["A"] * n ** -fit["alpha"] + fit["B"] * d ** -fit["beta"]


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
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  figure.savefig(path, dpi=100)
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
      "loss_nd": lambda: fit_loss_nd([r["params"] for r in rows], tokens, loss),
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
    try:
      n_opt, d_opt = compute_optimal(nd, compute.max(), k)
      fits["compute_optimal"].update(at_flops=float(compute.max()), params=float(n_opt),
                                     tokens=float(d_opt))
    except ValueError as e:
      fits["compute_optimal"]["error"] = str(e)
  return fits
