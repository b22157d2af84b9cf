"""What the converters share: reading safetensors checkpoints, accounting for every tensor, writing
an mmjax workdir (Orbax checkpoint + config.json + a config file that loads it).

A converter takes tensors out of a `Tensors` by name with the shape it expects; what is left at the
end is an error naming the keys, as is a missing key or a wrong shape. The mmjax side is filled
leaf by leaf (`fill_params`): a leaf the converter did not produce, or one of another shape, is an
error naming the leaf, so every mmjax parameter comes from the checkpoint.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from safetensors import safe_open

from mmjax.errors import UserError
from mmjax.tokenizers.hf_text import HFTextTokenizer
from mmjax.train import checkpoint
from mmjax.train import state as trainstate
from mmjax.train.loop import CONFIG_FILE, build, load_model

# The config file written beside config.json, so that `mmjax train/eval/generate --config
# <workdir>/config.py --workdir <workdir>` run the imported model with the imported config.
CONFIG_LOADER = "config.py"
_LOADER_TEXT = '''"""The config of the model imported into this workdir (from {source}).

Written by `mmjax import`; it reads config.json beside it. Run for example
  mmjax eval --config {workdir}/config.py --workdir {workdir}
"""

import os

from mmjax.convert.common import config_from_json


def get_config(arg=None):
  del arg
  return config_from_json(os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.json"))
'''


def _tuples(value):
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def config_from_json(path: str):
  """The ConfigDict of a run's config.json (lists back to tuples; modalities in the file's order,
  which is modality id order)."""
  raw = read_json(path)
  modalities = raw.pop("modalities", None)
  config = ml_collections.ConfigDict(_tuples(raw))
  if modalities is not None:
    config.modalities = ml_collections.ConfigDict(_tuples(modalities), sort_keys=False)
  return config


class ConvertError(UserError):
  """A checkpoint that does not convert: the message names the key (or leaf) and the reason."""


def read_safetensors(source: str) -> dict[str, np.ndarray]:
  """All tensors of a .safetensors file, or of every *.safetensors file in a directory (shards)."""
  if os.path.isdir(source):
    files = sorted(glob.glob(os.path.join(source, "*.safetensors")))
    if not files:
      raise ConvertError(f"{source}: no *.safetensors file in this directory")
  elif os.path.isfile(source):
    files = [source]
  else:
    raise ConvertError(f"{source}: no such file or directory")
  tensors: dict[str, np.ndarray] = {}
  for path in files:
    try:  # the flax reader: numpy has no bfloat16, the dtype of most released checkpoints
      with safe_open(path, framework="flax") as f:
        part = {name: np.asarray(f.get_tensor(name)) for name in f.keys()}  # noqa: SIM118
    except Exception as e:  # noqa: BLE001 -- a garbled file is the user's input, not our bug
      raise ConvertError(f"{path}: not a readable safetensors file ({e})") from None
    for name, value in part.items():
      if name in tensors:
        raise ConvertError(f"{path}: tensor {name!r} is also in another shard")
      tensors[name] = value.astype(np.float32) if jnp.issubdtype(value.dtype, jnp.floating) \
          else value
  return tensors


def read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise ConvertError(f"{path}: no such file (the checkpoint's JSON config)")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ConvertError(f"{path}: not valid JSON ({e})") from None


class Tensors:
  """Named reference tensors, each to be taken exactly once (or explicitly skipped)."""

  def __init__(self, tensors: Mapping[str, np.ndarray], where: str):
    self._tensors = dict(tensors)
    self._left = set(self._tensors)
    self.where = where

  def __contains__(self, name: str) -> bool:
    return name in self._tensors

  def names(self) -> list[str]:
    return sorted(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._get(name).shape)

  def _get(self, name: str) -> np.ndarray:
    if name not in self._tensors:
      raise ConvertError(f"{self.where}: missing key {name!r}")
    return self._tensors[name]

  def take(self, name: str, shape: Iterable[int] | None = None) -> np.ndarray:
    """The tensor `name`, checked against `shape`, marked as consumed."""
    value = self._get(name)
    if shape is not None and tuple(value.shape) != tuple(shape):
      raise ConvertError(f"{self.where}: key {name!r} has shape {tuple(value.shape)}, expected "
                         f"{tuple(shape)}")
    self._left.discard(name)
    return value

  def take_zero(self, name: str, shape: Iterable[int], why: str) -> None:
    """Consumes an optional tensor mmjax has no place for: it must be absent or all zeros."""
    if name in self._tensors:
      value = self.take(name, shape)
      if np.any(value != 0):
        raise ConvertError(f"{self.where}: key {name!r} is not zero, but {why}")

  def skip(self, prefix: str) -> list[str]:
    """Marks every tensor under `prefix` as deliberately not converted; returns their names."""
    names = sorted(n for n in self._left if n.startswith(prefix))
    self._left.difference_update(names)
    return names

  def check_consumed(self) -> None:
    if self._left:
      left = sorted(self._left)
      shown = ", ".join(repr(n) for n in left[:5])
      more = f" and {len(left) - 5} more" if len(left) > 5 else ""
      raise ConvertError(f"{self.where}: extra key{'s' if len(left) > 1 else ''} {shown}{more} "
                         "not used by the conversion (a different architecture?)")


def fill_params(abstract: Mapping[str, tuple[tuple[int, ...], str]],
                values: Mapping[str, np.ndarray], where: str) -> None:
  """Checks that `values` has exactly the leaves of `abstract` ({name: (shape, dtype)}), with their
  shapes."""
  for name, (shape, _) in abstract.items():
    if name not in values:
      raise ConvertError(f"{where}: mmjax parameter {name!r} {shape} was not filled by the "
                         "conversion")
    if tuple(values[name].shape) != tuple(shape):
      raise ConvertError(f"{where}: mmjax parameter {name!r} is {tuple(shape)} in the model but "
                         f"{tuple(values[name].shape)} from the checkpoint")
  extra = sorted(set(values) - set(abstract))
  if extra:
    raise ConvertError(f"{where}: the conversion produced {extra[0]!r}, which the mmjax model "
                       "does not have")


def require_fresh_workdir(workdir: str) -> None:
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise ConvertError(f"{workdir}: already holds checkpoints; import into an empty --workdir")


def copy_tokenizer(path: str, workdir: str) -> str:
  """Copies a tokenizer.json into the workdir; returns its absolute path (for the config)."""
  if not os.path.isfile(path):
    raise ConvertError(f"{path}: no such tokenizer file")
  HFTextTokenizer.load(path)  # refuse a file without the special tokens before writing anything
  require_fresh_workdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  target = os.path.abspath(os.path.join(workdir, "tokenizer.json"))
  shutil.copyfile(path, target)
  return target


def _train_state(config, setup, params: Mapping[str, np.ndarray]) -> dict:
  """The train state a fresh run of `config` would start from, with `params` as its parameters;
  built without compiling the model's init (the optimizer's init is a cheap elementwise program)."""
  abstract, shardings = setup.abstract_state, setup.state_shardings
  if jax.tree.leaves(abstract["rest"]):  # non-parameter variables: take them from a real init
    with setup.context():
      rest = setup.init()["rest"]
  else:
    rest = abstract["rest"]
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract["params"])
  values = [jax.device_put(np.asarray(params[checkpoint._path_name(path)], dtype=leaf.dtype),
                           sharding)
            for (path, leaf), sharding in zip(leaves, jax.tree.leaves(shardings["params"]))]
  state = dict(step=jnp.zeros((), jnp.int32), params=jax.tree_util.tree_unflatten(treedef, values),
               rest=rest, rng=jax.random.PRNGKey(int(config.seed) + 1),
               skipped=jnp.zeros((), jnp.int32))
  with setup.context():  # moments of the imported params: a fresh optimizer state
    state["opt_state"] = jax.jit(setup.tx.init, out_shardings=shardings["opt_state"])(
        state["params"])
  return {k: state[k] for k in abstract}


def write_workdir(config, params: Mapping[str, np.ndarray], workdir: str, source: str) -> dict:
  """Writes step 0 of `<workdir>/checkpoints` (the train state of `config` with `params` as its
  parameters and a fresh optimizer state), config.json and config.py. Returns a summary."""
  require_fresh_workdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  config_json = config.to_json_best_effort(indent=2)  # before build() resolves dtype "auto"
  _, setup = build(config)
  abstract = checkpoint._leaves(setup.abstract_state["params"])
  fill_params(abstract, params, where=source)
  state = _train_state(config, setup, params)
  checkpoint.save_state(ckpt_dir, 0, state)
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(config_json)
  with open(os.path.join(workdir, CONFIG_LOADER), "w") as f:
    f.write(_LOADER_TEXT.format(source=os.path.basename(os.path.abspath(source)),
                                workdir=workdir))
  return dict(workdir=workdir, params=trainstate.param_count(state),
              config=os.path.join(workdir, CONFIG_LOADER))


def params_of_workdir(config, workdir: str) -> tuple[dict[str, np.ndarray], int]:
  """({leaf name: array}, step) of the latest checkpoint in `workdir`, loaded as eval and generate
  load it."""
  model, step = load_model(config, workdir)
  params = nnx.state(model, nnx.Param)
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    out[checkpoint._path_name(path)] = np.asarray(leaf)
  return out, step
