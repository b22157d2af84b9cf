"""Analytic 4M FLOPs: against XLA's count of the compiled forward, and the heads' saving."""

import jax
import numpy as np
from flax import nnx

from mmjax.models.flops import fourm_flops
from tests.models import fourm_fixtures as fx


def test_forward_flops_match_xla_cost_analysis():
  # One layer per stack: XLA's cost analysis counts a scanned (while-loop) body once.
  cfg = fx.config(d_model=64, num_input_tokens=16, num_target_tokens=16, encoder_layers=1,
                  decoder_layers=1)
  reg = fx.registry()
  graphdef, state = nnx.split(fx.model(cfg, reg))
  b = fx.batch(cfg, reg, size=1)
  compiled = jax.jit(lambda s, b: nnx.merge(graphdef, s)(b)).lower(state, b).compile()
  xla = compiled.cost_analysis()
  xla = xla[0] if isinstance(xla, list) else xla
  f = fourm_flops(cfg, reg, {})
  # XLA also counts softmax, norms and elementwise work: a few percent above the matmuls.
  assert 1.0 <= xla["flops"] / f["forward"] < 1.25, (xla["flops"], f)


def test_heads_cost_only_their_tokens():
  cfg, reg = fx.config(), fx.registry()
  counts = {"tok_a": 6, "caption": 7, "glob": 3}
  f = fourm_flops(cfg, reg, counts)
  assert f["heads"] == 2 * cfg.d_model * (6 * 48 + 7 * 40 + 3 * 24)
  assert f["heads_all_positions"] == 2 * cfg.d_model * cfg.num_target_tokens * (48 + 40 + 24)
  np.testing.assert_allclose(f["train"], 3 * f["forward"])
