"""Generation metrics of a mixed-modal decoder on validation scenes of the shapes data.

The decoder's two directions, scored like 4M's (`mmjax.eval.fourm_eval`, same metric names):

  tok_rgb -> caption   prompt BOS BOI codes EOI, the caption sampled until EOS
  caption -> tok_rgb   prompt BOS caption ids BOI, the image codes sampled

Prompts are built from the pre-tokenized records as `mmjax generate` builds them from files
(`mmjax.generate.decoder_run`), with the config's sampling and guidance settings.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from mmjax import modalities as mod
from mmjax.data.sequences.documents import SharedVocab
from mmjax.eval import fourm_eval
from mmjax.generate import decoder as sampler
from mmjax.generate import decoder_run


def generation_metrics(config, model, registry: mod.Registry,
                       records: Sequence[Mapping[str, Any]], scenes: Sequence[Mapping[str, Any]],
                       tokenizers: Mapping[str, Any], *, tasks: Sequence[fourm_eval.Task],
                       out_dir: str, seed: int = 0, batch_size: int = 16, grid_rows: int = 6,
                       report: Callable[[str, bool], None] | None = None) -> dict[str, Any]:
  """{"metrics", "grids", "samples", "seconds"} of every task over the records."""
  settings = decoder_run.generate_config(config)
  vocab = SharedVocab.from_registry(registry)
  out: dict[str, Any] = {"metrics": {}, "grids": {}, "samples": {}, "seconds": {}}
  for task in tasks:
    start = time.perf_counter()
    source, target = registry[task.source], registry[task.target]
    image = target if target.kind == mod.IMAGE_TOKENS else source
    layout = sampler.TokenLayout.from_vocab(vocab, registry, image.name,
                                            text_first=settings.text_first)
    text = source if source.is_sequence else target
    layout = dataclasses.replace(layout, text_end=min(layout.text_end,
                                                      tokenizers[text.name].vocab_size))
    if target is image:
      begin, new_tokens = [layout.begin_image], layout.image_tokens + 1
    else:
      begin, new_tokens = [], target.max_length + 1
      layout = dataclasses.replace(layout, begin_image=-1)  # text only: no image can start
    _, weights, _ = decoder_run.guidance_weights(settings, [source], target)
    sample = decoder_run.sample_config(settings, target, weights)
    scorer = fourm_eval.Scorer(task, grid_rows)
    for b0 in range(0, len(records), batch_size):
      rows = list(range(b0, min(b0 + batch_size, len(records))))
      copies = []
      for i in rows:
        ids = np.asarray(records[i][source.name]).astype(np.int64)
        if source.is_sequence:
          condition = ("text", ids.tolist())
        else:
          condition = ("image", [vocab.begin_image(source.name),
                                 *vocab.to_global(source.name, ids).tolist(),
                                 vocab.end_image(source.name)])
        copies.append(sampler.guidance_prompts([vocab.bos], [condition], begin, len(weights)))
      prompts = [c[k] for k in range(len(weights)) for c in copies]  # copy-major
      tokens = np.asarray(sampler.generate(model, prompts, layout, new_tokens=new_tokens,
                                           sample=sample, seed=seed + b0))
      if target is image:
        codes = tokens[:len(rows), :layout.image_tokens] - layout.image_first
        decoded = tokenizers[target.name].decode_batch(list(codes))
      else:
        decoded = []
        for row in tokens[:len(rows)]:
          stop = np.flatnonzero(row == vocab.eos)
          decoded.append(tokenizers[target.name].decode_batch(
              [row[:stop[0]] if stop.size else row])[0])
      for i, d in zip(rows, decoded):
        scorer.add(d, scenes[i])
      if report:
        report(f"{task.name}: {rows[-1] + 1}/{len(records)} scenes "
               f"({time.perf_counter() - start:.0f} s)", rows[-1] + 1 == len(records))
    out["metrics"].update(scorer.metrics())
    out["grids"][task.name] = scorer.save_grid(out_dir)
    if scorer.samples:
      out["samples"][task.name] = scorer.samples[:grid_rows]
    out["seconds"][task.name] = time.perf_counter() - start
  return out
