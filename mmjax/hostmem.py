"""Host memory: keep freed memory in the process instead of handing it back to the kernel.

XLA:CPU allocates an executable's temporary buffers (activations, gradients, optimizer
intermediates: several GB for 4M-tiny) with malloc on every call and frees them at its end. glibc
serves blocks this large with fresh `mmap`s and unmaps them on free, so every train step touches
~3 GB of new pages: ~0.7 M page faults per step whose zeroing in the kernel was the "system" CPU
time of a step (1.4-1.9 s of a 4M-tiny step here). With mmap disabled and trimming
off, freed blocks stay in malloc's heap and the next step reuses them: no faults after the first.
The price is that the process keeps its peak host memory until it exits, which a training or
benchmark process does anyway.

`retain_freed_memory()` is called by the `mmjax` command line before JAX starts its threads (the
one-arena setting only holds for threads created afterwards). `MMJAX_HOST_MEMORY=system` keeps
glibc's defaults. Other C libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV = "MMJAX_HOST_MEMORY"  # "system": leave malloc's defaults
# mallopt parameters (glibc malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8
_TOP_PAD = 256 << 20  # grow the heap in steps of 256 MB: fewer brk calls while it grows
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int


def _glibc():
  """The process's glibc (for mallopt), or None on another C library."""
  name = ctypes.util.find_library("c")
  if not name:
    return None
  try:
    libc = ctypes.CDLL(name)
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    libc.gnu_get_libc_version()
  except (OSError, AttributeError):
    return None
  return libc


def retain_freed_memory() -> bool:
  """Makes glibc keep freed blocks for reuse (see the module docstring); True if it did."""
  if os.environ.get(ENV, "").strip().lower() == "system":
    return False
  libc = _glibc()
  if libc is None:
    return False
  ok = all(libc.mallopt(param, value) == 1 for param, value in (
      (M_MMAP_MAX, 0),                 # big blocks come from the heap, not from fresh mmaps
      (M_TRIM_THRESHOLD, _NEVER_TRIM),  # and freed ones stay there
      (M_TOP_PAD, _TOP_PAD),
      (M_ARENA_MAX, 1)))               # one heap: a thread's arena would unmap its free pages
  return ok
