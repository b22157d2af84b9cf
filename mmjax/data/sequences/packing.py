"""Packing mixed-modal documents into fixed-length rows, and the Grain transform around it.

Documents of a window of records are packed by first-fit decreasing (longest first, each into the
first row with room; ties keep arrival order), so the result is a pure function of the window. Each
row holds the layout of mmjax/data/sequences/batch.py with length L: segment ids 1, 2, ... in the
row's document order, positions restarting at 0, block ids renumbered to be unique in the row, and
padding with segment 0, token 0 and weight 0. Batching rows is Grain's `.batch(B)`.

`PackedSequencesIterDataset` is the Grain stage: records in, rows out. Its iterator state is the
parent's state at the start of the current window, the number of records before it and the rows
already emitted from it: restoring re-reads the window (records are random-access and the documents
of record r depend only on (seed, r)) and skips what was emitted, so a resume is exact.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from mmjax.data.sequences import batch as sequence_batch
from mmjax.data.sequences.documents import Document, SequenceBuilder, record_uniforms


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
  """Rows of document indices (in arrival order within a row); every length <= capacity."""
  order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties by arrival
  rows: list[list[int]] = []
  free: list[int] = []
  for i in order:
    for r, room in enumerate(free):
      if lengths[i] <= room:
        rows[r].append(i)
        free[r] -= lengths[i]
        break
    else:
      rows.append([i])
      free.append(capacity - lengths[i])
  return [sorted(row) for row in rows]


def pack_documents(documents: Sequence[Document], length: int) -> list[dict[str, np.ndarray]]:
  """Rows of `length` slots holding every document exactly once (see the module docstring)."""
  lengths = [len(d["tokens"]) for d in documents]
  if lengths and max(lengths) > length:
    raise ValueError(f"a document of {max(lengths)} tokens does not fit rows of {length}")
  rows = []
  for members in first_fit_decreasing(lengths, length):
    row = sequence_batch.empty(1, length)
    row = {k: v[0] for k, v in row.items()}
    docs = [documents[i] for i in members]
    used = sum(lengths[i] for i in members)
    for name in ("tokens", "targets", "modality", "position", "loss_weight"):
      row[name][:used] = np.concatenate([d[name] for d in docs])
    sizes = np.array([lengths[i] for i in members])
    row["segment"][:used] = np.repeat(np.arange(1, len(docs) + 1, dtype=np.int32), sizes)
    # Blocks are numbered 1.. within a document: shift each by the blocks of the documents before.
    block_offsets = np.cumsum([0] + [int(d["block"].max(initial=0)) for d in docs[:-1]])
    block = np.concatenate([d["block"] for d in docs])
    row["block"][:used] = np.where(block > 0, block + np.repeat(block_offsets, sizes), 0)
    rows.append(row)
  return rows


class _PackedSequencesIterator(grain.DatasetIterator):
  """Reads a window of records, builds and packs its documents, emits the rows one by one."""

  def __init__(self, parent: grain.DatasetIterator, builder: SequenceBuilder, length: int,
               window: int, seed: int):
    super().__init__(parent)
    self._builder, self._length, self._window, self._seed = builder, length, window, seed
    self._records = 0                 # records consumed before the current window
    self._window_records = 0          # records in the current window
    self._window_state = None         # parent state at the start of the current window
    self._rows: list[dict[str, np.ndarray]] = []
    self._emitted = 0
    self._skip = 0                    # rows to skip after a restore
    self._per_record = builder.config.documents_per_record

  def _read_window(self) -> None:
    self._records += self._window_records
    self._window_state = self._parent.get_state()
    documents, read = [], 0
    for _ in range(self._window):
      try:
        record = next(self._parent)
      except StopIteration:
        break
      number = self._records + read
      uniforms = record_uniforms(self._seed, number, self._per_record)
      documents += self._builder.documents(record, uniforms, number)
      read += 1
    self._window_records = read
    self._rows = pack_documents(documents, self._length)
    self._emitted = min(self._skip, len(self._rows))
    self._skip = 0

  def __next__(self) -> dict[str, np.ndarray]:
    if self._emitted >= len(self._rows):
      self._read_window()
      if not self._rows:
        raise StopIteration
    row = self._rows[self._emitted]
    self._emitted += 1
    return {k: v.copy() for k, v in row.items()}

  def get_state(self) -> dict[str, Any]:
    if self._window_state is None or self._emitted >= len(self._rows):
      # At a window boundary: the next row comes from a fresh window.
      return {"parent": self._parent.get_state(),
              "records": self._records + self._window_records, "emitted": 0}
    return {"parent": self._window_state, "records": self._records, "emitted": self._emitted}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._records, self._window_records = int(state["records"]), 0
    self._window_state, self._rows, self._emitted = None, [], 0
    self._skip = int(state["emitted"])


class PackedSequencesIterDataset(grain.IterDataset):
  """Grain stage: records -> packed rows of `length` slots (mmjax/data/sequences/batch.py per row).

  `builder` lays out documents, `window` records are packed together, `seed` makes the template
  draws a function of (seed, record number in this stream).
  """

  def __init__(self, parent: grain.IterDataset, builder: SequenceBuilder, length: int | None = None,
               *, window: int | None = None, seed: int = 0):
    super().__init__(parent)
    self._builder = builder
    self._length = int(length or builder.max_length)
    if self._length < builder.max_length:
      raise ValueError(f"row length {self._length} is shorter than the builder's document limit "
                       f"{builder.max_length}")
    self._window = int(window or builder.config.pack_window)
    self._seed = int(seed)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return _PackedSequencesIterator(self._parent.__iter__(), self._builder, self._length,
                                    self._window, self._seed)

  def __str__(self) -> str:
    return f"PackedSequencesIterDataset(length={self._length}, window={self._window})"
