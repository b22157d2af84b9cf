"""Test setup: eight fake CPU devices, so sharded code runs on one machine.

The flag must be set before JAX initialises its backends; single-device tests pick
`jax.devices()[:1]` explicitly.
"""

import os

import pytest

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Commands run by tests (in process or as subprocesses) write no compilation cache into the
# user's home and leave malloc's defaults; the tests of those two features set them themselves.
os.environ["MMJAX_COMPILATION_CACHE"] = "off"
os.environ["MMJAX_HOST_MEMORY"] = "system"


def pytest_collection_modifyitems(items):
  """Tests marked `slow` run first: with several workers (launch/test.sh runs two) a long test
  started last would leave the other worker idle at the end."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True, scope="session")
def _no_demo_tokens(tmp_path_factory):
  """An empty data.data_dir falls back to the demo's token set; in tests that is an empty temporary
  folder, never the `runs/demo` of the checkout that a user's `bash launch/local.sh` wrote."""
  from mmjax.data.pipeline import demo_tokens
  os.environ[demo_tokens.ENV] = str(tmp_path_factory.mktemp("demo") / "tokens")
  yield
  os.environ.pop(demo_tokens.ENV, None)
