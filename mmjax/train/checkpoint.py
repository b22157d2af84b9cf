"""Orbax checkpoints of the train state and the Grain iterator state of every host.

A checkpoint `<workdir>/checkpoints/<step>/` is a Composite of
  state: StandardSave of the train state (params, optimizer state, step, rng, skipped count),
  iter:  grain.checkpoint.CheckpointSave of the data iterator (one JSON file per process).
Saves are asynchronous (the next steps run while it is written); retention is a preservation
policy keeping the newest `keep` checkpoints. Orbax writes into a temporary directory and renames
it when complete, so a kill leaves at worst an incomplete temporary directory; it is reported and
removed.

Before a restore, the saved tree (paths, shapes, dtypes from the checkpoint's metadata) is compared
with the abstract state of the current config. A difference is the user's (the config changed since
the checkpoint was written): `CheckpointMismatchError`, and nothing on disk is touched. Only a
checkpoint that cannot be read (missing or garbled metadata, truncated data, failed reads) is
reported in one line, moved aside to `corrupt-<step>` and the previous checkpoint is tried; that
includes an iterator-state file that is not readable JSON, while a readable state that the current
data pipeline refuses is a mismatch. With
several processes, all of them agree on the outcome of every step before anyone acts on it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from mmjax import paths
from mmjax.config import ConfigError
from mmjax.train.state import TrainState

_TMP_MARKER = "orbax-checkpoint-tmp"

# Outcomes of one restore attempt, ordered so that the largest over processes wins.
_OK, _CORRUPT, _MISMATCH = 0, 1, 2


def report(message: str) -> None:
  print(f"mmjax: {message}", file=sys.stderr, flush=True)


class CheckpointMismatchError(ConfigError):
  """A checkpoint's tree differs from the state the current config builds (not corruption)."""


def _path_name(path) -> str:
  """`params.embed.embedding.value`: Orbax's own naming, the same for the metadata and the state
  (whose containers differ: dicts in the metadata, nnx.State and optax tuples in the state)."""
  parts = []
  for key in path:
    for attr in ("key", "idx", "name"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return ".".join(parts)


def _leaves(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """{path name: (shape, dtype name)} of the arrays of a state or of a checkpoint's metadata."""
  leaves = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      leaf = jax.eval_shape(jax.random.key_data, leaf)  # Orbax stores a key array as its raw data
      dtype = leaf.dtype
    leaves[_path_name(path)] = (tuple(getattr(leaf, "shape", None) or ()), str(dtype))
  return leaves


def _first_mismatch(saved: dict, wanted: dict) -> str | None:
  """The first difference between two `_leaves` maps, parameters first, as a phrase; or None."""
  names = list(wanted) + [n for n in saved if n not in wanted]
  names.sort(key=lambda n: not n.startswith("params."))  # stable: tree order within each group
  for name in names:
    if name not in saved:
      return f"{name} is in the current config's state but not in the checkpoint"
    if name not in wanted:
      return f"{name} is in the checkpoint but not in the current config's state"
    (saved_shape, saved_dtype), (shape, dtype) = saved[name], wanted[name]
    if saved_shape != shape or saved_dtype != dtype:
      return (f"{name} is {saved_shape} {saved_dtype} in the checkpoint but {shape} {dtype} in "
              "the current config")
  return None


def _check_tree(step_dir: epath.Path, abstract_state: TrainState) -> tuple[int, str]:
  """(_OK | _CORRUPT | _MISMATCH, detail) of the saved state tree in `step_dir` against
  `abstract_state`, from the metadata alone (no array is read)."""
  handler = ocp.StandardCheckpointHandler()
  try:  # Orbax wants absolute paths
    saved = _leaves(handler.metadata(step_dir / "state"))
  except Exception as e:  # noqa: BLE001 -- unreadable metadata: the checkpoint is corrupt.
    return _CORRUPT, _one_line(e)
  finally:
    handler.close()
  if not saved:
    return _CORRUPT, "its state metadata lists no arrays"
  mismatch = _first_mismatch(saved, _leaves(abstract_state))
  return (_MISMATCH, mismatch) if mismatch else (_OK, "")


def _one_line(e: BaseException) -> str:
  detail = str(e).strip().splitlines()
  return f"{type(e).__name__}: {detail[0][:200] if detail else ''}"


def _is_shape_error(e: BaseException) -> bool:
  """Orbax's refusal of a target shape that differs from the stored one (should the metadata check
  ever miss a difference, it is still not corruption)."""
  return isinstance(e, ValueError) and "not compatible with the stored shape" in str(e)


def _mismatch_error(directory: epath.Path, step: int, detail: str) -> CheckpointMismatchError:
  detail = detail or "its state tree differs (seen by another process)"
  return CheckpointMismatchError(
      f"workdir {directory.parent}: the checkpoint of step {step} "
      f"({directory / str(step)}) does not match the current config: {detail}. "
      "The config differs from the one that wrote the checkpoint; nothing was changed on disk. "
      "Resume with the original config, or train the new one in another --workdir")


def _is_closed_loop(exc_type, exc) -> bool:
  return exc_type is RuntimeError and str(exc) == "Event loop is closed"


def _silence_abandoned_reads() -> None:
  """A failed restore leaves the other arrays' reads in flight; as they finish, tensorstore hands
  each result to the restore's event loop, already closed, and each prints "Exception ignored"
  with a traceback of RuntimeError('Event loop is closed') (a dozen or more, after the one line
  that reported the corruption). From the first corrupt checkpoint on, that error alone is
  dropped (sys.unraisablehook, and sys.excepthook for a read that reports it that way); every
  other exception reaches the previous hook."""
  previous, previous_unraisable = sys.excepthook, sys.unraisablehook
  if getattr(previous_unraisable, "mmjax_drops_closed_loop", False):
    return

  def hook(exc_type, exc, tb):
    if not _is_closed_loop(exc_type, exc):
      previous(exc_type, exc, tb)

  def unraisable_hook(unraisable):
    if not _is_closed_loop(unraisable.exc_type, unraisable.exc_value):
      previous_unraisable(unraisable)

  hook.mmjax_drops_closed_loop = unraisable_hook.mmjax_drops_closed_loop = True
  sys.excepthook, sys.unraisablehook = hook, unraisable_hook


def _unreadable_iterator_state(step_dir: str) -> str:
  """Why this process's iterator state file in `step_dir` cannot be read as a JSON object (missing,
  undecodable, garbled), or "" when it can: only a readable state that the pipeline refuses is a
  config mismatch."""
  path = os.path.join(step_dir, "iter",
                      f"process_{jax.process_index()}-of-{jax.process_count()}.json")
  try:
    with open(path, encoding="utf-8") as f:
      state = json.load(f)
  except (OSError, ValueError) as e:  # ValueError: JSON and UTF-8 decoding errors
    return f"its data iterator state {path} is unreadable ({_one_line(e)})"
  return "" if isinstance(state, dict) else f"its data iterator state {path} is not a JSON object"


def _agree(outcome: int) -> int:
  """The worst outcome over all processes, so that all of them take the same branch."""
  if jax.process_count() == 1:
    return outcome
  return int(np.max(multihost_utils.process_allgather(np.int32(outcome))))


def restore_newest(restore: Callable[[int, Any], Any], steps: list[int],
                   directory: str | os.PathLike,
                   abstract_state: Any, *, iterator: Any = None,
                   agree: Callable[[int], int] = lambda outcome: outcome,
                   on_corrupt: Callable[[int, str], None]) -> tuple[Any, int] | None:
  """(state, step) of the newest of `steps` in `directory` that restores into `abstract_state`, or
  None. `restore(step, args)` reads a checkpoint (a CheckpointManager's restore).

  Each candidate's state tree is checked against `abstract_state` before it is read. Given an
  `iterator`, it is set to the checkpoint's data position once the state restored. `agree` makes
  every process take the same branch (the worst outcome of all). A mismatch (another config wrote
  the checkpoint) raises CheckpointMismatchError; an unreadable checkpoint goes to
  `on_corrupt(step, detail)` and the previous one is tried.
  """
  directory = paths.resolve(directory)  # Orbax wants absolute paths or URLs
  for step in reversed(sorted(steps)):
    outcome, detail = _check_tree(directory / str(step), abstract_state)
    state = None
    if outcome == _OK:
      try:
        state = restore(step, ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]
      except Exception as e:  # noqa: BLE001 -- a failed read means this checkpoint is unusable.
        outcome, detail = (_MISMATCH if _is_shape_error(e) else _CORRUPT), _one_line(e)
    # A checkpoint without an iterator (written by `mmjax import`): the data starts afresh.
    has_iter = os.path.isdir(os.path.join(directory, str(step), "iter"))
    if outcome == _OK and iterator is not None and has_iter:
      unreadable = _unreadable_iterator_state(os.path.join(directory, str(step)))
      if unreadable:  # damaged on disk: corruption, not a changed pipeline
        outcome, detail = _CORRUPT, unreadable
    if outcome == _OK and iterator is not None and has_iter:
      try:
        restore(step, ocp.args.Composite(iter=grain.checkpoint.CheckpointRestore(iterator)))
      except Exception as e:  # noqa: BLE001 -- the params read: the data pipeline has changed.
        outcome = _MISMATCH
        detail = (f"its data iterator state does not fit the current data pipeline (changed "
                  f"data.num_workers, data.mixture, host count or iterator format?): "
                  f"{_one_line(e)}")
    if outcome == _CORRUPT:
      _silence_abandoned_reads()
    agreed = agree(outcome)
    if agreed == _MISMATCH:
      raise _mismatch_error(directory, step, detail if outcome == _MISMATCH else "")
    if agreed == _CORRUPT:
      on_corrupt(step, detail or "failed on another process")
      continue
    return state, step
  return None


class Checkpointer:
  """Saves and restores (state, iterator) in `directory`."""

  def __init__(self, directory: str | os.PathLike, *, keep: int,
               report: Callable[[str], None] = report):
    if keep < 1:
      raise ValueError(f"train.keep_checkpoints must be >= 1, got {keep}")
    self.directory = paths.resolve(directory)
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
    if jax.process_index() != 0 or not self.directory.is_dir():
      return
    for name in sorted(p.name for p in self.directory.iterdir()):
      if _TMP_MARKER in name:
        self.report(f"checkpoint {self.directory / name} is incomplete (the run "
                    "stopped while saving it); ignoring it")

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: TrainState, iterator: Any) -> None:
    """Starts an asynchronous save of `state` (at `step`) and the iterator's current position."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              iter=grain.checkpoint.CheckpointSave(iterator))
    self.manager.save(step, args=args, force=True)

  def restore_latest(self, abstract_state: TrainState,
                     iterator: Any) -> tuple[TrainState, int] | None:
    """The newest checkpoint that restores (into `abstract_state`'s shardings), or None.

    The iterator is set to the saved position as a side effect (only once the state restored, so a
    fallback to a fresh start leaves it at the beginning). A checkpoint whose tree differs from
    `abstract_state` raises CheckpointMismatchError and leaves every checkpoint in place.
    """
    def corrupt(step: int, detail: str) -> None:
      self.report(f"checkpoint step {step} in {self.directory} cannot be restored ({detail}); "
                  f"moving it to corrupt-{step} and trying the previous one")
      self._move_aside(step)

    # self.manager, not a reference to it: moving a checkpoint aside reopens the manager.
    return restore_newest(lambda step, args: self.manager.restore(step, args=args), self.steps(),
                          self.directory, abstract_state, iterator=iterator, agree=_agree,
                          on_corrupt=corrupt)

  def _move_aside(self, step: int) -> None:
    """Renames on process 0 only; the others reopen the manager (which lists the steps) after it."""
    self.manager.close()
    if jax.process_index() == 0:
      target = self.directory / f"corrupt-{step}"
      if target.exists():
        target.rmtree()
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"mmjax checkpoint corrupt-{step}")
    self._open()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def save_state(directory: str, step: int, state: TrainState) -> None:
  """Writes `state` as checkpoint `step` of `directory` without a data iterator (imported weights:
  `mmjax train` restores the state and starts its data from the beginning)."""
  manager = ocp.CheckpointManager(paths.resolve(directory),
                                  options=ocp.CheckpointManagerOptions(create=True))
  try:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
    manager.wait_until_finished()
  finally:
    manager.close()
