"""The demo fallback: an empty data.data_dir means the token set `mmjax demo` wrote, if any.

Where that token set is comes from an explicit place, never from the working directory:
`$MMJAX_DEMO_TOKENS` when set (tests point it at their temporary folder), else
`<checkout>/runs/demo/tokens` of the source checkout this package runs from — where
`bash launch/local.sh` writes it, whatever directory the later commands run in. An installed
package (no checkout around it) has no fallback.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmjax import defaults

ENV = "MMJAX_DEMO_TOKENS"
# The checkout: the folder above the package, recognised by the launcher that runs the demo.
CHECKOUT = Path(__file__).resolve().parents[3]


def location() -> str | None:
  """The demo's token-set folder, or None where there is no checkout to hold one."""
  if os.environ.get(ENV):
    return os.environ[ENV]
  if (CHECKOUT / "launch" / "local.sh").is_file():
    return str(CHECKOUT / defaults.DEMO_TOKENS)
  return None


def use_demo_tokens_if_unset(config) -> None:
  """An empty data.data_dir (and no data.mixture) means the demo's token set when it exists, for
  training, evaluation and generation alike (which also find its tokenizers beside it)."""
  data = config.get("data")
  if data is None or data.get("data_dir", None) != "" or data.get("mixture", ()):
    return
  demo = location()
  if demo is None:
    return
  # Late: tensorflow_datasets takes seconds to import and every `mmjax train` passes here.
  from mmjax.data.tokens import records as tokens_tfds  # noqa: PLC0415
  if os.path.isdir(tokens_tfds.dataset_dir(demo, str(data.get("name", "")))):
    data.data_dir = demo
    print(f"mmjax: data.data_dir is empty; reading the demo's tokens in {demo}/", flush=True)
