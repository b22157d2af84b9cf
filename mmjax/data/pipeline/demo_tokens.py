"""The demo fallback: an empty data.data_dir means the token set `mmjax demo` wrote, if any."""

from __future__ import annotations

import os

from mmjax import defaults


def use_demo_tokens_if_unset(config) -> None:
  """An empty data.data_dir (and no data.mixture) means the demo's token set when it exists, for
  training, evaluation and generation alike (which also find its tokenizers beside it)."""
  data = config.get("data")
  if data is None or data.get("data_dir", None) != "" or data.get("mixture", ()):
    return
  # Late: tensorflow_datasets takes seconds to import and every `mmjax train` passes here.
  from mmjax.data.tokens import records as tokens_tfds  # noqa: PLC0415
  if os.path.isdir(tokens_tfds.dataset_dir(defaults.DEMO_TOKENS, str(data.get("name", "")))):
    data.data_dir = defaults.DEMO_TOKENS
    print(f"mmjax: data.data_dir is empty; reading the demo's tokens in {defaults.DEMO_TOKENS}/",
          flush=True)

