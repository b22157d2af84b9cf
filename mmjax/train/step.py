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


def make_step_fn(setup: Setup, train_config) -> Any:
  """The pure step function (not jitted)."""
  microbatches = int(train_config.microbatches)
  if microbatches < 1:
    raise ValueError(f"train.microbatches must be >= 1, got {microbatches}")
  lr_fn = make_schedule(train_config)

  def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, Any]]:
    number = state["step"] + 1
    rng = jax.random.fold_in(state["rng"], number)
    loss, metrics, grads, rest = grads_and_metrics(setup, state, batch, rng, microbatches)
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

  return step


def jit_step(setup: Setup, train_config):
  """The step jitted with state/batch shardings; the state is donated (it is rebound)."""
  replicated = NamedSharding(setup.mesh, PartitionSpec())
  return jax.jit(make_step_fn(setup, train_config),
                 in_shardings=(setup.state_shardings, setup.batch_shardings),
                 out_shardings=(setup.state_shardings, replicated), donate_argnums=0)


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
