"""What checkpoint checksums cost: recording and verifying them against saving and restoring.

  python benchmarks/checkpoint_checksums.py                       # ImageNet VQ-VAE-2 + top prior
  python benchmarks/checkpoint_checksums.py --config experiments/fashion_mnist.py

For each config, the whole train state (parameters, optimiser state, model state) is built
with the config's shapes and random values, saved once with vqjax's Checkpointer
(synchronously), and then timed, best of `--repeats`: recording the checksums
(`checkpoint_integrity.write_checksums`), verifying them
(`checkpoint_integrity.verify_checksums`, as every restore does first) and a full restore
(`Checkpointer.restore`, which includes the verification). The step's files are in the page
cache, as right after a save or on a second read: the figures are the CPU cost, not the disk's.
Prints one row per config: size, seconds for each, and verification as a share of the restore.
"""

import argparse
import os
import tempfile
import time

import jax
import numpy as np

from vqjax import _cli, configs
from vqjax.training import checkpoint, checkpoint_integrity, checkpoint_records, sharding, tasks

DEFAULT_CONFIGS = ("experiments/vqvae2_imagenet.py", "experiments/pixelsnail_top_imagenet.py")


def _best(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def measure(spec: str, repeats: int) -> dict:
  config = configs.load_experiment(spec)
  if config.data.name == "codes":  # a prior: synthetic codes of the ImageNet layout's shapes
    config.data.update(
      name="synthetic_codes",
      codes_dir="",
      synthetic_shapes=[[32, 32], [64, 64]],
      synthetic_num_codes=config.vq.num_codes,
    )
  task = tasks.make_task(config)
  batch = jax.tree.map(jax.numpy.asarray, task.dummy_batch())
  abstract = jax.eval_shape(lambda k: task.init(k, batch), jax.random.key(0))
  mesh = sharding.make_mesh(config.mesh)
  shardings = sharding.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)
  rng = np.random.default_rng(0)
  state = jax.tree.map(
    lambda a, s: (
      jax.device_put(rng.standard_normal(a.shape).astype(a.dtype), s)
      if np.issubdtype(a.dtype, np.floating)
      else jax.device_put(np.zeros(a.shape, a.dtype), s)
    ),
    abstract,
    shardings,
  )
  target = checkpoint.abstract_with_shardings(abstract, shardings)
  meta = checkpoint_records.config_meta(config)
  with tempfile.TemporaryDirectory(prefix="vqjax_ckpt_bench_") as tmp:
    ckpt = checkpoint.Checkpointer(tmp, keep=0, async_save=False)
    ckpt.save(1, state, {}, meta)
    ckpt.wait()
    root = os.path.join(tmp, "1")
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(root) for f in files)
    record = _best(lambda: checkpoint_integrity.write_checksums(tmp, 1), repeats)
    verify = _best(lambda: checkpoint_integrity.verify_checksums(tmp, 1), repeats)
    restore = _best(lambda: jax.block_until_ready(ckpt.restore(target, 1, meta)[0]), repeats)
    ckpt.close()
  return {
    "config": spec,
    "mib": size / 2**20,
    "record_s": record,
    "verify_s": verify,
    "restore_s": restore,
    "verify_share": verify / restore,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", action="append", help="experiment config(s) to measure")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  _cli.setup()
  print(
    "| config | checkpoint MiB | record s | verify s | restore s (verify included) "
    "| verify / restore | device |"
  )
  print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
  for spec in args.config or DEFAULT_CONFIGS:
    r = measure(spec, args.repeats)
    print(
      f"| {r['config']} | {r['mib']:.0f} | {r['record_s']:.3f} | {r['verify_s']:.3f} | "
      f"{r['restore_s']:.3f} | {r['verify_share']:.0%} | {jax.devices()[0].device_kind} |"
    )


if __name__ == "__main__":
  main()
