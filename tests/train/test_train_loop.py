"""run_train end to end on the toy objective: NaN policies, corrupt checkpoint fallback, outputs."""

import json
import os

import pytest

from mmjax.train import loop, toy
from mmjax.train.metrics import read_jsonl


def _config(**train):
  config = toy.toy_config(**dict(dict(steps=6, checkpoint_every=3, keep_checkpoints=3), **train))
  config.mesh.shape.update(dict(data=2, fsdp=2, tensor=2))
  return config


def _losses(workdir):
  return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if "loss" in r}


def test_nan_stop_names_step_and_losses_and_saves_nothing_after(tmp_path):
  config = _config(nan_policy="stop", checkpoint_every=2)
  config.toy.nan_at_step = 4
  with pytest.raises(loop.NonFiniteLossError, match=r"step 4 .*loss=nan, loss/a=[0-9.]+, loss/b="):
    loop.run_train(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]  # not 4 nor later


@pytest.mark.slow
def test_nan_skip_then_corrupt_latest_checkpoint_falls_back(tmp_path, capsys):
  config = _config(nan_policy="skip", eval_every=3)
  config.toy.nan_at_step = 2
  summary = loop.run_train(config, str(tmp_path))
  assert summary["skipped"] == 1 and summary["step"] == 6 and summary["checkpoints"] == [3, 6]
  assert "update skipped" in capsys.readouterr().err
  first = _losses(tmp_path)
  assert len(first) == 6 and first[2] != first[2]  # step 2's loss is NaN, later ones finite
  records = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert any("eval/loss" in r for r in records) and os.path.exists(summary["plot"])
  assert os.listdir(tmp_path / "tb")

  for root, _, files in os.walk(tmp_path / "checkpoints" / "6" / "state"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  again = loop.run_train(config, str(tmp_path))
  err = capsys.readouterr().err
  assert "checkpoint step 6" in err and "cannot be restored" in err
  assert "resumed from the checkpoint of step 3" in err
  assert again["start_step"] == 3 and again["step"] == 6
  assert _losses(tmp_path) == pytest.approx(first, nan_ok=True, rel=0, abs=0)
  # The summary is strict JSON (the CLI prints it) and says what happened.
  assert json.loads(json.dumps(again, allow_nan=False)) == again
  assert sorted(again) == ["checkpoints", "compile_s", "eval", "loss", "metrics_file", "params",
                           "plot", "preempted", "skipped", "start_step", "step", "workdir"]
  assert again["checkpoints"] == [3, 6] and again["skipped"] == 1 and again["preempted"] is False
  assert again["loss"] == first[6]
  assert again["eval"]["eval/loss"] == pytest.approx(records[-1]["eval/loss"], rel=1e-6)


def test_bf16_on_a_cpu_without_bf16_computes_in_fp32(monkeypatch, capsys):
  from mmjax import hostcpu
  from mmjax.train import loop as train_loop

  monkeypatch.setattr(hostcpu, "native_bf16", lambda flags=None: False)
  assert train_loop._compute_dtype("bfloat16", "cpu") == "float32"
  assert "computing in float32" in capsys.readouterr().err
  assert train_loop._compute_dtype("bfloat16", "tpu") == "bfloat16"  # accelerators keep bf16
  assert train_loop._compute_dtype("float32", "cpu") == "float32"
  monkeypatch.setattr(hostcpu, "native_bf16", lambda flags=None: True)
  assert train_loop._compute_dtype("bfloat16", "cpu") == "bfloat16"
  monkeypatch.setattr(hostcpu, "native_bf16", lambda flags=None: None)  # unknown: as asked
  assert train_loop._compute_dtype("bfloat16", "cpu") == "bfloat16"
  assert capsys.readouterr().err == ""
