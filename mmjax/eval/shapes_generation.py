"""The validation scenes, tasks and target tokenizers of a shapes token set, loaded once, and the
generation metrics of a 4M or decoder model on them (`mmjax eval` and evaluation during training).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mmjax import modalities as mod
from mmjax.data.tokens import records as tokens_tfds
from mmjax.errors import UserError
from mmjax.eval import bounds, decoder_eval, fourm_eval
from mmjax.objectives import tokenizer as tokenizer_objective
from mmjax.tokenizers import modality as modality_tokenizers


@dataclasses.dataclass
class ShapesGeneration:
  """What the generation metrics of a 4M or decoder config need besides the model."""
  config: Any
  registry: mod.Registry
  tasks: list[fourm_eval.Task]
  records: list[Mapping[str, Any]]
  scenes: list[dict]
  tokenizers: dict[str, Any]
  _bounds: dict[str, dict[str, float]] | None = None

  @classmethod
  def load(cls, config, registry: mod.Registry, *, num_scenes: int,
           task_names: Sequence[str] | None = None) -> ShapesGeneration | str:
    """The first `num_scenes` validation records of `config.data` and the targets' tokenizers;
    a note (str) instead when the token set was not made from the shapes data."""
    data = config.data
    ds_dir = tokens_tfds.dataset_dir(data.data_dir, data.name)
    source_info = tokens_tfds.read_metadata(ds_dir).get("source", {})
    if not str(source_info.get("name", "")).startswith("shapes/"):
      return (f"no generation metrics: {ds_dir} was not tokenized from the shapes data "
              f"(source {source_info.get('name', source_info.get('kind'))!r}), so no exact ground "
              "truth is known")
    tasks = fourm_eval.shapes_tasks(registry)
    if task_names is not None:
      unknown = sorted(set(task_names) - {t.name for t in tasks})
      if unknown:
        raise UserError(f"unknown generation task(s) {', '.join(unknown)}; this config has "
                        f"{', '.join(t.name for t in tasks)}")
      tasks = [t for t in tasks if t.name in task_names]
    source = tokens_tfds.load_tokens(data.data_dir, data.name, "validation")
    records = [source[i] for i in range(min(num_scenes, len(source)))]
    scenes = fourm_eval.ground_truth_scenes(records, int(source_info.get("seed", data.seed)),
                                            int(data.image_size))
    tokenizers_dir = data.get("tokenizers_dir", "") or os.path.join(data.data_dir, "tokenizers")
    tokenizers = {}
    for target in sorted({t.target for t in tasks}):
      m = registry[target]
      tokenizers[target] = tokenizer_objective.load_modality_tokenizer(
          m, modality_tokenizers.tokenizer_dir_for(m, tokenizers_dir))
    return cls(config, registry, tasks, records, scenes, tokenizers)

  def run(self, model, *, out_dir: str, seed: int = 0, grid_rows: int = 6,
          report: Callable[[str, bool], None] | None = None) -> dict[str, Any]:
    """The generation metrics of `model` (4M, or a decoder: `mmjax.eval.decoder_eval`)."""
    if self.config.get("objective") == "decoder":
      return decoder_eval.generation_metrics(
          self.config, model, self.registry, self.records, self.scenes, self.tokenizers,
          tasks=self.tasks, out_dir=out_dir, seed=seed, grid_rows=grid_rows, report=report)
    return fourm_eval.generation_metrics(
        model, self.registry, self.records, self.scenes, self.tokenizers,
        num_sentinels=int(self.config.masking.get("num_sentinels", 100)),
        generate_config=self.config.get("generate"), out_dir=out_dir, seed=seed,
        grid_rows=grid_rows, tasks=self.tasks, report=report)

  def bounds(self) -> dict[str, dict[str, float]]:
    """The chance level and tokenizer ceiling of every metric (`mmjax.eval.bounds`), once."""
    if self._bounds is None:
      self._bounds = bounds.bounds(self.records, self.scenes, self.tokenizers, self.tasks)
    return self._bounds
