"""Decodes and fits a dataset once into ArrayRecord shards that train without decoding.

  python -m vqjax.prepare --config EXPERIMENT[:variant] --out DIR [--splits train,test]

Every example of the splits (default: the config's train and eval splits) is read exactly as
the data layer reads it (`pipeline.load_batch` over `sources.make_source`: decoded, converted to
`channels`, fitted to `image_size` by `resize`, uint8, unflipped) and written with its other
features to `DIR` in the format of data/prepared.py. Then train with
`--config.data.name=prepared --config.data.prepared_dir=DIR` and the same image_size, channels
and resize: the pipeline only scales and flips the stored images.

Shards are split over processes (process p writes shards p, p + P, ...: `jax.process_index()`
and `jax.process_count()`, or --process_index/--process_count for independent launches). Each
shard is written under a temporary name and renamed when complete, so running the same command
again after a crash skips the finished shards and redoes the rest; the process that sees the
last shard finished marks the dataset complete.
"""

import concurrent.futures
import functools
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from vqjax import _cli, configs, errors, paths

# The library, and JAX with it, is imported inside the functions that use it, so that --help
# and flag errors answer at once (JAX alone takes seconds to import).

# With --examples_per_shard=0 a shard holds about this many bytes of images: small enough to
# redo quickly after a crash, large enough to keep the file count low.
SHARD_BYTES = 256 * 2**20
# Config fields that decide which examples are read and how (the location fields only for the
# readers that read them); a directory prepared under other values is refused rather than mixed
# with this run's shards.
_SOURCE_FIELDS = ("name", "image_size", "channels", "resize", "exclude_labels")
_LOCATION_FIELDS = {"folder": ("folder",), "local": ("local_dir",), "grain": ("data_dir",)}
_NOT_PREPARABLE = ("prepared", "codes", "synthetic_codes")


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program: several CLIs share names
  like --config, and tests import them together)."""
  config_flags.DEFINE_config_file(
    "config", None, "Experiment config: experiments/X.py, X.py or X, optionally :variant."
  )
  flags.DEFINE_string("out", None, "Directory to write the prepared dataset to.")
  flags.DEFINE_list("splits", None, "Splits to prepare (default: train and eval splits).")
  flags.DEFINE_integer(
    "examples_per_shard", 0, f"Examples per shard (0 = about {SHARD_BYTES >> 20} MiB of images)."
  )
  flags.DEFINE_integer("workers", 0, "Decoding threads (0 = one per core).")
  flags.DEFINE_integer("batch", 64, "Examples each thread reads at a time.")
  flags.DEFINE_integer("process_index", -1, "This process (-1 = jax.process_index()).")
  flags.DEFINE_integer("process_count", -1, "Processes sharing the work (-1 = jax's count).")
  flags.DEFINE_bool("verbose", False, "Show the traceback of user errors too.")


def _source_record(data: Any, reader: str) -> dict:
  """What decides the stored examples, as JSON: the concrete reader, `_SOURCE_FIELDS` and where
  that reader reads from."""
  out = {"reader": reader}
  for f in _SOURCE_FIELDS + _LOCATION_FIELDS.get(reader, ()):
    if f in data:  # exclude_labels is newer than some configs
      v = data[f]
      v = list(v) if isinstance(v, tuple) else v
      out[f] = paths.absolute(v) if f in ("folder", "local_dir", "data_dir") and v else v
  return out


def _ordered(
  pool: concurrent.futures.Executor, fn: Callable[[Any], Any], items: list, ahead: int
) -> Iterator[Any]:
  """`fn` over `items` in `pool`, yielded in order with at most `ahead` calls in flight (so a
  slow writer does not let decoded batches pile up in memory)."""
  pending = []
  for item in items:
    pending.append(pool.submit(fn, item))
    if len(pending) >= ahead:
      yield pending.pop(0).result()
  for future in pending:
    yield future.result()


class _Progress:
  """One log line per shard and at most every `every_s` seconds in between."""

  def __init__(self, split: str, total: int, every_s: float = 10.0):
    self.split, self.total, self.every_s = split, total, every_s
    self.done = self.written = 0
    self.t0 = self.last = time.perf_counter()

  def add(self, n: int, written: bool, shard_done: str = "") -> None:
    self.done += n
    self.written += n if written else 0
    now = time.perf_counter()
    if not shard_done and now - self.last < self.every_s:
      return
    self.last = now
    rate = self.written / max(now - self.t0, 1e-9)
    left = self.total - self.done
    eta = f"{left / rate:.0f}s" if rate > 0 else "?"
    logging.info(
      "prepare %s: %s%d/%d examples, %.0f img/s, ETA %s",
      self.split,
      f"{shard_done}; " if shard_done else "",
      self.done,
      self.total,
      rate,
      eta,
    )


def _check_compatible(old: dict, meta: dict, out: str) -> None:
  """Raises a one-line UserError when `out` holds a dataset prepared otherwise."""
  was, now = old.get("source", {}), meta["source"]
  differ = [k for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
  if differ:
    shown = ", ".join(f"{k}={was.get(k)!r} (now {now.get(k)!r})" for k in differ)
    raise errors.UserError(
      f"{out} holds data prepared with {shown}; choose another --out or delete it"
    )
  for base, info in meta["splits"].items():
    before = old["splits"].get(base)
    key = ("split", "num_examples", "examples_per_shard", "num_shards")
    if before and [before[k] for k in key] != [info[k] for k in key]:
      raise errors.UserError(
        f"{out} holds split {base!r} prepared as {before['split']!r} ({before['num_examples']} "
        f"examples, {before.get('examples_per_shard')} per shard), now {info['split']!r} "
        f"({info['num_examples']}, {info['examples_per_shard']} per shard); use the same "
        "--examples_per_shard, another --out, or delete it"
      )


def _read_records(indices: Any, source: Any, data: Any) -> list[bytes]:
  """The records of the examples at `indices`, read and fitted as the data layer does."""
  from vqjax.data import codes, pipeline

  loaded = pipeline.load_batch(source, indices, data)
  return [codes.encode_example({k: v[j] for k, v in loaded.items()}) for j in range(len(indices))]


def _records(
  pool: concurrent.futures.Executor,
  read: Callable[[Any], list[bytes]],
  chunks: list,
  ahead: int,
  progress: _Progress,
) -> Iterator[bytes]:
  """The records of `chunks` read in `pool`, in order, counted in `progress`."""
  for records in _ordered(pool, read, chunks, ahead):
    yield from records
    progress.add(len(records), True)


def _all_shards_exist(out: str, meta: dict) -> bool:
  return all(epath.Path(out, s).is_file() for i in meta["splits"].values() for s in i["shards"])


def prepare(
  data: Any,
  out: str,
  splits: list[str] | None = None,
  examples_per_shard: int = 0,
  workers: int = 0,
  batch: int = 64,
  process_index: int = -1,
  process_count: int = -1,
  experiment: str = "",
) -> dict:
  """Writes the prepared dataset of `config.data` (see the module docstring).

  Args:
    data: `config.data` of the run the data is for.
    out: output directory.
    splits: split names with optional slices; default the config's train and eval splits. Two
      slices of one split ("train[:90%]", "train[90%:]") prepare that split whole.
    examples_per_shard: examples per shard; 0 = about `SHARD_BYTES` of images.
    workers: decoding threads; 0 = one per core.
    batch: examples each thread reads at a time.
    process_index: this process; -1 = `jax.process_index()`.
    process_count: processes sharing the shards; -1 = `jax.process_count()`.
    experiment: the experiment spec, recorded in the metadata for people reading it.

  Returns:
    The metadata (complete once every process has finished).

  Raises:
    errors.UserError: the data cannot be read, has no "image", or `out` holds data prepared
      from another source, size or split.
  """
  import numpy as np

  from vqjax.data import codes, pipeline, prepared, sources

  if data.name in _NOT_PREPARABLE:
    raise errors.UserError(f"config.data.name={data.name!r} is already stored: nothing to prepare")
  if process_index < 0 or process_count < 0:
    import jax

    process_index = jax.process_index() if process_index < 0 else process_index
    process_count = jax.process_count() if process_count < 0 else process_count
  if not 0 <= process_index < process_count:
    raise errors.UserError(f"process_index {process_index} not in [0, {process_count})")
  if batch <= 0 or examples_per_shard < 0:
    raise errors.UserError(f"batch={batch} must be > 0 and examples_per_shard >= 0")
  workers = workers if workers > 0 else os.cpu_count() or 1
  reader = sources.resolve_reader(data)
  size, channels = data.image_size, data.channels
  per_shard = examples_per_shard or max(1, SHARD_BYTES // (size * size * channels))

  wanted: dict[str, list[str]] = {}
  for split in splits or [data.train_split, data.eval_split]:
    wanted.setdefault(sources.parse_split(split)[0], []).append("".join(split.split()))
  plan = {}
  for base, asked in wanted.items():
    split = asked[0] if len(set(asked)) == 1 else base  # two slices: the whole split
    source = sources.make_source(data, split)
    n = len(source)
    num_shards = max(1, -(-n // per_shard))
    names = [codes.shard_name(base, k, num_shards) for k in range(num_shards)]
    plan[base] = (split, source, n, names)
  first = next((p for p in plan.values() if p[2] > 0), None)
  if first is None:
    raise errors.UserError(f"the splits {sorted(plan)} of config.data.name={data.name!r} are empty")
  example = pipeline.load_batch(first[1], [0], data)
  if pipeline.IMAGE not in example:
    raise errors.UserError(
      f"config.data.name={data.name!r} gives no 'image' feature (has {sorted(example)}): "
      "prepare stores fitted images"
    )
  meta = {
    "format": prepared.FORMAT,
    "image_size": size,
    "channels": channels,
    "resize": data.resize,
    "features": {k: {"dtype": v.dtype.str, "shape": list(v.shape[1:])} for k, v in example.items()},
    "source": _source_record(data, reader),
    "experiment": experiment,
    "splits": {
      base: {
        "split": split,
        "num_examples": n,
        "examples_per_shard": per_shard,
        "num_shards": len(names),
        "shards": names,
      }
      for base, (split, _, n, names) in plan.items()
    },
    "complete": False,
  }
  epath.Path(out).mkdir(parents=True, exist_ok=True)
  old = None
  if epath.Path(out, codes.METADATA).exists():
    old = prepared.read_metadata(out, complete=False)
    _check_compatible(old, meta, out)
    meta["splits"] = {**old["splits"], **meta["splits"]}  # keep splits prepared earlier
  finished = old is not None and old.get("complete") and dict(old, complete=False) == meta
  if finished and all(
    not codes.shard_problem(os.path.join(out, s))
    for i in meta["splits"].values()
    for s in i["shards"]
  ):
    # Finished, every shard matching its check record: left as it is, so runs reading it
    # meanwhile never see it incomplete. A damaged shard is rewritten below.
    logging.info("prepared dataset %s is already complete", out)
    return old
  # Every process writes the same "not complete" metadata before its shards, so shards on disk
  # always have metadata a later run can check them against.
  codes.write_metadata(out, meta)

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for base, (_, source, n, names) in plan.items():
      mine = range(process_index, len(names), process_count)
      total = sum(min(n, (k + 1) * per_shard) - k * per_shard for k in mine)
      progress = _Progress(base, total)
      read = functools.partial(_read_records, source=source, data=data)
      for k in mine:
        path = os.path.join(out, names[k])
        lo, hi = k * per_shard, min(n, (k + 1) * per_shard)
        if codes.reusable_shard(path):  # finished by an earlier run, and intact
          progress.add(hi - lo, False, f"shard {k + 1}/{len(names)} already written")
          continue
        chunks = [np.arange(s, min(s + batch, hi)) for s in range(lo, hi, batch)]
        codes.write_shard(path, _records(pool, read, chunks, 2 * workers, progress))
        progress.add(0, True, f"shard {k + 1}/{len(names)} written")
  if _all_shards_exist(out, meta):
    meta["complete"] = True
    codes.write_metadata(out, meta)
    logging.info(
      "prepared dataset complete in %s; train with --config.data.name=prepared "
      "--config.data.prepared_dir=%s",
      out,
      out,
    )
  return meta


def _parse_flags(argv: list[str]) -> list[str]:
  """absl parsing where a bad experiment or override is one line, not a traceback."""
  try:
    return flags.FLAGS(configs.resolve_config_argv(argv))
  except errors.UserError as e:
    raise SystemExit(f"vqjax.prepare: {e}") from None
  except (AttributeError, KeyError, TypeError, flags.Error) as e:
    detail = " ".join(str(e).split())
    raise SystemExit(f"vqjax.prepare: bad flag or config override: {detail}") from None


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  for flag, value in (("--config", f.config), ("--out", f.out)):
    if not value:
      raise SystemExit(f"vqjax.prepare: {flag} is required")
  _cli.setup()  # before JAX creates its backends
  with errors.one_line("vqjax.prepare", f.verbose):
    meta = prepare(
      f.config.data,
      f.out,
      f.splits,
      f.examples_per_shard,
      f.workers,
      f.batch,
      f.process_index,
      f.process_count,
      experiment=f["config"].config_filename,
    )
  shown = ", ".join(f"{k}={v['num_examples']}" for k, v in meta["splits"].items())
  state = "complete" if meta["complete"] else "this process's shards done"
  print(f"prepared {shown} in {f.out} ({state})", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  _cli.run(main, flags_parser=_parse_flags)
