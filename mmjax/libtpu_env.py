"""libtpu's slice variables on a host without TPU chips.

With libtpu installed (the `tpu` and `test` extras), a JAX process on a host without chips lets
libtpu look for its slice on the metadata server; it finds none and prints errors about
TPU_ACCELERATOR_TYPE and TPU_WORKER_HOSTNAMES (seen at the start of `mmjax train` on a CPU
machine, and while `mmjax aot` describes a compile-only topology). Naming a one-host slice
silences them and changes nothing else: there are no chips to drive, and a compile-only topology
is described by its name. TPU hosts, and processes whose user set any of these variables, are
left alone.
"""

from __future__ import annotations

import glob
import os

SLICE_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_HOST_BOUNDS", "TPU_ACCELERATOR_TYPE")


def tpu_chips_present() -> bool:
  """Whether this host has TPU chips: their device files (/dev/accel* up to v4, VFIO groups from
  v5 on)."""
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def one_host_slice_without_chips() -> None:
  """Names a one-host slice for libtpu where the host has no chips (see the module docstring).
  Call it before JAX starts its backends."""
  if any(os.environ.get(name) for name in SLICE_VARS) or tpu_chips_present():
    return
  os.environ["TPU_WORKER_HOSTNAMES"] = "localhost"
  os.environ["TPU_HOST_BOUNDS"] = "1,1,1"
