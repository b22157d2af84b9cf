"""A tiny scaling ladder of the 4M shapes model: widths x depths x training steps, small enough for a
CPU, with scaling-law fits (L(N), L(C) on the compute frontier, L(N, D)) and a plot.

Run (after preparing the shapes tokens, see configs/tokens/shapes.py; DATA is the workdir of
`mmjax prepare tokens`, the directory holding mmjax_tokens/):
  mmjax sweep --sweep=configs/sweeps/scaling.py:data_dir=DATA --workdir=runs/scaling
  mmjax sweep --sweep=configs/sweeps/scaling.py:data_dir=DATA,runlocal --workdir=/tmp/scaling
  mmjax sweep --sweep=configs/sweeps/scaling.py:data_dir=DATA --workdir=runs/scaling --emit
Writes runs/scaling/<point>/ (one training run each), results.jsonl, results.txt, scaling.png.
Default: 4 sizes x 3 step budgets (100, 200, 400) at batch 32 = 12 runs; `runlocal`: 3 sizes x 3
budgets of a few steps (a smoke test).
"""

from mmjax import config as mmconfig

# (d_model, num_heads, layers per stack): width and depth grow together, as in scaling ladders.
SIZES = ((64, 2, 2), (96, 3, 3), (128, 4, 4), (192, 3, 4))
STEPS = (100, 200, 400)   # 3 budgets: L(N, D) needs 3 levels of each
RUNLOCAL_SIZES = ((32, 2, 1), (48, 2, 2), (64, 2, 2))
RUNLOCAL_STEPS = (4, 8, 12)


def get_sweep(arg=None):
  arg = mmconfig.parse_arg(arg, data_dir="", runlocal=False, batch_size=32)
  sizes, budgets = (RUNLOCAL_SIZES, RUNLOCAL_STEPS) if arg.runlocal else (SIZES, STEPS)
  batch_size = 8 if arg.runlocal else arg.batch_size
  common = {"train.batch_size": batch_size, "train.checkpoint_every": max(budgets),
            "train.log_every": 10}
  if arg.data_dir:
    common["data.data_dir"] = arg.data_dir
  points = []
  for width, heads, depth in sizes:
    for steps in budgets:
      points.append({
          "_name": f"d{width}_l{depth}_s{steps}",
          "model.d_model": width, "model.num_heads": heads,
          "model.encoder_layers": depth, "model.decoder_layers": depth,
          "train.steps": steps, "train.warmup_steps": max(1, steps // 10),
          **common,
      })
  base = "configs/fourm/shapes.py:tiny,runlocal" if arg.runlocal else "configs/fourm/shapes.py:tiny"
  return {"config": base, "points": points, "metric": "eval/loss", "fit": True}
