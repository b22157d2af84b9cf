"""`mmjax train` in this process, instrumented for the multi-process tests.

  python tests/train/run_multihost.py RECORD_DIR [mmjax train arguments...]

Runs `mmjax.cli.main(["train", ...])` (joining the cluster that MMJAX_* / SLURM_* variables
describe) after installing, from environment variables:
- always: every local batch this process reads for training and every global batch the train step
  receives (gathered over processes) are logged to RECORD_DIR/{local,global}_<process>.jsonl as
  one digest per row, one line per step; and the positions of the global record stream it reads
  (`IndexStream`: host h of H reads positions h, h + H, ...) to RECORD_DIR/reads_<process>.jsonl,
  one line per read;
- MMJAX_TEST_READ_AS_HOSTS=H: a single process reads the global batch of an H-host run (host 0's
  rows, then host 1's, ...), so that it trains on the same global batches as H processes do;
- MMJAX_TEST_KILL_AFTER_SAVE=S: the process SIGKILLs itself once the checkpoint of step S is on
  disk (a deterministic crash right after a save);
- evaluation is turned off (its batches would be logged as train batches).
"""

import hashlib
import json
import os
import signal
import sys

import grain
import jax
import numpy as np

from mmjax import cli
from mmjax import sharding as mmsharding
from mmjax.data.pipeline import stream as pipeline_stream
from mmjax.train import checkpoint, loop


def _digests(batch) -> list[str]:
  fields = sorted(batch)
  rows = len(batch[fields[0]])
  return [hashlib.sha1(b"".join(np.ascontiguousarray(batch[f][i]).tobytes() for f in fields))
          .hexdigest()[:16] for i in range(rows)]


class _Log:
  """Appends JSON lines to `<record_dir>/<name>_<this process's index>.jsonl`."""

  def __init__(self, record_dir, name):
    self.record_dir, self.name = record_dir, name

  def write(self, value) -> None:
    path = os.path.join(self.record_dir, f"{self.name}_{jax.process_index()}.jsonl")
    with open(path, "a") as f:
      f.write(json.dumps(value) + "\n")


class _AsHosts(grain.DatasetIterator):
  """One iterator over the global batches of `hosts` processes: their local batches, stacked."""

  def __init__(self, iterators):
    super().__init__()
    self.iterators = iterators

  def __next__(self):
    parts = [next(it) for it in self.iterators]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self):
    return {str(i): it.get_state() for i, it in enumerate(self.iterators)}

  def set_state(self, state):
    for i, it in enumerate(self.iterators):
      it.set_state(state[str(i)])


class _Recorded(grain.DatasetIterator):
  """An iterator that logs the digests of the rows it yields."""

  def __init__(self, it, log: _Log):
    super().__init__()
    self.it, self.log = it, log

  def __next__(self):
    batch = next(self.it)
    self.log.write(_digests(batch))
    return batch

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)


def _install(record_dir: str) -> None:
  hosts = int(os.environ.get("MMJAX_TEST_READ_AS_HOSTS", "0"))
  kill_after = int(os.environ.get("MMJAX_TEST_KILL_AFTER_SAVE", "0"))
  get_objective = loop.get_objective

  def instrumented_objective(config):
    objective = get_objective(config)
    make_iterator = objective.make_iterator

    def make(split, process_index, process_count):
      if hosts:
        it = _AsHosts([make_iterator(split, h, hosts) for h in range(hosts)])
      else:
        it = make_iterator(split, process_index, process_count)
      return _Recorded(it, _Log(record_dir, "local"))

    objective.make_iterator = make
    return objective

  loop.get_objective = instrumented_objective
  reads = _Log(record_dir, "reads")
  stream_call = pipeline_stream.IndexStream.__call__

  def logged_stream_call(self, positions):
    positions = np.asarray(positions, np.int64)
    reads.write((positions * self.process_count + self.process_index).tolist())
    return stream_call(self, positions)

  pipeline_stream.IndexStream.__call__ = logged_stream_call
  loop._evaluate = lambda *args, **kwargs: {}
  global_batch = mmsharding.global_batch
  global_log = _Log(record_dir, "global")

  def recorded_global_batch(local, shardings):
    batch = global_batch(local, shardings)
    from jax.experimental import multihost_utils  # noqa: PLC0415
    whole = multihost_utils.process_allgather(batch, tiled=True)
    global_log.write(_digests(whole))
    return batch

  loop.mmsharding.global_batch = recorded_global_batch

  if kill_after:
    save = checkpoint.Checkpointer.save

    def save_then_die(self, step, state, iterator):
      save(self, step, state, iterator)
      if step == kill_after:
        self.wait()
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.Checkpointer.save = save_then_die


def main(record_dir: str, *train_args: str) -> int:
  os.makedirs(record_dir, exist_ok=True)
  _install(record_dir)
  return cli.main(["train", *train_args])


if __name__ == "__main__":
  sys.exit(main(*sys.argv[1:]))
