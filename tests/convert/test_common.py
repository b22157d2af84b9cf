"""Reading checkpoints: bfloat16 tensors (the dtype of most released checkpoints), shards, and the
errors of an unreadable file or a tensor in two shards."""

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.flax import save_file

from mmjax.convert.common import ConvertError, read_safetensors


def test_reads_bfloat16_shards_as_float32(tmp_path):
  w = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)
  save_file({"a": jnp.asarray(w, jnp.bfloat16)}, str(tmp_path / "model-1.safetensors"))
  save_file({"b": jnp.arange(5, dtype=jnp.int32)}, str(tmp_path / "model-2.safetensors"))
  tensors = read_safetensors(str(tmp_path))
  assert tensors["a"].dtype == np.float32 and tensors["b"].dtype == np.int32
  np.testing.assert_array_equal(tensors["a"], np.asarray(jnp.asarray(w, jnp.bfloat16), np.float32))


def test_unreadable_and_duplicated(tmp_path):
  (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
  with pytest.raises(ConvertError, match="not a readable safetensors file"):
    read_safetensors(str(tmp_path / "bad.safetensors"))
  good = tmp_path / "two"
  good.mkdir()
  for i in range(2):
    save_file({"a": jnp.zeros(2)}, str(good / f"m{i}.safetensors"))
  with pytest.raises(ConvertError, match="'a' is also in another shard"):
    read_safetensors(str(good))
  with pytest.raises(ConvertError, match="no such file or directory"):
    read_safetensors(str(tmp_path / "absent"))
