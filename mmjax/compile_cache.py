"""JAX's persistent compilation cache, on for every `mmjax` command (except `aot`).

A repeated or resumed run loads its compiled train step (and every other program that took JAX
more than a second to compile) from the cache instead of compiling it again: 4M-tiny's step takes
10-25 s to compile on 2 cores.

Where: `$MMJAX_COMPILATION_CACHE` if set (a directory, local or a URL JAX can write), else
`$XDG_CACHE_HOME/mmjax/jax` (`~/.cache/mmjax/jax`). `MMJAX_COMPILATION_CACHE=off` turns it off; a
cache directory the user already gave JAX (`JAX_COMPILATION_CACHE_DIR`) is kept. JAX's own options
apply as usual, e.g. `JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` (default 1: quicker compiles are
not stored). Entries are keyed by the program, the backend and the compile options (XLA flags
included), so a changed flag or jaxlib never loads a stale program.

`mmjax aot` is left out: it compiles for a TPU topology on a host without TPUs, a client JAX's
cache was not checked with here.
"""

from __future__ import annotations

import os
import sys

ENV = "MMJAX_COMPILATION_CACHE"
JAX_ENV = "JAX_COMPILATION_CACHE_DIR"
OFF = ("off", "0", "false", "none")


def default_directory() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "mmjax", "jax")


def enable() -> str | None:
  """Turns the cache on for this process and its children; the directory used, or None if off."""
  value = os.environ.get(ENV, "").strip()
  if value.lower() in OFF:
    return None
  if os.environ.get(JAX_ENV):
    return os.environ[JAX_ENV]
  directory = value or default_directory()
  os.environ[JAX_ENV] = directory  # read by JAX when it is imported, here and in subprocesses
  if "jax" in sys.modules:  # already imported (a caller's own code): set it there too
    import jax  # noqa: PLC0415 -- only when the caller already paid for it

    jax.config.update("jax_compilation_cache_dir", directory)
  return directory
