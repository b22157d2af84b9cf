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
from mmjax import modalities as mod
from mmjax.data.shapes import world as shapes
from mmjax.errors import UserError
from mmjax.generate import decoder_run
from mmjax.objectives import text_tokenizer
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
  pairs = text_tokenizer.shapes_sentences(300, split="train", seed=0, image_size=64,
                                          coord_bins=65)
  sentences = [s for pair in pairs for s in pair]
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


def test_bidirectional_image_blocks_refuse_caption_to_image(tmp_path):
  config = make_config(str(tmp_path), "--config.sequences.image_blocks_bidirectional=True")
  with pytest.raises(UserError, match=r"'sequences.image_blocks_bidirectional' is True.*cannot "
                                      r"be sampled autoregressively"):
    decoder_run.generate_decoder(config, str(tmp_path), {"caption": "a red circle"}, ["tok_rgb"],
                                 out_dir=str(tmp_path / "out"), allow_random_init=True)


class FakeTokenizer:
  """Stands in for a modality tokenizer: fixed caption ids, image codes 0..N-1, blank decodes."""
  fingerprint, size = "fake", 64

  def __init__(self, modality):
    self.modality, self.vocab_size = modality, 100

  def encode_values(self, values):
    if self.modality.kind == "sequence":
      return [np.asarray([5, 6, 7])]
    return [np.arange(self.modality.grid[0] * self.modality.grid[1]) % 16]

  def decode_batch(self, rows):
    if self.modality.kind == "sequence":
      return [{self.modality.source: "a caption"} for _ in rows]
    shape = (64, 64, 3) if self.modality.source == "rgb" else (64, 64)  # depth: one channel
    return [{self.modality.source: np.zeros(shape, np.uint8)} for _ in rows]


@pytest.fixture
def fake_sampling(monkeypatch):
  """Tokenizers, model and sampler replaced: records what `generate_decoder` hands the sampler."""
  calls = []

  def fake_generate(model, prompts, layout, *, new_tokens, sample, seed):
    calls.append(dict(prompts=prompts, layout=layout, sample=sample))
    first = layout.image_first if layout.begin_image >= 0 else layout.text_first
    return np.full((len(prompts) // len(sample.guidance), new_tokens), first, np.int32)

  monkeypatch.setattr(decoder_run, "_load_tokenizer", lambda m, root: FakeTokenizer(m))
  monkeypatch.setattr(decoder_run, "load_model", lambda *a, **k: (None, 0))
  monkeypatch.setattr(decoder_run.sampler, "generate", fake_generate)
  return calls


def three_input_config(tmp_path, *overrides):
  """caption + tok_rgb -> tok_depth (a template with a text and an image input)."""
  config = make_config(str(tmp_path), "--config.model.max_length=160", *overrides)
  with config.unlocked():
    config.modalities.tok_depth = dict(kind="image_tokens", source="depth", vocab_size=1024,
                                       grid=(8, 8), tokenizer="configs/tokenizers/shapes_depth.py")
  config.sequences.templates = (("tok_rgb", "caption"), ("caption", "tok_rgb", "tok_depth"))
  return config


def test_caption_and_image_to_image_uses_three_way_guidance(fake_sampling, scene_png, tmp_path):
  from mmjax.data.sequences.documents import SharedVocab
  from mmjax.generate import decoder as sampler
  config = three_input_config(tmp_path)
  inputs = {"tok_rgb": scene_png, "caption": "a red circle"}  # any order: the template's is used
  summary = decoder_run.generate_decoder(config, str(tmp_path), inputs, ["tok_depth"],
                                         out_dir=str(tmp_path / "out"), num_samples=2)
  call = fake_sampling[-1]
  vocab = SharedVocab.from_registry(decoder_run.mm.from_config(config.modalities))
  image = [vocab.begin_image("tok_rgb"), *vocab.to_global("tok_rgb", np.arange(64) % 16),
           vocab.end_image("tok_rgb")]
  start = [vocab.bos], [vocab.begin_image("tok_depth")]
  full = [*start[0], 5, 6, 7, *image, *start[1]]
  image_only = [*start[0], *image, *start[1]]
  uncond = [*start[0], *start[1]]
  assert call["prompts"] == [full] * 2 + [image_only] * 2 + [uncond] * 2  # copy-major
  assert call["sample"].guidance == pytest.approx(sampler.three_way(1.2, 3.0))
  assert call["layout"].begin_image == vocab.begin_image("tok_depth")
  assert summary["guidance"] == "three_way" and summary["cfg_scale"] == [1.2, 3.0]
  assert summary["input"] == "caption+tok_rgb" and len(summary["outputs"]["tok_depth"]) == 2
  # Scales of 1 switch it off: the full prompt alone.
  decoder_run.generate_decoder(
      three_input_config(tmp_path, "--config.generate.three_way_image_scale=1",
                         "--config.generate.three_way_text_scale=1"),
      str(tmp_path), inputs, ["tok_depth"], out_dir=str(tmp_path / "off"))
  assert fake_sampling[-1]["prompts"] == [full] and fake_sampling[-1]["sample"].guidance == (1.0,)
  config.sequences.templates = (("tok_rgb", "caption"), ("caption", "tok_depth"))
  with pytest.raises(UserError, match=r"none starts with tok_rgb and caption \(in either order\) "
                                      r"-> tok_depth"):
    decoder_run.generate_decoder(config, str(tmp_path), inputs, ["tok_depth"],
                                 out_dir=str(tmp_path / "out"))


def test_image_to_caption_with_bidirectional_image_blocks(fake_sampling, scene_png, tmp_path):
  config = make_config(str(tmp_path), "--config.sequences.image_blocks_bidirectional=True",
                       "--config.generate.text_cfg_scale=2")
  summary = decoder_run.generate_decoder(config, str(tmp_path), {"tok_rgb": scene_png},
                                         ["caption"], out_dir=str(tmp_path / "out"))
  call = fake_sampling[-1]
  assert call["layout"].image_blocks and call["layout"].begin_image == -1
  assert len(call["prompts"]) == 2 and call["prompts"][1] == call["prompts"][0][:1]  # BOS only
  assert summary["guidance"] == "two_way" and summary["image_blocks_bidirectional"]
  assert summary["outputs"]["captions"] == ["a caption"]


def test_text_targets_have_their_own_temperature():
  config = mmconfig.load(os.path.join(ROOT, "configs/decoder/shapes.py:tiny"),
                         ["--config.generate.temperature=0.8"])
  settings = decoder_run.generate_config(config)
  registry = mod.from_config(config.modalities)
  assert decoder_run.sample_config(settings, registry["caption"], (1.0,)).temperature == 0.0
  image = decoder_run.sample_config(settings, registry["tok_rgb"], (3.0, -2.0))
  assert image.temperature == 0.8 and image.guidance == (3.0, -2.0)
  with pytest.raises(UserError, match="text_temperature"):
    decoder_run.generate_config(mmconfig.load(os.path.join(ROOT, "configs/decoder/shapes.py:tiny"),
                                              ["--config.generate.text_temperature=-1"]))
