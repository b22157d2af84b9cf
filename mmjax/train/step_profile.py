"""Where a compiled train step spends its time, from one `jax.profiler` trace of it.

XLA:CPU records every thunk it runs (a fusion, a dot, a copy ...) as a trace event named after the
HLO instruction. Each instruction is looked up in the compiled module's text and given
- a phase, from the JAX name stack in its metadata: `transpose(jvp(...))` is the backward pass,
  `jvp(...)` the forward pass, anything else in the step the optimizer update (with the gradient
  norm and the non-finite guard); instructions without metadata (XLA's own broadcasts and copies)
  are "unattributed";
- a kind: "attention" (inside `models.attention.ATTENTION_SCOPE`), "matmul" (a dot, or a fusion
  holding one), "copy" (copies and transposes only), "gather/scatter", "reduce", else
  "elementwise".
Times are summed per phase and kind, as shares of the summed op time. The shares are what the
profile can tell; seconds per step follow by scaling to the measured step time (ops of one step
can overlap on the thread pool, so op time and wall time differ).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
from typing import Any

import jax

from mmjax.models.attention import ATTENTION_SCOPE

_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_COPY_OPS = {"copy", "transpose", "bitcast", "parameter", "reshape", "tuple", "get-tuple-element"}
_GATHER_OPS = {"gather", "scatter", "dynamic-slice", "dynamic-update-slice"}


class _Module:
  """Instructions of an HLO module's text: opcode, metadata op_name and the ops they call."""

  def __init__(self, text: str):
    self.computations: dict[str, list[tuple[str, str, list[str]]]] = {}
    self.instructions: dict[str, tuple[str, str, list[str]]] = {}
    current = None
    for line in text.splitlines():
      head = _COMPUTATION.match(line) if not line.startswith(" ") else None
      if head:
        current = self.computations.setdefault(head.group(1), [])
        continue
      found = _INSTRUCTION.match(line)
      if found and current is not None:
        op_name = _OP_NAME.search(line)
        entry = (found.group(2), op_name.group(1) if op_name else "", _CALLS.findall(line))
        current.append(entry)
        self.instructions[found.group(1)] = entry

  def opcodes(self, name: str, depth: int = 0) -> set[str]:
    """Opcodes of an instruction and of the computations it calls (fusion bodies)."""
    opcode, _, calls = self.instructions[name]
    out = {opcode}
    for computation in calls:
      for inner_opcode, _, inner_calls in self.computations.get(computation, ()):
        out.add(inner_opcode)
        if depth < 2:
          for c in inner_calls:
            out |= {op for op, _, _ in self.computations.get(c, ())}
    return out


def phase_of(op_name: str) -> str:
  if not op_name:
    return "unattributed"
  if "transpose(jvp" in op_name:
    return "backward"
  if "jvp(" in op_name:
    return "forward"
  return "optimizer"


def kind_of(op_name: str, opcodes: set[str]) -> str:
  if ATTENTION_SCOPE in op_name:
    return "attention"
  if "dot" in opcodes or "convolution" in opcodes:
    return "matmul"
  if opcodes <= _COPY_OPS:
    return "copy"
  if opcodes & _GATHER_OPS:
    return "gather/scatter"
  if "reduce" in opcodes or "reduce-window" in opcodes:
    return "reduce"
  return "elementwise"


def _events(trace_dir: str) -> list[dict[str, Any]]:
  files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    return []
  with gzip.open(files[0], "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  return [e for e in events if e.get("ph") == "X"]


def breakdown(hlo_text: str, events: list[dict[str, Any]], steps: int = 1) -> dict[str, Any]:
  """Op time per step (s) and its shares by phase and by kind, from trace events of `steps` steps
  of the module whose compiled text is `hlo_text`."""
  module = _Module(hlo_text)
  by_phase: collections.Counter = collections.Counter()
  by_kind: collections.Counter = collections.Counter()
  for event in events:
    name = event.get("name", "")
    if name not in module.instructions:
      continue  # runtime events (executor, thread pool, Python), not HLO ops
    op_name = module.instructions[name][1]
    seconds = event.get("dur", 0) * 1e-6
    by_phase[phase_of(op_name)] += seconds
    by_kind[kind_of(op_name, module.opcodes(name))] += seconds
  total = sum(by_phase.values())
  share = lambda c: {k: round(v / total, 4) for k, v in c.most_common()} if total else {}
  return {"op_time_s": total / steps, "phases": share(by_phase), "kinds": share(by_kind)}


def profile_step(compiled, state, batch, steps: int = 1):
  """Runs `steps` steps of `compiled` under a trace; (state, breakdown dict)."""
  with tempfile.TemporaryDirectory(prefix="mmjax_profile_") as trace_dir:
    jax.profiler.start_trace(trace_dir)
    try:
      for _ in range(steps):
        state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
    finally:
      jax.profiler.stop_trace()
    events = _events(trace_dir)
  return state, breakdown(compiled.as_text(), events, steps)
