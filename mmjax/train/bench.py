"""`mmjax bench step`: train-step throughput on the objective's synthetic batches, as one dict.

The step is compiled ahead of time (its compile time and XLA's FLOP count are reported), run
`warmup` times, then `steps` times back to back; the peak FLOP rate (CPU: a measured matmul in
the run's precision) is measured before and after the timed steps and averaged, since the rate of
a shared machine drifts.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import ml_collections

from mmjax import progress
from mmjax import sharding as mmsharding
from mmjax.train import flops as mmflops
from mmjax.train import state as trainstate
from mmjax.train import step as trainstep
from mmjax.train.loop import build


def run_bench_step(config: ml_collections.ConfigDict, steps: int = 10, warmup: int = 2,
                   workdir: str | None = None) -> dict[str, Any]:
  """Times the train step; returns a JSON-able dict (`workdir` is unused: nothing is written)."""
  del workdir
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  shown = jax.process_index() == 0  # what it is doing, on stderr; stdout stays the JSON line
  with progress.phase("bench step: building the model and its batch", enabled=shown):
    objective, setup = build(config)
    batch_size = config.train.batch_size
    local = objective.synthetic_batch(batch_size // jax.process_count(),
                                      seed=int(config.seed) + jax.process_index())
    state = trainstate.init_state(config, setup)
  dtype = str(config.get("model", {}).get("dtype", "float32"))
  with setup.context():
    batch = mmsharding.global_batch(local, setup.batch_shardings)
    start = time.perf_counter()
    with progress.phase("bench step: compiling the train step", enabled=shown):
      compiled = trainstep.jit_step(setup, config.train).lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    with progress.phase(f"bench step: {warmup} warm-up steps", enabled=shown):
      for _ in range(warmup):
        state, _ = compiled(state, batch)
      jax.block_until_ready(state)
  with progress.phase("bench step: measuring the peak FLOP rate", enabled=shown):
    peak_before, how = mmflops.peak_flops(dtype=dtype)  # outside the mesh: one device
  with setup.context(), progress.phase(f"bench step: timing {steps} steps", enabled=shown):
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - start) / steps
  with progress.phase("bench step: measuring the peak FLOP rate again", enabled=shown):
    peak_after, _ = mmflops.peak_flops(dtype=dtype)
  peak = 0.5 * (peak_before + peak_after)
  model_flops = objective.train_flops_per_sample() * batch_size
  xla_flops = mmflops.compiled_flops(compiled)
  devices = jax.device_count()
  return {
      "bench": "step",
      "objective": config.objective,
      "batch_size": batch_size,
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
      "peak_source": how,
      "mfu": mmflops.mfu(model_flops / step_s, peak),
      "loss": float(metrics["loss"]),
  }
