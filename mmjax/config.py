"""Configs: loading `path[:arg]` files, `--config.a.b=value` overrides, validation, the dataclass boundary.

A config file is Python: `configs/<family>/<name>.py` defines `get_config(arg=None)` returning an
`ml_collections.ConfigDict`. Variants are arguments (`configs/fourm/4m.py:size=B`), never copied files.
Overrides go through ml_collections' config_flags, so values are parsed with the type of the field
they replace; the config is locked, so an unknown key is an error, reported here with the closest
valid names. The model section crosses into the model code as a frozen dataclass (`to_dataclass`):
modules never see the global config.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
import typing
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from mmjax.errors import UserError

ConfigDict = ml_collections.ConfigDict

_OVERRIDE = re.compile(r"^--?config\.([A-Za-z0-9_.]+)(?:=(.*))?$", re.DOTALL)


class ConfigError(UserError):
  """A config file, key or value that cannot be used; the message names it."""


# ---------------------------------------------------------------------------------------------
# Variant arguments: `configs/x.py:tiny` or `configs/x.py:size=B,runlocal`.


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses a config file's argument into typed fields, starting from `defaults`.

  `arg` is a comma-separated list of `key=value` items and bare words. A bare word sets the first
  default (the variant, e.g. `tiny`) unless it names a boolean default, which it then switches on
  (`runlocal`). Values take the type of their default.
  """
  result = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return result
  names = list(defaults)
  for item in (part.strip() for part in arg.split(",")):
    if not item:
      continue
    key, has_value, value = item.partition("=")
    if not has_value:
      if key in defaults and isinstance(defaults[key], bool):
        result[key] = True
        continue
      if not names:
        raise ConfigError(f"config argument {item!r}: this config takes no arguments")
      key, value = names[0], item
    if key not in defaults:
      raise ConfigError(f"config argument {key!r} is unknown{_closest_hint(key, names)}")
    result[key] = _parse_like(defaults[key], value, f"config argument {key!r}")
  return result


def _parse_like(default: Any, text: str, where: str) -> Any:
  try:
    if isinstance(default, bool):
      lowered = text.lower()
      if lowered not in ("true", "false", "1", "0"):
        raise ValueError(f"expected true or false, got {text!r}")
      return lowered in ("true", "1")
    if isinstance(default, int):
      return int(text)
    if isinstance(default, float):
      return float(text)
  except ValueError as e:
    raise ConfigError(f"{where}: {e}") from None
  return text


# ---------------------------------------------------------------------------------------------
# Loading and overrides.


def load(spec: str, overrides: Sequence[str] = (), *, validate_config: bool = True) -> ConfigDict:
  """Loads `path[:arg]`, applies `--config.KEY=VALUE` overrides and validates the result."""
  path = spec.split(":", 1)[0]
  if not path:
    raise ConfigError("--config is empty: give a config file, e.g. --config=configs/fourm/shapes.py")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist")
  override_args = _normalise_overrides(overrides)
  base = _load_file(spec)
  for arg in override_args:
    _check_key_exists(base, arg.split("=", 1)[0].split(".", 1)[1], path)

  flag_values = flags.FlagValues()
  argv = ["mmjax", f"--config={spec}", *override_args]
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  try:
    flag_values(argv)
  except flags.IllegalFlagValueError as e:
    raise ConfigError(f"{path}: {_strip_flag_prefix(str(e))}") from None
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    raise ConfigError(f"{path}: cannot apply overrides: {e}") from None
  config = flag_values.config
  if validate_config:
    validate(config, where=path)
  return config


def _load_file(spec: str) -> ConfigDict:
  """Runs the config file's get_config, turning its failures into one-line errors."""
  flag_values = flags.FlagValues()
  argv = ["mmjax", f"--config={spec}"]
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  try:
    flag_values(argv)
    config = flag_values.config
  except ConfigError:
    raise
  except Exception as e:  # noqa: BLE001 -- a config file may fail in any way; report it as the user's.
    message = str(e).strip().splitlines()
    cause = e.__cause__ or e.__context__
    if isinstance(cause, UserError):
      raise ConfigError(str(cause)) from None
    raise ConfigError(f"cannot load config {spec!r}: {message[-1] if message else type(e).__name__}"
                      ) from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{spec}: get_config() must return an ml_collections.ConfigDict, "
                      f"got {type(config).__name__}")
  return config


def _normalise_overrides(overrides: Sequence[str]) -> list[str]:
  """Turns `--config.k=v` and `--config.k v` items into `--config.k=v` strings."""
  result, i = [], 0
  items = list(overrides)
  while i < len(items):
    match = _OVERRIDE.match(items[i])
    if not match:
      raise ConfigError(f"unexpected argument {items[i]!r}: overrides look like --config.KEY=VALUE")
    key, value = match.group(1), match.group(2)
    if value is None:
      if i + 1 >= len(items):
        raise ConfigError(f"--config.{key} needs a value: --config.{key}=VALUE")
      value, i = items[i + 1], i + 1
    result.append(f"--config.{key}={value}")
    i += 1
  return result


def _strip_flag_prefix(message: str) -> str:
  return re.sub(r"^flag --config\.", "config key ", message)


def flat_keys(config: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
  """Every dotted key of a nested config, sections included."""
  for key in config:
    dotted = f"{prefix}{key}"
    yield dotted
    value = config[key]
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield from flat_keys(value, dotted + ".")


def _check_key_exists(config: ConfigDict, key: str, path: str) -> None:
  known = set(flat_keys(config))
  if key not in known:
    raise ConfigError(f"unknown config key {key!r} in {path}{_closest_hint(key, sorted(known))}")


def _closest_hint(key: str, candidates: Sequence[str]) -> str:
  # Match on the whole dotted path and on the last component, so `train.stepz` finds `train.steps`
  # and `lr` finds `train.lr`.
  close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
  leaf = key.rsplit(".", 1)[-1]
  close += [c for c in candidates if c.rsplit(".", 1)[-1] == leaf and c not in close]
  close += [c for c in candidates
            if difflib.SequenceMatcher(None, leaf, c.rsplit(".", 1)[-1]).ratio() >= 0.75
            and c not in close]
  return f"; closest valid names: {', '.join(close[:5])}" if close else ""


# ---------------------------------------------------------------------------------------------
# Validation.


def _check(condition: bool, key: str, message: str, where: str) -> None:
  if not condition:
    raise ConfigError(f"{where}: config key {key!r} {message}")


def validate(config: ConfigDict, *, where: str = "config", num_devices: int | None = None) -> None:
  """Checks values that types alone cannot: ranges and consistency between sections.

  With `num_devices`, also checks that the mesh fits the devices and that the global batch divides
  over the batch-sharding mesh axes.
  """
  train = config.get("train")
  if train is not None:
    for key in ("steps", "batch_size"):
      if key in train:
        _check(train[key] > 0, f"train.{key}", f"must be positive, got {train[key]}", where)
    if "warmup_steps" in train and "steps" in train:
      _check(train.warmup_steps >= 0, "train.warmup_steps",
             f"must be non-negative, got {train.warmup_steps}", where)
      if train.warmup_steps > train.steps:  # a short run (`--config.train.steps=N` alone)
        print(f"mmjax: train.warmup_steps={train.warmup_steps} is longer than the run; warming "
              f"up over all train.steps={train.steps} steps", file=sys.stderr, flush=True)
        train.warmup_steps = train.steps
    if "lr" in train:
      _check(train.lr >= 0, "train.lr", f"must be non-negative, got {train.lr}", where)
  model = config.get("model")
  if model is not None and "d_model" in model and "num_heads" in model:
    _check(model.num_heads > 0 and model.d_model % model.num_heads == 0, "model.num_heads",
           f"must divide model.d_model={model.d_model}, got {model.num_heads}", where)
  mesh = config.get("mesh")
  if mesh is not None:
    sizes = dict(mesh.get("shape", {}))
    for axis, size in sizes.items():
      _check(size == -1 or size >= 1, f"mesh.shape.{axis}", f"must be >= 1 or -1, got {size}", where)
    _check(sum(1 for s in sizes.values() if s == -1) <= 1, "mesh.shape",
           f"may have at most one -1 axis, got {sizes}", where)
    if num_devices is not None:
      resolved = resolve_mesh_shape(sizes, num_devices, where=where)
      if train is not None and "batch_size" in train:
        batch_axes = tuple(mesh.get("batch_axes", ("data", "fsdp")))
        ways = 1
        for axis in batch_axes:
          ways *= resolved.get(axis, 1)
        _check(train.batch_size % ways == 0, "train.batch_size",
               f"({train.batch_size}) must be divisible by the batch-sharding mesh axes "
               f"{batch_axes} = {ways} ways", where)


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int, *,
                       where: str = "config") -> dict[str, int]:
  """Fills one -1 axis from the device count; errors if the mesh does not match the devices."""
  known = 1
  for size in sizes.values():
    if size != -1:
      known *= size
  resolved = dict(sizes)
  free = [axis for axis, size in sizes.items() if size == -1]
  if free:
    _check(num_devices % known == 0, f"mesh.shape.{free[0]}",
           f"cannot be filled: {num_devices} devices are not divisible by the other axes "
           f"({known})", where)
    resolved[free[0]] = num_devices // known
  else:
    _check(known == num_devices, "mesh.shape",
           f"{dict(sizes)} needs {known} devices but {num_devices} are present", where)
  return resolved


# ---------------------------------------------------------------------------------------------
# The dataclass boundary.


def to_dataclass(cls: type, section: Mapping[str, Any], *, where: str = "model") -> Any:
  """Builds the frozen dataclass `cls` from a config section, recursively.

  Keys that are not fields are errors naming the closest fields; missing keys take the field's
  default. Lists become tuples so that the result is hashable (usable as a jit static argument).
  """
  if not dataclasses.is_dataclass(cls):
    raise TypeError(f"{cls!r} is not a dataclass")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  hints = typing.get_type_hints(cls)
  values = {}
  for key in section:
    if key not in fields:
      raise ConfigError(f"unknown config key {where}.{key!r} for {cls.__name__}"
                        f"{_closest_hint(key, sorted(fields))}")
    values[key] = _convert(hints[key], section[key], f"{where}.{key}")
  missing = [name for name, f in fields.items() if name not in values
             and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
  if missing:
    raise ConfigError(f"config section {where!r} lacks required keys: {', '.join(missing)}")
  try:
    return cls(**values)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config section {where!r}: {e}") from None


def _convert(hint: Any, value: Any, where: str) -> Any:
  if dataclasses.is_dataclass(hint) and isinstance(value, (Mapping, ml_collections.ConfigDict)):
    return to_dataclass(hint, value, where=where)
  return _freeze(value)


def _freeze(value: Any) -> Any:
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  if isinstance(value, (ml_collections.ConfigDict, dict)):
    return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
  return value
