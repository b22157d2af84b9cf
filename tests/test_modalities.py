"""The modality registry."""

import pytest

from mmjax import config as mmconfig
from mmjax import modalities


def _registry():
  return modalities.from_config({
      "rgb": dict(kind="image_pixels", image_size=64, patch_size=8),
      "tok_rgb": dict(kind="image_tokens", source="rgb", vocab_size=1024, grid=(8, 8)),
      "caption": dict(kind="sequence", vocab_size=500, max_length=48),
  })


def test_order_is_the_id_and_facts_derive():
  registry = _registry()
  assert registry.names == ("rgb", "tok_rgb", "caption")
  assert registry.index("caption") == 2
  assert registry["rgb"].grid == (8, 8) and registry["rgb"].num_tokens == 64
  assert registry["rgb"].patch_dim == 8 * 8 * 3 and not registry["rgb"].can_be_target
  assert registry["tok_rgb"].num_tokens == 64 and registry["tok_rgb"].source == "rgb"
  assert registry["caption"].source == "caption" and registry["caption"].num_tokens == 48
  assert [m.name for m in registry.targets()] == ["tok_rgb", "caption"]


def test_config_order_survives_loading():
  config = mmconfig.load("configs/fourm/shapes.py")
  assert modalities.from_config(config.modalities).names[:3] == ("rgb", "tok_rgb", "tok_depth")


@pytest.mark.parametrize("spec, message", [
    (dict(kind="pixels"), "kind"),
    (dict(kind="sequence", vocab_size=10), "max_length"),
    (dict(kind="image_tokens", vocab_size=0, grid=(2, 2)), "vocab_size"),
    (dict(kind="image_pixels", image_size=60, patch_size=8), "multiple"),
    (dict(kind="image_tokens", vocab_size=8, grid=(0, 4)), "grid"),
    (dict(kind="sequence", vocab_size=8, max_length=4, colour=1), "colour"),
])
def test_bad_declarations_name_the_modality(spec, message):
  with pytest.raises(mmconfig.ConfigError, match=f"modalities\\.bad.*{message}|{message}.*bad"):
    modalities.from_config({"bad": spec})


def test_unknown_name_lists_known():
  with pytest.raises(mmconfig.ConfigError, match="known: rgb, tok_rgb, caption"):
    _registry()["depth"]
