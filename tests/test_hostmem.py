"""The command line keeps freed host memory for reuse: big blocks come from malloc's heap and stay
there when freed, instead of being mapped and unmapped (page faults) on every train step."""

import os
import subprocess
import sys

import pytest

from mmjax import hostmem

# Allocates a 256 MB block and frees it; prints whether the setting applied, then glibc's counts
# (mallinfo2) of mmapped bytes while the block lives and of free heap bytes after it is gone.
_PROBE = """
import ctypes
import numpy as np
from mmjax import hostmem
print(hostmem.retain_freed_memory())
class Info(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in ("arena ordblks smblks hblks hblkhd usmblks fsmblks "
                                             "uordblks fordblks keepcost").split()]
libc = hostmem._glibc()
libc.mallinfo2.restype = Info
a = np.ones(64 << 20, np.float32)
print(libc.mallinfo2().hblkhd)
del a
print(libc.mallinfo2().fordblks)
"""
BLOCK = 256 << 20


def _probe(setting: str) -> tuple[bool, int, int]:
  env = dict(os.environ, **{hostmem.ENV: setting})
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                       check=True, timeout=120).stdout.split()
  return out[0] == "True", int(out[1]), int(out[2])


@pytest.mark.skipif(hostmem._glibc() is None, reason="glibc's mallopt only")
def test_freed_memory_is_kept_for_reuse():
  applied, mapped, kept = _probe("")
  assert applied and mapped < BLOCK and kept >= BLOCK, (mapped, kept)
  applied, mapped, kept = _probe("system")  # glibc's default: a fresh mapping, unmapped on free
  assert not applied and mapped >= BLOCK and kept < BLOCK, (mapped, kept)
