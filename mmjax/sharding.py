"""Mesh, logical-axis rules and the shardings derived from them.

The config names mesh axes (`data`, `fsdp`, `tensor`, `expert`) with sizes, one of them -1 to be
filled from the device count, and one table of rules from logical axis names (`embed`, `mlp`,
`batch`, ...) to mesh axes. Parameters carry logical names; everything here turns them into
`NamedSharding`s on the mesh. A logical name without a rule is replicated. A mesh axis that does
not divide its array dimension is dropped for that array (replicated there) rather than failing:
small vocabularies or head counts should not dictate the mesh.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mmjax import config as mmconfig
from mmjax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "expert")
Rules = tuple[tuple[str, Any], ...]


def make_mesh(mesh_config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The device mesh of `config.mesh` over `devices` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = dict(mesh_config.shape)
  unknown = [a for a in sizes if a not in MESH_AXES]
  if unknown:
    raise ConfigError(f"config key 'mesh.shape' names unknown mesh axes {unknown}; "
                      f"the axes are {MESH_AXES}")
  resolved = mmconfig.resolve_mesh_shape(sizes, len(devices))
  names = tuple(sizes)
  shape = tuple(resolved[a] for a in names)
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def logical_rules(mesh_config: ml_collections.ConfigDict) -> Rules:
  """The rule table as a tuple of (logical name, mesh axis | tuple of axes | None)."""
  rules = []
  for rule in mesh_config.rules:
    if len(rule) != 2:
      raise ConfigError(f"config key 'mesh.rules': each rule is (logical, mesh axes), got {rule}")
    logical, target = rule
    if isinstance(target, list):
      target = tuple(target)
    targets = target if isinstance(target, tuple) else (target,)
    bad = [t for t in targets if t is not None and t not in MESH_AXES]
    if bad:
      raise ConfigError(f"config key 'mesh.rules': rule for {logical!r} names unknown mesh axes "
                        f"{bad}; the axes are {MESH_AXES}")
    rules.append((logical, target))
  return tuple(rules)


def batch_axes(mesh_config: ml_collections.ConfigDict) -> tuple[str, ...]:
  return tuple(mesh_config.get("batch_axes", ("data", "fsdp")))


def check_batch(mesh: Mesh, mesh_config: ml_collections.ConfigDict, batch_size: int, *,
                key: str = "train.batch_size") -> None:
  """The global batch must split evenly over the batch-sharding axes (and over the hosts)."""
  axes = batch_axes(mesh_config)
  ways = int(np.prod([mesh.shape.get(a, 1) for a in axes]))
  if batch_size % ways:
    raise ConfigError(f"config key {key!r} ({batch_size}) must be divisible by the batch-sharding "
                      f"mesh axes {axes} = {ways} ways (mesh {dict(mesh.shape)})")
  if batch_size % jax.process_count():
    raise ConfigError(f"config key {key!r} ({batch_size}) must be divisible by the "
                      f"{jax.process_count()} processes")


def logical_to_spec(logical: Sequence[str | None] | None, rules: Rules, mesh: Mesh,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec on `mesh`.

  Unknown logical names are replicated; a mesh axis is used at most once per array and only where
  it divides the dimension (when `shape` is given).
  """
  if not logical:
    return PartitionSpec()
  table = dict(rules)
  used: set[str] = set()
  entries = []
  for dim, name in enumerate(logical):
    target = table.get(name) if name is not None else None
    if target is None and name in mesh.shape:  # already a mesh axis name
      target = name
    axes = [a for a in (target if isinstance(target, tuple) else (target,))
            if a is not None and a in mesh.shape and a not in used]
    kept = []
    size = 1
    for a in axes:
      if shape is not None and shape[dim] % (size * mesh.shape[a]):
        continue
      kept.append(a)
      size *= mesh.shape[a]
    used.update(kept)
    entries.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  while entries and entries[-1] is None:
    entries.pop()
  return PartitionSpec(*entries)


def logical_names(variable: nnx.Variable) -> tuple[str | None, ...] | None:
  """The logical axis names a variable was created with, if any."""
  metadata = variable.get_metadata()
  names = metadata.get("out_sharding") or metadata.get("sharding_names") or metadata.get("sharding")
  return tuple(names) if names else None


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for every array of `tree` (NNX variables use their logical names).

  `tree` may hold `nnx.Variable`s (params and optimizer moments mirroring them keep the metadata)
  or plain arrays / ShapeDtypeStructs, which are replicated. The result has the structure of
  `tree` with arrays replaced by shardings (Variables keep their boxes, as `nnx.State` does).
  """

  def one(x):
    if isinstance(x, nnx.Variable):
      value = x.get_value()
      spec = logical_to_spec(logical_names(x), rules, mesh, getattr(value, "shape", None))
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_shardings(axes: Mapping[str, Sequence[str | None]], mesh: Mesh,
                    rules: Rules) -> dict[str, NamedSharding]:
  """Shardings of the batch fields from the objective's logical batch axes."""
  out = {}
  for field, names in axes.items():
    if not names or names[0] != "batch":
      raise ValueError(f"batch field {field!r}: logical axes must start with 'batch', got {names}")
    out[field] = NamedSharding(mesh, logical_to_spec(names, rules, mesh))
  return out


def global_batch(local: Mapping[str, np.ndarray],
                 shardings: Mapping[str, NamedSharding]) -> dict[str, jax.Array]:
  """Assembles the global batch from every host's share (its rows, in process order)."""
  missing = sorted(set(shardings) - set(local))
  extra = sorted(set(local) - set(shardings))
  if missing or extra:
    raise ValueError(f"batch fields do not match the objective's batch_axes: missing {missing}, "
                     f"unexpected {extra}")
  out = {}
  for name, sharding in shardings.items():
    array = np.asarray(local[name])
    global_shape = (array.shape[0] * jax.process_count(),) + array.shape[1:]
    out[name] = jax.make_array_from_process_local_data(sharding, array, global_shape)
  return out
