"""Times the trainer's own jitted train step (and the reconstruction forward pass) on synthetic
data, for any experiment config.

The step is `trainer.jit_train_step`, the function `python -m vqjax.train` runs (the task's pure
`train_step` with the per-step key, sharded state, donated state, on the config's mesh); only
the data are random instead of the dataset (uint8 images, as the input pipeline sends them, or
random code maps for a prior), so no tfds or grain is needed:

  python benchmarks/train_step.py --config experiments/vqvae2_imagenet.py --dtype bfloat16 \
      --cache /tmp/jax_cache
  python benchmarks/train_step.py --config vqvae2_imagenet --set model.upconv_impl=lax \
      --set vq.stats_impl=scatter

Prints one JSON line: train img/s and ms/step, reconstruction img/s, compile time of the step
(with the persistent compilation cache when --cache is given: run twice to see a warm launch),
time from launch to the first step, peak device memory. `benchmarks/suite.py` builds its
workloads from the functions here (`load_config`, `setup`, `compile_step`, `time_steps`, ...).
"""

import argparse
import ast
import dataclasses
import json
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from arguments import at_least

from vqjax import _cli, config_checks, configs, errors
from vqjax.training import sharding, tasks, trainer

# As `python -m vqjax.train` does (vqjax/_cli.py), so the step is timed in the trainer's process
# setting: XLA:CPU's convolution kernels and glibc's allocator (the scripts that import this
# module get them too).
_cli.set_cpu_xla_flag()
_cli.tune_cpu_malloc()


def apply_override(config, assignment: str, flag: str = "--set") -> None:
  """Applies "group.field=value" (value parsed as a Python literal, else a string; any depth
  of dotted path, "seed=1" too).

  Raises `errors.UserError`, naming `flag` (the command-line flag the assignment came from),
  for an assignment without "=", a field the config does not have, or a value of another type
  than the field's.
  """
  key, sep, text = assignment.partition("=")
  if not sep:
    raise errors.UserError(f"{flag} {assignment!r}: an override is given as group.field=value")
  try:
    value = ast.literal_eval(text)
  except (ValueError, TypeError, SyntaxError, RecursionError):  # not a literal: the text
    value = text
  *groups, field = key.split(".")
  node = config
  for name in groups:
    node = node.get(name) if isinstance(node, ml_collections.ConfigDict) else None
  if not isinstance(node, ml_collections.ConfigDict) or field not in node:
    raise errors.UserError(f"{flag} {assignment!r}: config has no field {key!r}")
  old = node[field]
  try:
    setattr(node, field, value)
  except (TypeError, ValueError):
    raise errors.UserError(
      f"{flag} {assignment!r}: config.{key} takes a value of type {type(old).__name__}, "
      f"got {value!r} of type {type(value).__name__}"
    ) from None


def _time(fn, steps: int) -> float:
  """Seconds per call of `fn()` over `steps` calls (the result of the last is waited for)."""
  out = None
  t0 = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / steps


def load_config(name: str, dtype: str = "", overrides: Sequence[str | tuple[str, str]] = ()):
  """An experiment config ("vqvae2_imagenet", "experiments/x.py:smoke") with the compute dtype
  and "group.field=value" overrides applied, validated. An override may be given as (flag,
  assignment), the flag its errors name (default "--set")."""
  config = configs.load_experiment(name)
  if dtype:
    config.model.dtype = dtype
  for item in overrides:
    flag, assignment = ("--set", item) if isinstance(item, str) else item
    apply_override(config, assignment, flag)
  config_checks.validate(config)
  return config


def synthetic_batch(
  task: tasks.Task, config: ml_collections.ConfigDict, batch_size: int, seed: int = 0
) -> dict[str, np.ndarray]:
  """A random host batch shaped like the task's real ones: uint8 images, code maps in
  [0, vq.num_codes), labels 0 (any class costs the same)."""
  rng = np.random.default_rng(seed)
  batch = {}
  for key, example in task.dummy_batch().items():
    shape = (batch_size, *example.shape[1:])
    if key == "image":
      batch[key] = rng.integers(0, 256, shape, dtype=np.uint8)
    elif key == "label":
      batch[key] = np.zeros(shape, example.dtype)
    elif np.issubdtype(example.dtype, np.integer):
      batch[key] = rng.integers(0, config.vq.num_codes, shape).astype(example.dtype)
    else:
      batch[key] = rng.uniform(-1, 1, shape).astype(example.dtype)
  return batch


@dataclasses.dataclass
class Bench:
  """One task's jitted train step with its sharded state and a synthetic batch on the mesh."""

  config: ml_collections.ConfigDict
  task: tasks.Task
  mesh: jax.sharding.Mesh
  state: Any
  step: Any
  batch: dict[str, jax.Array]
  rng: jax.Array
  watch: dict[str, jax.Array]
  batch_size: int
  lowered: Any = None
  compiled: Any = None
  metrics: Any = None


def setup(
  config: ml_collections.ConfigDict,
  batch_size: int = 0,
  devices: Sequence[jax.Device] | None = None,
) -> Bench:
  """Builds what `python -m vqjax.train` would run for `config`, with synthetic data.

  Args:
    config: a validated config (`load_config`).
    batch_size: global batch; 0 = `config.data.batch_size`.
    devices: the mesh's devices; None = all (as the trainer).

  Returns:
    A `Bench` whose step is not compiled yet.
  """
  batch_size = batch_size or config.data.batch_size
  task = tasks.make_task(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_batch_size(batch_size, mesh)
  example = jax.tree.map(jnp.asarray, task.dummy_batch())
  state, shardings = sharding.create_sharded_state(
    lambda rng: task.init(rng, example),
    mesh,
    config.mesh.fsdp_min_size,
    jax.random.key(config.seed, impl="rbg"),  # as the trainer: faster init compile
  )
  step = trainer.jit_train_step(task, mesh, shardings)
  batch = sharding.global_batch(synthetic_batch(task, config, batch_size), mesh)
  rng = trainer.train_key(config)
  return Bench(config, task, mesh, state, step, batch, rng, trainer.new_watch(mesh), batch_size)


def compile_step(b: Bench, compiler_options: dict[str, Any] | None = None) -> float:
  """Compiles the step for `b`'s arguments (kept in `b.compiled`); returns the seconds taken.

  `compiler_options`: XLA debug options for this executable alone (e.g.
  {"xla_cpu_use_fusion_emitters": False}), so forms can be compared in one process.
  """
  t0 = time.perf_counter()
  b.lowered = b.step.lower(b.state, b.batch, b.rng, None, b.watch)
  b.compiled = b.lowered.compile(compiler_options) if compiler_options else b.lowered.compile()
  return time.perf_counter() - t0


def run_step(b: Bench) -> Any:
  """Dispatches one compiled step on `b` (state donated and replaced); returns its metrics."""
  b.state, b.metrics, b.watch = b.compiled(b.state, b.batch, b.rng, None, b.watch)
  return b.metrics


def time_steps(b: Bench, steps: int) -> float:
  """Seconds per step over `steps` steps, after one untimed step (the codebook init runs in
  the first step of a stage-1 run)."""
  jax.block_until_ready(run_step(b))
  return _time(lambda: run_step(b), steps)


def time_recon(b: Bench, steps: int) -> float:
  """Seconds per reconstruction forward pass of `b`'s images (stage-1 tasks)."""
  variables = {"params": b.state.params, **b.state.model_state}
  images = b.batch["image"].astype(jnp.float32) / 127.5 - 1.0
  recon = jax.jit(lambda v, x: b.task.model.apply(v, x)[0])
  jax.block_until_ready(recon(variables, images))
  return _time(lambda: recon(variables, images), steps)


def _first(analysis: Any) -> Any:
  """Older JAX returns cost/memory analyses as a list with one entry per program."""
  return analysis[0] if isinstance(analysis, (list, tuple)) else analysis


def flops(lowered: Any) -> float | None:
  """FLOPs of one call of a lowered (not compiled) function, all devices together: XLA's cost
  analysis of the program before optimisation, or None where it is not available.

  Not the compiled program's: on GPUs the compiled program's convolutions are cuDNN custom
  calls, which XLA's cost model counts as 0 FLOPs (an H200 run of the ImageNet stage-1 step
  reported 0.42 GFLOP per image compiled, 23.0 lowered, of which convolutions are nearly all).
  """
  try:
    value = float((_first(lowered.cost_analysis()) or {}).get("flops", -1.0))
  except Exception:  # noqa: BLE001 -- a backend without a cost model: no figure
    return None
  return value if value > 0 else None


def memory_gib(compiled: Any) -> float | None:
  """Device memory one call of a compiled function needs (arguments + outputs + temporaries,
  minus donated buffers reused as outputs), in GiB, from XLA's memory analysis."""
  try:
    m = _first(compiled.memory_analysis())
    used = (
      m.argument_size_in_bytes
      + m.output_size_in_bytes
      + m.temp_size_in_bytes
      - m.alias_size_in_bytes
    )
  except Exception:  # noqa: BLE001 -- not reported by this backend
    return None
  return used / 2**30


def device_peak_gib() -> float:
  """The device allocator's peak since the process started, in GiB (0 where not reported)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use", 0) / 2**30


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="experiments/vqvae2_imagenet.py")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--batch", type=at_least(0), default=0, help="global batch (0 = the config's)")
  p.add_argument("--steps", type=at_least(1), default=20)
  p.add_argument("--cache", default="", help="persistent compilation cache directory")
  p.add_argument("--set", action="append", default=[], help="config override group.field=value")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
  a = parse(argv)
  t_launch = time.perf_counter()
  trainer.setup_compilation_cache(a.cache)

  config = load_config(a.config, a.dtype, a.set)
  b = setup(config, a.batch)
  compile_s = compile_step(b)
  jax.block_until_ready(run_step(b))  # codebook init runs here
  first_step_s = time.perf_counter() - t_launch
  train_s = _time(lambda: run_step(b), a.steps)
  loss = float(b.metrics["loss"])
  recon_s = time_recon(b, a.steps) if "image" in b.batch else None  # a prior: no images
  shape = b.batch["image"].shape if "image" in b.batch else (0, 0)
  row = {
    "config": a.config,
    "dtype": a.dtype,
    "batch": b.batch_size,
    "image_size": shape[1],
    "overrides": a.set,
    "mesh": dict(b.mesh.shape),
    "train_img_s": round(b.batch_size / train_s, 1),
    "train_ms": round(1000 * train_s, 2),
    "recon_img_s": round(b.batch_size / recon_s, 1) if recon_s else None,
    "compile_s": round(compile_s, 2),
    "launch_to_first_step_s": round(first_step_s, 2),
    "peak_mem_gib": round(device_peak_gib(), 2),
    "loss": round(loss, 5),
    "cache": bool(a.cache),
    "device": jax.devices()[0].device_kind,
    "jax": jax.__version__,
  }
  print(json.dumps(row), flush=True)
  return row


if __name__ == "__main__":
  with errors.one_line("train_step"):
    main()
