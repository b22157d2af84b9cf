"""A fake Google Cloud Storage for tests: `gs://bucket/key` is the local file `<root>/bucket/key`.

GCS is reached through two client layers, and both are replaced at their boundary:
- epath (everything mmjax, TFDS, Grain and Orbax's bookkeeping do with files) reaches `gs://`
  through fsspec's "gcs" protocol, here a DirFileSystem over `<root>`;
- Orbax hands array bytes to TensorStore with a kvstore spec of driver "gcs", here a "file"
  kvstore under `<root>` (TensorStore's own GCS driver would need a server), and asks the
  google-cloud-storage client about the bucket, here a flat (non-hierarchical) bucket.
Paths keep their `gs://` form everywhere else, so code that turns a URL into a local path
(`os.path.abspath`, `open`, `os.makedirs`) writes into the current directory, where a test looks.

    with fake_gcs.installed(tmp_path / "gcs") as root: ... "gs://bucket/run" ...
"""

from __future__ import annotations

import contextlib
import os
from unittest import mock

import fsspec
from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils

_PREFIXES = ("gs://", "gcs://")


def _key(path: str) -> str:
  for prefix in _PREFIXES:
    if path.startswith(prefix):
      return path[len(prefix):]
  return path


class FakeGCSFileSystem(DirFileSystem):
  """fsspec's "gs"/"gcs" protocol over a local folder; listings name objects `bucket/key`."""
  protocol = ("gs", "gcs")
  root = ""

  def __init__(self, *args, finalize_on_close=True, **kwargs):
    del args, finalize_on_close, kwargs  # what epath passes to the real gcsfs
    super().__init__(path=self.root, fs=LocalFileSystem(auto_mkdir=True))

  @classmethod
  def _strip_protocol(cls, path):
    if isinstance(path, list):
      return [cls._strip_protocol(p) for p in path]
    return _key(os.fspath(path)).rstrip("/")

  def makedirs(self, path, exist_ok=False):
    return self.fs.makedirs(self._join(path), exist_ok=True)  # folders exist implicitly on GCS

  def mkdir(self, path, create_parents=True, **kwargs):
    return self.fs.makedirs(self._join(path), exist_ok=True)


class _FlatBucket:
  def __init__(self, name: str):
    self.name = name
    self.hierarchical_namespace_enabled = False


def _kvstore(root: str, path: str) -> dict[str, str]:
  return {"driver": "file", "path": os.path.join(root, _key(path))}


@contextlib.contextmanager
def installed(root: str | os.PathLike):
  """Routes `gs://` to `root` for the duration (in this process)."""
  root = os.path.abspath(root)
  os.makedirs(root, exist_ok=True)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # epath caches the filesystem
  fsspec.register_implementation("gcs", FakeGCSFileSystem, clobber=True)
  fsspec.register_implementation("gs", FakeGCSFileSystem, clobber=True)
  with mock.patch.object(FakeGCSFileSystem, "root", root), \
       mock.patch.object(gcs_utils, "get_kvstore_for_gcs", lambda path: _kvstore(root, path)), \
       mock.patch.object(gcs_utils, "get_bucket", _FlatBucket):
    FakeGCSFileSystem.clear_instance_cache()
    try:
      yield root
    finally:
      FakeGCSFileSystem.clear_instance_cache()
      epath_backend.fsspec_backend._get_filesystem.cache_clear()


def local_files(folder: str | os.PathLike) -> list[str]:
  """Every file under `folder`, relative to it, sorted."""
  found = []
  for dirpath, _, files in os.walk(folder):
    found += [os.path.relpath(os.path.join(dirpath, f), folder) for f in files]
  return sorted(found)
