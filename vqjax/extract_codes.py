"""Encodes a dataset with a trained stage-1 model into a code dataset for stage 2.

  python -m vqjax.extract_codes --workdir STAGE1_WORKDIR --out CODES_DIR [--splits train,test]
      [--rotations 4]

Every split of the run's dataset (default: its train and eval splits, unflipped, in example
order) is encoded with `encode_to_indices` into one code map per level plus the label, and
written as ArrayRecord shards with `metadata.json` (data/codes.py). Shards are split over
processes (process p writes shards p, p + P, ...); each is written to a temporary file and
renamed when complete, so a killed extraction restarts where it stopped and keeps the finished
shards. Then: `--config.data.name=codes --config.data.codes_dir=CODES_DIR`.

`--rotations 4` writes every image four times in a row, rotated 0-3 quarter turns and labelled
by the turns instead of its class: the training set of the rotation priors of the `rotation`
anomaly score (evaluation/rotation.py).
"""

import json
import os
import sys
import time

from absl import app, flags, logging
from etils import epath

from vqjax import _cli, errors, links, paths

# The library, and JAX with it, is imported inside the functions that use it, so that --help
# and flag errors answer at once (JAX alone takes seconds to import).


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program: several CLIs share names
  like --workdir, and tests import them together)."""
  flags.DEFINE_string("workdir", None, "Stage-1 run (trainer workdir or converted).")
  flags.DEFINE_string("out", None, "Directory to write the code dataset to.")
  flags.DEFINE_list("splits", None, "Splits to encode (default: train and eval splits).")
  flags.DEFINE_integer("batch", 0, "Examples per encoding batch (0 = eval batch size).")
  flags.DEFINE_integer("examples_per_shard", 10_000, "Examples per ArrayRecord shard.")
  flags.DEFINE_integer("step", None, "Checkpoint step of the stage-1 run (default newest).")
  flags.DEFINE_integer(
    "rotations", 0, "4: each image as 4 examples, rotated 0-3 quarter turns, labelled 0-3."
  )
  flags.DEFINE_bool("verbose", False, "Show the traceback of user errors too.")


def _stage1_record(workdir: str, out: str, config, step) -> dict:
  from vqjax.training import checkpoint_records, identity

  meta = checkpoint_records.config_meta(config)
  return {
    # Relative to the code dataset where both lie in one pipeline workdir (links.py).
    "workdir": links.record(workdir, out),
    "run_id": identity.read_run_id(workdir),
    "step": step,
    "fingerprint": meta["model_fingerprint"],
  }


_EXTRACTION = "extraction.json"
# What an extraction.json written before a setting existed means by its absence.
_BEFORE = {"rotations": 0}


def _check_extraction(out, stage1, splits, examples_per_shard, process_index, rotations=0) -> None:
  """Shards already in `out` count as done only if they were written from the same checkpoint
  step and the same split slices: `out/extraction.json`, written before the first shard,
  records them; a different request is a one-line error rather than codes mixed silently."""
  from vqjax.data import sources

  wanted = {
    "stage1_workdir": stage1["workdir"],
    "stage1_step": stage1["step"],
    "splits": {sources.parse_split(s)[0]: s for s in splits},
    "examples_per_shard": int(examples_per_shard),
    "rotations": int(rotations),
  }
  path = os.path.join(out, _EXTRACTION)
  try:
    with epath.Path(path).open() as f:
      done = json.load(f)
  except FileNotFoundError:
    done = None
  except (OSError, ValueError):
    raise errors.UserError(f"cannot read {path}: delete {out} and extract again") from None

  def write(record):
    if process_index == 0:  # atomically: other processes may be reading it
      paths.write_text(path, json.dumps(record, indent=2, sort_keys=True))

  if done is None:
    write(wanted)
    return
  problems = [
    f"{k} {done.get(k, _BEFORE.get(k))!r} (now {v!r})"
    for k, v in wanted.items()
    # a moved workdir is fine
    if k not in ("splits", "stage1_workdir") and done.get(k, _BEFORE.get(k)) != v
  ]
  for base, spec in wanted["splits"].items():
    before = (done.get("splits") or {}).get(base)
    if before is not None and before != spec:
      problems.append(f"split {before!r} (now {spec!r})")
  if problems:
    raise errors.UserError(
      f"{out} holds codes extracted with another {'; '.join(problems)}: delete it (and what was "
      "trained on it) or choose another --out"
    )
  if set(wanted["splits"]) - set(done.get("splits") or {}):
    write({**done, "splits": {**(done.get("splits") or {}), **wanted["splits"]}})


def extract(
  workdir: str,
  out: str,
  splits: list[str] | None = None,
  batch_size: int = 0,
  examples_per_shard: int = 10_000,
  step: int | None = None,
  rotations: int = 0,
) -> dict:
  """Writes the code dataset of a stage-1 run (see the module docstring).

  Args:
    workdir: the stage-1 run (anything `vqjax.load_run` reads).
    out: output directory.
    splits: split names (with optional slices); default the run's train and eval splits.
    batch_size: examples per encoding batch; 0 = the run's eval batch size.
    examples_per_shard: examples per shard.
    step: the stage-1 checkpoint step; None = the newest good one.
    rotations: 0, or 4: every image becomes 4 examples in a row, the image rotated 0, 1, 2 and
      3 quarter turns counter-clockwise, labelled by the turns instead of its own label: the
      training set of rotation priors (evaluation/rotation.py).

  Returns:
    The metadata written.

  Raises:
    errors.UserError: no trained model in `workdir`, `out` holds codes of another model or
      extraction, or `rotations` is not 0 or 4.
  """
  import jax
  import numpy as np
  from array_record.python.array_record_module import ArrayRecordWriter
  from jax.experimental import multihost_utils

  from vqjax import runs
  from vqjax.data import codes, pipeline, sources
  from vqjax.evaluation import rotation
  from vqjax.models import registry
  from vqjax.training import tasks

  config, model, variables, step = runs.load_run_with_step(workdir, step=step)
  if not registry.is_autoencoder(config):
    raise errors.UserError(f"{workdir} is a {config.model.name} run, not a stage-1 autoencoder")
  data = config.data
  splits = splits or [data.train_split, data.eval_split]
  batch_size = batch_size or data.eval_batch_size
  if rotations not in (0, rotation.ROTATIONS):
    raise errors.UserError(f"--rotations must be 0 or {rotation.ROTATIONS}, got {rotations}")
  copies = rotations or 1
  pi, pc = jax.process_index(), jax.process_count()
  stage1 = _stage1_record(workdir, out, config, step)
  epath.Path(out).mkdir(parents=True, exist_ok=True)
  meta_path = os.path.join(out, codes.METADATA)
  if epath.Path(meta_path).exists():
    old = codes.read_metadata(out)
    if old["stage1"]["fingerprint"] != stage1["fingerprint"]:
      raise errors.UserError(
        f"{out} holds codes of another stage-1 model "
        f"({links.resolve(old['stage1']['workdir'], out)}); choose "
        "another --out or delete it"
      )
  _check_extraction(out, stage1, splits, examples_per_shard, pi, rotations)

  encode = jax.jit(lambda v, x: model.apply(v, x, method="encode_to_indices"))
  image = np.zeros((1, data.image_size, data.image_size, data.channels), np.float32)
  level_shapes = [list(c.shape[1:]) for c in jax.eval_shape(encode, variables, image)]
  names = tasks.level_names(len(level_shapes))
  meta = {
    "format": codes.FORMAT,
    "levels": [{"name": n, "shape": s} for n, s in zip(names, level_shapes, strict=True)],
    "num_codes": int(config.vq.num_codes),
    "image_shape": [data.image_size, data.image_size, data.channels],
    "stage1": stage1,
    "splits": {},
    "has_labels": bool(rotations),
    "rotations": int(rotations),
  }
  for split in splits:
    base, _ = sources.parse_split(split)
    source = sources.make_source(data, split)
    n = len(source)
    num_shards = max(1, -(-n // examples_per_shard))
    done = written = 0
    t0 = time.perf_counter()
    for k in range(pi, num_shards, pc):
      path = os.path.join(out, codes.shard_name(base, k, num_shards))
      lo, hi = k * examples_per_shard, min(n, (k + 1) * examples_per_shard)
      if codes.reusable_shard(path):  # finished by an earlier (interrupted) run, and intact
        done += hi - lo
        continue
      tmp = codes.temporary_path(path, str(pi))
      writer = ArrayRecordWriter(tmp, "group_size:1")
      try:
        for start in range(lo, hi, batch_size):
          idx = np.arange(start, min(start + batch_size, hi))
          batch = pipeline.transform_batch(pipeline.load_batch(source, idx, data), data)
          labels = batch.get("label")
          if rotations:
            maps = [
              [np.asarray(c) for c in encode(variables, rotation.rotate(batch["image"], t))]
              for t in range(rotations)
            ]
          else:
            maps = [[np.asarray(c) for c in encode(variables, batch["image"])]]
          for j in range(len(idx)):
            for t, rotated in enumerate(maps):
              example = {f"codes{i}": m[j].astype(np.uint16) for i, m in enumerate(rotated)}
              if rotations:
                example["label"] = np.int32(t)
              elif labels is not None:
                example["label"] = np.int32(labels[j])
              writer.write(codes.encode_example(example))
          done += len(idx)
          written += len(idx)
      finally:
        writer.close()
      codes.finish_shard(tmp, path, (hi - lo) * copies)
      rate = written / max(time.perf_counter() - t0, 1e-9)
      logging.info(
        "%s: shard %d/%d written, %d/%d examples (%.0f examples/s)",
        base,
        k + 1,
        num_shards,
        done,
        -(-n // pc) if pc > 1 else n,
        rate,
      )
    has_labels = n > 0 and "label" in pipeline.load_batch(source, np.arange(1), data)
    meta["has_labels"] = meta["has_labels"] or has_labels
    meta["splits"][base] = {"num_examples": n * copies, "num_shards": num_shards}
  if pc > 1:
    multihost_utils.sync_global_devices("vqjax.extract_codes")
  if pi == 0:
    codes.write_metadata(out, meta)
    logging.info(
      "code dataset written to %s: levels %s, %d codes; train a prior with "
      "--config.data.name=codes --config.data.codes_dir=%s",
      out,
      level_shapes,
      meta["num_codes"],
      out,
    )
  return meta


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for flag, value in (("--workdir", flags.FLAGS.workdir), ("--out", flags.FLAGS.out)):
    if not value:
      raise SystemExit(f"vqjax.extract_codes: {flag} is required")
  _cli.setup()  # before JAX creates its backends
  with errors.one_line("vqjax.extract_codes", flags.FLAGS.verbose):
    meta = extract(
      flags.FLAGS.workdir,
      flags.FLAGS.out,
      flags.FLAGS.splits,
      flags.FLAGS.batch,
      flags.FLAGS.examples_per_shard,
      flags.FLAGS.step,
      flags.FLAGS.rotations,
    )
  shown = ", ".join(f"{k}={v['num_examples']}" for k, v in meta["splits"].items())
  print(f"codes written: {shown}", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  _cli.run(main)
