"""tokenizer.json beside an image tokenizer's checkpoints: written from the restored weights, read by
the data checks instead of the weights, refused when absent or older than the newest checkpoint."""

import json
import os

import jax
import pytest

from mmjax import cli
from mmjax import config as mmconfig
from mmjax import modalities as mod
from mmjax.data.tokens import records
from mmjax.errors import UserError
from mmjax.objectives import tokenizer as tokenizer_objective
from mmjax.tokenizers import modality as mt
from mmjax.tokenizers.image import image_fingerprint
from mmjax.train.checkpoint import Checkpointer
from mmjax.train.loop import build
from mmjax.train.state import init_state

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RGB_TOKENIZER = "configs/tokenizers/shapes_rgb.py:runlocal"


def _save(directory: str, step: int, seed: int) -> None:
  """A checkpoint of the runlocal rgb tokenizer at `step`, initialised from `seed`."""
  config = mmconfig.load(os.path.join(ROOT, RGB_TOKENIZER), [f"--config.seed={seed}"])
  objective, setup = build(config)
  checkpointer = Checkpointer(os.path.join(directory, "checkpoints"), keep=2)
  checkpointer.save(step, jax.device_get(init_state(config, setup)),
                    objective.make_iterator("train", 0, 1))
  checkpointer.close()


@pytest.mark.slow
def test_fingerprint_is_recorded_and_checked(tmp_path):
  directory = str(tmp_path / "tokenizers" / "shapes_rgb")
  config = mmconfig.load(os.path.join(ROOT, RGB_TOKENIZER))
  _save(directory, step=0, seed=0)
  modality = mod.from_config({"tok_rgb": dict(kind="image_tokens", source="rgb", vocab_size=1024,
                                              grid=(8, 8), tokenizer=RGB_TOKENIZER)})["tok_rgb"]
  tokenizers_dir = str(tmp_path / "tokenizers")

  with pytest.raises(UserError) as missing:  # a tokenizer trained before the file existed
    records.find_tokenizer(modality, tokenizers_dir)
  assert "has no tokenizer.json" in str(missing.value)
  assert "mmjax tokenizer fingerprint" in str(missing.value)
  assert "\n" not in str(missing.value)

  assert cli.main(["tokenizer", "fingerprint", "--config", os.path.join(ROOT, RGB_TOKENIZER),
                   "--workdir", directory]) == 0
  with open(os.path.join(directory, mt.TRAINED_INFO)) as f:
    info = json.load(f)
  assert info["step"] == 0 and info["modality"] == "rgb"
  assert info["model"]["width"] == config.model.width
  # The same hash the tokenizing side takes of the restored weights.
  model = tokenizer_objective.load_trained(config, directory)
  assert info["fingerprint"] == image_fingerprint(model)
  loaded = tokenizer_objective.load_modality_tokenizer(modality, directory, batch_size=2)
  assert loaded.fingerprint == info["fingerprint"]
  assert records.find_tokenizer(modality, tokenizers_dir) == (directory, info["fingerprint"], None)

  _save(directory, step=5, seed=1)  # retrained, but tokenizer.json not rewritten
  with pytest.raises(UserError, match="describes checkpoint step 0, but the newest checkpoint"):
    records.find_tokenizer(modality, tokenizers_dir)
  tokenizer_objective.run_write_info(config, directory)
  _, fingerprint, _ = records.find_tokenizer(modality, tokenizers_dir)
  assert fingerprint != info["fingerprint"]  # other weights, another fingerprint
