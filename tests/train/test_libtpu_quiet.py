"""libtpu on a host without TPU chips: describing a compile-only topology prints no errors."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("libtpu")  # the `tpu` and `test` extras install it

SCRIPT = """
from mmjax.train import aot
assert not aot.tpu_chips_present()
devices = aot.topology_devices(aot.parse_topology("v5e:2x2"))
print(len(devices))
"""


def test_a_compile_only_topology_prints_no_libtpu_errors(tmp_path):
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_PLATFORMS", "TPU_WORKER_HOSTNAMES", "TPU_HOST_BOUNDS",
                      "TPU_ACCELERATOR_TYPE")}
  done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=tmp_path,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == "4"
  assert done.stderr == ""
