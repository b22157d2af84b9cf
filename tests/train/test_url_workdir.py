"""`mmjax train --workdir=gs://...` writes everything under the URL and nothing locally.

The URL goes to a fake GCS (tests/fake_gcs.py) whose objects are files under tmp_path/gcs; the
current directory is an empty folder that must stay empty: a URL turned into a local path
(os.path.abspath gives `<cwd>/gs:/bucket/run`) would show up there."""

import json
import os

import pytest

from mmjax import cli
from tests import fake_gcs

CONFIG = '''
from mmjax.train import toy


def get_config(arg=None):
  del arg
  return toy.toy_config(steps=4, checkpoint_every=2, keep_checkpoints=2, eval_every=2)
'''


@pytest.mark.slow
def test_train_on_a_gs_workdir_writes_nothing_locally_and_resumes(tmp_path, monkeypatch, capsys):
  config = tmp_path / "toy_config.py"
  config.write_text(CONFIG)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  with fake_gcs.installed(tmp_path / "gcs") as root:
    assert cli.main(["train", f"--config={config}", "--workdir=gs://bucket/run"]) == 0
    assert cli.main(["train", f"--config={config}", "--workdir=gs://bucket/run",
                     "--config.train.steps=6"]) == 0
  err = capsys.readouterr().err
  assert "resumed from the checkpoint of step 4" in err
  assert fake_gcs.local_files(cwd) == []
  files = fake_gcs.local_files(os.path.join(root, "bucket", "run"))
  for name in ("config.json", "metrics.jsonl", "loss.png"):
    assert name in files
  assert any(f.startswith("tb/events.out.tfevents") for f in files)
  # keep_checkpoints=2: steps 4 and 6 remain, with their state and both iterators' positions.
  assert sorted({f.split("/")[1] for f in files if f.startswith("checkpoints/")}) == ["4", "6"]
  assert any(f.startswith("checkpoints/6/state/") for f in files)
  assert "checkpoints/6/iter/process_0-of-1.json" in files
  with open(os.path.join(root, "bucket", "run", "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))
