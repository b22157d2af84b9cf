"""Matmul FLOPs of an optimised HLO module with every loop body counted as often as it runs.

XLA's cost analysis counts the body of a while loop once, so a program whose layers run under
`lax.scan` reports the FLOPs of one layer. This walks the module's text instead: the FLOPs of each
`dot` and `convolution` (2 x output elements x contracted size), through fusions and calls, with
a while loop's body multiplied by its trip count (`known_trip_count` in its backend config, else
the bound of its condition). Splash attention kernels (custom calls XLA gives no cost) count the
matmuls they run: 2 forward, 3 for dq, 4 for dk/dv, each 2·L·S·D per head, over the blocks their
mask visits (the name scope of `mmjax.models.attention` says causal or full). `loop_scaled_flops`
adds the loops' further iterations and the kernels to XLA's own total.
"""

from __future__ import annotations

import functools
import math
import re

SPLASH_SCOPE = "mmjax_splash_"  # mmjax.models.attention.SPLASH_SCOPE (no import: train reads HLO)
SPLASH_BLOCK = 128
_SPLASH_MATMULS = {"splash_mha_fwd": 2, "splash_mha_dq": 3, "splash_mha_dkv": 4}
_SHAPE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\((.*)\)\s+->\s+.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s+=\s+(.+?)\s+([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"^[a-z]+[0-9]*\[([0-9,]*)\]")
_PARAM = re.compile(r"%?([\w.\-]+):\s+([a-z]+[0-9]*\[[0-9,]*\])")


def _dims(shape: str) -> list[int] | None:
  match = _ARRAY.match(shape.strip())
  if not match:
    return None
  return [int(d) for d in match.group(1).split(",") if d]


class _Module:
  def __init__(self, text: str, kernels: bool = True):
    self.kernels = kernels
    self.computations: dict[str, list[tuple[str, str, str, str]]] = {}
    self.shapes: dict[str, dict[str, str]] = {}
    self.entry = None
    current = None
    for line in text.splitlines():
      header = _HEADER.match(line)
      if header and not line.startswith(" "):
        current = header.group(1)
        self.computations[current] = []
        self.shapes[current] = dict(_PARAM.findall(header.group(2)))
        if line.startswith("ENTRY"):
          self.entry = current
        continue
      if current is None:
        continue
      if line.rstrip() == "}":
        current = None
        continue
      match = _INSTRUCTION.match(line)
      if match:
        name, shape, op, rest = match.groups()
        self.shapes[current][name] = shape
        self.computations[current].append((name, shape, op, rest))
      elif self.computations[current]:  # an attribute continued on the next line (kernel configs)
        name, shape, op, rest = self.computations[current][-1]
        self.computations[current][-1] = (name, shape, op, rest + "\n" + line)

  def _operand_shape(self, computation: str, rest: str, index: int) -> list[int] | None:
    operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
    if len(operands) <= index:
      return None
    return _dims(self.shapes[computation].get(operands[index], ""))

  def _instruction_flops(self, computation: str, shape: str, op: str, rest: str) -> float:
    if op == "custom-call" and SPLASH_SCOPE in rest and self.kernels:
      return _splash_flops(rest)
    out = _dims(shape)
    if out is None:
      return 0.0
    if op == "dot":
      lhs = self._operand_shape(computation, rest, 0)
      match = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest)
      if lhs is None or not match:
        return 0.0
      contracted = math.prod(lhs[int(d)] for d in match.group(1).split(",") if d)
      return 2.0 * math.prod(out) * contracted
    if op == "convolution":
      kernel = self._operand_shape(computation, rest, 1)
      labels = re.search(r"dim_labels=[^_]*_([^-]*)->", rest)
      if kernel is None or not labels or "o" not in labels.group(1):
        return 0.0
      groups = re.search(r"feature_group_count=([0-9]+)", rest)
      per_output = math.prod(kernel) / kernel[labels.group(1).index("o")]
      del groups  # grouped convolutions: each output reads its group's inputs, as counted here
      return 2.0 * math.prod(out) * per_output
    return 0.0

  def _trip_count(self, rest: str) -> int:
    """A while loop's iterations: XLA's `known_trip_count`, else the bound of a condition
    `counter < constant` (how a scan's loop reads once the TPU compiler has rewritten it)."""
    known = re.search(r'"known_trip_count":\{"n":"([0-9]+)"', rest)
    if known:
      return int(known.group(1))
    condition = re.search(r"condition=%?([\w.\-]+)", rest)
    instructions = self.computations.get(condition.group(1), []) if condition else []
    constants = {name: int(m.group(1)) for name, _, op, args in instructions
                 if op == "constant" and (m := re.match(r"(-?[0-9]+)\)", args))}
    for _, _, op, args in instructions:
      if op == "compare" and "direction=LT" in args:
        operands = re.findall(r"%([\w.\-]+)", args.split(")", 1)[0])
        if len(operands) == 2 and operands[1] in constants:
          return constants[operands[1]]
    return 1

  @functools.lru_cache(maxsize=None)  # noqa: B019 -- one module, walked twice
  def flops(self, computation: str, loops: bool) -> float:
    total = 0.0
    for _, shape, op, rest in self.computations.get(computation, []):
      total += self._instruction_flops(computation, shape, op, rest)
      if op == "while":
        body = re.search(r"body=%?([\w.\-]+)", rest)
        count = self._trip_count(rest) if loops else 1
        if body:
          total += count * self.flops(body.group(1), loops)
        continue
      for called in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", rest):
        total += self.flops(called, loops)
      branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
      if branches:  # a conditional runs one branch: count the dearest
        names = [b.strip().lstrip("%") for b in branches.group(1).split(",")]
        total += max((self.flops(b, loops) for b in names), default=0.0)
    return total


def _splash_flops(rest: str) -> float:
  """Matmul FLOPs of one splash kernel call from its q, k shapes [B, H, L, D], [B, G, S, D]."""
  name = re.search(r'op_name="[^"]*/(splash_mha_(?:fwd|dq|dkv))', rest)
  at = rest.find("operand_layout_constraints={")
  # q and k are the first floating-point operands; a batch of one shard loses its batch axis.
  operands = [[1] * (4 - len(shape)) + shape for dtype, dims in _SHAPE.findall(rest[at:])
              if dtype in ("bf16", "f16", "f32") and len(shape := [int(d) for d in dims.split(",")
                                                                   if d]) in (3, 4)][:2]
  if not name or at < 0 or len(operands) < 2:
    return 0.0
  q, k = operands
  b, h, lq, d = q
  s = k[2]
  blocks = max(1, lq // SPLASH_BLOCK)
  visited = (blocks + 1) / (2 * blocks) if f"{SPLASH_SCOPE}causal" in rest else 1.0
  return _SPLASH_MATMULS[name.group(1)] * 2.0 * b * h * lq * s * d * visited


def loop_flops(hlo_text: str, kernels: bool = True) -> tuple[float, float]:
  """(matmul FLOPs with loop bodies counted once, with them counted per iteration)."""
  module = _Module(hlo_text, kernels)
  if module.entry is None:
    return 0.0, 0.0
  return module.flops(module.entry, False), module.flops(module.entry, True)


def loop_scaled_flops(xla_flops: float, hlo_text: str) -> float:
  """XLA's FLOP count with the matmuls of every loop body's further iterations and of the
  attention kernels added."""
  once, _ = loop_flops(hlo_text, kernels=False)
  _, every = loop_flops(hlo_text, kernels=True)
  return xla_flops + (every - once)
