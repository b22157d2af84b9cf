"""The local-folder recipe: images + caption files -> the raw schema -> pre-tokenized shards,
offline, on a small folder made here with PIL."""

import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from mmjax import config as mmconfig
from mmjax import pretokenize
from mmjax.data import folder
from mmjax.data.tokens import records as tokens_tfds
from mmjax.errors import UserError
from mmjax.objectives import text_tokenizer
from mmjax.tokenizers import text

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
S = 32


def save(path, image, caption=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path)
  if caption is not None:
    with open(os.path.splitext(path)[0] + ".txt", "wb") as f:
      f.write(caption if isinstance(caption, bytes) else caption.encode())


def halves(width, height):
  """Left half red, right half blue."""
  a = np.zeros((height, width, 3), np.uint8)
  a[:, : width // 2] = (255, 0, 0)
  a[:, width // 2:] = (0, 0, 255)
  return Image.fromarray(a)


@pytest.fixture
def photos(tmp_path):
  root = str(tmp_path / "photos")
  # 4S x 2S: resized to 2S x S, the central S x S keeps the red | blue edge in the middle.
  save(os.path.join(root, "a_wide.png"), halves(4 * S, 2 * S), "a red and blue flag\n")
  save(os.path.join(root, "b_grey.jpg"), Image.new("L", (S, 3 * S), 77), "a grey card")
  rgba = Image.new("RGBA", (S, S), (0, 200, 0, 255))
  rgba.putpixel((0, 0), (0, 200, 0, 0))  # transparent corner -> white
  save(os.path.join(root, "sub", "c_alpha.PNG"), rgba, "a green square, naïve café")
  save(os.path.join(root, "d_palette.png"), Image.new("P", (S, S), 3), "a palette image")
  return root


def test_folder_source_converts_every_image_to_the_raw_schema(photos):
  source = folder.FolderSource(photos, S)
  assert source.paths == ["a_wide.png", "b_grey.jpg", "d_palette.png", "sub/c_alpha.PNG"]
  samples = [source[i] for i in range(len(source))]
  for s in samples:
    assert s["rgb"].shape == (S, S, 3) and s["rgb"].dtype == np.uint8
  wide = samples[0]["rgb"]
  assert (wide[:, : S // 2 - 2] == (255, 0, 0)).all() and (wide[:, S // 2 + 2:] == (0, 0, 255)).all()
  assert samples[0]["caption"] == b"a red and blue flag"
  grey = samples[1]["rgb"].astype(int)
  assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
  assert abs(grey.mean() - 77) < 2  # jpeg
  alpha = samples[3]["rgb"]
  assert tuple(alpha[0, 0]) == (255, 255, 255) and tuple(alpha[5, 5]) == (0, 200, 0)
  assert samples[3]["id"] == "sub/c_alpha.PNG"
  assert samples[3]["caption"].decode("utf-8") == "a green square, naïve café"


def test_splits_missing_captions_and_unreadable_files(tmp_path):
  root = str(tmp_path / "photos")
  save(os.path.join(root, "train", "x.png"), halves(S, S), "x")
  save(os.path.join(root, "validation", "y.png"), halves(S, S))  # no caption file
  with open(os.path.join(root, "validation", "z.jpg"), "wb") as f:
    f.write(b"not an image")
  sources = folder.folder_sources(root, S)
  assert sorted(sources) == ["train", "validation"] and len(sources["train"]) == 1
  assert "caption" not in sources["validation"][0]
  with pytest.raises(UserError, match="z.jpg: cannot be read as an image"):
    sources["validation"][1]
  with pytest.raises(UserError, match="does not exist"):
    folder.FolderSource(str(tmp_path / "nope"), S)


@pytest.fixture(scope="module")
def tokenizers_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("tokenizers"))
  cfg = mmconfig.load(os.path.join(ROOT, "configs/tokenizers/shapes_text.py"))
  pairs = text_tokenizer.shapes_sentences(200, split="train", seed=0, image_size=64,
                                          coord_bins=65)
  sentences = [s for pair in pairs for s in pair]
  text.train_text_tokenizer(sentences, os.path.join(root, "shapes_text", "text"), cfg.tokenizer)
  return root


def folder_config(photos, tokenizers_dir, **tokens):
  config = mmconfig.load(os.path.join(ROOT, "configs/fourm/shapes.py:tiny"))
  config.unlock()
  config.data.name = "folder"
  config.data.folder = photos
  config.data.image_size = S
  config.modalities = ml_collections.ConfigDict(sort_keys=False, initial_dictionary=dict(
      rgb=dict(kind="image_pixels", source="rgb", image_size=S, patch_size=8),
      # The folder has no semseg or boxes: these modalities are absent (no tokenizer needed).
      tok_semseg=dict(kind="image_tokens", source="semseg", vocab_size=256, grid=(4, 4),
                      tokenizer="configs/tokenizers/shapes_semseg.py"),
      caption=dict(kind="sequence", source="caption", vocab_size=1024, max_length=48,
                   tokenizer="configs/tokenizers/shapes_text.py"),
      det=dict(kind="sequence", source="det", vocab_size=1024, max_length=64,
               tokenizer="configs/tokenizers/shapes_text.py"),
  ))
  config.tokens = ml_collections.ConfigDict(dict(tokenizers_dir=tokenizers_dir, shard_size=3,
                                                 **tokens))
  return config


def test_folder_to_token_shards_offline(photos, tmp_path, tokenizers_dir):
  summary = pretokenize.run_prepare_tokens(folder_config(photos, tokenizers_dir),
                                           str(tmp_path / "out"), progress=False)
  assert summary["name"] == "folder" and summary["splits"]["train"]["records"] == 4
  assert summary["absent_modalities"] == ["tok_semseg", "det"]
  assert summary["gt_fields"] == ["caption"] and set(summary["fingerprints"]) == {"caption"}
  source = tokens_tfds.load_tokens(str(tmp_path / "out"), "folder", "train")
  raw = folder.FolderSource(photos, S)
  caption = pretokenize.load_modality_tokenizer(
      pretokenize.mod.from_config(folder_config(photos, "").modalities)["caption"],
      os.path.join(tokenizers_dir, "shapes_text"))
  for i in range(4):
    r = source[i]
    assert r["id"].decode() == raw.paths[i]
    assert r["present"].tolist() == [1, 0, 1, 0]
    assert r["tok_semseg"].size == 0 and r["det"].size == 0
    np.testing.assert_array_equal(r["rgb"], raw[i]["rgb"])
    assert caption.decode_batch([r["caption"]])[0]["caption"] == raw[i]["caption"].decode()
    assert r["gt_caption"] == raw[i]["caption"]


@pytest.mark.parametrize("caption, what", [(b"", "empty text"), (b"  \n", "empty text"),
                                           (b"caf\xe9 au lait", "not valid UTF-8")])
def test_bad_caption_files_error_or_skip(photos, tmp_path, tokenizers_dir, caption, what):
  with open(os.path.join(photos, "b_grey.txt"), "wb") as f:
    f.write(caption)
  with pytest.raises(pretokenize.BadSample,
                     match=f"folder train sample 1 \\(b_grey.jpg\\): field 'caption': {what}"):
    pretokenize.run_prepare_tokens(folder_config(photos, tokenizers_dir), str(tmp_path / "a"),
                                   progress=False)
  summary = pretokenize.run_prepare_tokens(folder_config(photos, tokenizers_dir,
                                                         bad_samples="skip"),
                                           str(tmp_path / "b"), progress=False)
  assert summary["bad_samples"]["by_field"] == {"caption": 1}
  assert summary["splits"]["train"]["records"] == 3


def test_missing_caption_file_and_corrupt_image(photos, tmp_path, tokenizers_dir):
  os.remove(os.path.join(photos, "d_palette.txt"))
  with open(os.path.join(photos, "e_broken.png"), "wb") as f:
    f.write(b"\x89PNG garbage")
  with pytest.raises(pretokenize.BadSample, match="d_palette.png\\): field 'caption': missing"):
    pretokenize.run_prepare_tokens(folder_config(photos, tokenizers_dir), str(tmp_path / "a"),
                                   progress=False)
  summary = pretokenize.run_prepare_tokens(folder_config(photos, tokenizers_dir,
                                                         bad_samples="skip"),
                                           str(tmp_path / "b"), progress=False)
  assert summary["bad_samples"]["by_field"] == {"caption": 1, "<read>": 1}
  assert any("e_broken.png: cannot be read" in m for m in summary["bad_samples"]["messages"])
  assert summary["splits"]["train"]["records"] == 3


# ---------------------------------------------------------------------------------------------
# The recipe script data/coco_captions.py (its tfds download needs the network; the mapping from
# coco records, the export to a folder and the offline folder mode are tested here).

_RECIPE_CONFIG = '''
import ml_collections

def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict(dict(name="folder", folder="", image_size=32, missing=""))
  c.modalities = ml_collections.ConfigDict(sort_keys=False, initial_dictionary=dict(
      rgb=dict(kind="image_pixels", source="rgb", image_size=32, patch_size=8),
      caption=dict(kind="sequence", source="caption", vocab_size=1024, max_length=48,
                   tokenizer="configs/tokenizers/shapes_text.py")))
  c.tokens = ml_collections.ConfigDict(dict(tokenizers_dir="", shard_size=2, bad_samples="error"))
  return c
'''


def load_recipe():
  import importlib.util
  spec = importlib.util.spec_from_file_location("coco_recipe",
                                                os.path.join(ROOT, "data", "coco_captions.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_recipe_maps_coco_records_exports_and_runs_offline(tmp_path, tokenizers_dir):
  recipe = load_recipe()
  rng = np.random.default_rng(0)
  records = [{"image": rng.integers(0, 256, (48, 80, 3), dtype=np.uint8), "image/id": 139 + i,
              "captions": {"text": [f"photo number {i}", "another caption"]}} for i in range(3)]
  source = recipe.CocoSource(records, S)
  sample = source[1]
  assert sample["id"] == "140" and sample["caption"] == "photo number 1"
  assert sample["rgb"].shape == (S, S, 3)
  out = str(tmp_path / "photos" / "train")
  assert recipe.export_folder(source, out) == 3
  exported = folder.FolderSource(out, S)
  assert exported.paths == ["139.png", "140.png", "141.png"]
  np.testing.assert_array_equal(exported[1]["rgb"], sample["rgb"])  # png: lossless, same size
  assert exported[1]["caption"] == b"photo number 1"

  config_path = tmp_path / "recipe_config.py"
  config_path.write_text(_RECIPE_CONFIG)
  summary = recipe.main(["folder", "--folder", str(tmp_path / "photos"), "--workdir",
                         str(tmp_path / "tokens"), "--config", str(config_path),
                         "--tokenizers-dir", tokenizers_dir])
  assert summary["splits"]["train"]["records"] == 3 and summary["shards_written"] == 2
  records = tokens_tfds.load_tokens(str(tmp_path / "tokens"), "folder", "train")
  assert records[2]["gt_caption"] == b"photo number 2"
  with pytest.raises(SystemExit):
    recipe.main(["folder", "--workdir", str(tmp_path / "x")])  # no --folder: a one-line error
