"""Times the trainer's own jitted train step (and the reconstruction forward pass) on synthetic
images, for any experiment config.

The step is `trainer.jit_train_step`, the function `python -m vqjax.train` runs (the task's pure
`train_step` with the per-step key, sharded state, donated state, on the config's mesh); only
the data are random images instead of the dataset, so no tfds or grain is needed:

  python benchmarks/train_step.py --config experiments/vqvae2_imagenet.py --dtype bfloat16 \
      --cache /tmp/jax_cache
  python benchmarks/train_step.py --config vqvae2_imagenet --set model.upconv_impl=lax \
      --set vq.stats_impl=scatter

Prints one JSON line: train img/s and ms/step, reconstruction img/s, compile time of the step
(with the persistent compilation cache when --cache is given: run twice to see a warm launch),
time from launch to the first step, peak device memory.
"""

import argparse
import ast
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from vqjax import configs
from vqjax.training import sharding, tasks, trainer


def _set(config, assignment: str) -> None:
  """Applies "group.field=value" (value parsed as a Python literal, else a string)."""
  key, _, text = assignment.partition("=")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  group, field = key.split(".", 1)
  setattr(config[group], field, value)


def _time(fn, steps: int) -> float:
  """Seconds per call of `fn()` over `steps` calls (the result of the last is waited for)."""
  out = None
  t0 = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / steps


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="experiments/vqvae2_imagenet.py")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--batch", type=int, default=0, help="global batch (0 = the config's)")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--cache", default="", help="persistent compilation cache directory")
  p.add_argument("--set", action="append", default=[], help="config override group.field=value")
  a = p.parse_args()
  t_launch = time.perf_counter()
  trainer.setup_compilation_cache(a.cache)

  config = configs.load_experiment(a.config)
  config.model.dtype = a.dtype
  for assignment in a.set:
    _set(config, assignment)
  configs.validate(config)
  batch_size = a.batch or config.data.batch_size
  task = tasks.make_task(config)
  mesh = sharding.make_mesh(config.mesh)
  example = jax.tree.map(jnp.asarray, task.dummy_batch())
  state, shardings = sharding.create_sharded_state(
    lambda rng: task.init(rng, example),
    mesh,
    config.mesh.fsdp_min_size,
    jax.random.key(config.seed, impl="rbg"),  # as the trainer: faster init compile
  )
  step = trainer.jit_train_step(task, mesh, shardings)
  shape = (batch_size,) + example["image"].shape[1:]
  images = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
  batch = sharding.global_batch({"image": images}, mesh)
  rng = jax.random.key(config.seed + 1)
  watch = trainer.new_watch(mesh)

  t0 = time.perf_counter()
  compiled = step.lower(state, batch, rng, None, watch).compile()
  compile_s = time.perf_counter() - t0
  state, metrics, watch = compiled(state, batch, rng, None, watch)  # codebook init runs here
  jax.block_until_ready(metrics)
  first_step_s = time.perf_counter() - t_launch

  def train():
    nonlocal state, metrics, watch
    state, metrics, watch = compiled(state, batch, rng, None, watch)
    return metrics

  train_s = _time(train, a.steps)
  loss = float(metrics["loss"])
  variables = {"params": state.params, **state.model_state}
  recon = jax.jit(lambda v, x: task.model.apply(v, x)[0])
  jax.block_until_ready(recon(variables, batch["image"]))
  recon_s = _time(lambda: recon(variables, batch["image"]), a.steps)
  mem = (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0)
  print(
    json.dumps(
      {
        "config": a.config,
        "dtype": a.dtype,
        "batch": batch_size,
        "image_size": shape[1],
        "overrides": a.set,
        "mesh": dict(mesh.shape),
        "train_img_s": round(batch_size / train_s, 1),
        "train_ms": round(1000 * train_s, 2),
        "recon_img_s": round(batch_size / recon_s, 1),
        "compile_s": round(compile_s, 2),
        "launch_to_first_step_s": round(first_step_s, 2),
        "peak_mem_gib": round(mem / 2**30, 2),
        "loss": round(loss, 5),
        "cache": bool(a.cache),
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
      }
    ),
    flush=True,
  )


if __name__ == "__main__":
  main()
