"""Times the trainer's own sharded train step for an experiment config on synthetic images.

This is the step `python -m vqjax.train` runs (the task's pure `train_step`, jitted with the
state's shardings and donated state, on the config's mesh), fed random images instead of the
dataset, so it runs where tfds/grain are not installed:

  python benchmarks/train_step.py --config experiments/vqvae2_imagenet.py --dtype bfloat16 \
      --cache /tmp/jax_cache

Prints one JSON line: img/s, ms/step, compile time of the step (with the persistent compilation
cache when --cache is given: run twice to see the warm-cache launch), peak device memory.
"""

import argparse
import importlib.util
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from vqjax.training import sharding, steps


def load_config(path: str):
  """`experiments/x.py[:variant]` -> ConfigDict, without absl flags."""
  path, _, variant = path.partition(":")
  spec = importlib.util.spec_from_file_location("experiment", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant or None)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="experiments/vqvae2_imagenet.py")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--batch", type=int, default=0, help="global batch (0 = the config's)")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--cache", default="", help="persistent compilation cache directory")
  a = p.parse_args()
  t_launch = time.perf_counter()
  if a.cache:
    jax.config.update("jax_compilation_cache_dir", a.cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

  config = load_config(a.config)
  config.model.dtype = a.dtype
  batch_size = a.batch or config.data.batch_size
  size, channels = config.data.image_size, config.data.channels
  task = steps.make_task(config)
  mesh = sharding.make_mesh(config.mesh)
  example = {"image": jnp.zeros((1, size, size, channels), jnp.float32)}
  state, shardings = sharding.create_sharded_state(
      lambda rng: task.init(rng, example), mesh, config.mesh.fsdp_min_size,
      jax.random.key(config.seed, impl="rbg"),  # as the trainer: faster init compile
  )
  repl = sharding.replicated(mesh)
  train_step = jax.jit(
      task.train_step,
      in_shardings=(shardings, sharding.batch_sharding(mesh), repl),
      out_shardings=(shardings, repl),
      donate_argnums=0,
  )
  rng = jax.random.key(1)
  images = np.random.default_rng(0).uniform(-1, 1, (batch_size, size, size, channels))
  batch = sharding.global_batch({"image": images.astype(np.float32)}, mesh)

  t0 = time.perf_counter()
  compiled = train_step.lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - t0
  state, metrics = compiled(state, batch, rng)  # warm-up (first codebook init runs here)
  jax.block_until_ready(metrics)
  first_step_s = time.perf_counter() - t_launch
  t0 = time.perf_counter()
  for _ in range(a.steps):
    state, metrics = compiled(state, batch, rng)
  loss = float(metrics["loss"])
  dt = (time.perf_counter() - t0) / a.steps
  mem = (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0)
  print(json.dumps({
      "config": a.config, "dtype": a.dtype, "batch": batch_size, "image_size": size,
      "mesh": dict(mesh.shape), "train_img_s": round(batch_size / dt, 1),
      "train_ms": round(1000 * dt, 2), "compile_s": round(compile_s, 2),
      "launch_to_first_step_s": round(first_step_s, 2), "peak_mem_gib": round(mem / 2**30, 2),
      "loss": round(loss, 5), "cache": bool(a.cache), "device": jax.devices()[0].device_kind,
      "jax": jax.__version__,
  }), flush=True)


if __name__ == "__main__":
  main()
