"""mmjax sweep: grids and names, sweep-file errors, emitted commands, resume, collection and fits."""

import json
import os
import shlex
import textwrap

import numpy as np
import pytest

from mmjax import cli
from mmjax import config as mmconfig
from mmjax.errors import UserError
from mmjax.train import scaling, sweep
from mmjax.train.metrics import METRICS_FILE, read_jsonl

TOY_CONFIG = """
from mmjax.train import toy

def get_config(arg=None):
  return toy.toy_config(steps=2, batch_size=8, checkpoint_every=100, log_every=1)
"""


@pytest.fixture
def files(tmp_path):
  """A toy base config and a sweep file over it: `{embeds}` x `{steps}`."""
  (tmp_path / "toy_config.py").write_text(TOY_CONFIG)

  def write(body: str, name: str = "sweep.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body).replace("CONFIG", str(tmp_path / "toy_config.py")))
    return str(path)
  return write


def _toy_params(config) -> int:
  c = config.toy
  return (c.vocab * c.embed + c.length * c.embed + 2 * c.embed + c.embed * c.mlp + c.mlp
          + c.mlp * c.vocab + c.vocab)


def test_product_and_point_names():
  points = sweep.product({("model.d_model", "model.num_heads"): [(64, 2), (128, 4)],
                          "train.lr": [1e-3, 3e-4]})
  assert points[1] == {"model.d_model": 64, "model.num_heads": 2, "train.lr": 3e-4}
  assert len(points) == 4
  assert sweep.point_name(points[1]) == "d_model=64,num_heads=2,lr=0.0003"
  assert sweep.point_name({"a.size": 1, "b.size": 2, "c": "x/y z"}) == "a.size=1,b.size=2,c=x_y_z"
  assert sweep.point_name({"_name": "small", "a": 1}) == "small"
  with pytest.raises(ValueError, match="tuples of 2"):
    sweep.product({("a", "b"): [1]})


def test_names_show_only_what_varies(files):
  spec = files("""
      def get_sweep():
        return {"config": "CONFIG", "points": [{"toy.embed": 8, "train.steps": 3},
                                               {"toy.embed": 16, "train.steps": 3}]}
  """)
  assert list(sweep.load_sweep(spec)["points"]) == ["embed=8", "embed=16"]


@pytest.mark.parametrize("body, message", [
    ("x = 1", "defines no get_sweep"),
    ("def get_sweep():\n  return {'config': 'CONFIG', 'points': [], }", "non-empty list"),
    ("def get_sweep():\n  return {'config': 'CONFIG', 'points': [{}], 'grid': 1}",
     "unknown sweep keys \\['grid'\\]"),
    ("def get_sweep():\n  return {'config': 'CONFIG', 'points': [{'a': 1}, {'_name': 'a=1'}]}",
     "both named 'a=1'"),
    ("def get_sweep():\n  raise KeyError('boom')", "KeyError"),
])
def test_bad_sweep_files_are_user_errors(files, body, message):
  with pytest.raises(UserError, match=message):
    sweep.load_sweep(files(body))


def test_a_bad_override_names_its_point_before_anything_runs(files, tmp_path):
  spec = files("""
      def get_sweep():
        return {"config": "CONFIG", "points": [{"toy.embed": 8}, {"toy.embedd": 16}]}
  """)
  calls = []
  with pytest.raises(UserError, match="point 'embedd=16'.*unknown config key 'toy.embedd'"):
    sweep.run_sweep(spec, str(tmp_path / "w"), train_fn=lambda c, d: calls.append(d) or {})
  assert not calls


def test_emitted_commands_give_the_points_configs(files, tmp_path):
  spec = files("""
      from mmjax.train.sweep import product
      def get_sweep():
        return {"config": "CONFIG",
                "points": product({"toy.embed": [8, 16], "train.lr": [0.01], "train.steps": [3, 4]})}
  """)
  loaded = sweep.load_sweep(spec)
  lines = sweep.run_sweep(spec, str(tmp_path / "w"), emit=True)["commands"]
  assert len(lines) == 4
  for line, name in zip(lines, loaded["points"]):
    argv = shlex.split(line)
    assert argv[:2] == ["mmjax", "train"] and argv[-1] == f"--workdir={tmp_path / 'w' / name}"
    rest, overrides = cli._split_overrides(argv[2:-1])
    emitted = mmconfig.load(rest[0].split("=", 1)[1], overrides)
    assert emitted.to_dict() == sweep.point_config(loaded, name).to_dict()


def _fake_train(law, preempt=()):
  """A train_fn writing the metrics a run would, with eval/loss from `law(params, tokens)`."""
  calls = []

  def train(config, workdir):
    calls.append(os.path.basename(workdir))
    os.makedirs(workdir, exist_ok=True)
    params = _toy_params(config)
    tokens = config.toy.length * config.train.batch_size * config.train.steps
    with open(os.path.join(workdir, METRICS_FILE), "w") as f:
      f.writelines(json.dumps({"step": step, "loss": 5.0 / step}) + "\n"
                   for step in range(1, config.train.steps + 1))
      f.write(json.dumps({"step": config.train.steps, "eval/loss": law(params, tokens)}) + "\n")
    return {"params": params, "preempted": os.path.basename(workdir) in preempt and
            len([c for c in calls if c == os.path.basename(workdir)]) == 1}
  return train, calls


def test_fit_over_a_sweep_recovers_the_law(files, tmp_path):
  spec = files("""
      from mmjax.train.sweep import product
      def get_sweep():
        return {"config": "CONFIG", "fit": True,
                "points": product({("toy.embed", "toy.mlp"): [(8, 16), (32, 64), (128, 256)],
                                   "train.steps": [2, 8, 32]})}
  """)
  truth = {"E": 0.5, "A": 40.0, "alpha": 0.35, "B": 9.0, "beta": 0.4}
  train, calls = _fake_train(lambda n, d: float(scaling.loss_nd(truth, n, d)))
  result = sweep.run_sweep(spec, str(tmp_path / "w"), train_fn=train, log=lambda s: None)
  assert len(calls) == 9 and result["done"] == 9
  rows = read_jsonl(result["results"])
  fit = rows[-1]
  assert fit["kind"] == "fit" and fit["metric"] == "eval/loss"
  for key, value in truth.items():
    assert fit["loss_nd"][key] == pytest.approx(value, rel=1e-3), key
  assert os.path.getsize(result["plot"]) > 10_000
  assert [r["name"] for r in rows[:2]] == ["embed=8,mlp=16,steps=2", "embed=8,mlp=16,steps=8"]
  assert rows[0]["train_flops"] == pytest.approx(6.0 * 8 * 8 * 2 * (8 * 16 + 16 * 64))
  with open(result["table"]) as f:
    table = f.read().splitlines()
  assert table[0].split()[:3] == ["point", "status", "step"] and len(table) == 10


def test_preempted_point_stops_the_sweep_and_runs_again(files, tmp_path):
  spec = files("""
      def get_sweep():
        return {"config": "CONFIG", "points": [{"toy.embed": 8}, {"toy.embed": 16}]}
  """)
  train, calls = _fake_train(lambda n, d: 1.0, preempt=("embed=8",))
  first = sweep.run_sweep(spec, str(tmp_path / "w"), train_fn=train, log=lambda s: None)
  assert calls == ["embed=8"] and first["ran"] == [] and first["done"] == 1  # metrics complete
  assert not os.path.exists(tmp_path / "w" / "embed=8" / sweep.MARKER)
  second = sweep.run_sweep(spec, str(tmp_path / "w"), train_fn=train, log=lambda s: None)
  assert calls == ["embed=8", "embed=8", "embed=16"] and second["ran"] == ["embed=16", "embed=8"]
  third = sweep.run_sweep(spec, str(tmp_path / "w"), train_fn=train, log=lambda s: None)
  assert len(calls) == 3 and third["skipped"] == ["embed=16", "embed=8"]


def test_cli_runs_resumes_and_collects_the_toy_objective(files, tmp_path, capsys):
  spec = files("""
      def get_sweep():
        return {"config": "CONFIG", "points": [{"toy.embed": 8}, {"toy.embed": 16}]}
  """)
  workdir = str(tmp_path / "w")
  # Point embed=16 finished earlier (as a fake run); the command trains only embed=8, for real.
  loaded = sweep.load_sweep(spec)
  train, _ = _fake_train(lambda n, d: 9.0)
  sweep.run_points({**loaded, "points": {"embed=16": loaded["points"]["embed=16"]}}, workdir,
                   train_fn=train, log=lambda s: None)
  assert cli.main(["sweep", "--sweep", spec, "--workdir", workdir]) == 0
  out, err = capsys.readouterr()
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary["ran"] == ["embed=8"] and summary["skipped"] == ["embed=16"]
  assert summary["done"] == 2 and "finished before; skipped" in err
  rows = read_jsonl(os.path.join(workdir, sweep.RESULTS))
  records = read_jsonl(os.path.join(rows[0]["workdir"], METRICS_FILE))
  assert rows[0]["metric"] == [r["eval/loss"] for r in records if "eval/loss" in r][-1]
  assert rows[0]["status"] == "done" and rows[0]["step"] == 2 and np.isfinite(rows[0]["metric"])
  assert rows[1]["metric"] == 9.0 and rows[0]["params"] == _toy_params(
      sweep.point_config(loaded, "embed=8"))
  assert "embed=8" in out and "eval/loss" in out.splitlines()[0]   # the table
  # Run again: both points are finished, nothing trains.
  assert cli.main(["sweep", "--sweep", spec, "--workdir", workdir]) == 0
  out, err = capsys.readouterr()
  assert json.loads(out.strip().splitlines()[-1])["skipped"] == ["embed=16", "embed=8"]
  assert err.count("finished before; skipped") == 2
  assert cli.main(["sweep", "--sweep", spec, "--workdir", workdir, "--collect"]) == 0
  assert json.loads(capsys.readouterr()[0].strip().splitlines()[-1])["done"] == 2
  assert cli.main(["sweep", "--sweep", spec, "--workdir", workdir, "--emit"]) == 0
  out, _ = capsys.readouterr()
  assert out.count("mmjax train --config=") == 2 and "{" not in out


@pytest.mark.parametrize("spec", ["configs/sweeps/scaling.py:data_dir=/data,runlocal",
                                  "configs/sweeps/scaling.py", "configs/sweeps/ablation.py:runlocal"])
def test_shipped_sweeps_resolve(spec):
  loaded = sweep.load_sweep(spec)
  for name in loaded["points"]:
    sweep.point_config(loaded, name)
  if "scaling" in spec:
    assert loaded["fit"] and len(loaded["points"]) == 12 - 3 * spec.endswith("runlocal")
