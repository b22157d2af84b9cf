"""`mmjax generate` on a decoder: caption -> image and image file -> caption, end to end on a
randomly initialised small decoder with cheap real tokenizers (a SentencePiece model trained on 300
scene captions; the untrained runlocal rgb tokenizer saved as a checkpoint), and the error paths."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from mmjax import cli
from mmjax import config as mmconfig
from mmjax.data import shapes
from mmjax.errors import UserError
from mmjax.generate import decoder_run
from mmjax.tokenizers import text
from mmjax.train.checkpoint import Checkpointer
from mmjax.train.loop import build
from mmjax.train.state import init_state

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RGB_TOKENIZER = "configs/tokenizers/shapes_rgb.py:runlocal"
CONFIG = os.path.join(ROOT, "configs/decoder/shapes.py:tiny,runlocal,tokenizers=runlocal")
OVERRIDES = ["--config.model.d_model=32", "--config.model.num_layers=1",
             "--config.model.num_heads=2", "--config.model.max_length=128",
             "--config.train.batch_size=8"]


@pytest.fixture(scope="module")
def tokenizers_dir(tmp_path_factory):
  """<dir>/shapes_text/text.model and <dir>/shapes_rgb/checkpoints (the initial state of the
  runlocal rgb tokenizer, written by the trainer's Checkpointer and restored the real way)."""
  root = str(tmp_path_factory.mktemp("tokenizers"))
  cfg = mmconfig.load(os.path.join(ROOT, "configs/tokenizers/shapes_text.py"))
  sentences = [s for pair in text.shapes_sentences(300, split="train", seed=0, image_size=64,
                                                   coord_bins=65) for s in pair]
  text.train_text_tokenizer(sentences, os.path.join(root, "shapes_text", "text"), cfg.tokenizer)
  rgb = mmconfig.load(os.path.join(ROOT, RGB_TOKENIZER))
  objective, setup = build(rgb)
  checkpointer = Checkpointer(os.path.join(root, "shapes_rgb", "checkpoints"), keep=1)
  checkpointer.save(0, jax.device_get(init_state(rgb, setup)),
                    objective.make_iterator("train", 0, 1))
  checkpointer.close()
  return root


def make_config(tokenizers_dir, *overrides):
  return mmconfig.load(CONFIG, OVERRIDES + [f"--config.data.tokenizers_dir={tokenizers_dir}",
                                            *overrides])


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("inputs") / "scene.png")
  Image.fromarray(shapes.generate_scene(3, split="validation")["rgb"]).save(path)
  return path


def test_caption_to_image_writes_pngs_grid_and_summary(tokenizers_dir, tmp_path):
  config = make_config(tokenizers_dir, "--config.generate.image_cfg_scale=2.0")
  out = str(tmp_path / "out")
  summary = decoder_run.generate_decoder(
      config, str(tmp_path / "no_run"), {"caption": "a small red circle in the center"},
      ["tok_rgb"], out_dir=out, seed=1, num_samples=2, allow_random_init=True)
  assert summary["step"] == 0 and summary["cfg_scale"] == 2.0
  assert summary["new_tokens"] == 65  # 8x8 codes and the forced end-image
  files = summary["outputs"]["tok_rgb"]
  assert len(files) == 2
  images = [np.asarray(Image.open(f)) for f in files]
  assert all(x.shape == (64, 64, 3) and x.dtype == np.uint8 for x in images)
  assert os.path.isfile(summary["outputs"]["grid"])
  with open(os.path.join(out, "summary.json")) as f:
    assert json.load(f)["outputs"]["tok_rgb"] == files


def test_image_to_caption_through_the_cli(tokenizers_dir, scene_png, tmp_path, capsys):
  out = str(tmp_path / "out")
  argv = ["generate", "--config", CONFIG,
          "--workdir", str(tmp_path / "no_run"), "--input", f"tok_rgb={scene_png}",
          "--target", "caption", "--out", out, "--num-samples", "1", "--allow-random-init",
          *OVERRIDES, f"--config.data.tokenizers_dir={tokenizers_dir}"]
  assert cli.main(argv) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  caption = summary["outputs"]["captions"][0]
  with open(summary["outputs"]["caption"]) as f:
    assert f.read() == caption + "\n"
  # The text tokenizer has fewer pieces than the caption vocabulary (1024): sampling must stay
  # inside it, or decoding would have failed. The caption re-encodes to valid ids.
  tokenizer = text.TextTokenizer.load(os.path.join(tokenizers_dir, "shapes_text", "text.model"))
  assert tokenizer.vocab_size < 1024
  assert isinstance(caption, str)
  assert tokenizer.encode(caption).max(initial=0) < tokenizer.vocab_size
  assert summary["new_tokens"] == 49  # caption max_length and EOS
  recon = np.asarray(Image.open(summary["outputs"]["input_reconstruction"]))
  assert recon.shape == (64, 64, 3)


@pytest.mark.parametrize("inputs, targets, message", [
    ({"caption": "a red circle"}, ["tok_depth"], "unknown modality 'tok_depth'"),
    ({"caption": "a red circle"}, ["caption"], "both input and target"),
    ({"caption": "a red circle"}, ["tok_rgb", "caption"], "one target from one input"),
    ({}, ["tok_rgb"], "one target from one input"),
    ({"caption": "   "}, ["tok_rgb"], "is empty"),
    ({"tok_rgb": "/nonexistent/scene.png"}, ["caption"], "no image file"),
    ({"caption": "a red circle " * 20}, ["tok_rgb"], "more than modalities.caption.max_length"),
])
def test_bad_requests_are_user_errors(tokenizers_dir, tmp_path, inputs, targets, message):
  with pytest.raises(UserError, match=message):
    decoder_run.generate_decoder(make_config(tokenizers_dir), str(tmp_path), inputs, targets,
                                 out_dir=str(tmp_path / "out"), allow_random_init=True)


def test_untrained_orders_missing_checkpoints_and_tokenizers(tokenizers_dir, tmp_path):
  args = dict(out_dir=str(tmp_path / "out"))
  one_way = make_config(tokenizers_dir)
  one_way.sequences.templates = (("caption", "tok_rgb"),)
  one_way.sequences.probabilities = (1.0,)
  with pytest.raises(UserError, match="none starts with tok_rgb -> caption"):
    decoder_run.generate_decoder(one_way, str(tmp_path), {"tok_rgb": "x.png"}, ["caption"],
                                 allow_random_init=True, **args)
  with pytest.raises(UserError, match="no checkpoint to load"):
    decoder_run.generate_decoder(make_config(tokenizers_dir), str(tmp_path),
                                 {"caption": "a red circle"}, ["tok_rgb"], **args)
  with pytest.raises(UserError, match="text tokenizer model .* does not exist"):
    decoder_run.generate_decoder(make_config(str(tmp_path / "empty")), str(tmp_path),
                                 {"caption": "a red circle"}, ["tok_rgb"],
                                 allow_random_init=True, **args)
  no_dirs = make_config("", "--config.data.data_dir=")
  with pytest.raises(UserError, match="'data.tokenizers_dir' and 'data.data_dir' are both empty"):
    decoder_run.generate_decoder(no_dirs, str(tmp_path), {"caption": "a red circle"},
                                 ["tok_rgb"], allow_random_init=True, **args)
  with pytest.raises(UserError, match="generate.image_cfg_scale"):
    decoder_run.generate_decoder(
        make_config(tokenizers_dir, "--config.generate.image_cfg_scale=-1"), str(tmp_path),
        {"caption": "a red circle"}, ["tok_rgb"], allow_random_init=True, **args)


def test_tokenizers_other_than_the_datas_are_an_error(tokenizers_dir, tmp_path):
  """The decoder learned the codes of the tokenizers that made its data: others decode garbage."""
  ds_dir = tmp_path / "data" / "mmjax_tokens" / "shapes" / "1.0.0"
  ds_dir.mkdir(parents=True)
  (ds_dir / "dataset_info.json").write_text("{}")
  (ds_dir / "metadata.json").write_text(json.dumps({
      "modalities": [{"name": "caption"}, {"name": "tok_rgb"}],
      "fingerprints": {"tok_rgb": "0123456789abcdef"}}))
  config = make_config(tokenizers_dir, f"--config.data.data_dir={tmp_path / 'data'}")
  with pytest.raises(UserError, match="tok_rgb: tokens made by tokenizer 0123456789ab"):
    decoder_run.generate_decoder(config, str(tmp_path), {"caption": "a red circle"}, ["tok_rgb"],
                                 out_dir=str(tmp_path / "out"), allow_random_init=True)
