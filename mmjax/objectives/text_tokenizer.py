"""`mmjax tokenizer train` for the text tokenizer: SentencePiece trained on the shapes scenes'
captions and boxes-as-text strings (data.name = "shapes"), or on the captions of any raw source of
`mmjax.data.sources` (a folder, coco_captions, ...), then its round-trip quality on held-out text.

The text tokenizer is not trained through the trainer (`mmjax.train`), but it is the same stage as
the image tokenizers' objective (`mmjax.objectives.tokenizer`): raw data -> a trained tokenizer.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from etils import epath

from mmjax import progress
from mmjax.data import sources as raw_sources
from mmjax.data.shapes import world as shapes
from mmjax.errors import UserError
from mmjax.tokenizers import boxes, special, text


def shapes_sentences(num_scenes: int, *, split: str, seed: int, image_size: int,
                     coord_bins: int) -> Iterator[tuple[str, str]]:
  """(caption, det string) of the first `num_scenes` scenes of a shapes split."""
  for i in range(num_scenes):
    scene = shapes.generate_scene(i, seed=seed, split=split, image_size=image_size)
    yield scene["caption"], boxes.det_text(scene["det_boxes"], scene["det_classes"], shapes.SHAPES,
                                           coord_bins)


def source_captions(source: Any, limit: int, *, label: str = "",
                    show: bool = True) -> list[str]:
  """The non-empty UTF-8 captions among the first `limit` samples of a raw source (a folder
  source reads only its .txt files), with a progress bar on stderr."""
  n = min(int(limit), len(source))
  read_caption = getattr(source, "caption", None)  # FolderSource: no image decoding
  captions = []
  with progress.bar(n, label or "captions", unit="sample", enabled=show) as bar:
    for i in range(n):
      value = read_caption(i) if read_caption is not None else source[i].get("caption")
      if isinstance(value, (bytes, np.bytes_)):
        value = bytes(value).decode("utf-8", "replace")
      if value is not None and str(value).strip():
        captions.append(str(value).strip())
      bar.update(1)
  return captions


def run_text_tokenizer_train(config: Mapping[str, Any], workdir: str, *,
                             show_progress: bool = True) -> dict[str, Any]:
  """Trains the text tokenizer; writes `<workdir>/text.model` and `<workdir>/text_tokenizer.json`.

  data.name "shapes": on shapes captions + det strings (num_train_scenes scenes), reporting the
  exact round-trip rates of validation captions and det strings. Any other raw source: on the
  captions of its first num_train_scenes training samples, reporting on num_val_scenes held-out
  captions (its validation split, or the end of train). Also: vocabulary size, fingerprint, mean
  tokens per caption.
  """
  data = config["data"]
  if data.get("name", "shapes") != "shapes":
    return _train_on_source(config, workdir, show_progress)
  cfg = text.as_config(config["tokenizer"])
  common = dict(seed=int(data["seed"]), image_size=int(data["image_size"]),
                coord_bins=cfg.coord_bins)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()

  def train_stream() -> Iterator[str]:
    for caption, det in shapes_sentences(int(config["num_train_scenes"]), split="train", **common):
      yield caption
      yield det

  with progress.phase(f"text tokenizer: training on {config['num_train_scenes']} scenes' "
                      "captions and det strings"):
    tokenizer = text.train_text_tokenizer(train_stream(), os.path.join(workdir, "text"), cfg)
  train_seconds = time.perf_counter() - start
  val = list(shapes_sentences(int(config["num_val_scenes"]), split="validation", **common))
  captions, dets = [c for c, _ in val], [d for _, d in val]
  det_ids = tokenizer.encode_batch(dets)
  num_boxes = sum(d.count("v0=") for d in dets)
  report = _caption_report(tokenizer, captions, train_seconds)
  report.update(
      det_round_trip=float(np.mean([tokenizer.decode(i) == d for i, d in zip(det_ids, dets)])),
      tokens_per_box=float(sum(len(i) for i in det_ids) / max(num_boxes, 1)),
      unk_rate=float(np.mean(np.concatenate(tokenizer.encode_batch(captions) + det_ids)
                             == special.UNK)))
  return _write_report(workdir, report)


def _train_on_source(config: Mapping[str, Any], workdir: str, show: bool) -> dict[str, Any]:
  cfg = text.as_config(config["tokenizer"])
  data = config["data"]
  found, described = raw_sources.open_sources(data, None, ("train", raw_sources.VALIDATION))
  if "train" not in found:
    raise UserError(f"text tokenizer: the data ({described}) has no train split")
  found = raw_sources.with_holdout(found, int(config["num_val_scenes"]))
  if "caption" not in raw_sources.source_fields(found["train"]):
    raise UserError(f"text tokenizer: the data ({described}) has no captions to train on")
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  train = source_captions(found["train"], int(config["num_train_scenes"]),
                          label="text tokenizer: reading training captions", show=show)
  if not train:
    raise UserError(f"text tokenizer: no non-empty caption among the training samples of "
                    f"{described}")
  with progress.phase(f"text tokenizer: training on {len(train)} captions"):
    tokenizer = text.train_text_tokenizer(train, os.path.join(workdir, "text"), cfg)
  train_seconds = time.perf_counter() - start
  val = source_captions(found[raw_sources.VALIDATION], int(config["num_val_scenes"]),
                        label="text tokenizer: reading held-out captions", show=show)
  report = _caption_report(tokenizer, val, train_seconds)
  report.update(source=described, train_captions=len(train),
                unk_rate=float(np.mean(np.concatenate(tokenizer.encode_batch(val) or [[0]])
                                       == special.UNK)) if val else None)
  return _write_report(workdir, report)


def _caption_report(tokenizer: text.TextTokenizer, captions: list[str],
                    train_seconds: float) -> dict[str, Any]:
  cap_ids = tokenizer.encode_batch(captions) if captions else []
  return {
      "model": tokenizer.path,
      "fingerprint": tokenizer.fingerprint,
      "vocab_size": tokenizer.vocab_size,
      "num_reserved": tokenizer.special.num_reserved,
      "val_captions": len(captions),
      "caption_round_trip": (float(np.mean([tokenizer.decode(i) == c
                                            for i, c in zip(cap_ids, captions)]))
                             if captions else None),
      "tokens_per_caption": float(np.mean([len(i) for i in cap_ids])) if cap_ids else None,
      "max_tokens_per_caption": int(max(len(i) for i in cap_ids)) if cap_ids else None,
      "train_seconds": train_seconds,
  }


def _write_report(workdir: str, report: dict[str, Any]) -> dict[str, Any]:
  with (epath.Path(workdir) / "text_tokenizer.json").open("w") as f:
    json.dump(report, f, indent=2)
  return report
