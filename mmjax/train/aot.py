"""`mmjax aot`: the train step compiled ahead of time for a TPU topology, on a machine without TPUs.

libtpu (the `tpu` extra: `pip install -e .[tpu]`) describes a topology such as `v5p:2x2x2` as
devices the TPU compiler can target from any host. The step of `mmjax train` (the same `build()` and
`jit_step`) is lowered with abstract arguments carrying the run's shardings and compiled; the
result is one dict: memory per chip (XLA's memory analysis), FLOPs (XLA's cost analysis next to the
analytic model FLOPs), the mesh, and whether the program fits the chip's HBM.

Without libtpu (or with `lower_only`), the step is lowered for the TPU platform over as many CPU
devices as the topology has chips, so the mesh, the shardings and the program are those of the
topology; reported are the per-chip bytes of the sharded state and batch (exact, from the
shardings) and the FLOPs of the HLO before XLA's optimisations (a while-loop body, such as the
scanned layers, counts once there). Temporaries, and so whether the step fits, need the TPU compiler.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import serialize_executable
from jax.experimental import topologies

from mmjax import libtpu_env, progress
from mmjax.errors import UserError
from mmjax.models.configs import MODEL_CONFIGS
from mmjax.train import flops as mmflops
from mmjax.train import hlo_flops
from mmjax.train import state as trainstate
from mmjax.train import step as trainstep
from mmjax.train.loop import build

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class TpuKind:
  """A TPU generation as libtpu names it, with its per-chip HBM (vendor figures)."""
  name: str            # prefix of libtpu's topology names, e.g. "v5p"
  device_kind: str     # jax Device.device_kind
  hbm_bytes: int       # HBM per chip
  dims: int            # dimensions of its topology names (2x2 or 2x2x2)
  hbm_bandwidth: float  # HBM bytes/s per chip


TPU_KINDS = {
    "v4": TpuKind("v4", "TPU v4", 32 * GIB, 3, 1228e9),
    "v5e": TpuKind("v5e", "TPU v5 lite", 16 * GIB, 2, 819e9),
    "v5p": TpuKind("v5p", "TPU v5", 95 * GIB, 3, 2765e9),
    "v6e": TpuKind("v6e", "TPU v6 lite", 32 * GIB, 2, 1640e9),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}
@dataclasses.dataclass(frozen=True)
class Topology:
  kind: TpuKind
  shape: tuple[int, ...]

  @property
  def name(self) -> str:
    return f"{self.kind.name}:{'x'.join(map(str, self.shape))}"

  @property
  def chips(self) -> int:
    return math.prod(self.shape)


def parse_topology(text: str) -> Topology:
  """`v5p:2x2x2`, `v6e:4x4`, `v5litepod:2x4`, ... (chips along each axis of the slice)."""
  match = re.fullmatch(r"\s*([A-Za-z0-9]+)[:=]([0-9x]+)\s*", text)
  examples = "e.g. v5p:2x2x2, v4:2x2x1, v5e:2x4, v6e:4x4"
  if not match:
    raise UserError(f"--topology {text!r}: expected KIND:AxB[xC], {examples} (not v5p-16)")
  name = ALIASES.get(match.group(1).lower(), match.group(1).lower())
  if name not in TPU_KINDS:
    raise UserError(f"--topology {text!r}: unknown TPU kind {match.group(1)!r}; known: "
                    f"{sorted(TPU_KINDS) + sorted(ALIASES)}")
  kind = TPU_KINDS[name]
  parts = match.group(2).split("x")
  if len(parts) != kind.dims or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise UserError(f"--topology {text!r}: {name} topologies have {kind.dims} positive sizes, "
                    f"{examples}")
  return Topology(kind, tuple(int(p) for p in parts))


def tpu_compiler_available() -> bool:
  """Whether libtpu (the TPU compiler) can be loaded in this environment."""
  return bool(os.environ.get("TPU_LIBRARY_PATH")) or importlib.util.find_spec("libtpu") is not None


def topology_devices(topology: Topology) -> list[jax.Device]:
  """One device per chip of the topology, as libtpu describes it."""

  # libtpu takes a machine-wide lock file for the chips it drives; a compile-only topology drives
  # none, and other processes (any JAX process here with libtpu installed) may hold the lock.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  libtpu_env.one_host_slice_without_chips()
  try:
    desc = topologies.get_topology_desc(topology_name=topology.name, platform="tpu")
  except Exception as e:  # noqa: BLE001 -- libtpu reports a bad name as a runtime error.
    raise UserError(f"--topology {topology.name}: libtpu cannot describe it: "
                    f"{str(e).splitlines()[0]}") from None
  # v4 descriptions list both TensorCores of a chip; jobs run one device per chip (megacore).
  devices = [d for d in desc.devices if getattr(d, "core_on_chip", 0) == 0]
  if len(devices) != topology.chips:
    raise UserError(f"--topology {topology.name}: libtpu describes {len(devices)} chips, expected "
                    f"{topology.chips}")
  return devices


def _configured_cpu_devices() -> int:
  """CPU devices this process has or will have (jax_num_cpu_devices, else XLA_FLAGS, else 1)."""
  if jax.config.jax_num_cpu_devices > 0:
    return int(jax.config.jax_num_cpu_devices)
  match = re.search(r"xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
  return int(match.group(1)) if match else 1


def cpu_devices(count: int) -> list[jax.Device]:
  """`count` CPU devices; more fake host devices are made if the backend has not started yet
  (never fewer: other code in the process may rely on the count)."""
  if _configured_cpu_devices() < count:
    try:
      jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
      pass  # the backend is already running: use what exists
  devices = jax.devices("cpu")
  if len(devices) < count:
    raise UserError(f"lowering for {count} chips needs {count} CPU devices; this process has "
                    f"{len(devices)} (run it in a fresh process, or with XLA_FLAGS="
                    f"--xla_force_host_platform_device_count={count})")
  return devices[:count]


def _target_tpu(config: ml_collections.ConfigDict) -> dict[str, str]:
  """Makes the TPU the model's target (`model.platform`), which every implementation choice
  follows (attention kernel, grouped matmuls, heads, compute dtype), also when the step is lowered
  over CPU devices for want of libtpu; returns what it set."""
  if "model" not in config or config.get("objective") not in MODEL_CONFIGS:
    return {}
  with config.unlocked():
    config.model.platform = "tpu"
  return {"model.platform": "tpu"}


def _abstract_batch(objective, setup: trainstate.Setup, batch_size: int) -> dict[str, Any]:
  """The global batch as ShapeDtypeStructs with its shardings (one synthetic row sets the layout)."""
  row = objective.synthetic_batch(1, seed=0)
  out = {}
  for name, sharding in setup.batch_shardings.items():
    x = np.asarray(row[name])
    out[name] = jax.ShapeDtypeStruct((batch_size,) + x.shape[1:], x.dtype, sharding=sharding)
  return out


def bytes_per_chip(tree: Any) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return int(total)


def _memory(compiled) -> dict[str, int]:
  stats = compiled.memory_analysis()
  memory = {"argument_bytes": int(stats.argument_size_in_bytes),
            "output_bytes": int(stats.output_size_in_bytes),
            "alias_bytes": int(stats.alias_size_in_bytes),
            "temp_bytes": int(stats.temp_size_in_bytes),
            "generated_code_bytes": int(stats.generated_code_size_in_bytes)}
  # Donated state: outputs alias arguments, so they count once.
  memory["total_bytes"] = (memory["argument_bytes"] + memory["output_bytes"] - memory["alias_bytes"]
                           + memory["temp_bytes"] + memory["generated_code_bytes"])
  return memory


_EXHAUSTED = re.compile(r"required for ([\w ]+?) \(([0-9.]+[KMGT]?)\) exceeds available "
                        r"([\w ]+?) \(([0-9.]+[KMGT]?)\)")
_TENSOR = re.compile(r"tensor<((?:[0-9]+x)+)(bf16|f16|f32|f64|i1|i8|i16|i32|i64|ui32)>")
_ITEM_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "i1": 1, "i8": 1, "i16": 2, "i32": 4,
               "i64": 8, "ui32": 4}


def largest_values(stablehlo: str, count: int = 3) -> list[str]:
  """The largest distinct array types of a lowered program (global shapes, before partitioning)."""
  sizes = {}
  for dims, dtype in set(_TENSOR.findall(stablehlo)):
    shape = [int(d) for d in dims.rstrip("x").split("x")]
    sizes[f"{dtype}[{','.join(map(str, shape))}]"] = math.prod(shape) * _ITEM_BYTES[dtype]
  top = sorted(sizes.items(), key=lambda kv: -kv[1])[:count]
  return [f"{name} {size / GIB:.1f} GiB" for name, size in top]


def does_not_fit(message: str, topo: Topology, stablehlo: str) -> str:
  """One line from the TPU compiler's out-of-memory error: needed vs available per chip, and
  the program's largest values."""
  match = _EXHAUSTED.search(message)
  if match:
    what, needed, where, available = match.groups()
    head = (f"the train step does not fit {topo.name}: {what} need {needed} per chip, "
            f"{where} has {available}")
  else:
    head = f"the train step does not fit {topo.name}: {message.splitlines()[0]}"
  return (f"{head}; largest values (global shapes): {', '.join(largest_values(stablehlo))} "
          f"(try a larger slice, more fsdp, model.remat or a smaller train.batch_size)")


def xla_cost(compiled) -> dict[str, float]:
  """XLA's own cost analysis of a compiled step, per chip: loop bodies and kernels counted once."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 -- some backends do not implement it.
    return {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return {key: float(cost[key]) for key in ("flops", "bytes accessed") if cost and key in cost}


def program_figures(hlo_text: str, cost: dict[str, float], *, chips: int, model_flops: float,
                    peak: float | None, bandwidth: float) -> dict[str, Any]:
  """What the compiled program does per chip, from its optimised HLO and XLA's cost analysis:
  FLOPs and HBM bytes with every loop body counted per iteration (and splash kernels' matmuls),
  the ratio to the analytic model FLOPs, the splash kernels present, the roofline step time."""
  flops = (hlo_flops.loop_scaled_flops(cost["flops"], hlo_text) if "flops" in cost else None)
  bytes_ = (hlo_flops.loop_scaled_bytes(cost["bytes accessed"], hlo_text)
            if "bytes accessed" in cost else None)
  figures: dict[str, Any] = {
      "xla_flops_per_chip": flops,
      "xla_flops_per_step": None if flops is None else flops * chips,
      # Compiled over analytic model FLOPs (loop bodies counted per iteration); above 1: the
      # remat recomputation, elementwise work and what the analytic count leaves out.
      "flops_ratio": None if not flops or not model_flops else round(flops * chips / model_flops, 4),
      "bytes_accessed_per_chip": bytes_,
      "hbm_bandwidth_per_chip": bandwidth,
      "splash_kernels": hlo_flops.splash_kernels(hlo_text),
      "roofline_step_s": None, "roofline_bound": None,
  }
  if flops and bytes_ and peak:
    compute_s, memory_s = flops / peak, bytes_ / bandwidth
    figures.update(roofline_step_s=max(compute_s, memory_s),
                   roofline_bound="compute" if compute_s >= memory_s else "memory",
                   roofline_compute_s=compute_s, roofline_memory_s=memory_s)
  return figures


def _lowered_flops(lowered) -> float | None:
  try:
    cost = lowered.cost_analysis()
  except Exception:  # noqa: BLE001 -- not every lowering has a cost model here.
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def run_aot(config: ml_collections.ConfigDict, topology: str, *, out_dir: str | None = None,
            lower_only: bool = False) -> dict[str, Any]:
  """Compiles (or, without libtpu, lowers) the train step for `topology`; a JSON-able dict."""
  topo = parse_topology(topology)
  compile_step = not lower_only and tpu_compiler_available()
  devices = topology_devices(topo) if compile_step else cpu_devices(topo.chips)
  overrides = _target_tpu(config)
  objective, setup = build(config, devices)
  batch_size = int(config.train.batch_size)
  batch = _abstract_batch(objective, setup, batch_size)
  jitted = trainstep.jit_step(setup, config.train)
  with setup.context():
    start = time.perf_counter()
    with progress.phase(f"aot: lowering the train step for {topology}"):
      traced = jitted.trace(setup.abstract_state, batch)
      lowered = traced.lower() if compile_step else traced.lower(lowering_platforms=("tpu",))
    lower_s = time.perf_counter() - start
    compiled, compile_s = None, None
    if compile_step:
      start = time.perf_counter()
      try:
        with progress.phase(f"aot: compiling it for {topology} with the TPU compiler"):
          compiled = lowered.compile()
      except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
          raise
        raise UserError(does_not_fit(str(e), topo, lowered.as_text())) from None
      compile_s = time.perf_counter() - start

  chips = topo.chips
  state_bytes = bytes_per_chip(setup.abstract_state)
  batch_bytes = bytes_per_chip(batch)
  model_flops = objective.train_flops_per_sample() * batch_size
  peak = mmflops.table_peak(topo.kind.device_kind)
  hbm = topo.kind.hbm_bytes
  result: dict[str, Any] = {
      "aot": topo.name,
      "device_kind": topo.kind.device_kind,
      "chips": chips,
      "compiled": compiled is not None,
      "objective": config.objective,
      "mesh": {k: int(v) for k, v in setup.mesh.shape.items()},
      "batch_size": batch_size,
      "microbatches": int(config.train.microbatches),
      "dtype": str(config.get("model", {}).get("dtype", "float32")),
      "param_dtype": str(config.train.get("param_dtype", "float32")),
      "params": int(sum(math.prod(x.shape) for x in jax.tree.leaves(setup.abstract_state["params"]))),
      "overrides": overrides,
      "state_bytes_per_chip": state_bytes,
      "batch_bytes_per_chip": batch_bytes,
      "hbm_bytes_per_chip": hbm,
      "model_flops_per_step": model_flops,
      "model_flops_per_chip": model_flops / chips,
      "peak_flops_per_chip": peak,
      # The step cannot run faster than its model FLOPs at the chip's peak (MFU = 1).
      "step_time_lower_bound_s": model_flops / chips / peak if peak else None,
      "lower_s": round(lower_s, 3),
  }
  if compiled is not None:
    memory = _memory(compiled)
    cost = xla_cost(compiled)
    result.update(
        compile_s=round(compile_s, 3),
        memory_per_chip=memory,
        total_gib_per_chip=round(memory["total_bytes"] / GIB, 3),
        fits=memory["total_bytes"] <= hbm,
        hbm_fraction=round(memory["total_bytes"] / hbm, 4),
        xla_cost_per_chip=cost,
        **program_figures(compiled.as_text(), cost, chips=chips, model_flops=model_flops,
                          peak=peak, bandwidth=topo.kind.hbm_bandwidth),
    )
  else:
    unoptimised_flops = _lowered_flops(lowered)
    result.update(
        memory_per_chip=None,
        fits=None,
        state_fits=state_bytes + batch_bytes <= hbm,
        hlo_flops_per_step=unoptimised_flops,
        hlo_flops_per_chip=None if unoptimised_flops is None else unoptimised_flops / chips,
        note=("lowered only, over CPU devices standing in for the chips: memory per chip "
              "(temporaries) and XLA's optimised FLOPs need the TPU compiler, libtpu "
              "(pip install -e .[tpu]); hlo_flops are those of the unoptimised program, which "
              "counts a while-loop body (e.g. the scanned layers) once"
              + ("" if not lower_only else "; --lower-only was given")),
    )
  if out_dir:
    result["files"] = _write(out_dir, lowered, compiled, result)
  return result


def _write(out_dir: str, lowered, compiled, result: dict[str, Any]) -> dict[str, Any]:
  """The program (StableHLO; the optimised HLO and the serialized executable when compiled)."""
  out = epath.Path(out_dir)  # a workdir: local or gs://
  out.mkdir(parents=True, exist_ok=True)
  files: dict[str, Any] = {}

  def write(name: str, data: str | bytes) -> None:
    path = out / name
    if isinstance(data, bytes):
      path.write_bytes(data)
    else:
      path.write_text(data)
    files[name] = os.fspath(path)

  write("step.stablehlo.mlir", lowered.as_text())
  if compiled is not None:
    write("step.hlo.txt", compiled.as_text())
    try:
      payload, _, _ = serialize_executable.serialize(compiled)
      write("step.executable", payload)
    except Exception as e:  # noqa: BLE001 -- compile-only clients may not serialize.
      files["executable_error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
  summary = dict(result, files=files)
  write("aot.json", json.dumps(summary, indent=2, default=str) + "\n")
  return files
