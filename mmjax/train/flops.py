"""Peak FLOP rates and model FLOPs utilisation (MFU).

MFU = analytic model FLOPs per second / peak FLOPs per second of the devices in use. Accelerator
peaks come from a table (dense bf16, per chip); on CPU the peak is a large matmul measured once at
start in the run's precision, on the whole host (the fake CPU devices of tests share its cores).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.train import hlo_flops

# Dense bf16 peak FLOP/s per chip (vendor figures).
PEAK_BF16 = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,   # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,   # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
}


def table_peak(device_kind: str) -> float | None:
  """Per-device peak for an accelerator kind, matching the longest table prefix."""
  for name in sorted(PEAK_BF16, key=len, reverse=True):
    if device_kind.startswith(name):
      return PEAK_BF16[name]
  return None


def measure_matmul_rate(dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a square matmul on the default device, best of `repeats`.

  Measured the way the models multiply: in this process (so with the XLA flags that mmjax sets, see
  mmjax/__init__.py), inputs in `dtype`, fp32 accumulation (`preferred_element_type`), the fast path
  for bf16. 2048 is large enough that the call overhead is negligible (17 GFLOP per call) and XLA:CPU
  spreads the matmul over all cores; 1024 under-reported the host's rate.
  """
  dt = jnp.dtype(dtype)
  device = jax.devices()[0]
  a = jax.device_put(jax.random.normal(jax.random.key(0), (size, size), dt), device)
  b = jax.device_put(jax.random.normal(jax.random.key(1), (size, size), dt), device)

  @jax.jit
  def matmul(x, y):
    return jnp.matmul(x, y, preferred_element_type=jnp.float32)

  matmul(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size ** 3 / best


def measure_numpy_matmul_rate(size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a square fp32 matmul in numpy (its BLAS), best of `repeats`: the host's matmul rate
  outside XLA, for comparing CPUs and matmul libraries."""
  rng = np.random.default_rng(0)
  a = rng.standard_normal((size, size), dtype=np.float32)
  b = rng.standard_normal((size, size), dtype=np.float32)
  out = np.empty((size, size), np.float32)
  np.matmul(a, b, out=out)
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    np.matmul(a, b, out=out)
    best = min(best, time.perf_counter() - start)
  return 2.0 * size ** 3 / best


def peak_flops(devices: list[jax.Device] | None = None, dtype: str = "float32") -> tuple[float, str]:
  """(peak FLOP/s of `devices` together, how it was obtained)."""
  devices = list(jax.devices() if devices is None else devices)
  kind = devices[0].device_kind
  if devices[0].platform == "cpu":
    return measure_matmul_rate(dtype), f"measured {dtype} matmul on the CPU host"
  peak = table_peak(kind)
  if peak is None:
    return float("nan"), f"no peak known for {kind!r}"
  return peak * len(devices), f"table: {kind} x {len(devices)}"


def mfu(model_flops_per_s: float, peak: float) -> float:
  return model_flops_per_s / peak if peak and peak == peak else float("nan")


def compiled_flops(compiled) -> float | None:
  """XLA's FLOP count of a compiled computation (per device on a sharded program), with the
  matmuls of loop bodies (the scanned layers) counted once per iteration, not once in all."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 -- some backends do not implement it.
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return hlo_flops.loop_scaled_flops(float(cost["flops"]), compiled.as_text())
