"""The command line: help, config errors and user errors exit non-zero with one line."""

import os
import re
import subprocess
import sys

import pytest

from mmjax import cli
from mmjax import config as mmconfig

COMMANDS = ("demo", "prepare", "tokenizer", "train", "eval", "generate", "bench", "aot", "sweep")


def _run(capsys, *argv):
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def test_help_lists_every_command_of_the_contract():
  result = subprocess.run([sys.executable, "-m", "mmjax.cli", "--help"], capture_output=True,
                          text=True, check=True)
  for command in COMMANDS:
    assert f"    {command}" in result.stdout


def test_no_command_prints_help_and_fails(capsys):
  code, out, _ = _run(capsys)
  assert code == 2 and "usage: mmjax" in out


@pytest.mark.parametrize("argv, message", [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["train"], "required: --config"),
    (["train", "--config=configs/missing.py"], "'configs/missing.py' does not exist"),
    (["train", "--config=configs/fourm/shapes.py", "--config.train.stepz=3"],
     "unknown config key 'train.stepz'.*closest valid names: train.steps"),
    (["train", "--config=configs/fourm/shapes.py", "--config.train.steps"], "needs a value"),
    (["train", "--config=configs/fourm/shapes.py", "--bogus"], "unrecognized arguments: --bogus"),
    (["prepare", "shapes", "--num-train", "3"], "required: --out"),
    (["prepare", "shapes", "--out", "x", "--num-train", "many"], "invalid int value"),
    (["bench"], "choose one of its subcommands"),
    (["prepare", "shapes", "--out", "x", "--config.data.seed=1"], "without --config"),
    (["demo", "--quick", "--reference"], "--quick and --reference are exclusive"),
])
def test_user_errors_are_one_line_and_exit_2(capsys, argv, message):
  code, _, err = _run(capsys, *argv)
  assert code == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("mmjax: error: "), err
  assert "Traceback" not in err
  assert re.search(message, lines[0]), lines[0]


def test_aot_lower_only_prints_one_json_line(tmp_path, capsys, monkeypatch):
  import json

  from mmjax.data.pipeline import demo_tokens
  from mmjax.data.tokens import records

  # Demo tokens exist, but aot reads no data: no note about data.data_dir.
  demo = tmp_path / "demo_tokens"
  os.makedirs(records.dataset_dir(str(demo), "shapes"))
  monkeypatch.setenv(demo_tokens.ENV, str(demo))
  code, out, err = _run(capsys, "aot", "--config=configs/fourm/shapes.py:tiny,runlocal",
                      "--topology=v5e:2x2", "--lower-only", "--out", str(tmp_path))
  assert code == 0
  result = json.loads(out.strip().splitlines()[-1])
  assert result["aot"] == "v5e:2x2" and result["mesh"]["data"] == 4 and not result["compiled"]
  # The TPU is the target (its choices follow: bf16, ragged heads), not the CPU.
  assert result["overrides"] == {"model.platform": "tpu"} and result["dtype"] == "bfloat16"
  assert (tmp_path / "step.stablehlo.mlir").stat().st_size > 0
  assert "data.data_dir" not in err and "aot: lowering the train step for v5e:2x2 ..." in err


@pytest.mark.parametrize("argv, message", [
    (["aot", "--config=configs/fourm/4m.py:B", "--topology=v5p-16"], "expected KIND:AxB"),
    (["aot", "--config=configs/fourm/4m.py:B", "--topology=v9:2x2"], "unknown TPU kind 'v9'"),
    (["sweep", "--sweep=configs/sweeps/scaling.py"], "--workdir is required"),
    (["sweep", "--sweep=configs/sweeps/nope.py", "--workdir=x"], "'configs/sweeps/nope.py' does"),
    (["sweep", "--sweep=configs/sweeps/scaling.py", "--workdir=x", "--config=a.py"],
     "the sweep file names the base config"),
])
def test_aot_and_sweep_user_errors(capsys, argv, message):
  code, _, err = _run(capsys, *argv)
  assert code == 2 and re.search(message, err) and "Traceback" not in err, err


def test_console_script_error_has_no_traceback(tmp_path):
  result = subprocess.run([sys.executable, "-m", "mmjax.cli", "train",
                           "--config=configs/fourm/shapes.py:tiny", "--config.model.d_modle=3"],
                          capture_output=True, text=True)
  assert result.returncode == 2
  assert "Traceback" not in result.stderr and "model.d_model" in result.stderr


def test_prepare_shapes_writes_a_readable_dataset(tmp_path, capsys):
  import json

  import tensorflow_datasets as tfds

  code, out, _ = _run(capsys, "prepare", "shapes", "--out", str(tmp_path), "--num-train", "6",
                      "--num-val", "2", "--seed", "3")
  assert code == 0
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary["splits"] == {"train": 6, "validation": 2}
  source = tfds.data_source("shapes/s64", data_dir=str(tmp_path))
  assert len(source["train"]) == 6 and source["validation"][1]["rgb"].shape == (64, 64, 3)


def test_prepare_shapes_bad_parameter_is_a_user_error(tmp_path, capsys):
  code, _, err = _run(capsys, "prepare", "shapes", "--out", str(tmp_path), "--image-size", "8")
  assert code == 2 and "image_size" in err and "Traceback" not in err


@pytest.mark.slow
def test_demo_quick_runs_every_stage_then_resumes(tmp_path, capsys):
  """The whole pipeline at smoke-test sizes; a second run skips every finished stage."""
  import json

  from PIL import Image

  workdir = tmp_path / "demo"
  assert cli.main(["demo", "--quick", "--workdir", str(workdir)]) == 0
  out = capsys.readouterr().out
  summary = json.loads((workdir / "demo_summary.json").read_text())
  assert list(summary["stage_seconds"]) == [
      "shapes data", "text tokenizer", "rgb tokenizer", "depth tokenizer", "semseg tokenizer",
      "pre-tokenize", "4M training", "evaluation", "sample"]
  assert summary["figures"]["4M"]["steps"] == 2
  for name, path in summary["pngs"].items():
    assert path in out, name
    with Image.open(path) as image:
      assert image.size[0] >= 64, name
  assert "generated caption->tok_rgb" in summary["pngs"]
  metrics = json.loads((workdir / "fourm" / "eval" / "metrics.json").read_text())["metrics"]
  assert metrics["gen/rgb->caption/scenes"] == 2.0 and "val/loss" in metrics
  assert 0.0 <= metrics["gen/caption->tok_rgb/attr_acc"] <= 1.0
  assert not any(k.startswith("gen/rgb->det") for k in metrics)  # quick: two tasks only
  assert "sample tok_rgb" in summary["pngs"] and "sample det" in summary["pngs"]
  # Learning curves during training, and the report's table with chance and ceiling.
  assert "4M learning curves" in summary["pngs"]
  rows = [r.split("|") for r in (workdir / "report.md").read_text().splitlines()
          if r.startswith("| rgb->caption/attr_acc |")]
  assert len(rows) == 1 and 0.0 <= float(rows[0][3]) <= 1.0  # chance
  assert float(rows[0][4]) == 1.0  # ceiling: the text tokenizer round-trips every caption

  assert cli.main(["demo", "--quick", "--workdir", str(workdir)]) == 0
  again = capsys.readouterr().out
  assert again.count("exists; skipped") == 6  # text, 3 image tokenizers, evaluation, sample
  assert json.loads((workdir / "demo_summary.json").read_text())["figures"]["4M"]["steps"] == 2

  # The decoder on the same tokens: its own training, evaluation and report.
  assert cli.main(["demo", "--quick", "--model", "decoder", "--workdir", str(workdir)]) == 0
  capsys.readouterr()
  report = (workdir / "report_decoder.md").read_text()
  assert "| caption->tok_rgb/attr_acc |" in report and "| tok_rgb->caption/attr_acc |" in report
  assert (workdir / "decoder" / "curves.png").is_file()


def test_demo_reference_trains_4m_with_the_reference_config():
  from mmjax import demo

  settings = demo.DemoSettings.reference_settings()
  config = demo.fourm_config("W", settings)
  reference = mmconfig.load("configs/fourm/shapes.py:reference,tokenizers=runlocal", [])
  assert config.train.to_dict() == reference.train.to_dict()
  assert config.eval.every_steps == reference.eval.every_steps > 0
  assert config.train.steps > 5 * demo.fourm_config("W", demo.DemoSettings()).train.steps
  assert config.data.data_dir == "W/tokens"


def test_tokenizer_train_text(tmp_path, capsys):
  import json

  code, out, _ = _run(capsys, "tokenizer", "train", "--config=configs/tokenizers/shapes_text.py",
                      "--config.num_train_scenes=300", "--config.num_val_scenes=50",
                      "--workdir", str(tmp_path))
  assert code == 0
  report = json.loads(out.strip().splitlines()[-1])
  assert report["caption_round_trip"] == 1.0 and (tmp_path / "text.model").exists()
