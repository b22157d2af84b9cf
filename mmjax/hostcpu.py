"""What this host's CPU can do, read from /proc/cpuinfo (Linux; elsewhere nothing is known).

`native_bf16()` decides whether bf16 compute pays on the CPU: with AVX512-BF16 or AMX-BF16 (x86)
or the BF16 extension (Arm) XLA:CPU's bf16 matmuls run on the vector units at about twice the fp32
rate; without them every bf16 operand is converted to fp32 and back, so bf16 is slower than fp32.
"""

from __future__ import annotations

import functools
import os
import platform

CPUINFO = "/proc/cpuinfo"
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 flags; "bf16" is Arm's Features entry
# Flags a reader needs to compare CPU figures (vector width, FMA, bf16/int8 units).
SHOWN_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8",
               "asimd", "sve", "bf16")


def _parse(text: str) -> tuple[str, frozenset[str]]:
  """(model name, flags) of the first processor listed in a /proc/cpuinfo text."""
  model, flags = "", frozenset()
  for line in text.splitlines():
    key, _, value = line.partition(":")
    key = key.strip().lower()
    if key in ("model name", "cpu model") and not model:
      model = value.strip()
    elif key in ("flags", "features") and not flags:
      flags = frozenset(value.split())
  return model or platform.processor() or platform.machine(), flags


@functools.lru_cache(maxsize=1)
def _read() -> tuple[str, frozenset[str]]:
  try:
    with open(CPUINFO, encoding="utf-8", errors="replace") as f:
      return _parse(f.read())
  except OSError:
    return platform.processor() or platform.machine(), frozenset()


def native_bf16(flags: frozenset[str] | None = None) -> bool | None:
  """True/False if the flags (default: this host's) say whether bf16 arithmetic is native; None
  if nothing is known (no /proc/cpuinfo)."""
  flags = _read()[1] if flags is None else flags
  if not flags:
    return None
  return any(f in flags for f in BF16_FLAGS)


def describe() -> dict[str, object]:
  """The CPU model, its core count as Python sees it, and the flags that matter for speed."""
  model, flags = _read()
  return {"model": model, "cpus": os.cpu_count(),
          "flags": [f for f in SHOWN_FLAGS if f in flags]}
