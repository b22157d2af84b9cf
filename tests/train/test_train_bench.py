"""bench step: one JSON-able dict whose analytic FLOPs agree with XLA's; the MFU arithmetic; the
batch it draws (synthetic, masked with pinned counts, data); the per-phase breakdown."""

import json

import numpy as np
import pytest

from mmjax import config as mmconfig
from mmjax.errors import UserError
from mmjax.objectives.fourm import FourMObjective
from mmjax.train import bench, flops, step_profile, toy


@pytest.mark.slow
def test_bench_step_on_the_toy_objective(capsys):
  config = toy.toy_config(batch_size=16)
  config.mesh.shape.update(dict(data=-1))
  result = bench.run_bench_step(config, steps=2, warmup=1)
  out, err = capsys.readouterr()
  assert out == ""  # stdout is the CLI's JSON line alone
  assert [line.split(":")[1].strip() for line in err.splitlines() if line.endswith(" ...")] == [
      "building the model and its batch ...", "compiling the train step ...", "1 warm-up steps ...",
      "measuring the matmul rates ...", "timing 2 steps ...",
      "measuring the matmul rates again ...", "profiling one step ..."]
  json.dumps(result)
  assert result["bench"] == "step" and result["devices"] == 8
  assert result["batch"] == "synthetic" and result["valid_tokens"] == {}  # no masks in toy batches
  assert len(result["load_avg_1min"]) == 2 and result["cpu"]["cpus"] >= 1
  assert result["matmul_gflops"]["numpy_float32"] > 0 and result["matmul_gflops"]["jax_float32"] > 0
  phases, kinds = result["breakdown"]["phases"], result["breakdown"]["kinds"]
  assert {"forward", "backward", "optimizer"} <= set(phases)
  assert sum(phases.values()) == pytest.approx(1.0, abs=1e-3)
  assert sum(kinds.values()) == pytest.approx(1.0, abs=1e-3) and kinds["matmul"] > 0
  assert sum(result["breakdown"]["phase_s"].values()) == pytest.approx(result["step_time_s"],
                                                                       rel=1e-2)
  c = config.toy
  assert result["model_flops_per_step"] == 16 * 6 * c.length * (c.embed * c.mlp + c.mlp * c.vocab)
  # XLA counts the matmuls plus elementwise work (per sample) and the optimizer (per step, on
  # every replica). The difference between two batch sizes drops the optimizer: what is left is
  # the matmuls the model counts plus 5-10 % of elementwise work (7.2 % measured).
  larger = bench.run_bench_step(toy.toy_config(batch_size=64), steps=1, warmup=0, profile=False)
  assert "breakdown" not in larger
  marginal = ((larger["xla_flops_per_step"] - result["xla_flops_per_step"])
              / (larger["model_flops_per_step"] - result["model_flops_per_step"]))
  assert 1.0 < marginal < 1.15, marginal
  assert result["samples_per_s"] == pytest.approx(16 / result["step_time_s"])
  expected = result["model_flops_per_step"] / result["step_time_s"] / result["peak_flops_per_s"]
  assert result["mfu"] == pytest.approx(expected)


def test_peak_table():
  assert flops.table_peak("TPU v5p") == 459e12
  assert flops.table_peak("TPU v5 lite") == 197e12
  assert flops.table_peak("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.table_peak("Some GPU") is None
  assert flops.mfu(50.0, 100.0) == 0.5


def test_masked_batch_follows_the_masking_and_pins_counts(monkeypatch):
  config = mmconfig.load("configs/fourm/4m.py:tiny")
  objective = FourMObjective(config)
  batch, source = bench.local_batch(objective, config, "masked")
  counts = bench.valid_counts(batch)
  assert source == {"batch": "masked", "seed": 0} and set(counts) == {
      "dec_loss_mask", "dec_valid", "enc_valid"}
  # Teacher forcing: each sequence target's last slot has no label.
  assert counts["dec_loss_mask"] < counts["dec_valid"] <= 16 * 128
  target = int(objective.masked_batch(16, 4)["dec_valid"].sum())
  pinned, source = bench.local_batch(objective, config, "masked", valid_targets=target)
  assert source["seed"] <= 4 and int(pinned["dec_valid"].sum()) == target
  # Longer texts fill more of the target budget than the reference's 8-token ones.
  longer, _ = bench.local_batch(objective, config, "masked", text_tokens=200)
  assert longer["dec_valid"].sum() > batch["dec_valid"].sum()
  with pytest.raises(UserError, match="needs --batch=masked"):
    bench.local_batch(objective, config, "synthetic", valid_targets=target)
  with pytest.raises(UserError, match="--batch must be one of"):
    bench.local_batch(objective, config, "real")
  monkeypatch.setattr(bench, "MAX_SEEDS", 3)
  with pytest.raises(UserError, match="no masked batch"):
    bench.local_batch(objective, config, "masked", valid_targets=16 * 128 + 1)


_HLO = """HloModule jit_step

%fused_dot (p0: f32[4,4], p1: f32[4,4]) -> f32[4,4] {
  %p0 = f32[4,4]{1,0} parameter(0)
  %p1 = f32[4,4]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_add (p0: f32[4,4]) -> f32[4,4] {
  %p0 = f32[4,4]{1,0} parameter(0)
  ROOT %add.2 = f32[4,4]{1,0} add(%p0, %p0)
}

ENTRY %main (a: f32[4,4], b: f32[4,4]) -> f32[4,4] {
  %a = f32[4,4]{1,0} parameter(0)
  %b = f32[4,4]{1,0} parameter(1)
  %fwd = f32[4,4]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_dot, metadata={op_name="jit(step)/jvp(mmjax_attention)/dot_general"}
  %bwd = f32[4,4]{1,0} fusion(%fwd, %b), kind=kCustom, calls=%fused_dot, metadata={op_name="jit(step)/transpose(jvp())/dot_general"}
  %opt = f32[4,4]{1,0} fusion(%bwd), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/add"}
  ROOT %copy.3 = f32[4,4]{1,0} copy(%opt)
}
"""


def test_breakdown_by_phase_and_kind():
  events = [{"ph": "X", "name": "fwd", "dur": 100}, {"ph": "X", "name": "bwd", "dur": 200},
            {"ph": "X", "name": "opt", "dur": 50}, {"ph": "X", "name": "copy.3", "dur": 50},
            {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 1000}]  # not an HLO op
  out = step_profile.breakdown(_HLO, events, steps=2)
  assert out["op_time_s"] == pytest.approx(200e-6)
  assert out["phases"] == {"backward": 0.5, "forward": 0.25, "optimizer": 0.125,
                           "unattributed": 0.125}
  assert out["kinds"] == {"matmul": 0.5, "attention": 0.25, "elementwise": 0.125, "copy": 0.125}
  assert np.isclose(sum(out["kinds"].values()), 1.0)
