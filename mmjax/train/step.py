"""The train step: a pure function of (state, batch) -> (state, metrics), jitted with shardings.

Gradient accumulation: the global batch of B rows is cut into `microbatches` = M slices of B/M
rows taken with stride M (row i goes to slice i % M), so every slice stays spread over all the
batch-sharding devices; a `lax.scan` sums the gradients. Each slice's loss is a mean, so the
accumulated gradient is the mean of the slices' gradients (equal to the full-batch gradient
when the objective's loss is a mean over equally weighted rows).

Non-finite guard: if the loss or the gradient norm is NaN/inf, the update is not applied (params
and optimizer state are kept) and `skipped` counts it. The host's `nan_policy` then decides:
"skip" carries on, "stop" raises. Either way no NaN ever enters the state that is saved.
The step counter advances either way (the batch was consumed); the schedule follows the optimizer's
own count of applied updates, so skipped steps do not advance the learning rate.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mmjax.train.optim import schedule as make_schedule
from mmjax.train.state import Setup, TrainState


def _loss_fn(setup: Setup):
  def loss_fn(params, rest, batch, rng):
    # copy: Variables made in this trace, so the loss may update non-Param ones (see below).
    model = nnx.merge(setup.graphdef, params, rest, copy=True)
    loss, metrics = setup.objective.loss(model, batch, rng)
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    # Non-Param state the loss updated (e.g. a VQ codebook's EMA) leaves the step with the
    # metrics; a model that mutates nothing returns `rest` unchanged.
    new_rest = jax.lax.stop_gradient(nnx.split(model, nnx.Param, ...)[2])
    return loss.astype(jnp.float32), (metrics, new_rest)
  return loss_fn


def _split_microbatches(setup: Setup, batch: dict[str, jax.Array], m: int) -> dict[str, jax.Array]:
  out = {}
  for name, x in batch.items():
    if x.shape[0] % m:
      raise ValueError(f"batch field {name!r}: {x.shape[0]} rows do not split into {m} micro-batches")
    x = x.reshape((x.shape[0] // m, m) + x.shape[1:]).swapaxes(0, 1)
    spec = setup.batch_shardings[name].spec
    out[name] = jax.lax.with_sharding_constraint(
        x, NamedSharding(setup.mesh, PartitionSpec(None, *spec)))
  return out


def grads_and_metrics(setup: Setup, state: TrainState, batch: dict[str, jax.Array],
                      rng: jax.Array, microbatches: int):
  """(loss, metrics, grads) averaged over the micro-batches, and the model's updated non-Param
  state (threaded through the micro-batches in order)."""
  grad_fn = jax.value_and_grad(_loss_fn(setup), has_aux=True)
  params, rest = state["params"], state["rest"]
  if microbatches == 1:
    (loss, (metrics, rest)), grads = grad_fn(params, rest, batch, rng)
    return loss, metrics, grads, rest

  slices = _split_microbatches(setup, batch, microbatches)

  def body(carry, xs):
    index, micro = xs
    acc, rest = carry
    (loss, (metrics, rest)), grads = grad_fn(params, rest, micro, jax.random.fold_in(rng, index))
    acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, (loss, metrics, grads))
    return (acc, rest), None

  zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  abstract = jax.eval_shape(grad_fn, params, rest, jax.tree.map(lambda x: x[0], slices), rng)
  zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), abstract[0][1][0])
  init = (jnp.zeros((), jnp.float32), zero_metrics, zero_grads)
  (total, rest), _ = jax.lax.scan(body, (init, rest), (jnp.arange(microbatches), slices))
  loss, metrics, grads = jax.tree.map(lambda x: x / microbatches, total)
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  return loss, metrics, grads, rest


def _step_parts(setup: Setup, train_config):
  """The step's two halves: `gradients(state, batch) -> (loss, metrics, grads, rest)` and
  `apply(state, loss, metrics, grads, rest) -> (state, metrics)`, the optimizer update."""
  microbatches = int(train_config.microbatches)
  if microbatches < 1:
    raise ValueError(f"train.microbatches must be >= 1, got {microbatches}")
  lr_fn = make_schedule(train_config)

  def gradients(state: TrainState, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(state["rng"], state["step"] + 1)
    return grads_and_metrics(setup, state, batch, rng, microbatches)

  def apply(state: TrainState, loss, metrics, grads, rest) -> tuple[TrainState, dict[str, Any]]:
    number = state["step"] + 1
    updates, opt_state = setup.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = dict(state, step=number, params=keep(params, state["params"]),
                     opt_state=keep(opt_state, state["opt_state"]),
                     rest=keep(rest, state["rest"]),
                     skipped=state["skipped"] + (~finite).astype(jnp.int32))
    out = dict(metrics)
    out.update(loss=loss, lr=lr_fn(number - state["skipped"]), grad_norm=grad_norm,
               param_norm=optax.tree.norm(new_state["params"]),
               update_norm=optax.tree.norm(updates), finite=finite.astype(jnp.float32),
               skipped=new_state["skipped"].astype(jnp.float32))
    return new_state, out

  return gradients, apply


def make_step_fn(setup: Setup, train_config) -> Any:
  """The pure step function (not jitted)."""
  gradients, apply = _step_parts(setup, train_config)

  def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, Any]]:
    return apply(state, *gradients(state, batch))

  return step


def jit_step(setup: Setup, train_config, *, programs: str = "auto"):
  """The step jitted with state/batch shardings; the state is donated (it is rebound).

  `programs`: "one" (one jitted function), "two" (`TwoProgramStep`) or "auto": two where every
  device of the mesh is a CPU, one elsewhere. `mmjax aot` asks for one."""
  if programs not in ("auto", "one", "two"):
    raise ValueError(f"programs must be 'auto', 'one' or 'two', got {programs!r}")
  on_cpu = all(d.platform == "cpu" for d in setup.mesh.devices.flat)
  if programs == "two" or (programs == "auto" and on_cpu):
    return TwoProgramStep(setup, train_config)
  replicated = NamedSharding(setup.mesh, PartitionSpec())
  return jax.jit(make_step_fn(setup, train_config),
                 in_shardings=(setup.state_shardings, setup.batch_shardings),
                 out_shardings=(setup.state_shardings, replicated), donate_argnums=0)


def _update_compiler_options() -> dict[str, str]:
  """XLA:CPU options of the optimizer update's program: YNNPACK fuses only its dots and
  reductions (none here but the norms) and XLA's own loop fusions take the elementwise work,
  unless the user chose the YNN fusion flag in XLA_FLAGS."""
  from mmjax import YNN_FUSION_DEFAULT, YNN_FUSION_FLAG  # noqa: PLC0415 -- the package's own

  if f"{YNN_FUSION_FLAG}={YNN_FUSION_DEFAULT}" not in os.environ.get("XLA_FLAGS", ""):
    return {}
  return {YNN_FUSION_FLAG.lstrip("-"): "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
                                      "LIBRARY_FUSION_TYPE_REDUCE"}


class TwoProgramStep:
  """The train step on XLA:CPU as two programs run one after the other: the gradients, then the
  optimizer update, which is compiled with `_update_compiler_options`. Same arguments, results
  and donation as the one-program step, and the same numbers (float rounding aside).

  Why: measured on 4M-tiny fp32 (tied heads, batch 16, 1,258 valid targets, Intel Xeon, 2
  cores, load average 2-3, the variants interleaved in one process, 5 rounds of 2 steps,
  2026-12-07), one program took 4.24 s per step (median), the two programs 3.63 s (1.17x) and
  the two with the update's elementwise work left to XLA's loop fusions 3.46 s (1.23x); the
  parameters after the same steps differed by at most 7e-9. YNNPACK's elementwise fusions
  materialise the optimizer's scalar broadcasts at the size of each parameter, and in one
  program XLA fuses the update with the backward pass's last ops.

  Behaves like a jitted function where the code uses one: call it, or `lower(...).compile()`;
  the compiled step lists its two compiled programs in `programs`."""

  def __init__(self, setup: Setup, train_config):
    gradients, apply = _step_parts(setup, train_config)
    replicated = NamedSharding(setup.mesh, PartitionSpec())
    state = setup.state_shardings
    grads = (replicated, replicated, state["params"], state["rest"])
    self._gradients = jax.jit(gradients, in_shardings=(state, setup.batch_shardings),
                              out_shardings=grads)
    self._apply = jax.jit(apply, in_shardings=(state, *grads),
                          out_shardings=(state, replicated), donate_argnums=0,
                          compiler_options=_update_compiler_options())

  def __call__(self, state: TrainState, batch: dict[str, jax.Array]):
    return self._apply(state, *self._gradients(state, batch))

  def lower(self, state, batch) -> _LoweredSteps:
    outputs = jax.eval_shape(self._gradients, state, batch)
    return _LoweredSteps(self._gradients.lower(state, batch), self._apply.lower(state, *outputs))


class _LoweredSteps:
  def __init__(self, gradients, apply):
    self.programs = (gradients, apply)

  def compile(self) -> _CompiledSteps:
    return _CompiledSteps(*(p.compile() for p in self.programs))


class _CompiledSteps:
  def __init__(self, gradients, apply):
    self.programs = (gradients, apply)

  def __call__(self, state: TrainState, batch: dict[str, jax.Array]):
    gradients, apply = self.programs
    return apply(state, *gradients(state, batch))

  def as_text(self) -> str:
    return "\n".join(p.as_text() for p in self.programs)


def jit_eval(setup: Setup):
  """Loss and metrics of one batch, without gradients (validation)."""
  loss_fn = _loss_fn(setup)

  def evaluate(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    rng = jax.random.fold_in(state["rng"], 2**31 - 1)  # not a train step number
    loss, (metrics, _) = loss_fn(state["params"], state["rest"], batch, rng)
    return dict(metrics, loss=loss)

  replicated = NamedSharding(setup.mesh, PartitionSpec())
  return jax.jit(evaluate, in_shardings=(setup.state_shardings, setup.batch_shardings),
                 out_shardings=replicated)
