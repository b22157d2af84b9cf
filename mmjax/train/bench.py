"""`mmjax bench step`: train-step throughput, the work it ran, and where the time goes, as one dict.

The batch (`batch`):
- "synthetic": the objective's random batch (every slot budget filled);
- "masked": random records through the training masking (4M: the config's Dirichlet mixture,
  clamps, span masking), i.e. the valid-token statistics of training and of the reference
  implementation; `valid_targets=N` takes the first seed from `config.seed` on whose batch has
  exactly N valid decoder slots, for equal work with a figure measured elsewhere;
- "data": the first batch of the config's token set (`data.data_dir`), as training reads it.
The result states the valid tokens of the batch it ran (every boolean field of the batch, summed).

The step is compiled ahead of time (compile time and XLA's FLOP count are reported), run `warmup`
times, then `steps` times back to back. The peak FLOP rate (CPU: a measured matmul in the run's
precision) is measured before and after the timed steps and averaged, since the rate of a shared
machine drifts; on CPU the fp32 matmul rate of numpy is measured beside it, and the load average
is read at both ends. With `profile`, one more step runs under `jax.profiler` and its op time is
split by phase (forward, backward, optimizer) and kind (matmul, attention, elementwise ...):
`mmjax.train.step_profile`.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from mmjax import hostcpu, progress
from mmjax import sharding as mmsharding
from mmjax.errors import UserError
from mmjax.train import flops as mmflops
from mmjax.train import state as trainstate
from mmjax.train import step as trainstep
from mmjax.train import step_profile
from mmjax.train.loop import build

BATCHES = ("synthetic", "masked", "data")
MAX_SEEDS = 5000  # seeds tried for `valid_targets` (a 4M-tiny batch's count spreads over ~+-300)


def _masked(objective, batch_size: int, seed: int, valid_targets: int | None,
            text_tokens: int | None) -> tuple[dict[str, np.ndarray], int]:
  make = getattr(objective, "masked_batch", None)
  if make is None:
    raise UserError(f"bench step --batch=masked: objective {type(objective).__name__} has no "
                    "training masking to draw from; use --batch=synthetic or --batch=data")
  kwargs = {} if text_tokens is None else {"text_tokens": text_tokens}
  if valid_targets is None:
    return make(batch_size, seed, **kwargs), seed
  for s in range(seed, seed + MAX_SEEDS):
    batch = make(batch_size, s, **kwargs)
    if int(np.count_nonzero(batch["dec_valid"])) == valid_targets:
      return batch, s
  raise UserError(f"bench step --valid-targets={valid_targets}: no masked batch of {batch_size} "
                  f"with that many valid targets among seeds {seed}..{seed + MAX_SEEDS - 1}")


def local_batch(objective, config: ml_collections.ConfigDict, kind: str = "synthetic", *,
                valid_targets: int | None = None,
                text_tokens: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """This host's share of the bench batch, and how it was drawn."""
  if kind not in BATCHES:
    raise UserError(f"bench step --batch must be one of {BATCHES}, got {kind!r}")
  if valid_targets is not None and kind != "masked":
    raise UserError("bench step --valid-targets needs --batch=masked")
  size = config.train.batch_size // jax.process_count()
  seed = int(config.seed) + jax.process_index()
  source: dict[str, Any] = {"batch": kind}
  if kind == "synthetic":
    batch = objective.synthetic_batch(size, seed=seed)
  elif kind == "masked":
    batch, source["seed"] = _masked(objective, size, seed, valid_targets, text_tokens)
    if text_tokens is not None:
      source["text_tokens"] = text_tokens
  else:
    source["data_dir"] = str(config.data.get("data_dir", ""))
    it = objective.make_iterator("train", jax.process_index(), jax.process_count())
    batch = next(iter(it))
  return {k: np.asarray(v) for k, v in batch.items()}, source


def valid_counts(batch: dict[str, np.ndarray]) -> dict[str, int]:
  """Each boolean field of the batch (validity and loss masks), summed over this host's rows."""
  return {name: int(np.count_nonzero(x)) for name, x in sorted(batch.items()) if x.dtype == bool}


def run_bench_step(config: ml_collections.ConfigDict, steps: int = 10, warmup: int = 2,
                   workdir: str | None = None, *, batch: str = "synthetic",
                   valid_targets: int | None = None, text_tokens: int | None = None,
                   profile: bool = True) -> dict[str, Any]:
  """Times the train step; returns a JSON-able dict (`workdir` is unused: nothing is written)."""
  del workdir
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  load_before = os.getloadavg()
  shown = jax.process_index() == 0  # what it is doing, on stderr; stdout stays the JSON line
  with progress.phase("bench step: building the model and its batch", enabled=shown):
    objective, setup = build(config)
    batch_size = config.train.batch_size
    local, source = local_batch(objective, config, batch, valid_targets=valid_targets,
                                text_tokens=text_tokens)
    state = trainstate.init_state(config, setup)
  dtype = str(config.get("model", {}).get("dtype", "float32"))
  on_cpu = jax.devices()[0].platform == "cpu"
  with setup.context():
    global_batch = mmsharding.global_batch(local, setup.batch_shardings)
    start = time.perf_counter()
    with progress.phase("bench step: compiling the train step", enabled=shown):
      compiled = trainstep.jit_step(setup, config.train).lower(state, global_batch).compile()
    compile_s = time.perf_counter() - start
    with progress.phase(f"bench step: {warmup} warm-up steps", enabled=shown):
      for _ in range(warmup):
        state, _ = compiled(state, global_batch)
      jax.block_until_ready(state)

  def rates() -> dict[str, float]:
    peak, how = mmflops.peak_flops(dtype=dtype)  # outside the mesh: one device
    out = {"peak": peak, "how": how}
    if on_cpu:
      out["jax_float32"] = peak if dtype == "float32" else mmflops.measure_matmul_rate("float32")
      out["numpy_float32"] = mmflops.measure_numpy_matmul_rate()
    return out

  with progress.phase("bench step: measuring the matmul rates", enabled=shown):
    before = rates()
  with setup.context(), progress.phase(f"bench step: timing {steps} steps", enabled=shown):
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, global_batch)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - start) / steps
  with progress.phase("bench step: measuring the matmul rates again", enabled=shown):
    after = rates()
  breakdown = None
  if profile:
    with setup.context(), progress.phase("bench step: profiling one step", enabled=shown):
      state, breakdown = step_profile.profile_step(compiled, state, global_batch)
  load_after = os.getloadavg()
  peak = 0.5 * (before["peak"] + after["peak"])
  model_flops = objective.train_flops_per_sample() * batch_size
  xla_flops = mmflops.compiled_flops(compiled)
  devices = jax.device_count()
  result = {
      "bench": "step",
      "objective": config.objective,
      "batch_size": batch_size,
      **source,
      "valid_tokens": valid_counts(local),
      "microbatches": int(config.train.microbatches),
      "devices": devices,
      "mesh": {k: int(v) for k, v in setup.mesh.shape.items()},
      "dtype": dtype,
      "param_dtype": str(config.train.get("param_dtype", "float32")),
      "params": trainstate.param_count(state),
      "compile_s": round(compile_s, 3),
      "step_time_s": step_s,
      "samples_per_s": batch_size / step_s,
      "tokens_per_s": objective.tokens_per_sample() * batch_size / step_s,
      "model_flops_per_step": model_flops,
      "xla_flops_per_step": None if xla_flops is None else xla_flops * devices,
      "xla_flops_per_device": xla_flops,
      "peak_flops_per_s": peak,
      "peak_source": before["how"],
      "mfu": mmflops.mfu(model_flops / step_s, peak),
      "loss": float(metrics["loss"]),
      "load_avg_1min": [round(load_before[0], 2), round(load_after[0], 2)],
  }
  if on_cpu:
    result["cpu"] = hostcpu.describe()
    result["matmul_gflops"] = {
        name: round(0.5 * (before[name] + after[name]) / 1e9, 1)
        for name in ("jax_float32", "numpy_float32")}
  if breakdown is not None:
    # Shares of op time, as seconds of the measured step.
    breakdown["phase_s"] = {k: round(v * step_s, 4) for k, v in breakdown["phases"].items()}
    breakdown["kind_s"] = {k: round(v * step_s, 4) for k, v in breakdown["kinds"].items()}
    result["breakdown"] = breakdown
  return result
