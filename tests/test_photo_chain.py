"""The real-data recipe end to end, through the command line: tokenizers trained on a folder of
rendered photos with captions -> a token set (verified) -> a few steps of 4M and of the decoder;
and the same tokenizers and token set from a tfds image-caption dataset (coco_captions, mocked)."""

import json
import os
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mmjax import cli
from mmjax.data.tokens import records as tokens_tfds
from tests.data.photo_folder import write_folder

TOKENIZERS = "tokenizers=runlocal"
# Small widths: the chain is what is tested, not the models.
FOURM_SMALL = ["--config.model.d_model=32", "--config.model.num_heads=2",
               "--config.model.encoder_layers=1", "--config.model.decoder_layers=1",
               "--config.train.steps=2", "--config.train.eval_every=0",
               "--config.train.eval_batches=1", "--config.train.batch_size=8"]
DECODER_SMALL = ["--config.model.d_model=32", "--config.model.num_heads=2",
                 "--config.model.num_layers=1", "--config.train.steps=2",
                 "--config.train.eval_every=0", "--config.train.eval_batches=1",
                 "--config.train.batch_size=8", "--config.sequences.pack_window=8"]


def _run(capsys, *argv):
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  assert code == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1]), err


def _tokenizers_and_tokens(capsys, work, *source):
  """Trains both runlocal photo tokenizers on `source` and pre-tokenizes it into `work`."""
  k = os.path.join(work, "tokenizers")
  text, _ = _run(capsys, "tokenizer", "train", "--config",
                 "configs/tokenizers/photo_text.py:runlocal", "--workdir",
                 os.path.join(k, "photo_text"), *source)
  rgb, _ = _run(capsys, "tokenizer", "train", "--config", "configs/tokenizers/photo_rgb.py:runlocal",
                "--workdir", os.path.join(k, "photo_rgb"), "--config.train.steps=6",
                "--config.train.log_every=3", *source)
  tokens, _ = _run(capsys, "prepare", "tokens", "--config",
                   f"configs/tokens/photo.py:runlocal,{TOKENIZERS}", "--workdir", work, *source)
  return text, rgb, tokens


@pytest.mark.slow
def test_folder_chain_tokenizers_tokens_fourm_decoder(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  photos = write_folder(str(tmp_path / "photos"), num_train=12, num_val=4)
  work = str(tmp_path / "run")
  start = time.perf_counter()
  text, rgb, tokens = _tokenizers_and_tokens(capsys, work, f"--config.data.folder={photos}")
  assert text["caption_round_trip"] == 1.0 and text["val_captions"] == 4
  quality = rgb["tokenizer_eval"]
  assert quality["steps"] == 6 and quality["psnr"] > 5.0  # measured on the 4 held-out images
  assert tokens["splits"]["train"]["records"] == 12 and tokens["splits"]["validation"]["records"] == 4
  assert tokens["absent_modalities"] == []
  verified, err = _run(capsys, "verify", work)
  assert list(verified["verified"].values()) == [3]  # train: 8 + 4 records, validation: 4
  assert "sizes and sha256 as recorded" in err
  fourm, _ = _run(capsys, "train", "--config", f"configs/fourm/photo.py:tiny,runlocal,{TOKENIZERS}",
                  "--workdir", os.path.join(work, "fourm"), f"--config.data.data_dir={work}",
                  *FOURM_SMALL)
  decoder, _ = _run(capsys, "train", "--config",
                    f"configs/decoder/photo.py:tiny,runlocal,{TOKENIZERS}", "--workdir",
                    os.path.join(work, "decoder"), f"--config.data.data_dir={work}", *DECODER_SMALL)
  seconds = time.perf_counter() - start
  assert fourm["step"] == 2 and decoder["step"] == 2
  assert fourm["bad_records"] == {"total": 0, "by_dataset": {"photo": 0}}
  print(f"folder chain: {seconds:.1f} s; rgb tokenizer on held-out images: PSNR "
        f"{quality['psnr']:.2f} dB, {quality['codes_used']:.0%} of the codes used; text round "
        f"trip {text['caption_round_trip']}")


class MockImageCaptions(tfds.core.GeneratorBasedBuilder):
  """An image-caption dataset shaped like coco_captions (image, image/id, captions.text), whose
  records `tfds.testing.mock_data` makes up (coco_captions' own builder needs TensorFlow)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "image/id": tfds.features.Scalar(np.int64),
        "captions": tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text()})}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(), "validation": self._generate_examples()}

  def _generate_examples(self):
    yield from ()


@pytest.mark.slow
def test_tfds_chain_with_mock_data(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  work = str(tmp_path / "run")
  source = ["--config.data.name=mock_image_captions", f"--config.data.data_dir={tmp_path / 'tfds'}"]
  with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
    text, rgb, tokens = _tokenizers_and_tokens(capsys, work, *source)
  assert text["val_captions"] == 4 and text["caption_round_trip"] == 1.0
  assert text["source"]["name"] == "mock_image_captions"
  assert rgb["tokenizer_eval"]["num_images"] == 4.0 and rgb["tokenizer_eval"]["psnr"] > 0
  assert tokens["splits"]["train"]["records"] == 10 and tokens["absent_modalities"] == []
  meta = tokens_tfds.read_metadata(tokens["path"])
  assert meta["source"]["name"] == "mock_image_captions"
  assert [m["name"] for m in meta["modalities"]] == ["rgb", "tok_rgb", "caption"]
  # Training reads the token set outside the mock (which would make up its records too).
  fourm, _ = _run(capsys, "train", "--config", f"configs/fourm/photo.py:tiny,runlocal,{TOKENIZERS}",
                  "--workdir", os.path.join(work, "fourm"), f"--config.data.data_dir={work}",
                  *FOURM_SMALL)
  assert fourm["step"] == 2
