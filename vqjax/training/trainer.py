"""The training loop shared by every stage: setup, resume, steps, eval, logs, checkpoints.

`train_and_evaluate(config, workdir)` is the one entry point; `vqjax/train.py`, notebooks,
tests and benchmarks all call it. What is trained is decided by a `tasks.Task` (the stage-1
autoencoder, the priors, the classifier), so this file holds no model code and makes no
assumption about what a batch holds.

Order of a run: checkpoints -> config (the data reader pinned) -> mesh -> task and its
evaluators -> data -> state (newest intact workdir checkpoint, else `ckpt.init_from`, else
fresh, always created in its sharding) -> the task's frozen inputs, sharded -> jitted steps ->
loop. The loop reads as big_vision's: `for step, batch in zip(range(first + 1, total + 1),
batches)`, where `batches` (`feed.DeviceFeed`) yields batches already on the devices, reads
ahead where dispatch is synchronous, and knows the data position a checkpoint records. The
loop pulls metrics to the host only on logging, eval and checkpoint steps, and keeps at most
one step queued behind the running one, so a stop request is served within a step or two.
SIGTERM / SIGINT finish the current step, save and return; with several processes, all agree
on the step to stop at (`host.StopRequest`: JAX's preemption sync point for SIGTERM).

The progress line and metrics.jsonl report "data_wait": the share of wall time the devices sat
idle because the loop was still reading (the step in flight had finished before its
successor's batch was there, `host.DeviceClock`), with a warning when it passes 10%
(`logs.Progress`).

Evaluation: every `config.log.eval_every_steps` and at the end, the evaluators `config.evals`
names (default: the task's `evals`) run over the eval split (`evaluators.py`), the same ones
`python -m vqjax.evaluate` runs on a saved run.

Divergence (`health.py`): every step folds its loss into a device-side watch. A check (every
log and checkpoint step) that finds a non-finite loss stops the run with
`errors.DivergenceError`, recording as bad the checkpoints whose parameters gave it; one that
finds the loss exploded (far above the recent losses) warns and records the checkpoints since
the previous check as bad, and stops the run if it stays exploded. A resume starts from the
newest checkpoint not recorded bad, and the keep-N clean-up never deletes the last good one.
"""

import collections
import os
import shlex
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from vqjax import config_checks, errors, links, paths
from vqjax.data import pipeline, sources
from vqjax.training import (
  checkpoint,
  checkpoint_records,
  evaluators,
  feed,
  health,
  host,
  identity,
  logs,
  sharding,
  tasks,
  weights,
  workdir_lock,
)


def setup_compilation_cache(directory: str) -> None:
  """Turns on JAX's persistent compilation cache in `directory` ("" = leave it off).

  A setting of the whole process, which JAX reads at its first compilation: the programs set
  it from `config.log.compilation_cache` (`python -m vqjax.train`, `vqjax.pipeline`) and the
  benchmark scripts from their flag; `train_and_evaluate` leaves `jax.config` alone.
  """
  if not directory:
    return
  directory = paths.absolute(directory)  # JAX's cache reads and writes a bucket too
  epath.Path(directory).mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  # Cache every executable: the small eval/image/check functions add up on each launch too.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# With several processes, a Ctrl-C is agreed on every this many steps (a preemption's SIGTERM
# goes through JAX's sync point, asked every step): each agreement waits for the device, so not
# every step, but often enough that the save starts soon whatever log.every_steps is.
_STOP_SYNC_EVERY = 10


def _host_metrics(metrics: dict[str, jax.Array]) -> dict[str, float]:
  return {k: float(v) for k, v in sharding.to_host(metrics).items()}


def _count_params(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _pin_reader(config: ml_collections.ConfigDict, saved_meta: dict) -> ml_collections.ConfigDict:
  """Resolves `data.reader="auto"` once: to the reader the run's checkpoint records, else from
  this machine. The same run moved to another machine then reads the same way (or fails with
  what to set) instead of switching readers under a saved data position."""
  # A copy: the run resolves fields (this one; a prior's code shapes) without touching the
  # caller's config.
  config = config.copy_and_resolve_references()
  if config.data.reader == "auto":
    recorded = saved_meta.get("config", {}).get("data", {}).get("reader", "auto")
    config.data.reader = recorded if recorded != "auto" else sources.resolve_reader(config.data)
  return config


def _place(tree: Any, mesh: jax.sharding.Mesh, min_size: int) -> tuple[Any, Any]:
  """Host arrays -> global arrays sharded by the FSDP rule (each process gives its slices)."""
  shardings = sharding.state_shardings(tree, mesh, min_size)

  def put(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

  return jax.tree.map(put, tree, shardings), shardings


# config.train.rng_impl -> JAX's PRNG implementation name.
RNG_IMPLS = {"threefry": "threefry2x32", "rbg": "rbg", "unsafe_rbg": "unsafe_rbg"}


def train_key(config: ml_collections.ConfigDict) -> jax.Array:
  """The key every train step folds its step number into, of `config.train.rng_impl`'s kind."""
  return jax.random.key(config.seed + 1, impl=RNG_IMPLS[config.train.rng_impl])


def jit_train_step(
  task: tasks.Task, mesh: jax.sharding.Mesh, state_shardings: Any, frozen_shardings: Any = None
):
  """The train step `train_and_evaluate` runs, jitted: benchmarks time exactly this.

  `step(state, batch, rng, frozen, watch) -> (state, metrics, watch)` hands the task the key
  `fold_in(rng, state.step)` (one key per step, a function of the step only: a resumed run
  draws the same randomness and no task can forget to fold it) and folds the step's loss into
  the loss watch (`health.fold`; start one with `new_watch(mesh)`). The state is donated.

  Args:
    task: the task.
    mesh: the mesh.
    state_shardings: shardings of the train state.
    frozen_shardings: shardings of the task's frozen inputs (None when it has none).
  """

  def step(state, batch, rng, frozen, watch):
    new_state, metrics = task.train_step(state, batch, jax.random.fold_in(rng, state.step), frozen)
    return new_state, metrics, health.fold(watch, metrics["loss"], new_state.step)

  repl = sharding.replicated(mesh)
  return jax.jit(
    step,
    in_shardings=(state_shardings, sharding.batch_sharding(mesh), repl, frozen_shardings, repl),
    out_shardings=(state_shardings, repl, repl),
    donate_argnums=0,
  )


# The train step's loss watch with nothing seen yet (`jit_train_step`'s last argument).
new_watch = health.new_watch


def _finished(workdir: str, step: int, total: int) -> dict[str, float]:
  """What a re-run of a finished workdir returns: the last eval record, without re-running."""
  records = logs.read_records(os.path.join(workdir, "metrics.jsonl"))
  evals = [r for r in records if r.get("split") == "eval"]
  result = {
    f"eval/{k}": v for k, v in (evals[-1] if evals else {}).items() if k not in ("step", "split")
  }
  logging.info(
    "run already finished at step %d (config.train.steps=%d): nothing to do. Raise "
    "--config.train.steps to train further.",
    step,
    total,
  )
  return {**result, "step": step}


@logs.quiet_library_logs()  # Orbax's INFO lines per save would bury the progress lines
def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  task: tasks.Task | None = None,
  make_task: Callable[[ml_collections.ConfigDict], tasks.Task] = tasks.make_task,
) -> dict[str, float]:
  """Trains (or resumes) the run described by `config` in `workdir`.

  Args:
    config: a config from `experiments/` (see `vqjax/configs.py` for every field).
    workdir: output directory: checkpoints/, metrics.jsonl, tb/, images/, config.json.
    task: the stage to train; default `make_task` of the run's copy of `config`.
    make_task: builds the task from that copy; `vqjax.runs.make_task` (what `python -m
      vqjax.train` passes) also gives a prior its stage-1 model, for sample grids in the logs.

  Returns:
    Host floats: the last eval metrics (prefixed "eval/"), the last train metrics, "step",
    and "first_step_s" (setup + compile time of this launch) when a step ran; "stopped" (the
    signal's number, 0 for another process's request) when a stop request ended the launch
    before `train.steps`.
  """
  t_start = time.perf_counter()
  config_checks.validate(config)
  profile_dir = os.path.join(paths.absolute(workdir), "profile")
  profiler = host.Profiler(
    config.log.profile_steps, config.train.steps, profile_dir, jax.process_index() == 0
  )
  make = make_task if task is None else lambda _: task
  with _Run(config, workdir, make) as run, profiler:
    if run.step >= run.total and run.resumed:
      return _finished(run.workdir, run.step, run.total)
    return run.train(t_start, profiler)


class _Run:
  """One launch of a run: its state and step, data, jitted steps, logs and checkpoints.

  Built in the order of the module docstring; `train` is the loop. Closing it (a `with`
  block) waits for pending checkpoint saves and releases files, signal handlers and readers.
  """

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    workdir: str,
    make_task: Callable[[ml_collections.ConfigDict], tasks.Task],
  ):
    self.workdir = paths.absolute(workdir)
    self.pi = jax.process_index()
    self.writer = self.data = self.batches = self.stop = self.clock = None
    # One trainer per workdir: the primary holds the lock until close (workdir_lock.py).
    self.lock = workdir_lock.WorkdirLock(self.workdir).acquire() if self.pi == 0 else None
    try:
      if self.pi == 0:
        identity.ensure_run_id(self.workdir)  # what consumes this run records it
      self.ckpt = checkpoint.Checkpointer(
        os.path.join(self.workdir, checkpoint.CHECKPOINT_SUBDIR),
        config.ckpt.keep,
        config.ckpt.async_save,
      )
    except BaseException:
      if self.lock is not None:
        self.lock.release()
      raise
    try:
      self._setup(config, make_task)
    except BaseException:
      self.close()
      raise

  # --- setup ------------------------------------------------------------------------------

  def _setup(
    self,
    config: ml_collections.ConfigDict,
    make_task: Callable[[ml_collections.ConfigDict], tasks.Task],
  ) -> None:
    latest = self.ckpt.latest_step()
    saved_meta = self.ckpt.read_meta(latest) if latest is not None else {}
    self.config = config = _pin_reader(config, saved_meta)
    self.mesh = mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_size(config.data.batch_size, mesh)
    sharding.check_batch_size(config.data.eval_batch_size, mesh)
    self.task = task = make_task(config)
    # The runs it reads are recorded relative to this one where they share its parent directory
    # (a pipeline workdir), so the workdir can move (links.py).
    self.meta = checkpoint_records.config_meta(
      links.recorded_config(config, self.workdir), task.config_sections
    )
    self.evaluators = evaluators.build(evaluators.names_for(config, task.evals), config, task.model)

    # Data first: a missing dataset fails here, before any compilation.
    pi, pc = self.pi, jax.process_count()
    self.data = pipeline.make_train_iterator(config.data, config.seed, pi, pc)
    self.eval_data = pipeline.make_eval_iterator(config.data, pi, pc, config.log.eval_batches)
    shardings = self._restore_or_init(saved_meta, latest is not None)
    self.step = int(jax.device_get(self.state.step))
    self.total = int(config.train.steps)
    if self.resumed and self.step >= self.total:
      return  # finished: nothing to compile or write

    # Written only once the state is restored or created: a relaunch with a config that does
    # not fit the workdir's checkpoint fails above and leaves the run's config record as it was.
    if self.pi == 0:
      logs.save_config(self.workdir, links.recorded_config(config, self.workdir))
    self.writer = logs.MetricWriter(
      self.workdir, tensorboard=config.log.tensorboard, active=self.pi == 0
    )
    self.writer.start_at(self.step)
    self._compile(shardings)
    ckpt = self.ckpt
    unjudged = [] if not self.resumed or self.step in ckpt.bad_steps() else [self.step]
    self.health = health.Health(ckpt, mesh, unjudged)
    if self.pi == 0:
      logging.info(
        "mesh %s over %d processes; %s parameters; global batch %d; steps %d -> %d",
        dict(mesh.shape),
        pc,
        f"{_count_params(self.state.params):,}",
        config.data.batch_size,
        self.step,
        self.total,
      )

  def _restore_or_init(self, saved_meta: dict, resume: bool) -> Any:
    """Sets `state` (and the data position): the newest intact workdir checkpoint, else
    `ckpt.init_from`'s weights, else fresh, created in its sharding. Returns the shardings."""
    config, task, ckpt = self.config, self.task, self.ckpt
    # The task initialises from a one-example batch shaped like the real ones (images for the
    # autoencoder, code maps for a prior): the first batch, peeked at (it stays the first).
    example = {k: np.zeros((1, *v.shape[1:]), v.dtype) for k, v in self.data.peek().items()}

    def init_fn(rng):
      return task.init(rng, jax.tree.map(jnp.asarray, example))

    repl = sharding.replicated(self.mesh)
    # Parameters are drawn with the "rbg" generator: XLA compiles a flax init that uses it in
    # a fraction of the time threefry's unrolled loops take (4 s vs 23 s measured on 2 CPU
    # cores for the Fashion-MNIST smoke model). Training randomness: config.train.rng_impl.
    init_rng = jax.jit(lambda: jax.random.key(config.seed, impl="rbg"), out_shardings=repl)()
    self.train_rng = jax.jit(lambda: train_key(config), out_shardings=repl)()
    self.image_rng = jax.jit(lambda: jax.random.key(config.seed + 2), out_shardings=repl)()
    abstract = jax.eval_shape(init_fn, init_rng)
    shardings = sharding.state_shardings(abstract, self.mesh, config.mesh.fsdp_min_size)
    target = checkpoint.abstract_with_shardings(abstract, shardings)

    self.resumed = resume
    if resume:
      self.state, data_state, step = ckpt.restore_newest_intact(target, meta=self.meta)
      ckpt.discard_after(step)
      if data_state is not None:
        self.data.set_state(data_state)
      self._compare_config(step, ckpt.read_meta(step) or saved_meta)
      logging.info("resumed from %s/%d", ckpt.directory, step)
    elif config.ckpt.init_from:
      # Weights (params + EMA codebooks) only: the optimiser, step and data order start fresh.
      loaded = weights.restore_weights(config.ckpt.init_from, target)
      self.state = sharding.init_sharded(init_fn, shardings, init_rng).replace(**loaded)
      logging.info("initialised weights from %s", config.ckpt.init_from)
    else:
      self.state = sharding.init_sharded(init_fn, shardings, init_rng)
    return shardings

  def _compare_config(self, step: int, saved: dict) -> None:
    """Warns about the fields that differ from the config checkpoint `step` was saved with."""
    if self.pi != 0:
      return
    if not saved.get("config"):
      # The arrays restored (and were checked); only the record to compare against is lost.
      logging.warning(
        "checkpoint %d's config record (%s) cannot be read: the config is not compared",
        step,
        os.path.join(self.ckpt.directory, str(step), "meta"),
      )
      return
    changes = checkpoint_records.config_changes(saved, self.meta)
    if changes:
      logging.warning(
        "the config differs from the one checkpoint %d was saved with: %s",
        step,
        "; ".join(changes),
      )

  def _compile(self, shardings: Any) -> None:
    """The task's frozen inputs, sharded, and the jitted train, eval, image and check steps."""
    mesh, config, task = self.mesh, self.config, self.task
    self.frozen, frozen_sh = task.frozen(), None
    if self.frozen is not None:
      self.frozen, frozen_sh = _place(self.frozen, mesh, config.mesh.fsdp_min_size)
    self.train_step = jit_train_step(task, mesh, shardings, frozen_sh)
    repl = sharding.replicated(mesh)
    self.eval_suite = evaluators.Suite(
      self.evaluators, put=lambda batch: sharding.global_batch(batch, mesh), out_sharding=repl
    )
    n_img = config.log.num_images

    def images(s, b, r, f):
      # OrderedDicts come out of jit in their order (dicts sorted): "input" stays above
      # "reconstruction" whatever the names.
      grids = task.images(s, b, r, f)
      return {
        name: collections.OrderedDict((row, x[:n_img]) for row, x in rows.items())
        for name, rows in grids.items()
      }

    batch_sh = sharding.batch_sharding(mesh)
    self.images_fn = jax.jit(
      images, in_shardings=(shardings, batch_sh, repl, frozen_sh), out_shardings=repl
    )
    self.finite_fn = jax.jit(
      lambda s: sharding.all_finite((s.params, s.model_state)), out_shardings=repl
    )

  # --- what the loop does besides stepping ------------------------------------------------

  def evaluate(self) -> dict[str, float]:
    """One pass of the evaluators over the eval split; writes and returns their metrics."""
    variables = {"params": self.state.params, **self.state.model_state}
    try:
      result = self.eval_suite.run(variables, self.eval_data, self.frozen)
    except errors.UserError as e:
      raise errors.UserError(f"eval split {self.config.data.eval_split!r}: {e}") from e
    self.writer.write(self.step, result, prefix="eval")
    if self.pi == 0:
      shown = " ".join(f"{k}={v:.4g}" for k, v in result.items() if k != "examples")
      logging.info(
        "eval over %d examples at step %d: %s", int(result.get("examples", 0)), self.step, shown
      )
    return result

  def save_images(self) -> None:
    """The task's grids for the first eval batch, as `images/{grid}_{step}.png`."""
    batch = sharding.global_batch(next(iter(self.eval_data)), self.mesh)
    rng = jax.random.fold_in(self.image_rng, self.step)
    grids = sharding.to_host(self.images_fn(self.state, batch, rng, self.frozen))
    if self.pi != 0:
      return
    epath.Path(self.workdir, "images").mkdir(parents=True, exist_ok=True)
    for name, rows in grids.items():
      grid = logs.comparison_grid(rows)
      logs.save_png(os.path.join(self.workdir, "images", f"{name}_{self.step:07d}.png"), grid)
      self.writer.write_images(self.step, name, grid)

  def save(self) -> None:
    """Checks the losses so far, then saves (never a non-finite state) with the data position
    after the last batch a step consumed."""
    self.health.check(self.step)
    if not bool(self.finite_fn(self.state)):
      self.health.judge(np.inf, self.step + 1, self.step)
    self.ckpt.save(self.step, self.state, self.batches.get_state(), self.meta)
    self.health.saved(self.step)

  def log(self, step: int, metrics: dict[str, jax.Array], progress: logs.Progress) -> dict:
    """Pulls the step's metrics, judges the losses, writes the progress line and records."""
    values = _host_metrics(metrics)
    self.health.check(step)
    text, timing = progress.line(step, values, self.task.progress_keys)
    self.writer.write(step, {**values, **timing})
    if self.pi == 0:
      logging.info("%s", text)
    return values

  # --- the loop ---------------------------------------------------------------------------

  def train(self, t_start: float, profiler: host.Profiler) -> dict[str, float]:
    """Steps to `config.train.steps` (or a stop request), then evaluates; see the module
    docstring. `profiler` traces the steps `config.log.profile_steps` selects. Returns what
    `train_and_evaluate` returns."""
    c = self.config
    self.stop, self.clock = host.StopRequest(), host.DeviceClock()
    first = self.step
    self.batches = feed.DeviceFeed(
      self.data, self.mesh, self.total - first, read_ahead=feed.synchronous_dispatch()
    )
    progress = None  # started after the first step, so compilation is not in the throughput
    result: dict[str, float] = {}
    eval_result: dict[str, float] = {}
    in_flight: list[Any] = []  # outputs of the steps dispatched and not waited for
    stopping = False
    for step, batch in zip(range(first + 1, self.total + 1), self.batches):
      if progress is not None:  # the devices' idle time while the loop read this batch
        progress.add_data_wait(self.clock.idle_during(step - 1, *self.batches.last_read))
      # At most one step queued behind the running one: the host never runs far ahead of the
      # devices, so a stop request or a log line is served within a step or two, not dozens.
      if len(in_flight) == 2:
        jax.block_until_ready(in_flight.pop(0))
      profiler.before_step(step - 1)
      with profiler.annotate(step - 1):
        self.state, metrics, self.health.watch = self.train_step(
          self.state, batch, self.train_rng, self.frozen, self.health.watch
        )
      del batch  # the step holds it now; dropping ours lets its buffers go when it is done
      self.step = step
      profiler.after_step(step, self.state)
      self.clock.dispatched(step, self.health.watch)
      in_flight.append(self.health.watch)
      if step == first + 1:
        jax.block_until_ready(self.state)
        result["first_step_s"] = time.perf_counter() - t_start
        if self.pi == 0:
          logging.info(
            "first step done %.1f s after start (compilation included)", result["first_step_s"]
          )
        progress = logs.Progress(self.total, c.data.batch_size, step, unit=self.task.unit)
      log_now = step % c.log.every_steps == 0 or step == self.total
      if log_now:
        result.update(self.log(step, metrics, progress))
      stopping = self.stop.requested(step, sync=log_now or step % _STOP_SYNC_EVERY == 0)
      t_aside = time.perf_counter()
      if _every(step, c.log.eval_every_steps) and not stopping:
        eval_result = self.evaluate()
      if _every(step, c.log.image_every_steps):
        self.save_images()
      progress.exclude(time.perf_counter() - t_aside)
      if stopping or step == self.total or _every(step, c.ckpt.every_steps):
        self.save()
      if stopping:
        break
    return self._finish(first, stopping, result, eval_result)

  def _finish(self, first: int, stopped: bool, result: dict, eval_result: dict) -> dict:
    """After the loop: the stop reported, or the last checkpoint, eval and images made."""
    c = self.config
    if stopped:
      signum = self.stop.signum
      logging.warning(
        "stopped at step %d by %s; checkpoint saved",
        self.step,
        signal.Signals(signum).name if signum else "another process",
      )
      result["stopped"] = int(signum or 0)  # not finished: the CLIs exit non-zero
    else:
      if self.step == first and self.ckpt.latest_step() != self.step:
        self.save()  # nothing ran (train.steps reached by init_from or 0): keep a checkpoint
      if not _every(self.step, c.log.eval_every_steps) or self.step == first:
        eval_result = self.evaluate()
      if c.log.image_every_steps and self.step % c.log.image_every_steps:
        self.save_images()
    result.update({f"eval/{k}": v for k, v in eval_result.items()})
    result["step"] = self.step
    if self.pi == 0:
      self.ckpt.wait()
      logging.info(
        "outputs in %s: checkpoints/ (step %s), metrics.jsonl, images/, config.json; "
        "TensorBoard: `pip install tensorboard && tensorboard --logdir %s`",
        self.workdir,
        self.ckpt.latest_step(),
        shlex.quote(os.path.join(self.workdir, "tb")),  # pasteable with spaces in the path
      )
    return result

  def close(self) -> None:
    """Releases everything, each even when an earlier one fails (a checkpoint that cannot be
    written on a full disk: its error is raised after the rest is closed, so no log writer's
    thread is left to die at exit with a traceback after the one-line error)."""
    if self.stop is not None:
      self.stop.restore()
    if self.clock is not None:
      self.clock.close()
    if self.batches is not None:
      self.batches.close()
    try:
      self.ckpt.close()
    finally:
      try:
        if self.writer is not None:
          self.writer.close()
        if self.data is not None and hasattr(self.data, "close"):
          self.data.close()
      finally:
        if self.lock is not None:  # last: everything the run writes is written
          self.lock.release()
          self.lock = None

  def __enter__(self) -> "_Run":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _every(step: int, every: int) -> bool:
  """Whether `step` is one of every `every` steps (0 = never)."""
  return bool(every) and step % every == 0
