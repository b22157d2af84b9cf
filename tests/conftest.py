"""Test setup: eight fake CPU devices, so sharded code runs on one machine.

The flag must be set before JAX initialises its backends; single-device tests pick
`jax.devices()[:1]` explicitly.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_collection_modifyitems(items):
  """Tests marked `slow` run first: with several workers (launch/test.sh runs two) a long test
  started last would leave the other worker idle at the end."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
