"""Train state and its sharded initialisation: abstract first, then a jitted init with shardings.

The train state is a plain pytree (a dict), so that jit, optax and Orbax all see the same thing:

  step       int32 []      updates taken (the next step is step + 1)
  params     nnx.State     the model's `nnx.Param`s, in `train.param_dtype` (float32 by default)
  rest       nnx.State     every other model variable; updates made in the loss are carried out
  opt_state  optax state   moments mirror `params`, so they carry the same logical axis names
  rng        uint32 [2]    base key; step s uses fold_in(rng, s), so a resumed run draws the same
  skipped    int32 []      updates skipped for a non-finite loss (nan_policy="skip")
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from mmjax import sharding as mmsharding
from mmjax.train.objective import Objective
from mmjax.train.optim import make_optimizer

TrainState = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything static about a run: built once, shared by init, step, checkpoint and bench."""
  objective: Objective
  mesh: Mesh
  rules: mmsharding.Rules
  graphdef: Any
  tx: optax.GradientTransformation
  abstract_state: TrainState          # ShapeDtypeStructs with shardings (for Orbax restore)
  state_shardings: TrainState
  batch_shardings: dict[str, NamedSharding]
  init: Any                           # jitted () -> TrainState, with out_shardings

  def context(self):
    """Mesh + logical rules, active while tracing anything of this run."""
    return _context(self.mesh, self.rules)


def _context(mesh: Mesh, rules: mmsharding.Rules) -> contextlib.ExitStack:
  """The mesh, the logical axis rules and lazy sharding, entered together, left in reverse."""
  stack = contextlib.ExitStack()
  for manager in (jax.set_mesh(mesh), nnx.logical_axis_rules(rules),
                  nnx.use_eager_sharding(False)):
    stack.enter_context(manager)
  return stack


def _init_fn(objective: Objective, tx: optax.GradientTransformation, seed: int,
             param_dtype: jnp.dtype):
  def init() -> tuple[Any, TrainState]:
    model = objective.create_model(nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(
        lambda x: x.astype(param_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    state = dict(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                 opt_state=tx.init(params), rng=jax.random.PRNGKey(seed + 1),
                 skipped=jnp.zeros((), jnp.int32))
    return graphdef, state
  return init


def make_setup(config: ml_collections.ConfigDict, objective: Objective, mesh: Mesh) -> Setup:
  """Abstract init: shapes, shardings and the graph of the model, without allocating it."""
  rules = mmsharding.logical_rules(config.mesh)
  tx = make_optimizer(config.train)
  param_dtype = jnp.dtype(config.train.get("param_dtype", "float32"))
  init = _init_fn(objective, tx, int(config.seed), param_dtype)
  with _context(mesh, rules):
    graphdef_box = []

    def shapes_only():
      graphdef, state = init()
      graphdef_box.append(graphdef)
      return state

    abstract = jax.eval_shape(shapes_only)
  shardings = mmsharding.tree_shardings(abstract, mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  batch_shardings = mmsharding.batch_shardings(objective.batch_axes(), mesh, rules)
  jitted_init = jax.jit(lambda: init()[1], out_shardings=shardings)
  return Setup(objective=objective, mesh=mesh, rules=rules, graphdef=graphdef_box[0], tx=tx,
               abstract_state=abstract, state_shardings=shardings,
               batch_shardings=batch_shardings, init=jitted_init)


def init_state(config: ml_collections.ConfigDict, setup: Setup) -> TrainState:
  """The initial state, created directly in its shardings by a jitted init."""
  del config  # the seed and dtypes were fixed by make_setup
  with setup.context():
    return setup.init()


def param_count(state: TrainState) -> int:
  return int(sum(x.size for x in jax.tree.leaves(state["params"])))
