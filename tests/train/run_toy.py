"""Runs the toy objective's training in its own process (for kill/resume and SIGTERM tests).

  python tests/train/run_toy.py WORKDIR '{"train": {"steps": 12}, "toy": {"delay_s": 0.2}}'
Prints the run's summary as one JSON line; exits 0 (also after a SIGTERM).
"""

import json
import sys

from mmjax.train import loop, toy


def main(workdir: str, overrides: str) -> int:
  config = toy.toy_config()
  config.mesh.shape.update(dict(data=-1))
  for section, values in json.loads(overrides).items():
    config[section].update(values)
  summary = loop.run_train(config, workdir)
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "{}"))
