"""The persistent compilation cache: on for CLI runs, where it is configured, and a second run of the
same command compiles nothing new."""

import os
import subprocess
import sys

import pytest

from mmjax import compile_cache

TOY_CONFIG = """
from mmjax.train import toy

def get_config(arg=None):
  config = toy.toy_config(batch_size=8)
  config.mesh.shape.update(dict(data=1))
  return config
"""


def test_where_the_cache_goes(monkeypatch, tmp_path):
  monkeypatch.delenv(compile_cache.JAX_ENV, raising=False)
  monkeypatch.setenv(compile_cache.ENV, "off")
  assert compile_cache.enable() is None and compile_cache.JAX_ENV not in os.environ
  monkeypatch.setenv(compile_cache.ENV, "")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compile_cache.default_directory() == str(tmp_path / "xdg" / "mmjax" / "jax")
  monkeypatch.setattr(sys, "modules", {k: v for k, v in sys.modules.items() if k != "jax"})
  assert compile_cache.enable() == str(tmp_path / "xdg" / "mmjax" / "jax")
  assert os.environ[compile_cache.JAX_ENV] == str(tmp_path / "xdg" / "mmjax" / "jax")
  monkeypatch.setenv(compile_cache.JAX_ENV, str(tmp_path / "own"))  # the user's own choice wins
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
  assert compile_cache.enable() == str(tmp_path / "own")


@pytest.mark.slow  # two CLI processes: ~10 s idle, ~40 s on the loaded 2-core machine
def test_second_run_hits_the_cache(tmp_path):
  config = tmp_path / "toy.py"
  config.write_text(TOY_CONFIG)
  cache = tmp_path / "cache"
  env = dict(os.environ, **{compile_cache.ENV: str(cache),
                            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                            "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
  env.pop(compile_cache.JAX_ENV, None)
  command = [sys.executable, "-m", "mmjax.cli", "bench", "step", f"--config={config}",
             "--steps=1", "--warmup=0", "--no-profile"]

  def entries():
    return sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []

  subprocess.run(command, env=env, check=True, capture_output=True, timeout=300)
  first = entries()
  assert first, "the first run stored nothing"
  subprocess.run(command, env=env, check=True, capture_output=True, timeout=300)
  assert entries() == first  # every program came from the cache
