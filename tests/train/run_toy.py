"""Runs the toy objective's training in its own process (for kill/resume and SIGTERM tests).

  python tests/train/run_toy.py WORKDIR '{"train": {"steps": 12}, "toy": {"delay_s": 0.2}}' [WHEN]
Prints the run's summary as one JSON line; exits 0 (also after a SIGTERM). WHEN ("iterator" or
"restore") makes the process send itself a SIGTERM as it creates the train iterator or restores.
"""

import functools
import json
import os
import signal
import sys

from mmjax.train import checkpoint, loop, toy


def _sigterm_first(owner, name: str) -> None:
  original = getattr(owner, name)

  @functools.wraps(original)
  def wrapped(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)

  setattr(owner, name, wrapped)


def main(workdir: str, overrides: str = "{}", when: str = "") -> int:
  config = toy.toy_config()
  config.mesh.shape.update(dict(data=-1))
  for section, values in json.loads(overrides).items():
    config[section].update(values)
  if when:
    owner, name = {"iterator": (toy.ToyObjective, "make_iterator"),
                   "restore": (checkpoint.Checkpointer, "restore_latest")}[when]
    _sigterm_first(owner, name)
  summary = loop.run_train(config, workdir)
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main(*sys.argv[1:]))
