"""bench step: one JSON-able dict whose analytic FLOPs agree with XLA's; the MFU arithmetic."""

import json

import pytest

from mmjax.train import bench, flops, toy


@pytest.mark.slow
def test_bench_step_on_the_toy_objective(capsys):
  config = toy.toy_config(batch_size=16)
  config.mesh.shape.update(dict(data=-1))
  result = bench.run_bench_step(config, steps=2, warmup=1)
  out, err = capsys.readouterr()
  assert out == ""  # stdout is the CLI's JSON line alone
  assert [line.split(":")[1].strip() for line in err.splitlines() if line.endswith(" ...")] == [
      "building the model and its batch ...", "compiling the train step ...", "1 warm-up steps ...",
      "measuring the peak FLOP rate ...", "timing 2 steps ...",
      "measuring the peak FLOP rate again ..."]
  json.dumps(result)
  assert result["bench"] == "step" and result["devices"] == 8
  c = config.toy
  assert result["model_flops_per_step"] == 16 * 6 * c.length * (c.embed * c.mlp + c.mlp * c.vocab)
  # XLA counts the matmuls plus elementwise work (per sample) and the optimizer (per step, on
  # every replica). The difference between two batch sizes drops the optimizer: what is left is
  # the matmuls the model counts plus 5-10 % of elementwise work (7.2 % measured).
  larger = bench.run_bench_step(toy.toy_config(batch_size=64), steps=1, warmup=0)
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
