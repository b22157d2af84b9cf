"""Orbax checkpoints of the train state and the Grain iterator state of every host.

A checkpoint `<workdir>/checkpoints/<step>/` is a Composite of
  state: StandardSave of the train state (params, optimizer state, step, rng, skipped count),
  iter:  grain.checkpoint.CheckpointSave of the data iterator (one JSON file per process).
Saves are asynchronous (the next steps run while it is written); retention is a preservation
policy keeping the newest `keep` checkpoints. Orbax writes into a temporary directory and renames
it when complete, so a kill leaves at worst an incomplete temporary directory; it is reported and
removed. A finalized checkpoint that fails to restore (corrupt files) is reported in one line,
moved aside to `corrupt-<step>` and the previous checkpoint is tried.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from mmjax.train.state import TrainState

_TMP_MARKER = "orbax-checkpoint-tmp"


def _report(message: str) -> None:
  print(f"mmjax: {message}", file=sys.stderr, flush=True)


class Checkpointer:
  """Saves and restores (state, iterator) in `directory`."""

  def __init__(self, directory: str, *, keep: int, report: Callable[[str], None] = _report):
    if keep < 1:
      raise ValueError(f"train.keep_checkpoints must be >= 1, got {keep}")
    self.directory = os.path.abspath(directory)
    self.keep = keep
    self.report = report
    self._report_incomplete()
    self._open()

  def _open(self) -> None:
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(n=self.keep),
        enable_async_checkpointing=True, create=True, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def _report_incomplete(self) -> None:
    if not os.path.isdir(self.directory) or jax.process_index() != 0:
      return
    for name in sorted(os.listdir(self.directory)):
      if _TMP_MARKER in name:
        self.report(f"checkpoint {os.path.join(self.directory, name)} is incomplete (the run "
                    "stopped while saving it); ignoring it")

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: TrainState, iterator: Any) -> None:
    """Starts an asynchronous save of `state` (at `step`) and the iterator's current position."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              iter=grain.checkpoint.CheckpointSave(iterator))
    self.manager.save(step, args=args, force=True)

  def restore_latest(self, abstract_state: TrainState, iterator: Any) -> tuple[TrainState, int] | None:
    """The newest checkpoint that restores (into `abstract_state`'s shardings), or None.

    The iterator is set to the saved position as a side effect.
    """
    for step in reversed(self.steps()):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            iter=grain.checkpoint.CheckpointRestore(iterator)))
      except Exception as e:  # noqa: BLE001 -- any failure means this checkpoint is unusable.
        detail = str(e).strip().splitlines()
        self.report(f"checkpoint step {step} in {self.directory} cannot be restored "
                    f"({type(e).__name__}: {detail[0][:200] if detail else ''}); moving it to "
                    f"corrupt-{step} and trying the previous one")
        self._move_aside(step)
        continue
      return restored["state"], step
    return None

  def _move_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      source = os.path.join(self.directory, str(step))
      target = os.path.join(self.directory, f"corrupt-{step}")
      if os.path.exists(target):
        shutil.rmtree(target)
      os.rename(source, target)
    self.manager.close()
    self._open()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def load_model(config: Any, workdir: str, *, allow_random_init: bool = False) -> tuple[Any, int]:
  """(model, step) of the latest valid checkpoint in `<workdir>/checkpoints`, on the host.

  For evaluation and generation: only the train state is read, not the data iterator. Without a
  checkpoint it is an error, unless `allow_random_init` (then a freshly initialised model, step 0).
  """
  from flax import nnx  # late: nnx is heavy and this module is imported by the trainer's CLI path

  from mmjax.errors import UserError
  from mmjax.train.loop import build

  _, setup = build(config)
  directory = os.path.join(workdir, "checkpoints")
  manager = ocp.CheckpointManager(os.path.abspath(directory)) if os.path.isdir(directory) else None
  state, step = None, 0
  try:
    for candidate in reversed(sorted(manager.all_steps()) if manager else []):
      try:
        restored = manager.restore(candidate, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(setup.abstract_state)))
      except Exception as e:  # noqa: BLE001 -- report and fall back to the previous checkpoint.
        _report(f"checkpoint step {candidate} in {directory} cannot be restored "
                f"({type(e).__name__}); trying the previous one")
        continue
      state, step = restored["state"], candidate
      break
  finally:
    if manager:
      manager.close()
  if state is None:
    if not allow_random_init:
      raise UserError(f"no checkpoint to load in {directory} (train first: mmjax train --config "
                      f"... --workdir {workdir})")
    _report(f"no checkpoint in {directory}; using a randomly initialised model")
    with setup.context():
      state = setup.init()
  state = jax.device_get(state)
  return nnx.merge(setup.graphdef, state["params"], state["rest"]), step
