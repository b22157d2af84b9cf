"""`mmjax bench data`: throughput of the 4M masking transform and of the whole input pipeline.

    run_bench_data(config)  ->  {"bench": "data", "samples_per_s_per_core": ..., ...}

Records are shapes-like and synthetic (token grids, captions and boxes-as-text of realistic
lengths); like the PyTorch reference's figure, token modalities only (no raw pixels). Figures:

  transform only (records already in memory, batches of `batch_size`, one process):
    samples_per_s_per_core    per CPU-second of the process: the one-core rate, robust to other
                              jobs on a shared machine (numpy here runs on one thread)
    samples_per_s             per wall-clock second
  end to end (Grain iterator: index, read, decode, batch, mask; main process, no workers):
    pipeline_samples_per_s(_per_core)       records in memory (Grain + transform only)
    disk_pipeline_samples_per_s(_per_core)  the same records as pre-tokenized ArrayRecord shards
                                            on disk, read in batches and parsed by
                                            `tokens_tfds.RecordParser`
    read_decode_records_per_s_per_core      those reads + parsing alone
    tfds_read_decode_records_per_s_per_core the same through tfds' feature decoding (what
                                            `load_tokens` + `RecordDecoder` do)
`load_avg_1min` says how busy the machine was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmjax import modalities, progress
from mmjax.data.pipeline import fourm as fourm_pipeline
from mmjax.data.pipeline import stream
from mmjax.data.tokens import records as tokens_tfds
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


def _rates(run, samples_per_call: int, min_seconds: float) -> tuple[float, float]:
  """(samples per wall second, samples per CPU second of this process) of repeated `run()`."""
  samples, start, cpu = 0, time.perf_counter(), time.process_time()
  while True:
    run()
    samples += samples_per_call
    elapsed = time.perf_counter() - start
    if elapsed >= min_seconds:
      return samples / elapsed, samples / max(time.process_time() - cpu, 1e-9)


def write_records(registry: Registry, records: Sequence[Mapping[str, Any]], data_dir: str,
                  name: str = "bench") -> None:
  """`records` (a modality absent where a record lacks it or holds None) as a one-shard
  pre-tokenized dataset `name` under `data_dir`, in the layout of `mmjax prepare tokens`."""

  features = tokens_tfds.make_features(registry, ())
  ds_dir = tokens_tfds.dataset_dir(data_dir, name)
  os.makedirs(ds_dir, exist_ok=True)
  serialized = []
  for i, record in enumerate(records):
    present = np.ones(len(registry), np.uint8)
    example: dict[str, Any] = {"id": str(i), "index": i, "present": present}
    for k, m in enumerate(registry):
      value = record.get(m.name)
      present[k] = value is not None
      if m.kind == IMAGE_PIXELS:
        example[m.name] = (np.zeros((m.image_size, m.image_size, m.channels), np.uint8)
                           if value is None else np.asarray(value, np.uint8))
      else:
        dtype = tokens_tfds.token_dtype(m.vocab_size)
        example[m.name] = np.zeros(0, dtype) if value is None else np.asarray(value, dtype)
    serialized.append(features.serialize_example(example))
  tokens_tfds.write_shard(os.path.join(ds_dir, tokens_tfds.shard_filename("train", 0, 1)),
                          serialized)
  tokens_tfds.write_info(ds_dir, name, features, {"train": [len(records)]},
                         {"modalities": tokens_tfds.modality_specs(registry),
                          "splits": {"train": len(records)}},
                         "synthetic records of mmjax bench data")


def run_bench_data(config, workdir: str | None = None, *, batch_size: int = 256,
                   num_records: int = 2048, min_seconds: float = 3.0,
                   pipeline_batches: int = 20, pixels: bool = False,
                   disk: bool = True) -> dict[str, Any]:
  """Measures the 4M transform of `config` on synthetic records, then the input pipeline end to
  end; one JSON-able dict (module docstring). The on-disk records go to `workdir`/bench_records,
  or a temporary directory removed afterwards.

  With `pixels`, `image_pixels` modalities are included (then "rgb" in rgb->all components is
  the pixel modality, else the rgb token modality).
  """

  registry = modalities.from_config(config.modalities)
  if not pixels:
    registry = Registry(tuple(m for m in registry if m.kind != IMAGE_PIXELS))
  records = synthetic_records(registry, num_records, seed=1)
  transform = fourm_pipeline.transform_from_config(config, registry=registry)
  batches = [records[i:i + batch_size] for i in range(0, num_records - batch_size + 1, batch_size)]
  rng = np.random.default_rng(0)
  transform(batches[0], rng)  # warm-up

  def transform_all():
    for records_B in batches:
      transform(records_B, rng)

  with progress.phase(f"bench data: timing the 4M transform for {min_seconds:g} s"):
    rate, cpu_rate = _rates(transform_all, len(batches) * batch_size, min_seconds)

  def pipeline_rates(spec: stream.DatasetSpec) -> tuple[float, float]:
    it = fourm_pipeline.make_iterator(config, [spec], batch_size=batch_size, process_index=0,
                                      process_count=1, num_workers=0, registry=registry)
    next(it)  # warm-up
    return _rates(lambda: [next(it) for _ in range(pipeline_batches)],
                  pipeline_batches * batch_size, 0.0)

  result = {"bench": "data", "samples_per_s": round(rate, 1),
            "samples_per_s_per_core": round(cpu_rate, 1)}
  with progress.phase(f"bench data: timing the pipeline over {pipeline_batches} batches"):
    wall, cpu = pipeline_rates(stream.DatasetSpec("synthetic", records))
  result.update(pipeline_samples_per_s=round(wall, 1),
                pipeline_samples_per_s_per_core=round(cpu, 1))
  if disk:

    with contextlib.ExitStack() as stack, progress.phase("bench data: timing reads from disk"):
      data_dir = (os.path.join(workdir, "bench_records") if workdir else
                  stack.enter_context(tempfile.TemporaryDirectory(prefix="mmjax_bench_")))
      write_records(registry, records, data_dir)
      specs = tokens_tfds.modality_specs(registry)
      raw = tokens_tfds.load_token_bytes(data_dir, "bench", "train")
      parse = tokens_tfds.RecordParser(specs)
      decoded = tokens_tfds.load_tokens(data_dir, "bench", "train")
      decode = tokens_tfds.RecordDecoder(specs)
      keys = list(range(batch_size))
      _, read_cpu = _rates(lambda: list(map(parse, raw.__getitems__(keys))), batch_size, 1.0)
      _, tfds_cpu = _rates(lambda: list(map(decode, decoded.__getitems__(keys))), batch_size, 1.0)
      wall, cpu = pipeline_rates(stream.DatasetSpec("bench", raw, decode=parse))
      result.update(disk_pipeline_samples_per_s=round(wall, 1),
                    disk_pipeline_samples_per_s_per_core=round(cpu, 1),
                    read_decode_records_per_s_per_core=round(read_cpu, 1),
                    tfds_read_decode_records_per_s_per_core=round(tfds_cpu, 1))
  result.update(
      batch_size=batch_size,
      num_input_tokens=int(config.model.num_input_tokens),
      num_target_tokens=int(config.model.num_target_tokens),
      modalities=list(registry.names),
      mixture=str(config.masking.mixture),
      cpu_count=os.cpu_count(),
      load_avg_1min=round(os.getloadavg()[0], 2),
  )
  return result
