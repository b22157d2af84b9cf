"""`train.profile_steps`: a jax.profiler trace of chosen train steps, for TensorBoard or Perfetto.

`--config.train.profile_steps=a,b` traces steps a to b (inclusive; `a` alone: one step) into
`<workdir>/profile/plugins/profile/<run>/*.xplane.pb` (TensorBoard's profile plugin reads
`<workdir>/profile`; Perfetto opens the `.trace.json.gz` beside it). The trace starts before step
a is dispatched and stops once step b's results exist, so it holds whole steps.
"""

from __future__ import annotations

import os

import jax

from mmjax import paths
from mmjax.config import ConfigError


def parse_steps(spec) -> tuple[int, int] | None:
  """"a,b" or "a" (or a tuple) -> (first, last) step; "" -> None."""
  if spec in ("", None, ()):
    return None
  parts = spec.split(",") if isinstance(spec, str) else list(spec)
  try:
    steps = [int(str(p).strip()) for p in parts]
  except ValueError:
    steps = []
  if len(steps) == 1:
    steps = steps * 2
  if len(steps) != 2 or not 1 <= steps[0] <= steps[1]:
    raise ConfigError(f"config key 'train.profile_steps' must be 'a,b' with 1 <= a <= b (or one "
                      f"step 'a'), got {spec!r}")
  return steps[0], steps[1]


class StepProfiler:
  """Starts and stops the trace around the chosen steps (a no-op without them)."""

  def __init__(self, spec, workdir: str):
    self.steps = parse_steps(spec)
    # A URL workdir stays a URL (paths.resolve); only local folders were tried here.
    self.directory = os.fspath(paths.resolve(workdir) / "profile")
    self.active = False

  def before(self, step: int) -> None:
    if self.steps and step == self.steps[0]:
      jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
      self.active = True

  def after(self, step: int, outputs) -> None:
    if self.active and step >= self.steps[1]:
      jax.block_until_ready(outputs)
      self.stop()

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
