"""Multi-host start-up: one call, before any other JAX use, on every process.

Where the processes come from decides how they find each other:
- Cloud TPU VMs and SLURM: JAX detects the cluster itself (`jax.distributed.initialize()` with no
  arguments reads the TPU metadata or the SLURM variables).
- Anything else, including several processes on one machine for tests: set
  `MMJAX_COORDINATOR=host:port`, `MMJAX_NUM_PROCESSES=N` and `MMJAX_PROCESS_ID=i`
  (and optionally `MMJAX_LOCAL_DEVICES=k` for k CPU devices per process).
- None of these: a single process; nothing to do.
"""

from __future__ import annotations

import dataclasses
import os

import jax

from mmjax.errors import UserError

_initialized = False


@dataclasses.dataclass(frozen=True)
class Cluster:
  """How this process joins the others, as found in the environment."""
  kind: str                  # "single", "explicit", "slurm" or "tpu"
  coordinator: str = ""
  num_processes: int = 1
  process_id: int = 0
  local_devices: int = 0     # CPU devices per process; 0 keeps JAX's default


def detect(environ: dict[str, str] | None = None) -> Cluster:
  """The cluster this process is part of, from environment variables."""
  env = os.environ if environ is None else environ
  if "MMJAX_COORDINATOR" in env:
    try:
      num_processes = int(env["MMJAX_NUM_PROCESSES"])
      process_id = int(env["MMJAX_PROCESS_ID"])
      local_devices = int(env.get("MMJAX_LOCAL_DEVICES", "0"))
    except KeyError as e:
      raise UserError(f"MMJAX_COORDINATOR is set but {e.args[0]} is not") from None
    except ValueError as e:
      raise UserError(f"MMJAX_NUM_PROCESSES / MMJAX_PROCESS_ID / MMJAX_LOCAL_DEVICES must be "
                      f"integers: {e}") from None
    if not 0 <= process_id < num_processes:
      raise UserError(f"MMJAX_PROCESS_ID={process_id} is outside [0, MMJAX_NUM_PROCESSES="
                      f"{num_processes})")
    return Cluster("explicit", env["MMJAX_COORDINATOR"], num_processes, process_id, local_devices)
  if int(env.get("SLURM_NTASKS", "1")) > 1:
    return Cluster("slurm", num_processes=int(env["SLURM_NTASKS"]),
                   process_id=int(env.get("SLURM_PROCID", "0")))
  if env.get("TPU_WORKER_HOSTNAMES") and "," in env["TPU_WORKER_HOSTNAMES"]:
    return Cluster("tpu", num_processes=len(env["TPU_WORKER_HOSTNAMES"].split(",")),
                   process_id=int(env.get("TPU_WORKER_ID", "0")))
  return Cluster("single")


def initialize(cluster: Cluster | None = None) -> Cluster:
  """Joins the cluster (once per process) and returns it."""
  global _initialized
  cluster = detect() if cluster is None else cluster
  if _initialized or cluster.kind == "single":
    return cluster
  if cluster.kind == "explicit":
    if cluster.local_devices:
      jax.config.update("jax_num_cpu_devices", cluster.local_devices)
    jax.distributed.initialize(cluster.coordinator, num_processes=cluster.num_processes,
                               process_id=cluster.process_id)
  else:
    jax.distributed.initialize()  # JAX reads the SLURM / TPU environment itself
  _initialized = True
  return cluster
