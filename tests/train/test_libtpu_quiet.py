"""libtpu on a host without TPU chips: describing a compile-only topology, or starting JAX in a
command, prints no errors."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("libtpu")  # the `tpu` and `test` extras install it

SCRIPT = """
from mmjax import libtpu_env
from mmjax.train import aot
assert not libtpu_env.tpu_chips_present()
devices = aot.topology_devices(aot.parse_topology("v5e:2x2"))
print(len(devices))
"""


# What every `mmjax` command does before its first JAX call (`mmjax train` printed libtpu's errors
# when JAX started its backends).
COMMAND = """
from mmjax import cli
cli._prepare_process("train")
import jax
print(jax.devices()[0].platform)
"""


def _run(script: str, tmp_path) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_PLATFORMS", "MMJAX_COMPILATION_CACHE", "TPU_WORKER_HOSTNAMES",
                      "TPU_HOST_BOUNDS", "TPU_ACCELERATOR_TYPE")}
  env["MMJAX_COMPILATION_CACHE"] = str(tmp_path / "cache")
  done = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  return done


def test_a_compile_only_topology_prints_no_libtpu_errors(tmp_path):
  done = _run(SCRIPT, tmp_path)
  assert done.stdout.strip() == "4"
  assert done.stderr == ""


def test_a_command_starts_jax_on_the_cpu_without_libtpu_errors(tmp_path):
  done = _run(COMMAND, tmp_path)
  assert done.stdout.strip() == "cpu"
  assert done.stderr == ""
