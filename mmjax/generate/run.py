"""`mmjax generate`: dispatches to the generator of the config's objective.

Each generator takes (config, workdir, inputs {modality: text or image path}, targets [modality],
out_dir, seed, num_samples, allow_random_init), writes decoded outputs (PNGs, text, boxes drawn on
an image) into out_dir and returns a JSON-able summary naming the files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mmjax.data.pipeline.demo_tokens import use_demo_tokens_if_unset
from mmjax.errors import UserError
from mmjax.generate import decoder_run
from mmjax.generate import fourm_run


def run_generate(config, workdir: str, inputs: Mapping[str, str], targets: Sequence[str], *,
                 out_dir: str, seed: int = 0, num_samples: int = 1,
                 allow_random_init: bool = False) -> dict[str, Any]:
  objective = config.get("objective", "")
  kwargs = dict(out_dir=out_dir, seed=seed, num_samples=num_samples,
                allow_random_init=allow_random_init)
  use_demo_tokens_if_unset(config)  # tokenizers are found beside the tokens
  if objective == "fourm":
    return fourm_run.generate_fourm(config, workdir, inputs, targets, **kwargs)
  if objective == "decoder":
    return decoder_run.generate_decoder(config, workdir, inputs, targets, **kwargs)
  raise UserError(f"mmjax generate: config objective {objective!r} has no generator (use a 4M "
                  "or decoder config)")
