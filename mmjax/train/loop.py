"""`mmjax train`: the training loop around the jitted step.

Order of a step N: take batch N from the iterator, dispatch step N, then fetch step N-1's metrics
(so the device has N queued while the host logs), check them for a non-finite loss, log. Before a
checkpoint or an evaluation the metrics of the current step are fetched too, so a NaN is always
seen before the state that followed it could be saved. SIGTERM (preemption) and a first Ctrl-C
(SIGINT) set a flag from the start of `run_train` on (setup, iterator creation and restore
included); the loop saves at the next step boundary and returns normally (exit code 0). A second
Ctrl-C aborts without saving. A SIGTERM before the first step returns without
training or saving: the checkpoints on disk are already the latest state.

With several processes, JAX's coordination service carries the SIGTERM instead: its preemption
notifier (installed by `jax.distributed.initialize`) tells every process, they agree on the first
step all of them can still reach, and `reached_preemption_sync_point` is true there on each, so all
hosts save the same step and stop. Asking it costs no communication, so no step waits for the other
hosts beyond what the step's own collectives do.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from mmjax import config as mmconfig
from mmjax import hostcpu, paths, progress
from mmjax import sharding as mmsharding
from mmjax.data.pipeline import demo_tokens
from mmjax.errors import UserError
from mmjax.models.configs import MODEL_CONFIGS, platform_of, resolve_dtype_name
from mmjax.train import checkpoint
from mmjax.train import flops as mmflops
from mmjax.train import state as trainstate
from mmjax.train import step as trainstep
from mmjax.train.metrics import MetricsWriter
from mmjax.train.objective import get_objective
from mmjax.train.profiling import StepProfiler

NAN_POLICIES = ("stop", "skip")
# The config of the run, beside its checkpoints (what restores a model without its config file).
CONFIG_FILE = "config.json"


class NonFiniteLossError(UserError):
  """The loss became NaN/inf under nan_policy="stop"; the bad state was not saved."""


class _Preemption:
  """Remembers a SIGTERM (preemption) or a first Ctrl-C (SIGINT) until the loop reaches a step
  boundary, where it saves and stops; a second Ctrl-C aborts at once (KeyboardInterrupt), without
  saving.

  One process: Python signal handlers set a flag. Several: JAX's preemption notifier owns SIGTERM
  (a Python handler installed after it would take the signal away from it) and `at_step` asks the
  coordination service whether this step is the one all hosts stop at; Ctrl-C keeps Python's
  default there, since one host's flag cannot make the others stop at the same step."""

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self.name = "SIGTERM"  # the signal that asked to stop, for the messages
    self._interrupts = 0
    self._previous: dict[int, Any] = {}
    self._multihost = False

  def __enter__(self):
    self._multihost = jax.process_count() > 1
    if not self._multihost and threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self._SIGNALS}
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      self._interrupts += 1
      if self._interrupts > 1:
        raise KeyboardInterrupt
      print("\nmmjax: Ctrl-C: saving a checkpoint at the next step and stopping; press Ctrl-C "
            "again to abort without saving", file=sys.stderr, flush=True)
    if not self.requested:
      self.name = signal.Signals(signum).name
    self.requested = True

  def __exit__(self, *exc):
    for s, previous in self._previous.items():
      signal.signal(s, previous)
    return False

  def before_start(self) -> bool:
    """Whether to stop before training (one process; several learn of it at their sync step)."""
    return self.requested

  def at_step(self, step: int) -> bool:
    """Whether to save at `step` and stop; every process gets the same answer at the same step."""
    if self._multihost:
      self.requested = self.requested or multihost_utils.reached_preemption_sync_point(step)
    return self.requested


def _compute_dtype(dtype: str, platform: str) -> str:
  """bf16 compute on a CPU without bf16 arithmetic becomes fp32, with a note: XLA:CPU would convert
  every bf16 operand to fp32 and back, slower than fp32 throughout (parameters stay fp32)."""
  if platform == "cpu" and dtype == "bfloat16" and hostcpu.native_bf16() is False:
    print("mmjax: note: model.dtype=bfloat16 on a CPU without bf16 arithmetic (no avx512_bf16, "
          "amx_bf16 or Arm bf16): computing in float32, which is faster there", file=sys.stderr)
    return "float32"
  return dtype


def build(config: ml_collections.ConfigDict, devices: list[jax.Device] | None = None):
  """(objective, setup) after checking the config against the devices (default: all devices;
  `mmjax aot` passes the devices of a TPU topology description)."""
  devices = list(jax.devices() if devices is None else devices)
  mmconfig.validate(config, num_devices=len(devices))
  if config.get("objective") in MODEL_CONFIGS:
    # "auto": the platform the run compiles for decides every implementation choice.
    with config.model.unlocked():
      platform = config.model.get("platform", "auto")
      if platform == "auto":
        platform = config.model.platform = platform_of(devices[0].platform)
      config.model.dtype = _compute_dtype(resolve_dtype_name(config.model.get("dtype", "auto"),
                                                             platform), platform)
  policy = config.train.nan_policy
  if policy not in NAN_POLICIES:
    raise mmconfig.ConfigError(f"config key 'train.nan_policy' must be one of {NAN_POLICIES}, "
                               f"got {policy!r}")
  objective = get_objective(config)
  mesh = mmsharding.make_mesh(config.mesh, devices)
  mmsharding.check_batch(mesh, config.mesh, config.train.batch_size)
  micro = config.train.microbatches
  if micro < 1 or config.train.batch_size % micro:
    raise mmconfig.ConfigError(f"config key 'train.microbatches' ({micro}) must be >= 1 and divide "
                               f"train.batch_size ({config.train.batch_size})")
  mmsharding.check_batch(mesh, config.mesh, config.train.batch_size // micro,
                         key="train.batch_size / train.microbatches")
  return objective, trainstate.make_setup(config, objective, mesh)


def load_model(config: Any, workdir: str, *, allow_random_init: bool = False) -> tuple[Any, int]:
  """(model, step) of the latest valid checkpoint in `<workdir>/checkpoints`, on the host.

  For evaluation and generation: only the train state is read, not the data iterator. Without a
  checkpoint it is an error, unless `allow_random_init` (then a freshly initialised model, step 0).
  """
  _, setup = build(config)
  directory = paths.resolve(workdir) / "checkpoints"
  manager = ocp.CheckpointManager(directory) if directory.is_dir() else None
  try:
    found = manager and checkpoint.restore_newest(
        lambda step, args: manager.restore(step, args=args), list(manager.all_steps()),
        directory, setup.abstract_state,
        on_corrupt=lambda step, detail: checkpoint.report(
            f"checkpoint step {step} in {directory} cannot be restored ({detail}); trying the "
            "previous one"))
  finally:
    if manager:
      manager.close()
  if found:
    state, step = found
  else:
    if not allow_random_init:
      raise UserError(f"no checkpoint to load in {directory} (train first: mmjax train --config "
                      f"... --workdir {workdir})")
    checkpoint.report(f"no checkpoint in {directory}; using a randomly initialised model")
    with setup.context():
      state, step = setup.init(), 0
  if jax.process_count() > 1:  # every host gets the whole state (its arrays span all hosts)
    state = multihost_utils.process_allgather(state, tiled=True)
  else:
    state = jax.device_get(state)
  return nnx.merge(setup.graphdef, state["params"], state["rest"]), step


def _bad_record_metrics(it) -> dict[str, float]:
  """data/bad_records (all datasets) and data/bad_records/<dataset>: records skipped so far."""
  bad = getattr(it, "bad_by_dataset", None)
  if bad is None:
    return {}
  return {"data/bad_records": float(sum(bad.values())),
          **{f"data/bad_records/{name}": float(n) for name, n in bad.items()}}


def _evaluate(config, objective, setup, eval_fn, state) -> dict[str, float]:
  it = objective.make_iterator("val", jax.process_index(), jax.process_count())
  totals: dict[str, float] = {}
  count = 0
  for _ in range(config.train.get("eval_batches", 4)):
    try:
      local = next(it)
    except StopIteration:
      break
    metrics = jax.device_get(eval_fn(state, mmsharding.global_batch(local, setup.batch_shardings)))
    for k, v in metrics.items():
      totals[k] = totals.get(k, 0.0) + float(v)
    count += 1
  return {f"eval/{k}": v / count for k, v in totals.items()} if count else {}


def run_train(config: ml_collections.ConfigDict, workdir: str, *, stream=None,
              evaluator=None) -> dict[str, Any]:
  """Trains (or resumes from `workdir`'s latest valid checkpoint); returns a summary dict.

  `evaluator` (e.g. `mmjax.eval.curves.TrainingEval`): called as `evaluator(step, model)` every
  `evaluator.every_steps` steps and at the end, on one process; the metrics it returns are
  logged with the step's. `evaluator.finish()` (a plot's path) ends the run."""
  with _Preemption() as preemption:  # before anything slow: a SIGTERM must never kill the run
    return _run(config, workdir, stream, preemption, evaluator)


def _run(config, workdir, stream, preemption: _Preemption, evaluator=None) -> dict[str, Any]:
  train = config.train
  demo_tokens.use_demo_tokens_if_unset(config)  # here, not in build(): only commands that read data
  objective, setup = build(config)
  directory = paths.resolve(workdir)
  directory.mkdir(parents=True, exist_ok=True)
  it = objective.make_iterator("train", jax.process_index(), jax.process_count())
  checkpointer = checkpoint.Checkpointer(directory / "checkpoints", keep=train.keep_checkpoints)
  try:
    restored = checkpointer.restore_latest(setup.abstract_state, it)
  except BaseException:
    checkpointer.close()
    raise
  if jax.process_index() == 0:  # after the restore: a checkpoint of another config stopped us there
    (directory / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))
  stop = preemption.before_start()
  if restored:
    state, start = restored
  else:  # a preempted fresh start needs no initialised state (it saves nothing)
    state, start = (setup.abstract_state if stop else trainstate.init_state(config, setup)), 0
  writer = MetricsWriter(directory, total_steps=train.steps, log_every=train.log_every,
                         start_step=start, stream=stream)
  if restored:
    writer.message(f"mmjax: resumed from the checkpoint of step {start}")
  summary: dict[str, Any] = dict(workdir=workdir, start_step=start, step=start, preempted=False,
                                 params=trainstate.param_count(state))
  try:
    if stop:
      writer.message(f"mmjax: {preemption.name} before the first step; stopping (nothing new "
                     "to save)")
      summary["preempted"] = True
    elif start < train.steps:
      _loop(config, objective, setup, state, it, checkpointer, writer, start, summary, preemption,
            evaluator)
    bad = getattr(it, "bad_by_dataset", None)
    if bad is not None:  # records skipped as bad (data.bad_records="skip"), per dataset
      summary["bad_records"] = {"total": sum(bad.values()), "by_dataset": bad}
      if sum(bad.values()):
        writer.message("mmjax: skipped bad records: " + ", ".join(
            f"{name} {n}" for name, n in sorted(bad.items())))
  finally:
    checkpointer.close()
    writer.close()
  summary["checkpoints"] = checkpointer.steps()
  summary["plot"] = writer.plot()
  if evaluator is not None and jax.process_index() == 0:
    summary["curves"] = evaluator.finish()
  summary["metrics_file"] = os.fspath(writer.path)
  return summary


def _loop(config, objective, setup, state, it, checkpointer, writer, start, summary,
          preemption: _Preemption, evaluator=None) -> None:
  train = config.train
  batch_size = train.batch_size
  flops_per_step = objective.train_flops_per_sample() * batch_size
  tokens_per_step = objective.tokens_per_sample() * batch_size
  peak, _ = mmflops.peak_flops(dtype=str(config.get("model", {}).get("dtype", "float32")))
  eval_fn = trainstep.jit_eval(setup)
  eval_every = train.eval_every
  pending: list[tuple[int, Any]] = []
  clock = {"time": None, "step": start}
  profiler = StepProfiler(train.get("profile_steps", ""), summary["workdir"])

  def fetch() -> None:
    while pending:
      number, device_metrics = pending.pop(0)
      metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
      if not metrics.pop("finite"):
        modality = {k: v for k, v in metrics.items() if k.startswith("loss")}
        if train.nan_policy == "stop":
          raise NonFiniteLossError(
              f"non-finite loss at step {number} (nan_policy='stop'; no checkpoint of this state "
              f"was saved): " + ", ".join(f"{k}={v:.6g}" for k, v in sorted(modality.items())))
        writer.message(f"mmjax: non-finite loss at step {number}; update skipped "
                       f"({int(metrics['skipped'])} so far)")
      now = time.perf_counter()
      seconds = (now - clock["time"]) / max(number - clock["step"], 1)
      clock.update(time=now, step=number)
      metrics.update(step_time_s=seconds, samples_per_s=batch_size / seconds,
                     tokens_per_s=tokens_per_step / seconds,
                     mfu=mmflops.mfu(flops_per_step / seconds, peak), **_bad_record_metrics(it))
      writer.write(number, metrics)
      writer.progress(number, metrics)
      summary.update(step=number, loss=metrics["loss"], skipped=int(metrics["skipped"]))

  with setup.context():
    batch = mmsharding.global_batch(next(it), setup.batch_shardings)
    compile_start = time.perf_counter()
    with progress.phase("train: compiling the step", enabled=jax.process_index() == 0):
      step_fn = trainstep.jit_step(setup, train).lower(state, batch).compile()
    summary["compile_s"] = time.perf_counter() - compile_start
    if preemption.before_start():  # during the compile: stop before a step there may be no time for
      writer.message(f"mmjax: {preemption.name} before the first step; stopping (nothing new "
                     "to save)")
      summary["preempted"] = True
      return
    clock["time"] = time.perf_counter()
    for number in range(start + 1, train.steps + 1):
      if number > start + 1:
        batch = mmsharding.global_batch(next(it), setup.batch_shardings)
      profiler.before(number)
      state, metrics = step_fn(state, batch)
      profiler.after(number, metrics)
      fetch()  # step number - 1: the device is busy with `number` meanwhile
      pending.append((number, metrics))
      last = number == train.steps
      do_eval = (eval_every and number % eval_every == 0) or last
      stop = preemption.at_step(number)  # every host saves and stops at the same step
      do_save = number % train.checkpoint_every == 0 or last or stop
      if do_eval or do_save:
        fetch()
      if do_eval:
        results = _evaluate(config, objective, setup, eval_fn, state)
        writer.write(number, results)
        summary["eval"] = results
      evaluated = evaluator is not None and (number % evaluator.every_steps == 0 or last)
      if evaluated:
        fetch()
        if jax.process_index() == 0:
          model = nnx.merge(setup.graphdef, *jax.device_get((state["params"], state["rest"])))
          writer.write(number, evaluator(number, model))
      if do_save:
        checkpointer.save(number, state, it)
      if do_eval or do_save or evaluated:
        clock["time"] = time.perf_counter()  # step times exclude evaluation and saving
      if stop:
        checkpointer.wait()
        writer.message(f"mmjax: {preemption.name}: saved the checkpoint of step {number}; "
                       "stopping")
        summary["preempted"] = True
        break
    fetch()
    profiler.stop()  # a run that ended inside the profiled steps
