"""`mmjax tokenizer train` for the text tokenizer of the shapes world: SentencePiece trained on the
scenes' captions and boxes-as-text strings, then its round-trip quality on validation scenes.

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

from mmjax.data.shapes import world as shapes
from mmjax.tokenizers import boxes, special, text


def shapes_sentences(num_scenes: int, *, split: str, seed: int, image_size: int,
                     coord_bins: int) -> Iterator[tuple[str, str]]:
  """(caption, det string) of the first `num_scenes` scenes of a shapes split."""
  for i in range(num_scenes):
    scene = shapes.generate_scene(i, seed=seed, split=split, image_size=image_size)
    yield scene["caption"], boxes.det_text(scene["det_boxes"], scene["det_classes"], shapes.SHAPES,
                                           coord_bins)


def run_text_tokenizer_train(config: Mapping[str, Any], workdir: str) -> dict[str, Any]:
  """Trains the text tokenizer on shapes captions + det strings; writes `<workdir>/text.model`.

  Returns (and writes to `<workdir>/text_tokenizer.json`) the vocabulary size, the fingerprint, the
  exact round-trip rates of validation captions and det strings, and mean tokens per caption / box.
  """
  cfg = text.as_config(config["tokenizer"])
  data = config["data"]
  common = dict(seed=int(data["seed"]), image_size=int(data["image_size"]),
                coord_bins=cfg.coord_bins)
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()

  def train_stream() -> Iterator[str]:
    for caption, det in shapes_sentences(int(config["num_train_scenes"]), split="train", **common):
      yield caption
      yield det

  tokenizer = text.train_text_tokenizer(train_stream(), os.path.join(workdir, "text"), cfg)
  train_seconds = time.perf_counter() - start
  val = list(shapes_sentences(int(config["num_val_scenes"]), split="validation", **common))
  captions, dets = [c for c, _ in val], [d for _, d in val]
  cap_ids, det_ids = tokenizer.encode_batch(captions), tokenizer.encode_batch(dets)
  num_boxes = sum(d.count("v0=") for d in dets)
  report = {
      "model": tokenizer.path,
      "fingerprint": tokenizer.fingerprint,
      "vocab_size": tokenizer.vocab_size,
      "num_reserved": tokenizer.special.num_reserved,
      "val_captions": len(captions),
      "caption_round_trip": float(np.mean([tokenizer.decode(i) == c
                                           for i, c in zip(cap_ids, captions)])),
      "det_round_trip": float(np.mean([tokenizer.decode(i) == d for i, d in zip(det_ids, dets)])),
      "tokens_per_caption": float(np.mean([len(i) for i in cap_ids])),
      "max_tokens_per_caption": int(max(len(i) for i in cap_ids)),
      "tokens_per_box": float(sum(len(i) for i in det_ids) / max(num_boxes, 1)),
      "unk_rate": float(np.mean(np.concatenate(cap_ids + det_ids) == special.UNK)),
      "train_seconds": train_seconds,
  }
  with open(os.path.join(workdir, "text_tokenizer.json"), "w") as f:
    json.dump(report, f, indent=2)
  return report
