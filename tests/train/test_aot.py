"""mmjax aot: topology names, a real TPU compile through libtpu, and the lowered-only fallback."""

import json
import re

import jax
import jax.numpy as jnp
import pytest

from mmjax import cli
from mmjax import config as mmconfig
from mmjax.errors import UserError
from mmjax.models import grouped as mmgrouped
from mmjax.models import layers
from mmjax.models.configs import model_config
from mmjax.train import aot, hlo_flops, toy
from mmjax.train import flops as mmflops


@pytest.mark.parametrize("text, name, chips", [
    ("v5p:2x2x2", "v5p:2x2x2", 8), ("v5litepod:2x4", "v5e:2x4", 8), ("V6E:4x4", "v6e:4x4", 16),
    ("v4:2x2x1", "v4:2x2x1", 4),
])
def test_parse_topology(text, name, chips):
  topology = aot.parse_topology(text)
  assert topology.name == name and topology.chips == chips


@pytest.mark.parametrize("text, message", [
    ("v5p-16", "expected KIND"), ("v5p:2x2", "3 positive sizes"), ("v6e:0x4", "2 positive"),
    ("tpu:2x2", "unknown TPU kind"),
])
def test_bad_topologies_are_user_errors(text, message):
  with pytest.raises(UserError, match=message):
    aot.parse_topology(text)


def test_compile_for_a_topology_reports_memory_flops_and_files(tmp_path):
  assert aot.tpu_compiler_available(), "libtpu is in the test extras (pip install -e .[test])"
  config = toy.toy_config(batch_size=16)
  config.toy.update(embed=128, mlp=256)
  result = aot.run_aot(config, "v5e:2x2", out_dir=str(tmp_path))
  json.dumps(result)
  assert result["compiled"] and result["device_kind"] == "TPU v5 lite"
  assert result["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1, "expert": 1}
  memory = result["memory_per_chip"]
  # The state is donated: its outputs alias its arguments, which hold at least the sharded state
  # (TPU layouts pad small arrays, so not exactly).
  assert memory["argument_bytes"] >= result["state_bytes_per_chip"] + result["batch_bytes_per_chip"]
  assert memory["alias_bytes"] >= result["state_bytes_per_chip"]
  assert memory["total_bytes"] == (memory["argument_bytes"] + memory["output_bytes"]
                                   - memory["alias_bytes"] + memory["temp_bytes"]
                                   + memory["generated_code_bytes"])
  assert result["fits"] and result["hbm_bytes_per_chip"] == 16 * 2 ** 30
  # XLA's count covers the model's matmuls (each chip does a quarter of the batch) plus the
  # optimizer and elementwise work.
  ratio = result["xla_flops_per_chip"] / result["model_flops_per_chip"]
  assert 0.9 < ratio < 3.0, ratio
  assert "HloModule" in (tmp_path / "step.hlo.txt").read_text()
  assert (tmp_path / "step.executable").stat().st_size > 0
  assert json.loads((tmp_path / "aot.json").read_text())["aot"] == "v5e:2x2"


def test_a_program_too_big_for_the_chip_does_not_fit():
  config = toy.toy_config(batch_size=4)
  config.toy.update(vocab=65536, embed=8192, mlp=16384)   # 1.7G params: 21 GB of fp32 Adam state
  result = aot.run_aot(config, "v5e:2x2", lower_only=True)
  assert result["state_bytes_per_chip"] > 16 * 2 ** 30 and result["state_fits"] is False


def test_lower_only_reports_sharded_state_bytes_and_hlo_flops():
  replicated = toy.toy_config(batch_size=16)
  sharded = toy.toy_config(batch_size=16)
  sharded.mesh.shape.update(data=1, fsdp=8)
  a = aot.run_aot(replicated, "v5p:2x2x2", lower_only=True)
  b = aot.run_aot(sharded, "v5p:2x2x2", lower_only=True)
  for result in (a, b):
    assert not result["compiled"] and result["memory_per_chip"] is None and result["fits"] is None
    assert "libtpu" in result["note"] and result["chips"] == 8
    ratio = result["hlo_flops_per_step"] / result["model_flops_per_step"]
    assert 0.9 < ratio < 3.0, ratio
  assert b["mesh"]["fsdp"] == 8
  # fsdp shards every parameter with an "embed" axis (and its two Adam moments) 8 ways.
  c = replicated.toy
  embed_params = c.vocab * c.embed + c.length * c.embed + 2 * c.embed + c.embed * c.mlp
  saved = 3 * 4 * embed_params * 7 // 8
  assert a["state_bytes_per_chip"] - b["state_bytes_per_chip"] == saved


def test_lowering_needs_enough_cpu_devices():
  with pytest.raises(UserError, match="needs 16 CPU devices"):
    aot.run_aot(toy.toy_config(batch_size=16), "v6e:4x4", lower_only=True)


def test_the_topology_is_the_model_target():
  config = mmconfig.load("configs/fourm/shapes.py:tiny,runlocal")
  assert aot._target_tpu(config) == {"model.platform": "tpu"}
  cfg = model_config(config)
  assert (cfg.platform, cfg.dtype) == ("tpu", "bfloat16")  # "auto" dtype follows the target
  config.model.dtype = "float32"   # an explicit choice is kept
  assert model_config(config).dtype == "float32"


@pytest.mark.slow
def test_compiled_flops_count_every_layer_and_splash_runs_on_tpu(tmp_path):
  """The scanned layers' loop body and the splash kernels count once per execution: compiled
  FLOPs land within 10% above the analytic model FLOPs."""
  config = mmconfig.load("configs/decoder/shapes.py:tiny", ["--config.train.batch_size=8",
                                                            "--config.model.d_model=512"])
  result = aot.run_aot(config, "v5e:2x2", out_dir=str(tmp_path))
  assert 1.0 <= result["flops_ratio"] <= 1.10, result["flops_ratio"]
  hlo = (tmp_path / "step.hlo.txt").read_text()
  assert "splash_mha_fwd" in hlo and "splash_mha_dkv" in hlo
  # One kernel of each kind per attention of the scanned layer's body: forward and the fused
  # backward (dk/dv and dq in one kernel: no separate dq kernel).
  assert set(result["splash_kernels"]) == {"splash_mha_fwd", "splash_mha_dkv"}
  assert result["roofline_step_s"] == max(result["roofline_compute_s"],
                                          result["roofline_memory_s"])


def test_a_step_that_does_not_fit_is_one_line(tmp_path, capsys):
  path = tmp_path / "too_big.py"
  path.write_text(
      "from mmjax.train import toy\n\n\n"
      "def get_config(arg=None):\n"
      "  config = toy.toy_config(batch_size=4096)\n"
      "  config.toy.update(dict(vocab=4096, embed=256, mlp=8192, length=1024))\n"
      "  config.mesh.shape.update(dict(data=-1, fsdp=1, tensor=1))\n"
      "  return config\n")
  code = cli.main(["aot", f"--config={path}", "--topology=v5e:2x2"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code != 0
  lines = [line for line in err if line.startswith("mmjax:")]
  assert len(lines) == 1 and "Traceback" not in "\n".join(err)
  assert re.fullmatch(r"mmjax: error: the train step does not fit v5e:2x2: HLO temporaries need "
                      r"[0-9.]+G per chip, HBM has 15.75G; largest values \(global shapes\): "
                      r"f32\[4096,1024,8192\] 128.0 GiB, .*", lines[0]), lines[0]


def test_hlo_flops_scale_loop_bodies_by_their_trip_counts():
  def f(x, ws):  # 5 layers, each an inner loop of 3 matmuls
    def layer(c, w):
      return jax.lax.scan(lambda c2, _: (jnp.tanh(c2 @ w), None), c, None, length=3)[0], None
    return jax.lax.scan(layer, x, ws)[0].sum()

  x, ws = jnp.ones((8, 64)), jnp.ones((5, 64, 64))
  compiled = jax.jit(jax.grad(f, argnums=1)).lower(x, ws).compile()
  once, every = hlo_flops.loop_flops(compiled.as_text())
  matmuls = 2 * 8 * 64 * 64 * 5 * 3 * 3  # forward and two backward matmuls per iteration
  assert every == matmuls and once == matmuls / 15
  xla = compiled.cost_analysis()["flops"]
  assert xla < matmuls / 10 and mmflops.compiled_flops(compiled) >= matmuls


def test_tpu_convolutions_and_grouped_matmuls_count_as_xla_counts_them():
  """The TPU compiler writes batched dot products as convolutions whose padded, reversed windows
  stand for the batch axes, and ragged_dot as a kernel plus a group-masked convolution: per
  instruction the walk must agree with XLA's own cost analysis (no loops here to scale)."""
  devices = aot.topology_devices(aot.parse_topology("v5e:2x2"))
  mesh = jax.sharding.Mesh(devices[:1], ("x",))

  def spec(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))

  def heads(x, w):  # the 4M/decoder QKV projection: [B, L, D] x [D, 3, H, K]
    return jnp.einsum("abc,cdef->abdef", x, w, preferred_element_type=jnp.float32).sum()

  def grouped(x, w, sizes):
    return jax.lax.ragged_dot(x, w, sizes, preferred_element_type=jnp.float32).sum()

  def grouped_tpu(x, w, sizes):  # the model's TPU path: megablox tgmm for the weight gradient
    with layers.target("tpu"):
      return mmgrouped.ragged_matmul(x, w, sizes, jnp.bfloat16).sum()

  cases = [(jax.grad(heads, argnums=(0, 1)), (spec((8, 128, 256)), spec((256, 3, 4, 64))),
            2 * 2 * 8 * 128 * 256 * 3 * 4 * 64),
           # dx as a kernel (2·M·K·N) and dw as a convolution over every group (G·2·M·K·N)
           (jax.grad(grouped, argnums=(0, 1)), (spec((512, 256)), spec((4, 256, 384)),
                                                spec((4,), jnp.int32)),
            (1 + 4) * 2 * 512 * 256 * 384),
           # dx as a kernel and dw as the grouped tgmm kernel: 2·M·K·N each
           (jax.grad(grouped_tpu, argnums=(0, 1)), (spec((512, 256)), spec((4, 256, 384)),
                                                    spec((4,), jnp.int32)),
            (1 + 1) * 2 * 512 * 256 * 384)]
  for fn, args, expected in cases:
    compiled = jax.jit(fn).lower(*args).compile()
    once, every = hlo_flops.loop_flops(compiled.as_text())
    assert once == every == pytest.approx(expected, rel=1e-3)
    assert compiled.cost_analysis()["flops"] == pytest.approx(expected, rel=1e-2)  # + sums


def test_bytes_accessed_scale_loop_bodies_by_their_trip_counts():
  def f(x, ws):
    return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)[0].sum()

  x = jnp.ones((64, 256))
  short = jax.jit(f).lower(x, jnp.ones((2, 256, 256))).compile()
  long = jax.jit(f).lower(x, jnp.ones((12, 256, 256))).compile()
  once_short, every_short = hlo_flops.loop_bytes(short.as_text())
  once_long, every_long = hlo_flops.loop_bytes(long.as_text())
  # 10 more iterations read 10 more [256, 256] weights at least (plus the carry each time).
  assert every_long - every_short >= 10 * 256 * 256 * 4
  assert once_long - once_short < 10 * 256 * 256 * 4  # counted once, only the inputs grow
  xla = long.cost_analysis()["bytes accessed"]
  assert hlo_flops.loop_scaled_bytes(xla, long.as_text()) == xla + every_long - once_long


def test_windowed_einsum_loops_count_by_their_step():
  """An fsdp-sharded matmul compiles to a windowed einsum loop that the TPU compiler unrolls by 2:
  its counter runs 0, 2 < 4 (two iterations of a body holding two matmuls, one per direction of
  the ring). Counted as `bound` iterations, every such matmul counted twice (the 1B decoder on
  v5p:2x2x2 read 1.93x the analytic FLOPs)."""
  devices = aot.topology_devices(aot.parse_topology("v5p:2x2x2"))
  mesh = jax.sharding.Mesh(devices, ("fsdp",))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None))
  n, d, f = 8192, 512, 1024
  x = jax.ShapeDtypeStruct((n, d), jnp.bfloat16, sharding=rows)
  w = jax.ShapeDtypeStruct((d, f), jnp.bfloat16, sharding=rows)  # gathered for the matmul

  def matmul(x, w):
    y = jnp.einsum("nd,df->nf", x, w, preferred_element_type=jnp.bfloat16)
    return jax.lax.with_sharding_constraint(y, rows)

  text = jax.jit(matmul).lower(x, w).compile().as_text()
  assert "windowed_dot_general" in text  # else this test no longer covers the unrolled loop
  _, every = hlo_flops.loop_flops(text)
  assert every == 2 * n * d * f / len(devices)


def _loop_module(start: int, bound: int, step: int, direction: str = "LT") -> str:
  """An HLO module whose while loop runs a [8, 16] x [16, 32] dot per iteration, its counter
  (tuple element 1) starting at `start`, compared with `bound`, advanced by `step`."""
  op, amount = ("add", step) if step > 0 else ("subtract", -step)
  state = "(f32[8,16], s32[], f32[16,32])"
  return f"""HloModule m

%body (p: {state}) -> {state} {{
  %p = {state} parameter(0)
  %x = f32[8,16]{{1,0}} get-tuple-element(%p), index=0
  %i = s32[]{{:T(128)}} get-tuple-element(%p), index=1
  %w = f32[16,32]{{1,0}} get-tuple-element(%p), index=2
  %y = f32[8,32]{{1,0}} dot(%x, %w), lhs_contracting_dims={{1}}, rhs_contracting_dims={{0}}
  %c = s32[]{{:T(128)}} constant({amount})
  %next = s32[]{{:T(128)}} {op}(%i, %c)
  ROOT %t = {state} tuple(%x, %next, %w)
}}

%cond (q: {state}) -> pred[] {{
  %q = {state} parameter(0)
  %j = s32[]{{:T(128)}} get-tuple-element(%q), index=1
  %b = s32[]{{:T(128)}} constant({bound})
  ROOT %lt = pred[]{{:T(512)}} compare(%j, %b), direction={direction}
}}

ENTRY %main (a: f32[8,16], v: f32[16,32]) -> f32[8,16] {{
  %a = f32[8,16]{{1,0}} parameter(0)
  %v = f32[16,32]{{1,0}} parameter(1)
  %s = s32[]{{:T(128)}} constant({start})
  %s2 = s32[]{{:T(128)}} copy(%s)
  %init = {state} tuple(%a, %s2, %v)
  %loop = {state} while(%init), condition=%cond, body=%body
  ROOT %out = f32[8,16]{{1,0}} get-tuple-element(%loop), index=0
}}
"""


@pytest.mark.parametrize("start, bound, step, direction, trips", [
    (0, 4, 1, "LT", 4), (0, 4, 2, "LT", 2), (1, 8, 2, "LT", 4), (0, 4, 2, "LE", 3),
    (5, 0, -1, "GT", 5), (6, 0, -4, "GE", 2), (3, 3, 1, "LT", 0),
])
def test_loop_trip_counts_follow_the_counter(start, bound, step, direction, trips):
  once, every = hlo_flops.loop_flops(_loop_module(start, bound, step, direction))
  assert once == 2 * 8 * 16 * 32 and every == trips * once
