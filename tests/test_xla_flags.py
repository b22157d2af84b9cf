"""mmjax sets its XLA:CPU default flags on import, without overriding the user's own choice."""

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
