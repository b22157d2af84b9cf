"""Teacher-forced validation metrics of a trained model: its objective's loss on validation batches.

The objective's own `loss` (as in the trainer's periodic evaluation) runs on batches of its
validation iterator: for 4M the masked targets given the visible inputs, for the decoder the next
token of every position. Per-modality losses and accuracies come out as the objective names them
(`loss/<modality>`, `acc/<modality>` or `accuracy/<modality>`). Metrics are averaged over batches
(each batch weighs equally; batches have the same size).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from mmjax.errors import UserError
from mmjax.progress import bar as progress_bar


def validation_metrics(objective: Any, model: nnx.Module, *, max_batches: int,
                       seed: int = 0, progress: bool = True) -> dict[str, float]:
  """Mean metrics over at most `max_batches` validation batches (one pass, no repetition)."""
  if max_batches < 1:
    raise ValueError(f"max_batches must be >= 1, got {max_batches}")
  graphdef, state = nnx.split(model)
  rng = jax.random.key(seed)

  @jax.jit
  def evaluate(state, batch):
    loss, metrics = objective.loss(nnx.merge(graphdef, state), batch, rng)
    return dict(metrics, loss=loss)

  it = objective.make_iterator("val", 0, 1)
  totals: dict[str, float] = {}
  count = 0
  with progress_bar(max_batches, "eval: teacher-forced", unit="batch", enabled=progress) as shown:
    for batch in it:
      metrics = jax.device_get(evaluate(state, {k: np.asarray(v) for k, v in batch.items()}))
      for k, v in metrics.items():
        totals[k] = totals.get(k, 0.0) + float(v)
      count += 1
      shown.update(1)
      if count >= max_batches:
        break
  if not count:
    raise UserError("the validation split holds fewer records than one batch (config key "
                    "'train.batch_size'): no teacher-forced metrics")
  out = {f"val/{k}": v / count for k, v in sorted(totals.items())}
  out["val/batches"] = float(count)
  return out
