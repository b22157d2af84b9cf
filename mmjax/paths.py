"""Paths of workdirs, data dirs and tokenizer dirs: local folders or URLs (gs://bucket/run).

Everything that reads or writes them goes through `etils.epath`, which Orbax, TFDS and Grain use
too, so a `gs://` workdir works wherever a local one does (with gcsfs installed: pip install
'mmjax[gcs]'). Never `os.path.abspath` a URL: it becomes the local folder `<cwd>/gs:/bucket/run`.
"""

from __future__ import annotations

import os

from etils import epath


def is_url(path: str | os.PathLike) -> bool:
  return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> epath.Path:
  """`path` as an epath.Path: a URL as given, a local path made absolute (Orbax requires that)."""
  p = epath.Path(path)
  return p if is_url(p) else p.expanduser().resolve()
