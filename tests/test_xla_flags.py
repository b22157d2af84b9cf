"""mmjax sets its XLA:CPU default flags on import, without overriding the user's own choice."""

import importlib.machinery
import importlib.metadata
import importlib.util
import os

import mmjax


def test_default_ynn_fusion_flag_is_added(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  mmjax._set_default_xla_flags()
  flags = os.environ["XLA_FLAGS"].split()
  assert "--xla_force_host_platform_device_count=8" in flags
  assert f"{mmjax.YNN_FUSION_FLAG}={mmjax.YNN_FUSION_DEFAULT}" in flags


def test_users_choice_is_kept(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", f"{mmjax.YNN_FUSION_FLAG}=dot")
  mmjax._set_default_xla_flags()
  assert os.environ["XLA_FLAGS"] == f"{mmjax.YNN_FUSION_FLAG}=dot"


def test_unset_environment(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  mmjax._set_default_xla_flags()
  assert os.environ["XLA_FLAGS"] == f"{mmjax.YNN_FUSION_FLAG}={mmjax.YNN_FUSION_DEFAULT}"


def test_this_process_runs_with_the_default():
  # conftest sets only the device count; importing mmjax added the fusion flag before JAX started.
  assert mmjax.YNN_FUSION_FLAG in os.environ["XLA_FLAGS"]


def test_not_set_when_jax_leaves_the_cpu_out(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  mmjax._set_default_xla_flags()
  assert os.environ["XLA_FLAGS"] == ""
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  mmjax._set_default_xla_flags()
  assert mmjax.YNN_FUSION_FLAG in os.environ["XLA_FLAGS"]


def test_a_jaxlib_without_the_flag_gets_none(monkeypatch, tmp_path):
  """An unknown flag in XLA_FLAGS aborts XLA: a jaxlib other than the measured one gets the flag
  only if its libraries name it."""
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setattr(importlib.metadata, "version", lambda name: "99.0.0")
  package = tmp_path / "jaxlib"
  package.mkdir()
  (package / "libxla.so").write_bytes(b"\0other_flags\0" * 100)
  spec = importlib.machinery.ModuleSpec("jaxlib", None, is_package=True)
  spec.submodule_search_locations = [str(package)]
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
  monkeypatch.setenv("XLA_FLAGS", "")
  mmjax._set_default_xla_flags()
  assert os.environ["XLA_FLAGS"] == ""
  (package / "libxla.so").write_bytes(b"\0" + mmjax.YNN_FUSION_FLAG[2:].encode() + b"\0")
  mmjax._set_default_xla_flags()
  assert os.environ["XLA_FLAGS"] == f"{mmjax.YNN_FUSION_FLAG}={mmjax.YNN_FUSION_DEFAULT}"
