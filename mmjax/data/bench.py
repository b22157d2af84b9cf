"""`mmjax bench data`: throughput of the 4M masking transform and of the whole Grain pipeline.

    run_bench_data(config)  ->  {"bench": "data", "samples_per_s": ..., "samples_per_s_per_core": ...}

Records are shapes-like and synthetic (token grids, captions and boxes-as-text of realistic
lengths), so the figure measures the transform, not a disk. `samples_per_s` is the transform alone on
one process over batches of records already in memory (wall clock); `samples_per_s_per_core` the
same per CPU-second of the process (numpy here is single-threaded, so this is the one-core rate even
when other jobs share the machine); `pipeline_samples_per_s` adds Grain (shuffle, shard, batch,
state) in the main process, wall clock.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from mmjax import modalities
from mmjax.modalities import IMAGE_PIXELS, IMAGE_TOKENS, Registry
from mmjax.tokenizers import special


def synthetic_records(registry: Registry, count: int, seed: int = 0) -> list[dict[str, Any]]:
  """Well-formed records for every modality of the registry: uint16 grids, int32 text of random
  length (a quarter to all of max_length - 1, ids above the reserved ones), uint8 images."""
  rng = np.random.default_rng(seed)
  low = special.SpecialIds().num_reserved
  records = []
  for i in range(count):
    record: dict[str, Any] = {"id": i}
    for m in registry:
      if m.kind == IMAGE_TOKENS:
        record[m.name] = rng.integers(0, m.vocab_size, m.num_tokens).astype(np.uint16)
      elif m.kind == IMAGE_PIXELS:
        record[m.name] = rng.integers(0, 256, (m.image_size, m.image_size, m.channels), np.uint8)
      else:
        longest = max(1, m.max_length - 1)
        n = int(rng.integers(max(1, longest // 4), longest + 1))
        record[m.name] = rng.integers(min(low, m.vocab_size - 1), m.vocab_size, n).astype(np.int32)
    records.append(record)
  return records


def _time_transform(transform, batches, rng, min_seconds: float) -> tuple[float, float]:
  """(samples per wall second, samples per CPU second of this process)."""
  samples, start, cpu = 0, time.perf_counter(), time.process_time()
  while True:
    for records in batches:
      transform(records, rng)
      samples += len(records)
    elapsed = time.perf_counter() - start
    if elapsed >= min_seconds:
      return samples / elapsed, samples / max(time.process_time() - cpu, 1e-9)


def run_bench_data(config, workdir: str | None = None, *, batch_size: int = 256,
                   num_records: int = 2048, min_seconds: float = 3.0,
                   pipeline_batches: int = 20, pixels: bool = False) -> dict[str, Any]:
  """Measures the 4M transform of `config` on synthetic records; one JSON-able dict.

  Like the reference figure, the token modalities only: `image_pixels` ones are left out unless
  `pixels` (then "rgb" in rgb->all components falls back to the rgb token modality).
  """
  del workdir  # nothing is written
  from mmjax.data import pipeline  # late: keeps `import bench` light

  registry = modalities.from_config(config.modalities)
  if not pixels:
    registry = Registry(tuple(m for m in registry if m.kind != IMAGE_PIXELS))
  records = synthetic_records(registry, num_records, seed=1)
  transform = pipeline.transform_from_config(config, registry=registry)
  batches = [records[i:i + batch_size] for i in range(0, num_records - batch_size + 1, batch_size)]
  rng = np.random.default_rng(0)
  transform(batches[0], rng)  # warm-up
  rate, cpu_rate = _time_transform(transform, batches, rng, min_seconds)

  it = pipeline.make_iterator(config, [pipeline.DatasetSpec("synthetic", records)],
                              batch_size=batch_size, process_index=0, process_count=1,
                              num_workers=0, registry=registry)
  next(it)
  start = time.perf_counter()
  for _ in range(pipeline_batches):
    next(it)
  pipeline_rate = pipeline_batches * batch_size / (time.perf_counter() - start)
  return {
      "bench": "data",
      "samples_per_s": round(rate, 1),
      # One process runs on one core at a time; per CPU-second is robust to a shared machine.
      "samples_per_s_per_core": round(cpu_rate, 1),
      "pipeline_samples_per_s": round(pipeline_rate, 1),
      "batch_size": batch_size,
      "num_input_tokens": int(config.model.num_input_tokens),
      "num_target_tokens": int(config.model.num_target_tokens),
      "modalities": list(registry.names),
      "mixture": str(config.masking.mixture),
      "cpu_count": os.cpu_count(),
  }
