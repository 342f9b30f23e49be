"""Times each input reader alone (training batches per second, as img/s) over generated JPEGs.

  python benchmarks/input_pipeline.py --images 512 --size 320 --image_size 256 --workers 1,2
  python benchmarks/input_pipeline.py --tfds imagenet2012 --data_dir ~/tensorflow_datasets
  python benchmarks/input_pipeline.py --trainer --config vqvae2_imagenet --set model.channels=32

N random-content JPEGs of SIZE x SIZE (smooth colour fields plus noise, so they compress and
decode like photos) are written once into --dir, then each reader's training iterator
(`pipeline.make_train_iterator`, exactly what `python -m vqjax.train` reads) is timed with
`resize="resize_crop"` to --image_size and random flips, for every worker count:

  folder     the JPEG folder (`data.name=folder`): decode + resize on every read
  prepared   the same images after `python -m vqjax.prepare` (ArrayRecord of fitted uint8)
  grain      a tfds dataset prepared as ArrayRecord (--tfds NAME), read through grain
  tfdata     the same tfds dataset as TFRecord through tf.data (needs TensorFlow)

The tfds rows are skipped with a message when --tfds is not given, its data is not prepared in
that format, or TensorFlow is missing. Workers are `data.num_workers` threads, and, where the
config has `data.worker_processes`, as many grain worker processes; mode "direct" calls
`pipeline.load_batch` on the source in that many plain threads, without the grain pipeline
(its per-example shuffle and batching), to tell the reader's cost from the pipeline's. The
one-off cost of preparing is a row of its own. With --trainer, the trainer's jitted step
(`trainer.jit_train_step`, as benchmarks/train_step.py) is also timed over each reader at the
largest worker count and over one synthetic batch reused, so the gap is the input's share.

Prints one row per figure (reader, mode, workers, img/s, image size, cores, machine) and, with
--jsonl FILE, appends each as a JSON line. Needs no accelerator.
"""

import argparse
import concurrent.futures
import contextlib
import functools
import json
import os
import platform
import shutil
import tempfile
import time

import numpy as np
from PIL import Image

from vqjax import configs, errors, prepare
from vqjax.data import pipeline, sources

COLUMNS = ("reader", "mode", "workers", "img/s", "image", "cores", "machine")


def _machine() -> str:
  """The CPU model (from /proc/cpuinfo where there is one)."""
  with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("model name"):
        return " ".join(line.partition(":")[2].split())
  return platform.processor() or platform.machine()


def _cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def make_jpegs(directory: str, count: int, size: int, quality: int = 90) -> str:
  """Writes `count` SIZE x SIZE JPEGs into `directory/images` once (reused when present).

  Each is a bilinear blow-up of an 8x8 random colour grid plus Gaussian noise (sigma 8): large
  smooth areas and fine grain, so file sizes and decode times are close to photos'.
  """
  folder = os.path.join(directory, f"images_{count}x{size}_q{quality}")
  marker = os.path.join(folder, "done")
  if os.path.exists(marker):
    return folder
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(0)
  for i in range(count):
    grid = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    smooth = np.asarray(grid.resize((size, size), Image.Resampling.BILINEAR), np.float32)
    noisy = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(os.path.join(folder, f"{i:06d}.jpg"), quality=quality)
  open(marker, "w").close()
  return folder


def _row(out: list, reader: str, mode: str, workers: int, rate: float, args, **extra) -> None:
  """Prints one figure as a table row and keeps it for --jsonl."""
  tfds = reader.split("+")[-1] in ("grain", "tfdata")
  record = {
    "reader": reader,
    "mode": mode,
    "workers": workers,
    "img_s": round(rate, 1),
    "image": f"{args.tfds if tfds else args.size}->{args.image_size}",
    "cores": _cores(),
    "machine": _machine(),
    **extra,
  }
  cells = [reader, mode, str(workers), f"{rate:,.0f}", record["image"], str(record["cores"])]
  print(_line(cells) + " | " + record["machine"], flush=True)
  out.append(record)


def _line(cells) -> str:
  return " | ".join([f"{cells[0]:>16}"] + [f"{c:>9}" for c in cells[1:]])


def _skip(reader: str, why: str) -> None:
  print(f"{reader:>16} | skipped: {why}", flush=True)


def time_reader(data, batches: int, seed: int = 0) -> float:
  """img/s of `batches` training batches after one warm-up batch (which starts the workers)."""
  it = pipeline.make_train_iterator(data, seed)
  try:
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
      next(it)
    elapsed = time.perf_counter() - t0
  finally:
    it.close()
  return batches * data.batch_size / elapsed


def time_source(data, batches: int, workers: int, seed: int = 0) -> float:
  """img/s of `pipeline.load_batch` straight over the source (no grain pipeline: no shuffle,
  no batching stage, no prefetch) in `workers` threads: the reader's own cost."""
  source = sources.make_source(data, data.train_split)
  b = data.batch_size
  order = np.resize(np.random.default_rng(seed).permutation(len(source)), (batches + 1) * b)
  chunks = [order[k * b : (k + 1) * b] for k in range(batches + 1)]
  read = functools.partial(pipeline.load_batch, source, data_config=data)
  read(chunks[0])  # warm-up: opens files, first decoder calls
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    t0 = time.perf_counter()
    for _ in pool.map(read, chunks[1:]):
      pass
    elapsed = time.perf_counter() - t0
  return batches * b / elapsed


def _worker_counts(text: str) -> list[int]:
  if text:
    return [int(w) for w in text.split(",")]
  counts, w = [], 1
  while w < _cores():
    counts.append(w)
    w *= 2
  return counts + [_cores()]


def _modes(data, wanted: str) -> list[str]:
  """The worker modes asked for that this config has (processes need data.worker_processes)."""
  return [m for m in wanted.split(",") if m != "processes" or "worker_processes" in data]


def _with_workers(data, mode: str, workers: int):
  d = data.copy_and_resolve_references()
  d.num_workers = workers if mode == "threads" else 0
  if "worker_processes" in d:
    d.worker_processes = workers if mode == "processes" else 0
  return d


def _readers(args, base, folder: str, rows: list) -> dict:
  """{reader: data config} of the readers that can run here; prints why the others cannot."""
  out = {}
  wanted = args.readers.split(",")
  folder_data = base.copy_and_resolve_references()
  folder_data.update(name="folder", folder=folder, reader="auto")
  if "folder" in wanted:
    out["folder"] = folder_data
  if "prepared" in wanted:
    where = os.path.join(args.dir, f"prepared_{os.path.basename(folder)}_{args.image_size}")
    workers = max(_worker_counts(args.workers))
    shutil.rmtree(where, ignore_errors=True)  # timed from scratch, every run
    sources.make_source(folder_data, "train")  # the folder check (cached) is not preparing
    t0 = time.perf_counter()
    meta = prepare.prepare(
      folder_data, where, ["train"], workers=workers, process_index=0, process_count=1
    )
    n = meta["splits"]["train"]["num_examples"]
    _row(rows, "prepare", "threads", workers, n / (time.perf_counter() - t0), args, one_off=True)
    d = base.copy_and_resolve_references()
    d.update(name="prepared", prepared_dir=where, reader="auto")
    out["prepared"] = d
  for reader in ("grain", "tfdata"):
    if reader not in wanted:
      continue
    if not args.tfds:
      _skip(reader, "no tfds dataset given (--tfds NAME [--data_dir DIR])")
      continue
    if reader == "tfdata":
      try:
        import tensorflow  # noqa: F401
      except ImportError:
        _skip(reader, "TensorFlow is not installed (pip install tensorflow-cpu)")
        continue
    d = base.copy_and_resolve_references()
    d.update(name=args.tfds, reader=reader, data_dir=args.data_dir, train_split=args.tfds_split)
    try:
      if reader == "grain":
        sources.make_source(d, d.train_split)
      else:
        pipeline.num_examples(d, d.train_split)
    except (errors.UserError, ImportError) as e:
      _skip(reader, " ".join(str(e).split()))
      continue
    out[reader] = d
  return out


def time_trainer(args, readers: dict, rows: list) -> None:
  """Train-step img/s over each reader (largest worker count, threads) and a synthetic batch."""
  import jax
  import jax.numpy as jnp
  import train_step  # the sibling script: its directory is on sys.path when run as a script

  from vqjax.training import sharding, tasks, trainer

  config = configs.load_experiment(args.config)
  for assignment in args.set:
    train_step.apply_override(config, assignment)
  config.data.update(image_size=args.image_size, channels=3, batch_size=args.batch)
  task = tasks.make_task(config)
  mesh = sharding.make_mesh(config.mesh)
  example = jax.tree.map(jnp.asarray, task.dummy_batch())
  state, shardings = sharding.create_sharded_state(
    lambda rng: task.init(rng, example),
    mesh,
    config.mesh.fsdp_min_size,
    jax.random.key(config.seed, impl="rbg"),
  )
  step = trainer.jit_train_step(task, mesh, shardings)
  rng, watch = jax.random.key(config.seed + 1), trainer.new_watch(mesh)
  workers = max(_worker_counts(args.workers))

  def run(next_batch, steps: int) -> float:
    nonlocal state, watch
    metrics = None
    for k in range(steps + 1):  # the first step compiles (per batch structure) and is not timed
      if k == 1:
        jax.block_until_ready(metrics)
        t0 = time.perf_counter()
      previous = metrics
      state, metrics, watch = step(
        state, sharding.global_batch(next_batch(), mesh), rng, None, watch
      )
      if previous is not None:  # one step in flight, as the trainer's loop
        jax.block_until_ready(previous)
    jax.block_until_ready(metrics)
    return steps * args.batch / (time.perf_counter() - t0)

  fixed = None
  for name, data in readers.items():
    it = pipeline.make_train_iterator(_with_workers(data, "threads", workers), 0)
    try:
      fixed = fixed or next(it)  # the synthetic run reuses this one batch: no reading at all
      rate = run(lambda it=it: next(it), args.steps)
    finally:
      it.close()
    _row(rows, f"train+{name}", "threads", workers, rate, args, config=args.config)
  if fixed is not None:
    _row(rows, "train+synthetic", "-", 0, run(lambda: fixed, args.steps), args, config=args.config)


def main(argv: list[str] | None = None) -> list[dict]:
  """Runs the benchmark (see the module docstring); returns the rows printed."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "vqjax_input_bench"))
  p.add_argument("--images", type=int, default=512, help="JPEGs to generate")
  p.add_argument("--size", type=int, default=320, help="their height and width")
  p.add_argument("--quality", type=int, default=90, help="their JPEG quality")
  p.add_argument("--image_size", type=int, default=256, help="config.data.image_size")
  p.add_argument("--batch", type=int, default=64, help="config.data.batch_size")
  p.add_argument("--batches", type=int, default=0, help="timed batches (0 = two epochs)")
  p.add_argument("--workers", default="", help="worker counts, e.g. 1,2,4 (default 1,2,4..cores)")
  p.add_argument("--readers", default="folder,prepared,grain,tfdata")
  p.add_argument("--modes", default="threads,processes,direct", help="worker modes to time")
  p.add_argument("--tfds", default="", help="a prepared tfds dataset for the grain/tfdata rows")
  p.add_argument("--tfds_split", default="train")
  p.add_argument("--data_dir", default="", help="tfds data dir")
  p.add_argument("--trainer", action="store_true", help="also time train steps per reader")
  p.add_argument("--config", default="vqvae2_imagenet", help="experiment for --trainer")
  p.add_argument("--set", action="append", default=[], help="--trainer config group.field=value")
  p.add_argument("--steps", type=int, default=5, help="--trainer timed steps")
  p.add_argument("--jsonl", default="", help="append every row to this JSON-lines file")
  args = p.parse_args(argv)

  folder = make_jpegs(args.dir, args.images, args.size, args.quality)
  base = configs.base_config().data
  base.update(
    image_size=args.image_size,
    channels=3,
    resize="resize_crop",
    random_flip=True,
    batch_size=args.batch,
    train_split="train",
    data_dir=os.path.join(args.dir, "cache"),
  )
  batches = args.batches or max(1, 2 * args.images // args.batch)
  rows: list = []
  print(_line(COLUMNS[:-1]) + " | machine", flush=True)
  readers = _readers(args, base, folder, rows)
  for name, data in readers.items():
    for mode in _modes(data, args.modes):
      if mode == "direct" and name == "tfdata":
        continue  # a stream: no source to read directly
      for workers in _worker_counts(args.workers):
        if mode == "direct":
          rate = time_source(data, batches, workers)
        else:
          rate = time_reader(_with_workers(data, mode, workers), batches)
        _row(rows, name, mode, workers, rate, args)
  if args.trainer:
    time_trainer(args, readers, rows)
  if args.jsonl:
    with open(args.jsonl, "a") as f:
      for r in rows:
        f.write(json.dumps(dict(r, images=args.images, batch=args.batch)) + "\n")
  return rows


if __name__ == "__main__":
  with errors.one_line("input_pipeline"):
    main()
