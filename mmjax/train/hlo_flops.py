"""Matmul FLOPs of an optimised HLO module with every loop body counted as often as it runs.

XLA's cost analysis counts the body of a while loop once, so a program whose layers run under
`lax.scan` reports the FLOPs of one layer. This walks the module's text instead: the FLOPs of each
`dot` (2 x output elements x contracted size) and `convolution` (as XLA counts it), through
fusions and calls, with
a while loop's body multiplied by its trip count (`known_trip_count` in its backend config, else
from its counter: where it starts, the bound its condition compares it with, the step its body
adds). Splash attention kernels (custom calls XLA gives no cost) count the
matmuls they run: 2 forward, 3 for dq, 4 for dk/dv, 5 for the fused dk/dv kernel that also writes
dq (no dq kernel then), each 2·L·S·D per head, over the blocks their mask visits (the name scope
of `mmjax.models.attention` says causal or full). The grouped matmuls
(`ragged_dot`'s custom calls, and megablox's `tgmm` kernel of their weight gradient on TPU, named by
`mmjax.models.grouped`'s scope) XLA does count, once: a loop body's further iterations add them.
`loop_scaled_flops` adds the loops' further iterations and the attention kernels to XLA's own
total.
"""

from __future__ import annotations

import functools
import math
import re

SPLASH_SCOPE = "mmjax_splash_"  # mmjax.models.attention.SPLASH_SCOPE (no import: train reads HLO)
SPLASH_BLOCK = 128
TGMM_SCOPE = "mmjax_tgmm"  # mmjax.models.grouped.TGMM_SCOPE
_SPLASH_MATMULS = {"splash_mha_fwd": 2, "splash_mha_dq": 3, "splash_mha_dkv": 4,
                   "splash_mha_dkv_fused": 5}
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
    self.roots: dict[str, str] = {}  # computation -> its ROOT instruction
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
        if line.lstrip().startswith("ROOT "):
          self.roots[current] = name
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
      return _splash_flops(shape, rest)
    if op == "custom-call" and "ragged-dot" in rest:  # XLA counts these: in both totals
      return _ragged_dot_flops(shape, rest)
    if op == "custom-call" and TGMM_SCOPE in rest:  # its cost estimate: in both totals
      return _tgmm_flops(rest)
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
      return self._convolution_flops(computation, out, rest)
    return 0.0

  def _convolution_flops(self, computation: str, out: list[int], rest: str) -> float:
    """2 x batch x input features x output features (per group) x the (output, kernel) position
    pairs of each spatial dimension that read an input element rather than padding or a dilation
    hole: how XLA's cost analysis counts a convolution. The TPU compiler rewrites batched dot
    products as convolutions whose padded, reversed windows stand for the batch axes; a count of
    output elements x kernel window would multiply those axes in twice."""
    lhs = self._operand_shape(computation, rest, 0)
    rhs = self._operand_shape(computation, rest, 1)
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", rest)
    if lhs is None or rhs is None or not labels:
      return 0.0
    lhs_labels, rhs_labels, out_labels = labels.groups()
    if not (len(lhs_labels) == len(lhs) and len(rhs_labels) == len(rhs)
            and len(out_labels) == len(out)):
      return 0.0
    window = _window(rest, len(lhs) - 2)
    valid = 1
    for d, (stride, low, base, dilation) in enumerate(window):
      size_in = lhs[lhs_labels.index(str(d))]
      size_kernel = rhs[rhs_labels.index(str(d))]
      size_out = out[out_labels.index(str(d))]
      count = 0
      for k in range(size_kernel):
        for o in range(size_out):
          at = o * stride - low + k * dilation   # position in the base-dilated, padded input
          if at % base == 0 and 0 <= at // base < size_in:
            count += 1
      valid *= count
    groups = re.search(r"feature_group_count=([0-9]+)", rest)
    batch_groups = re.search(r"batch_group_count=([0-9]+)", rest)
    features_in = lhs[lhs_labels.index("f")] // (int(groups.group(1)) if groups else 1)
    batch = lhs[lhs_labels.index("b")] // (int(batch_groups.group(1)) if batch_groups else 1)
    return 2.0 * batch * features_in * out[out_labels.index("o" if "o" in out_labels else "f")] \
        * valid

  def _trip_count(self, computation: str, rest: str) -> int:
    """A while loop's iterations: XLA's `known_trip_count`, else read off the loop itself (how a
    scan's loop, or a windowed einsum's, reads once the TPU compiler has rewritten it): the
    condition compares a counter of the loop's tuple with a constant bound, the body adds a
    constant step to that counter, and the while's operand starts it at a constant. The step
    matters: the TPU compiler unrolls the windowed einsum loops of sharded matmuls by 2, so their
    counter runs 0, 2 < 4, two iterations of a body that holds two matmuls, not four."""
    known = re.search(r'"known_trip_count":\{"n":"([0-9]+)"', rest)
    if known:
      return int(known.group(1))
    condition = re.search(r"condition=%?([\w.\-]+)", rest)
    body = re.search(r"body=%?([\w.\-]+)", rest)
    bound = self._loop_bound(condition.group(1)) if condition else None
    if bound is None:
      return 1
    index, direction, limit = bound
    known_counter = index >= 0
    step = self._loop_step(body.group(1), index) if body and known_counter else None
    start = self._loop_start(computation, rest, index) if known_counter else None
    step = 1 if step is None else step
    start = 0 if start is None else start
    if direction == "GT":  # counting down: i > limit
      direction, start, limit, step = "LT", -start, -limit, -step
    elif direction == "GE":
      direction, start, limit, step = "LE", -start, -limit, -step
    if step <= 0:
      return 1
    span = limit - start + (1 if direction == "LE" else 0)
    return max(0, -(-span // step))

  def _by_name(self, computation: str) -> dict[str, tuple[str, str, str]]:
    return {name: (shape, op, args) for name, shape, op, args in
            self.computations.get(computation, [])}

  @staticmethod
  def _operands(args: str) -> list[str]:
    return re.findall(r"%([\w.\-]+)", args.split(")", 1)[0])

  def _through(self, instructions: dict, name: str) -> tuple[str, str, str]:
    """`name`'s instruction, looking through copies, converts and bitcasts."""
    shape, op, args = instructions.get(name, ("", "", ""))
    while op in ("copy", "convert", "bitcast") and self._operands(args):
      shape, op, args = instructions.get(self._operands(args)[0], ("", "", ""))
    return shape, op, args

  def _constant(self, instructions: dict, name: str) -> int | None:
    _, op, args = self._through(instructions, name)
    match = re.match(r"(-?[0-9]+)\)", args) if op == "constant" else None
    return int(match.group(1)) if match else None

  def _counter(self, instructions: dict, name: str) -> int | None:
    """The tuple index of the loop state `name` reads (get-tuple-element of the parameter)."""
    _, op, args = self._through(instructions, name)
    index = re.search(r"index=([0-9]+)", args) if op == "get-tuple-element" else None
    return int(index.group(1)) if index else None

  def _loop_bound(self, condition: str) -> tuple[int, str, int] | None:
    """(counter index, direction, bound) of a condition `counter <op> constant`."""
    instructions = self._by_name(condition)
    flipped = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE"}
    names = [self.roots[condition]] if condition in self.roots else []
    names += [n for n, (_, op, _) in instructions.items() if op == "compare"]
    for name in names:
      _, op, args = instructions.get(name, ("", "", ""))
      direction = re.search(r"direction=([A-Z]+)", args)
      operands = self._operands(args)
      if op != "compare" or not direction or direction.group(1) not in flipped \
          or len(operands) != 2:
        continue
      lhs, rhs = operands
      if (limit := self._constant(instructions, rhs)) is not None \
          and (index := self._counter(instructions, lhs)) is not None:
        return index, direction.group(1), limit
      if (limit := self._constant(instructions, lhs)) is not None \
          and (index := self._counter(instructions, rhs)) is not None:
        return index, flipped[direction.group(1)], limit
    for name in names:  # a counter this walk cannot follow: `... < constant`, counted from 0 by 1
      _, op, args = instructions.get(name, ("", "", ""))
      operands = self._operands(args)
      if op == "compare" and "direction=LT" in args and len(operands) == 2 \
          and (limit := self._constant(instructions, operands[1])) is not None:
        return -1, "LT", limit
    return None

  def _loop_step(self, body: str, index: int) -> int | None:
    """The constant the body adds to (or subtracts from) counter `index` each iteration."""
    instructions = self._by_name(body)
    _, op, args = instructions.get(self.roots.get(body, ""), ("", "", ""))
    operands = self._operands(args)
    if op != "tuple" or index >= len(operands):
      return None
    _, op, args = self._through(instructions, operands[index])
    pair = self._operands(args)
    if op not in ("add", "subtract") or len(pair) != 2:
      return None
    orders = [(pair[0], pair[1])] + ([(pair[1], pair[0])] if op == "add" else [])
    for counter, constant in orders:
      step = self._constant(instructions, constant)
      if step is not None and self._counter(instructions, counter) == index:
        return step if op == "add" else -step
    return None

  def _loop_start(self, computation: str, rest: str, index: int) -> int | None:
    """The constant counter `index` starts at: element `index` of the while's operand tuple."""
    instructions = self._by_name(computation)
    operands = self._operands(rest)
    if not operands:
      return None
    _, op, args = self._through(instructions, operands[0])
    elements = self._operands(args)
    if op != "tuple" or index >= len(elements):
      return None
    return self._constant(instructions, elements[index])

  @functools.lru_cache(maxsize=None)  # noqa: B019 -- one module, walked twice
  def flops(self, computation: str, loops: bool) -> float:
    total = 0.0
    for _, shape, op, rest in self.computations.get(computation, []):
      total += self._instruction_flops(computation, shape, op, rest)
      if op == "while":
        body = re.search(r"body=%?([\w.\-]+)", rest)
        count = self._trip_count(computation, rest) if loops else 1
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


_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
               "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
# Instructions that move no data of their own (views, tuples) or whose traffic the computations
# they run are counted for; an async pair is counted once, at its start.
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call",
               "conditional", "after-all", "partition-id", "replica-id"}


def _array_bytes(shape: str) -> int:
  return sum(math.prod(int(d) for d in dims.split(",") if d) * _ITEM_BYTES.get(dtype, 0)
             for dtype, dims in _SHAPE.findall(shape.split("{", 1)[0] if "(" not in shape
                                               else shape))


class _Traffic(_Module):
  """HBM bytes each top-level instruction reads and writes (a fusion's operands and results, not
  its insides), with loop bodies counted per iteration: what XLA's "bytes accessed" adds up."""

  @functools.lru_cache(maxsize=None)  # noqa: B019 -- one module, walked twice
  def bytes(self, computation: str, loops: bool) -> float:
    total = 0.0
    shapes = self.shapes.get(computation, {})
    for _, shape, op, rest in self.computations.get(computation, []):
      if op == "while":
        body = re.search(r"body=%?([\w.\-]+)", rest)
        if body:
          total += ((self._trip_count(computation, rest) if loops else 1)
                    * self.bytes(body.group(1), loops))
        continue
      if op == "call":
        for called in re.findall(r"to_apply=%?([\w.\-]+)", rest):
          total += self.bytes(called, loops)
        continue
      branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
      if branches:
        names = [b.strip().lstrip("%") for b in branches.group(1).split(",")]
        total += max((self.bytes(b, loops) for b in names), default=0.0)
        continue
      if op in _NO_TRAFFIC or op.endswith("-done"):
        continue
      operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
      fused = re.search(r"calls=%?([\w.\-]+)", rest) if op == "fusion" else None
      read = [self._read_bytes(fused.group(1) if fused else None, op, i, shapes.get(o, ""), shape)
              for i, o in enumerate(operands)]
      written = _array_bytes(shape)
      if op == "dynamic-update-slice" and len(operands) > 1:  # updated where it lies
        written = _array_bytes(shapes.get(operands[1], ""))
      elif fused:
        written = self._in_place_update_bytes(fused.group(1), written)
      total += written + sum(read)
    return total

  def _read_bytes(self, fused: str | None, op: str, index: int, shape: str, out: str) -> float:
    """Bytes read of one operand: all of it, except where only a slice of it is read (the
    scanned layers' stacked weights, one layer per iteration) or it is a buffer updated in place."""
    if fused is None:
      if op == "dynamic-slice" and index == 0:
        return _array_bytes(out)
      if op == "dynamic-update-slice" and index == 0:
        return 0.0
      return _array_bytes(shape)
    params = list(self.shapes.get(fused, {}))
    if index >= len(params):
      return _array_bytes(shape)
    return min(_array_bytes(shape), self._value_read(fused, params[index]))

  def _value_read(self, computation: str, value: str) -> float:
    """Bytes of `value` that `computation` reads, following bitcasts and nested fusions."""
    total = 0.0
    full = _array_bytes(self.shapes[computation].get(value, ""))
    for name, shape, op, rest in self.computations.get(computation, []):
      operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
      if value not in operands:
        continue
      at = operands.index(value)
      if op == "dynamic-slice" and at == 0:
        total += _array_bytes(shape)
      elif op == "dynamic-update-slice" and at == 0:
        continue
      elif op == "bitcast":
        total += self._value_read(computation, name)
      elif op == "fusion" and (inner := re.search(r"calls=%?([\w.\-]+)", rest)):
        params = list(self.shapes.get(inner.group(1), {}))
        total += (self._value_read(inner.group(1), params[at]) if at < len(params) else full)
      else:
        return full
    return total

  def _in_place_update_bytes(self, fused: str, written: float) -> float:
    """A fusion's results that are dynamic-update-slices write only their updates."""
    instructions = self.computations.get(fused, [])
    if not instructions:
      return written
    by_name = {name: (shape, op, rest) for name, shape, op, rest in instructions}

    def result_bytes(name: str) -> float:
      shape, op, rest = by_name.get(name, ("", "", ""))
      operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
      if op == "bitcast" and operands:
        return result_bytes(operands[0])
      if op == "dynamic-update-slice" and len(operands) > 1:
        return _array_bytes(self.shapes[fused].get(operands[1], ""))
      return _array_bytes(shape)

    root, _, op, rest = instructions[-1]
    if op == "tuple":
      return sum(result_bytes(o) for o in re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0]))
    return result_bytes(root)


def loop_bytes(hlo_text: str) -> tuple[float, float]:
  """(bytes accessed with loop bodies counted once, with them counted per iteration)."""
  module = _Traffic(hlo_text)
  if module.entry is None:
    return 0.0, 0.0
  return module.bytes(module.entry, False), module.bytes(module.entry, True)


def loop_scaled_bytes(xla_bytes: float, hlo_text: str) -> float:
  """XLA's bytes accessed with every loop body's further iterations added."""
  once, every = loop_bytes(hlo_text)
  return xla_bytes + (every - once)


def splash_kernels(hlo_text: str) -> dict[str, int]:
  """How many splash attention kernels (Pallas/Mosaic custom calls) the program holds, by kind."""
  counts: dict[str, int] = {}
  for instructions in _Module(hlo_text).computations.values():
    for _, _, op, rest in instructions:
      kind = re.search(r'op_name="[^"]*/(splash_mha_(?:fwd|dq|dkv))', rest)
      if op == "custom-call" and kind:
        counts[kind.group(1)] = counts.get(kind.group(1), 0) + 1
  return dict(sorted(counts.items()))


def _window(rest: str, spatial: int) -> list[tuple[int, int, int, int]]:
  """(stride, low padding, base dilation, window dilation) per spatial dimension of a
  convolution's `window={size=.. stride=.. pad=lo_hi.. lhs_dilate=.. rhs_dilate=..}`."""
  match = re.search(r"window=\{([^}]*)\}", rest)
  fields = dict(f.split("=", 1) for f in match.group(1).split()) if match else {}

  def values(key: str, default: int) -> list[int]:
    if key not in fields:
      return [default] * spatial
    return [int(v.split("_")[0]) for v in fields[key].split("x")]

  return list(zip(values("stride", 1), values("pad", 0), values("lhs_dilate", 1),
                  values("rhs_dilate", 1)))


def _splash_flops(result: str, rest: str) -> float:
  """Matmul FLOPs of one splash kernel call from its q, k shapes [B, H, L, D], [B, G, S, D].
  The fused dk/dv kernel is the dk/dv kernel that also returns dq's partial sums, one per key
  block: a result of one more axis than q."""
  name = re.search(r'op_name="[^"]*/(splash_mha_(?:fwd|dq|dkv))', rest)
  at = rest.find("operand_layout_constraints={")
  # q and k are the first floating-point operands; a batch of one shard loses its batch axis.
  floats = [shape for dtype, dims in _SHAPE.findall(rest[at:])
            if dtype in ("bf16", "f16", "f32")
            and len(shape := [int(d) for d in dims.split(",") if d]) in (3, 4)][:2]
  if not name or at < 0 or len(floats) < 2:
    return 0.0
  kind = name.group(1)
  if kind == "splash_mha_dkv" and any(len([d for d in dims.split(",") if d]) > len(floats[0])
                                      for _, dims in _SHAPE.findall(result)):
    kind = "splash_mha_dkv_fused"
  q, k = ([1] * (4 - len(shape)) + shape for shape in floats)
  b, h, lq, d = q
  s = k[2]
  blocks = max(1, lq // SPLASH_BLOCK)
  visited = (blocks + 1) / (2 * blocks) if f"{SPLASH_SCOPE}causal" in rest else 1.0
  return _SPLASH_MATMULS[kind] * 2.0 * b * h * lq * s * d * visited


def _ragged_dot_flops(shape: str, rest: str) -> float:
  """A grouped matmul kernel (`ragged_dot` on TPU, a custom call XLA gives no cost): every row of
  its [M, K] operand meets one group's [K, N] weight, 2·M·K·N, whichever way its operands lie."""
  out = _dims(shape)
  at = rest.find("operand_layout_constraints={")
  floats = [[int(d) for d in dims.split(",") if d] for dtype, dims in _SHAPE.findall(rest[at:])
            if dtype in ("bf16", "f16", "f32")]
  if out is None or at < 0 or len(out) != 2 or not floats or len(floats[0]) != 2:
    return 0.0
  lhs = floats[0]
  contracted = lhs[1] if lhs[0] == out[0] else lhs[0]
  return 2.0 * out[0] * out[1] * contracted


def _tgmm_flops(rest: str) -> float:
  """Megablox's grouped weight-gradient kernel: lhs [M, K] and rhs [M, N] (its first floating-point
  operands), every row in one group: 2·M·K·N, as its cost estimate tells XLA."""
  at = rest.find("operand_layout_constraints={")
  floats = [[int(d) for d in dims.split(",") if d] for dtype, dims in _SHAPE.findall(rest[at:])
            if dtype in ("bf16", "f16", "f32")]
  if at < 0 or len(floats) < 2 or len(floats[0]) != 2 or len(floats[1]) != 2:
    return 0.0
  (m, k), (_, n) = floats[0], floats[1]
  return 2.0 * m * k * n


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
