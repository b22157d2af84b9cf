"""An ablation of the 4M shapes model: masking mixture x input/target token budgets.

Run (DATA as in configs/sweeps/scaling.py: the workdir of `mmjax prepare tokens`):
  mmjax sweep --sweep=configs/sweeps/ablation.py:data_dir=DATA --workdir=runs/ablation
  mmjax sweep --sweep=configs/sweeps/ablation.py:data_dir=DATA,runlocal --workdir=/tmp/ablation
Writes runs/ablation/<point>/, results.jsonl and the table results.txt (final train and eval
losses). Each run's validation batches are masked by its own mixture and budgets, so eval/loss
compares runs on their own tasks; per-modality eval losses (eval/loss/<modality>) are in the table's
results.jsonl rows.
"""

from mmjax import config as mmconfig
from mmjax.train.sweep import product

MIXTURES = ("4m7", "4m21", "all2all")
BUDGETS = ((64, 64), (128, 64), (128, 128))   # (num_input_tokens, num_target_tokens)


def get_sweep(arg=None):
  arg = mmconfig.parse_arg(arg, data_dir="", runlocal=False, steps=500)
  budgets = ((32, 32), (64, 32)) if arg.runlocal else BUDGETS
  points = product({
      "masking.mixture": MIXTURES,
      ("model.num_input_tokens", "model.num_target_tokens"): budgets,
  })
  common = {"train.steps": 8 if arg.runlocal else arg.steps}
  common["train.warmup_steps"] = max(1, common["train.steps"] // 10)
  if arg.data_dir:
    common["data.data_dir"] = arg.data_dir
  points = [{**p, **common} for p in points]
  base = "configs/fourm/shapes.py:tiny,runlocal" if arg.runlocal else "configs/fourm/shapes.py:tiny"
  return {"config": base, "points": points, "metric": "eval/loss", "fit": False}
