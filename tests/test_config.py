"""Config loading, variant arguments, overrides, validation and the dataclass boundary."""

import dataclasses
import glob
import os

import pytest

from mmjax import config as mmconfig
from mmjax import modalities
from mmjax.models import configs as model_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = os.path.join(ROOT, "configs/fourm/shapes.py")


def test_variant_argument_selects_sizes():
  tiny = mmconfig.load(f"{SHAPES}:tiny")
  small = mmconfig.load(f"{SHAPES}:small")
  assert (tiny.model.d_model, small.model.d_model) == (192, 384)


def test_runlocal_flag_shrinks_the_run():
  config = mmconfig.load(f"{SHAPES}:tiny,runlocal")
  assert config.train.steps == 20 and config.data.num_train == 256


def test_overrides_are_typed():
  config = mmconfig.load(SHAPES, ["--config.train.steps=300", "--config.train.lr", "0.01",
                                  "--config.masking.mixture=rgb->tok_semseg",
                                  "--config.modalities.caption.max_length=32"])
  assert config.train.steps == 300 and isinstance(config.train.steps, int)
  assert config.train.lr == 0.01
  assert config.masking.mixture == "rgb->tok_semseg"
  assert config.modalities.caption.max_length == 32


def test_unknown_key_names_closest_valid_keys():
  with pytest.raises(mmconfig.ConfigError, match=r"'train\.stepz'.*train\.steps"):
    mmconfig.load(SHAPES, ["--config.train.stepz=3"])
  with pytest.raises(mmconfig.ConfigError, match=r"unknown config key 'lr'.*train\.lr"):
    mmconfig.load(SHAPES, ["--config.lr=3"])


def test_wrong_type_is_an_error_naming_the_key():
  with pytest.raises(mmconfig.ConfigError, match=r"train\.steps"):
    mmconfig.load(SHAPES, ["--config.train.steps=many"])


@pytest.mark.parametrize("override, key", [
    ("--config.train.steps=-5", "train.steps"),
    ("--config.train.warmup_steps=-1", "train.warmup_steps"),
    ("--config.model.d_model=100", "model.num_heads"),
    ("--config.mesh.shape.fsdp=0", "mesh.shape.fsdp"),
])
def test_inconsistent_values_are_errors(override, key):
  with pytest.raises(mmconfig.ConfigError, match=key.replace(".", r"\.")):
    mmconfig.load(SHAPES, [override])


def test_a_short_run_clamps_its_warm_up_with_a_note(capsys):
  config = mmconfig.load(SHAPES, ["--config.train.steps=7"])
  assert config.train.warmup_steps == 7
  err = capsys.readouterr().err
  assert err == ("mmjax: train.warmup_steps=200 is longer than the run; warming up over all "
                 "train.steps=7 steps\n")
  mmconfig.validate(config)  # clamped once: no second note
  assert capsys.readouterr().err == ""


def test_mesh_and_batch_checked_against_devices():
  config = mmconfig.load(SHAPES, ["--config.mesh.shape.fsdp=2"])  # data=-1, fsdp=2
  mmconfig.validate(config, num_devices=8)  # data=4 x fsdp=2, batch 32 divides 8 ways
  with pytest.raises(mmconfig.ConfigError, match="divisible"):
    mmconfig.validate(config, num_devices=7)
  config.train.batch_size = 12
  with pytest.raises(mmconfig.ConfigError, match=r"train\.batch_size"):
    mmconfig.validate(config, num_devices=16)  # 16 ways
  config.mesh.shape.data = 3
  with pytest.raises(mmconfig.ConfigError, match="needs 6 devices but 8"):
    mmconfig.validate(config, num_devices=8)


def test_resolve_mesh_shape_fills_one_axis():
  assert mmconfig.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == {
      "data": 2, "fsdp": 2, "tensor": 2}


def test_bad_variant_argument_and_missing_file():
  with pytest.raises(mmconfig.ConfigError, match="huge"):
    mmconfig.load(f"{SHAPES}:huge")
  with pytest.raises(mmconfig.ConfigError, match="'runlocl' is unknown.*runlocal"):
    mmconfig.load(f"{SHAPES}:runlocl=1")
  with pytest.raises(mmconfig.ConfigError, match="does not exist"):
    mmconfig.load("configs/nope.py")


def test_parse_arg_types():
  arg = mmconfig.parse_arg("B,runlocal,steps=7", variant="tiny", runlocal=False, steps=1)
  assert (arg.variant, arg.runlocal, arg.steps) == ("B", True, 7)
  with pytest.raises(mmconfig.ConfigError, match="steps"):
    mmconfig.parse_arg("steps=x", variant="tiny", steps=1)


@dataclasses.dataclass(frozen=True)
class _Inner:
  a: int = 1


@dataclasses.dataclass(frozen=True)
class _Outer:
  width: int
  sizes: tuple = ()
  inner: _Inner = _Inner()


def test_to_dataclass_is_frozen_hashable_and_strict():
  result = mmconfig.to_dataclass(_Outer, {"width": 3, "sizes": [1, 2], "inner": {"a": 5}})
  assert result == _Outer(width=3, sizes=(1, 2), inner=_Inner(a=5))
  hash(result)  # usable as a jit static argument
  with pytest.raises(dataclasses.FrozenInstanceError):
    result.width = 4
  with pytest.raises(mmconfig.ConfigError, match="'widht'.*width"):
    mmconfig.to_dataclass(_Outer, {"widht": 3})
  with pytest.raises(mmconfig.ConfigError, match="lacks required keys: width"):
    mmconfig.to_dataclass(_Outer, {})


# Sweep files define get_sweep, not get_config; tests/train/test_sweep.py resolves their points.
SHIPPED = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*", "*.py"))
                 if os.path.basename(os.path.dirname(p)) != "sweeps")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_shipped_config_resolves(path):
  """Configs cannot rot: each loads, validates, and its model section crosses the boundary."""
  config = mmconfig.load(path)
  with open(path) as f:
    assert "mmjax " in f.read().split('"""')[1], "the docstring holds the command that runs it"
  if config.get("objective") in model_configs.MODEL_CONFIGS:
    model_configs.model_config(config)
  if "modalities" in config:
    modalities.from_config(config.modalities)
