"""The training loop shared by every stage: setup, resume, steps, eval, logs, checkpoints.

`train_and_evaluate(config, workdir)` is the one entry point; `vqjax/train.py`, notebooks,
tests and benchmarks all call it. What is trained is decided by a `steps.Task` (stage 1
autoencoder today; priors and a classifier later), so this file holds no model code.

Order of a run: mesh -> task -> data -> state (workdir checkpoint, else `ckpt.init_from`,
else fresh init, always created directly in its sharding) -> jitted steps -> loop. The loop
pulls metrics to the host only on logging, eval and checkpoint steps. SIGTERM / SIGINT finish
the current step, save and return. A non-finite loss stops the run with FloatingPointError
before anything non-finite is saved.
"""

import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from vqjax.data import pipeline
from vqjax.training import checkpoint, logs, sharding, steps


def setup_compilation_cache(directory: str) -> None:
  """Turns on JAX's persistent compilation cache in `directory` ("" = leave it off)."""
  if not directory:
    return
  directory = os.path.abspath(os.path.expanduser(directory))
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  # Cache every executable: the small eval/image/check functions add up on each launch too.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# With several processes, a stop request (SIGTERM on a preemptible pod) is agreed on every this
# many steps: each agreement waits for the device, so not every step, but often enough that the
# save starts well inside a preemption notice whatever log.every_steps is.
_STOP_SYNC_EVERY = 10


class _StopRequest:
  """Records SIGTERM / SIGINT so the loop can finish its step and save; a second signal of
  the same kind gets the previous handler (a second Ctrl-C interrupts at once)."""

  def __init__(self):
    self.signum = None
    self._previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. a notebook worker): no handlers
        pass

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
    logging.warning("received %s: finishing this step, saving, stopping",
                    signal.Signals(signum).name)

  def requested(self, sync: bool) -> bool:
    """Whether to stop. With several processes all must stop at the same step, so the answer
    is True only on `sync` steps, where every process learns whether any was signalled."""
    local = self.signum is not None
    if jax.process_count() == 1:
      return local
    if not sync:
      return False
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([local]))))

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _host_metrics(metrics: dict[str, jax.Array]) -> dict[str, float]:
  return {k: float(v) for k, v in sharding.to_host(metrics).items()}


def _count_params(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, task: steps.Task | None = None
) -> dict[str, float]:
  """Trains (or resumes) the run described by `config` in `workdir`.

  Args:
    config: a config from `experiments/` (see `vqjax/configs.py` for every field).
    workdir: output directory: checkpoints/, metrics.jsonl, tb/, images/, config.json.
    task: the stage to train; default `steps.make_task(config)`.

  Returns:
    Host floats: the last eval metrics (prefixed "eval/"), the last train metrics, "step",
    and "first_step_s" (setup + compile time of this launch) when a step ran.
  """
  t_start = time.perf_counter()
  logs.quiet_library_logs()
  setup_compilation_cache(config.log.compilation_cache)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  pi, pc = jax.process_index(), jax.process_count()
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.data.batch_size, mesh)
  sharding.check_batch_size(config.data.eval_batch_size, mesh)
  writer = logs.MetricWriter(workdir, tensorboard=config.log.tensorboard, active=pi == 0)
  task = steps.make_task(config) if task is None else task

  # Data first: a missing dataset fails here, before any compilation.
  train_iter = pipeline.make_train_iterator(config.data, config.seed, pi, pc)
  eval_data = pipeline.make_eval_iterator(config.data, pi, pc, config.log.eval_batches)
  # The task initialises from a one-example batch shaped like the real ones (images for the
  # autoencoder, code maps for a prior); peek at one and rewind the iterator.
  position = train_iter.get_state()
  example = {k: np.zeros((1, *v.shape[1:]), v.dtype) for k, v in next(train_iter).items()}
  train_iter.set_state(position)

  def init_fn(rng):
    return task.init(rng, jax.tree.map(jnp.asarray, example))

  repl = sharding.replicated(mesh)
  # Parameters are drawn with the "rbg" generator: XLA compiles a flax init that uses it in
  # a fraction of the time threefry's unrolled loops take (4 s vs 23 s measured on 2 CPU
  # cores for the Fashion-MNIST smoke model). Training randomness stays threefry.
  init_rng = jax.jit(lambda: jax.random.key(config.seed, impl="rbg"), out_shardings=repl)()
  train_rng = jax.jit(lambda: jax.random.key(config.seed + 1), out_shardings=repl)()
  abstract = jax.eval_shape(init_fn, init_rng)
  shardings = sharding.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)
  target = checkpoint.abstract_with_shardings(abstract, shardings)
  meta = checkpoint.config_meta(config)

  ckpt = checkpoint.Checkpointer(
      os.path.join(workdir, checkpoint.CHECKPOINT_SUBDIR), config.ckpt.keep, config.ckpt.async_save
  )
  stop = None
  try:
    if ckpt.latest_step() is not None:
      state, data_state = ckpt.restore(target, meta=meta)
      if data_state is not None:
        train_iter.set_state(data_state)
      logging.info("resumed from %s/%d", ckpt.directory, ckpt.latest_step())
    elif config.ckpt.init_from:
      # Weights (params + EMA codebooks) only: the optimiser, step and data order start fresh.
      weights = checkpoint.restore_weights(config.ckpt.init_from, target)
      state = jax.jit(init_fn, out_shardings=shardings)(init_rng)
      state = state.replace(**weights)
      logging.info("initialised weights from %s", config.ckpt.init_from)
    else:
      state = jax.jit(init_fn, out_shardings=shardings)(init_rng)

    batch_sh = sharding.batch_sharding(mesh)
    train_step = jax.jit(
        task.train_step,
        in_shardings=(shardings, batch_sh, repl),
        out_shardings=(shardings, repl),
        donate_argnums=0,
    )
    eval_step = jax.jit(task.eval_step, in_shardings=(shardings, batch_sh), out_shardings=repl)
    n_img = config.log.num_images
    images_fn = jax.jit(
        lambda s, b: jax.tree.map(lambda x: x[:n_img], task.images(s, b)),
        in_shardings=(shardings, batch_sh),
        out_shardings=repl,
    )
    finite_fn = jax.jit(lambda s: sharding.all_finite((s.params, s.model_state)),
                        out_shardings=repl)

    step = int(jax.device_get(state.step))
    # Written only once the state is restored or created: a relaunch with a config that does
    # not fit the workdir's checkpoint fails above and leaves the run's config record as it was.
    if pi == 0:
      logs.save_config(workdir, config)
    writer.start_at(step)
    total = int(config.train.steps)
    start_step = step
    if pi == 0:
      logging.info(
          "mesh %s over %d processes; %s parameters; global batch %d; steps %d -> %d",
          dict(mesh.shape), pc, f"{_count_params(state.params):,}", config.data.batch_size,
          step, total,
      )

    def evaluate() -> dict[str, float]:
      totals = None
      for host_batch in eval_data:
        sums = eval_step(state, sharding.global_batch(host_batch, mesh))
        totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
      if totals is None:
        raise ValueError(f"eval split {config.data.eval_split!r} gave no batches")
      result = task.eval_summary(sharding.to_host(totals))
      writer.write(step, result, prefix="eval")
      if pi == 0:
        shown = " ".join(f"{k}={v:.4g}" for k, v in result.items() if k != "examples")
        logging.info("eval at step %d: %s", step, shown)
      return result

    def save_images() -> None:
      host_batch = next(iter(eval_data))
      imgs = sharding.to_host(images_fn(state, sharding.global_batch(host_batch, mesh)))
      if imgs and pi == 0:
        grid = logs.comparison_grid(imgs)
        os.makedirs(os.path.join(workdir, "images"), exist_ok=True)
        logs.save_png(os.path.join(workdir, "images", f"recon_{step:07d}.png"), grid)
        writer.write_images(step, "reconstructions", grid)

    def save(where: str) -> None:
      # Never write a non-finite state: the previous checkpoint stays the last good one.
      if not bool(finite_fn(state)):
        raise FloatingPointError(
            f"non-finite parameters at step {step} ({where}); not saved. Last good checkpoint: "
            f"{ckpt.directory}/{ckpt.latest_step()}. Lower config.optim.lr or set "
            "config.optim.grad_clip."
        )
      ckpt.save(step, state, train_iter.get_state(), meta)

    stop = _StopRequest()
    progress = logs.Progress(total, config.data.batch_size, step)
    result: dict[str, float] = {}
    eval_result: dict[str, float] = {}
    last_eval = -1
    while step < total:
      batch = sharding.global_batch(next(train_iter), mesh)
      state, metrics = train_step(state, batch, train_rng)
      step += 1
      if step == start_step + 1:
        jax.block_until_ready(state)
        result["first_step_s"] = time.perf_counter() - t_start
        if pi == 0:
          logging.info("first step done %.1f s after start (compilation included)",
                       result["first_step_s"])
        progress = logs.Progress(total, config.data.batch_size, step)
      log_now = step % config.log.every_steps == 0 or step == total
      if log_now:
        host = _host_metrics(metrics)
        if not np.isfinite(host["loss"]):
          raise FloatingPointError(
              f"loss is {host['loss']} at step {step}; stopping. Last good checkpoint: "
              f"{ckpt.directory}/{ckpt.latest_step()}. Lower config.optim.lr, set "
              "config.optim.grad_clip or check the input data."
          )
        text, timing = progress.line(step, host, task.progress_keys)
        writer.write(step, {**host, **timing})
        if pi == 0:
          logging.info("%s", text)
        result.update(host)
      stopping = stop.requested(sync=log_now or step % _STOP_SYNC_EVERY == 0)
      t_aside = time.perf_counter()
      if config.log.eval_every_steps and step % config.log.eval_every_steps == 0 and not stopping:
        eval_result, last_eval = evaluate(), step
      if config.log.image_every_steps and step % config.log.image_every_steps == 0:
        save_images()
      progress.exclude(time.perf_counter() - t_aside)
      if stopping or step == total or (config.ckpt.every_steps and
                                       step % config.ckpt.every_steps == 0):
        save("stop request" if stopping else "checkpoint step")
      if stopping:
        logging.warning("stopped at step %d by %s; checkpoint saved", step,
                        signal.Signals(stop.signum).name if stop.signum else "another process")
        break
    else:
      if step == start_step and ckpt.latest_step() != step:  # nothing ran: keep a checkpoint
        save("end of training")
      if last_eval != step:
        eval_result = evaluate()
      if config.log.image_every_steps and step % config.log.image_every_steps:
        save_images()
    result.update({f"eval/{k}": v for k, v in eval_result.items()})
    result["step"] = step
    return result
  finally:
    if stop is not None:
      stop.restore()
    ckpt.close()
    writer.close()
    if hasattr(train_iter, "close"):
      train_iter.close()
