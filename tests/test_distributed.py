"""Multi-host start-up: detection from the environment and two real CPU processes."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from mmjax import distributed
from mmjax.errors import UserError

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_detect_from_environment():
  assert distributed.detect({}).kind == "single"
  explicit = distributed.detect({"MMJAX_COORDINATOR": "127.0.0.1:1234", "MMJAX_NUM_PROCESSES": "4",
                                 "MMJAX_PROCESS_ID": "3", "MMJAX_LOCAL_DEVICES": "2"})
  assert explicit == distributed.Cluster("explicit", "127.0.0.1:1234", 4, 3, 2, timeout_s=300)
  slurm = distributed.detect({"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
                              "SLURM_JOB_ID": "4097", "SLURM_STEP_NODELIST": "gpu[003-006]"})
  assert (slurm.kind, slurm.num_processes, slurm.process_id) == ("slurm", 8, 5)
  assert slurm.coordinator == "gpu003:61441"  # JAX's rule: first node, port from the job id
  tpu = distributed.detect({"TPU_WORKER_HOSTNAMES": "a,b,c,d", "TPU_WORKER_ID": "2"})
  assert (tpu.kind, tpu.num_processes, tpu.process_id) == ("tpu", 4, 2)


@pytest.mark.parametrize("env, message", [
    ({"MMJAX_COORDINATOR": "x:1", "MMJAX_NUM_PROCESSES": "2"}, "MMJAX_PROCESS_ID"),
    ({"MMJAX_COORDINATOR": "x:1", "MMJAX_NUM_PROCESSES": "2", "MMJAX_PROCESS_ID": "2"}, "outside"),
    ({"MMJAX_COORDINATOR": "x:1", "MMJAX_NUM_PROCESSES": "two", "MMJAX_PROCESS_ID": "0"},
     "integers"),
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "0"}, "SLURM_JOB_ID, SLURM_STEP_NODELIST"),
    ({"MMJAX_INIT_TIMEOUT": "soon"}, "integers"),
])
def test_bad_environment_is_a_user_error(env, message):
  with pytest.raises(UserError, match=message):
    distributed.detect(env)


_WORKER = textwrap.dedent("""
    import json, jax, numpy as np
    from mmjax import distributed
    cluster = distributed.initialize()
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    local = np.arange(2, dtype=np.float32) + 10 * jax.process_index()
    total = jax.jit(lambda x: x.sum())(jax.make_array_from_process_local_data(sharding, local))
    print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                      "devices": jax.device_count(), "sum": float(total)}))
""")


def test_two_processes_join_and_reduce_across_hosts():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, "-c", _WORKER], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**env, "MMJAX_COORDINATOR": f"127.0.0.1:{port}",
                                 "MMJAX_NUM_PROCESSES": "2", "MMJAX_PROCESS_ID": str(i),
                                 "MMJAX_LOCAL_DEVICES": "2", "JAX_PLATFORMS": "cpu"})
           for i in range(2)]
  results = []
  for proc in procs:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-2000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  # Process 0 holds [0, 1], process 1 holds [10, 11]: every process sees the global sum.
  assert sorted(r["process"] for r in results) == [0, 1]
  assert all(r["processes"] == 2 and r["devices"] == 4 and r["sum"] == 22.0 for r in results)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_an_unreachable_coordinator_is_one_line_within_the_timeout(tmp_path):
  """Process 1 of 2 with nobody listening at the coordinator: `mmjax train` exits 2 after
  MMJAX_INIT_TIMEOUT seconds, naming the address (JAX alone would abort with a C++ stack trace)."""
  address = f"127.0.0.1:{_free_port()}"
  env = {**os.environ, "MMJAX_COORDINATOR": address, "MMJAX_NUM_PROCESSES": "2",
         "MMJAX_PROCESS_ID": "1", "MMJAX_INIT_TIMEOUT": "2"}
  start = time.monotonic()
  proc = subprocess.run([sys.executable, "-m", "mmjax.cli", "train", "--config",
                         "configs/fourm/shapes.py:tiny,runlocal", "--workdir", str(tmp_path / "w")],
                        env=env, capture_output=True, text=True, timeout=120, cwd=_ROOT)
  elapsed = time.monotonic() - start
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.count("\n") == 1 and address in proc.stderr and "within 2 s" in proc.stderr
  assert elapsed < 30
