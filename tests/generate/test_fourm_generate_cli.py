"""`mmjax generate` on a randomly initialised 4M shapes model, end to end: text and image inputs,
chained image + boxes targets, decoded files, and the user errors.

Tokenizers are tiny and cheap, as in tests/data/test_pretokenize.py: SentencePiece trained on 300
scene sentences and the untrained (initial) checkpoint of the runlocal rgb tokenizer."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from mmjax import cli
from mmjax import config as mmconfig
from mmjax.objectives import text_tokenizer
from mmjax.tokenizers import text
from mmjax.train.checkpoint import Checkpointer
from mmjax.train.loop import build
from mmjax.train.state import init_state

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RGB_TOKENIZER = "configs/tokenizers/shapes_rgb.py:runlocal"


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
  root = tmp_path_factory.mktemp("generate")
  tokenizers = root / "tokenizers"
  cfg = mmconfig.load(os.path.join(ROOT, "configs/tokenizers/shapes_text.py"))
  pairs = text_tokenizer.shapes_sentences(300, split="train", seed=0, image_size=64,
                                          coord_bins=65)
  sentences = [s for pair in pairs for s in pair]
  text.train_text_tokenizer(sentences, str(tokenizers / "shapes_text" / "text"), cfg.tokenizer)
  rgb = mmconfig.load(os.path.join(ROOT, RGB_TOKENIZER))
  objective, setup = build(rgb)
  checkpointer = Checkpointer(str(tokenizers / "shapes_rgb" / "checkpoints"), keep=1)
  state = jax.device_get(init_state(rgb, setup))
  checkpointer.save(0, state, objective.make_iterator("train", 0, 1))
  checkpointer.close()
  path = root / "fourm_generate.py"
  path.write_text(f'''
from mmjax import config as mmconfig

def get_config(arg=None):
  config = mmconfig.load({os.path.join(ROOT, "configs/fourm/shapes.py:tiny,runlocal")!r})
  config.modalities.tok_rgb.tokenizer = {RGB_TOKENIZER!r}
  config.model.update(d_model=64, num_heads=2, encoder_layers=1, decoder_layers=1)
  config.modalities.caption.max_length = 24  # shorter autoregressive loops
  config.modalities.det.max_length = 24
  config.data.tokenizers_dir = {str(tokenizers)!r}
  config.generate.steps = 3
  if arg == "two_rgb":  # a second token modality of the rgb image: `--target rgb` is ambiguous
    with config.unlocked():
      config.modalities.tok_rgb2 = config.modalities.tok_rgb.to_dict()
  return config
''')
  return str(path)


def _generate(config_path, workdir, *args):
  return cli.main(["generate", "--config", config_path, "--workdir", str(workdir), *args])


def test_caption_to_image_then_boxes(config_path, tmp_path, capsys):
  code = _generate(config_path, tmp_path, "--input", "caption=a small red circle in the top left",
                   "--target", "tok_rgb", "--target", "det", "--num-samples", "2",
                   "--allow-random-init", "--config.generate.image_schedule=roar",
                   "--config.generate.top_k=50")
  out = capsys.readouterr()
  assert code == 0, out.err
  summary = json.loads(out.out.strip().splitlines()[-1])
  assert summary["order"] == ["tok_rgb", "det"] and summary["random_init"]
  assert summary["settings"]["tok_rgb"]["schedule"] == "roar"
  assert summary["settings"]["tok_rgb"]["steps"] == 3 and summary["settings"]["det"]["top_k"] == 50
  assert summary["settings"]["det"]["schedule"] == "autoregressive"
  out_dir = tmp_path / "generate"
  for i in range(2):
    assert np.asarray(Image.open(out_dir / f"tok_rgb_{i}.png")).shape == (64, 64, 3)
    assert (out_dir / f"det_{i}.txt").read_text().strip() == summary["texts"]["det"][i]
    assert np.asarray(Image.open(out_dir / f"det_{i}.png")).shape == (256, 256, 3)  # 4x, boxes
  assert json.loads((out_dir / "summary.json").read_text())["files"] == summary["files"]


def test_image_file_input_to_caption(config_path, tmp_path, capsys):
  picture = tmp_path / "scene.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(picture)
  code = _generate(config_path, tmp_path, "--input", f"rgb={picture}", "--input",
                   f"tok_rgb={picture}", "--target", "caption", "--out", str(tmp_path / "o"),
                   "--allow-random-init", "--config.generate.cfg_scale=2",
                   "--config.generate.temperature=0")
  err = capsys.readouterr().err
  assert code == 0, err
  assert "resizing" in err  # 32x32 -> 64x64
  caption = (tmp_path / "o" / "caption_0.txt").read_text()
  summary = json.loads((tmp_path / "o" / "summary.json").read_text())
  assert caption.strip() == summary["texts"]["caption"][0]
  assert summary["settings"]["caption"]["cfg_scale"] == 2.0


@pytest.mark.parametrize("args, message", [
    (["--input", "caption=x", "--target", "tok_zz"], "unknown modality 'tok_zz'"),
    (["--input", "caption=x", "--target", "caption"], "both an --input and a --target"),
    (["--input", "rgb=/no/such.png", "--target", "caption"], "no such image file"),
    (["--input", "caption=x", "--target", "det", "--config.generate.order=caption"],
     "generate.order"),
    (["--input", "caption=x", "--target", "det"], "no checkpoint"),
])
def test_user_errors(config_path, tmp_path, capsys, args, message):
  assert _generate(config_path, tmp_path, *args) == cli.EXIT_USER_ERROR
  assert message in capsys.readouterr().err


def test_raw_pixel_target_means_the_token_modality_of_the_image(config_path, tmp_path, capsys):
  """`--target rgb` (the issue's example) generates tok_rgb, the only token modality of the rgb
  image, and says so; with two such modalities it stays an error naming both."""
  # No tokenizers there: the run stops right after the name check, before any model is built.
  nowhere = f"--config.data.tokenizers_dir={tmp_path / 'none'}"
  assert _generate(config_path, tmp_path, "--input", "caption=x", "--target", "rgb",
                   nowhere) == cli.EXIT_USER_ERROR
  err = capsys.readouterr().err
  assert "--target rgb is raw pixels, an input only; generating tok_rgb" in err
  assert "does not exist" in err and "an image-token modality instead" not in err
  assert _generate(config_path + ":two_rgb", tmp_path, "--input", "caption=x", "--target",
                   "rgb") == cli.EXIT_USER_ERROR
  err = capsys.readouterr().err
  assert "2 token modalities share its rgb image (tok_rgb, tok_rgb2)" in err
  assert "generating" not in err


def test_boxes_drawn_where_the_det_text_puts_them(tmp_path):
  """Boxes as text -> boxes on the image, in yellow at 4x; a malformed box is skipped."""
  from types import SimpleNamespace

  from mmjax.tokenizers.modality import DetModalityTokenizer
  from mmjax.generate import fourm_run
  from mmjax.tokenizers import boxes as box_text

  class Text:  # the text side of a det tokenizer: ids are the words of the string
    special = SimpleNamespace(coord_bins=65, class_names=("circle", "square"))
    fingerprint, vocab_size, path = "t", 100, "t"

    def decode_batch(self, ids):
      return [" ".join(self.words[i] for i in row) for row in ids]

  words = ["v0=0", "v1=0", "v2=32", "v3=16", "circle", "v0=5", "square"]
  tok_text = Text()
  tok_text.words = words
  det = DetModalityTokenizer(SimpleNamespace(name="det", source="det"), tok_text)
  assert len(box_text.text_to_boxes(" ".join(words), 65, ("circle", "square")).boxes) == 1
  grey = np.full((64, 64, 3), 100, np.uint8)
  paths = fourm_run._write_boxes(str(tmp_path), "det", det, [list(range(len(words)))], {},
                                 {"rgb": grey}, [], 1)
  drawn = np.asarray(Image.open(paths[0]))
  yellow = (drawn[..., 0] == 255) & (drawn[..., 1] == 255) & (drawn[..., 2] == 0)
  assert drawn.shape == (256, 256, 3)
  assert yellow[0:2, 0:128].all() and yellow[0:64, 0:2].all()  # top and left edges of the box
  assert yellow[200:, :].sum() == 0 and yellow[:, 140:].sum() == 0  # nothing beyond it
