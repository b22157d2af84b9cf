"""`mmjax eval`: dispatch by objective, metrics.json and grids; the 4M tasks and ground truth."""

import json

import numpy as np
import pytest

from mmjax import cli, modalities
from mmjax import config as mmconfig
from mmjax.data.shapes import world as shapes
from mmjax.errors import UserError
from mmjax.eval import fourm_eval, run
from mmjax.objectives import tokenizer as tokenizer_objective

TOKENIZER = "configs/tokenizers/shapes_rgb.py:runlocal"
TINY = ["--config.train.steps=1", "--config.train.warmup_steps=0", "--config.train.batch_size=8", "--config.data.num_val=4",
        "--config.eval.batch_size=4", "--config.eval.grid_images=2"]


@pytest.mark.slow
def test_eval_of_a_tokenizer_checkpoint(tmp_path, capsys):
  workdir = str(tmp_path / "tok")
  assert cli.main(["train", f"--config={TOKENIZER}", "--workdir", workdir, *TINY]) == 0
  capsys.readouterr()
  assert cli.main(["eval", f"--config={TOKENIZER}", "--workdir", workdir, *TINY]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["step"] == 1 and summary["objective"] == "tokenizer"
  with open(tmp_path / "tok" / "eval" / run.METRICS_FILE) as f:
    written = json.load(f)
  assert written["metrics"]["recon/num_images"] == 4.0
  assert (tmp_path / "tok" / "eval" / "reconstructions_rgb.png").stat().st_size > 1000
  # The run's config file fixes the architecture: this `runlocal` tokenizer loads through the
  # full-size config that the 4M configs name by default.
  registry = modalities.from_config({"tok_rgb": dict(
      kind="image_tokens", source="rgb", vocab_size=1024, grid=(8, 8),
      tokenizer="configs/tokenizers/shapes_rgb.py")})
  tok = tokenizer_objective.load_modality_tokenizer(registry["tok_rgb"], workdir)
  assert tok.tokenizer.cfg.width == mmconfig.load(TOKENIZER).model.width == 64
  # The PSNR is that of the checkpoint's reconstructions of the 4 validation scenes, recomputed
  # here from the restored weights with the formula written out.
  config = mmconfig.load(TOKENIZER, TINY)
  images = tokenizer_objective.validation_images(config, "rgb")
  recon = np.asarray(tok.tokenizer.reconstruct(images)[1], np.float64)
  mse = np.mean((recon - images.astype(np.float64)).reshape(len(images), -1) ** 2, axis=1)
  assert written["metrics"]["recon/psnr"] == pytest.approx(
      np.mean(10 * np.log10(255.0 ** 2 / mse)), abs=1e-4)


def test_eval_without_a_checkpoint_is_a_user_error(tmp_path, capsys):
  code = cli.main(["eval", f"--config={TOKENIZER}", "--workdir", str(tmp_path), *TINY])
  err = capsys.readouterr().err
  assert code == 2 and "no checkpoint" in err and "Traceback" not in err


def test_eval_rejects_an_objective_without_evaluation(tmp_path):
  config = mmconfig.load(TOKENIZER)
  with config.unlocked():
    config.objective = "toy"
  with pytest.raises(UserError, match="objective 'toy' has no evaluation"):
    run.run_eval(config, str(tmp_path), out_dir=str(tmp_path / "eval"))


def test_shapes_tasks_follow_the_registry():
  config = mmconfig.load("configs/fourm/shapes.py:tiny")
  registry = modalities.from_config(config.modalities)
  names = [t.name for t in fourm_eval.shapes_tasks(registry)]
  assert names == ["rgb->caption", "rgb->det", "rgb->tok_semseg", "rgb->tok_depth",
                   "caption->tok_rgb"]
  # Without raw pixels the rgb tokens are the input; without a caption there is no caption task.
  with config.modalities.unlocked():
    del config.modalities["rgb"]
    del config.modalities["caption"]
  registry = modalities.from_config(config.modalities)
  names = [t.name for t in fourm_eval.shapes_tasks(registry)]
  assert names == ["tok_rgb->det", "tok_rgb->tok_semseg", "tok_rgb->tok_depth"]


def test_ground_truth_scenes_are_checked_against_the_records():
  scene = shapes.generate_scene(5, split="validation", seed=3)
  record = {"index": np.int64(5), "gt_caption": scene["caption"].encode()}
  (found,) = fourm_eval.ground_truth_scenes([record], seed=3, image_size=64)
  np.testing.assert_array_equal(found["semseg"], scene["semseg"])
  with pytest.raises(UserError, match="data.seed"):
    fourm_eval.ground_truth_scenes([record], seed=4, image_size=64)


def test_printable_titles():
  assert fourm_eval.printable("a\x03b\ufffd") == "a?b\ufffd"
  assert len(fourm_eval.printable("x" * 500)) == 120


def test_eval_scores_the_tasks_named_on_the_command_line(tmp_path, monkeypatch, capsys):
  seen = {}

  def fake_run_eval(config, workdir, **kwargs):
    seen.update(kwargs)
    return {"step": 0}

  monkeypatch.setattr(run, "run_eval", fake_run_eval)
  args = ["eval", f"--config={TOKENIZER}", "--workdir", str(tmp_path)]
  assert cli.main([*args, "--tasks", "rgb->caption, caption->tok_rgb"]) == 0
  assert seen["tasks"] == ["rgb->caption", "caption->tok_rgb"]
  assert cli.main(args) == 0
  assert seen["tasks"] is None  # every task the config supports
