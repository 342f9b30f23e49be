"""Evaluates trained runs and drawn samples, writes the numbers as JSON and draws plots.

  # a run on its eval split (stage 1: MSE, PSNR, SSIM, code usage; prior: bits per code)
  python -m vqjax.evaluate --workdir RUN [--out RUN/eval.json] [--max_batches 0]
  # ... plus a reconstruction grid and code-usage histograms of a stage-1 run
  python -m vqjax.evaluate --workdir STAGE1 --plots [--out_dir STAGE1/plots]
  # samples (a `python -m vqjax.sample` directory) against the real eval split
  python -m vqjax.evaluate --samples DIR [--features RUN] [--max_real 10000]
      [--classifier REJECTION_CLASSIFIER --thresholds 0.5,0.7,0.9 --out_dir DIR]
  # quality vs diversity of fresh samples at several temperatures
  python -m vqjax.evaluate --workdir PRIOR_TOP --workdir PRIOR_BOTTOM [--features RUN]
      --temperatures 0.7,0.85,1.0 --num 1000 [--stage1 STAGE1] [--seed 0]
      [--out_dir PRIOR_TOP/plots]

A run gets the evaluators its training ran (`config.evals`, else its task's; the one registry
of training/evaluators.py): an autoencoder reconstruction MSE and PSNR and the codebook usage,
perplexity and top share per level, plus SSIM here; a prior held-out cross-entropy in bits per
code and bits per image dimension; a classifier accuracy and NLL. --plots also writes
reconstructions.png (eval images over their reconstructions) and code_usage.png (how often each
code is used, most used first, one panel per level, perplexity in the title).

Sample quality is measured in the feature space of an evaluation network: by default the
network vqjax ships for the dataset (Fashion-MNIST), else the dataset's cached one
(`python -m vqjax.features --data DATASET` trains it once), or any classifier run given by
--features. It is never the rejection classifier unless you say so.
Against at most --max_real images of the eval split of the stage-1 run named in
DIR/settings.json: Frechet distance, precision and recall (k = 3 nearest neighbours),
Inception-style score, the judge's class shares, and the classification accuracy score when
the samples are labelled. Beside them stand the same statistics of as many held-out real
images (train split) and of those images blurred (2x2 average, upsampled), and the samples' FD
over the blurred images' FD. eval.json also names the network (run, step, test accuracy).
With --thresholds, the samples (drawn without --classifier) are filtered as rejection sampling
would at each threshold by --classifier: the acceptance rate and the statistics of the kept
samples go to threshold_tradeoff.json and threshold_tradeoff.png. --temperatures draws --num
samples per temperature with one compiled sampler (the temperature is traced) and writes
temperature_tradeoff.json / .png. Every table is also printed. Statistics of too few samples
(2 for FD, 100 for precision / recall, the Inception-style score and CAS) are NaN in the
results (null in the JSON), with a "note" saying so.
"""

import json
import math
import os
import sys
from typing import Any

from absl import app, flags
from etils import epath

from vqjax import _cli, errors
from vqjax import paths as vqjax_paths  # `paths` names the plots written
from vqjax.evaluation.reports import evaluate, stage1_plots  # noqa: F401  (public API too)
from vqjax.evaluation.samples import check_unfiltered, evaluate_samples  # noqa: F401
from vqjax.evaluation.tradeoffs import (  # noqa: F401  (the public API of this module too)
  check_temperatures,
  check_thresholds,
  temperature_tradeoff,
  threshold_tradeoff,
)


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program: several CLIs share names
  like --workdir, and tests import them together)."""
  flags.DEFINE_multi_string(
    "workdir", [], "The run to evaluate; with --temperatures, one prior per level."
  )
  flags.DEFINE_string("out", "", "JSON output (default WORKDIR/eval.json or DIR/eval.json).")
  flags.DEFINE_integer("max_batches", 0, "Eval batches (0 = the whole split).")
  flags.DEFINE_bool("plots", False, "Also draw stage-1 plots (reconstructions, code usage).")
  flags.DEFINE_string("out_dir", "", "Where plots go (default WORKDIR/plots or DIR).")
  flags.DEFINE_string("samples", "", "A vqjax.sample output directory to evaluate.")
  flags.DEFINE_string(
    "features",
    "",
    "The classifier run whose features judge samples (default: the dataset's evaluation "
    "network, shipped with vqjax or cached by python -m vqjax.features).",
  )
  flags.DEFINE_string("classifier", "", "The rejection classifier that scores --thresholds.")
  flags.DEFINE_string("thresholds", "", "Rejection thresholds in (0, 1), e.g. 0.5,0.7,0.9.")
  flags.DEFINE_string("temperatures", "", "Sampling temperatures > 0, e.g. 0.7,0.85,1.0.")
  flags.DEFINE_integer("num", 256, "Samples per temperature.")
  flags.DEFINE_string("stage1", "", "The autoencoder run (default: from the priors' codes).")
  flags.DEFINE_integer("seed", 0, "Sampling seed (the same for every temperature).")
  flags.DEFINE_integer("max_real", 10000, "At most this many real eval images.")
  flags.DEFINE_bool(
    "allow_mismatch",
    False,
    "--temperatures: use a stage-1 run and priors that do not belong together anyway.",
  )
  flags.DEFINE_bool("verbose", False, "Show the traceback of user errors too.")


def _parse_floats(text: str, flag: str) -> list[float]:
  values = []
  for part in text.split(","):
    try:
      values.append(float(part))
    except ValueError:
      raise errors.UserError(f"--{flag}: {part.strip()!r} is not a number") from None
  return values


def _jsonable(value: Any) -> Any:
  """NaN and infinities become null (JSON has no NaN)."""
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_jsonable(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def _write_json(path: str, result: Any) -> None:
  epath.Path(vqjax_paths.absolute(path)).parent.mkdir(parents=True, exist_ok=True)
  with epath.Path(path).open("w") as f:
    json.dump(_jsonable(result), f, indent=2, sort_keys=True)
  print(f"written to {path}", file=sys.stderr)


def _fmt(value: Any) -> str:
  return f"{value:.6g}" if isinstance(value, int | float) else str(value)


def _print_table(result: dict) -> None:
  width = max(len(k) for k in result)
  for key in sorted(result):
    print(f"{key:<{width}}  {_fmt(result[key])}")


def _print_rows(rows: list[dict]) -> None:
  columns = [k for k in rows[0] if k != "note"]
  cells = [[_fmt(r.get(k, "")) for k in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
  print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
  for r, row in zip(rows, cells, strict=True):
    note = f"  ({r['note']})" if "note" in r else ""
    print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + note)


def _run(f: Any) -> None:
  """The mode the flags ask for (see the module docstring)."""
  if f.samples:
    if f.workdir or f.temperatures or f.plots:
      raise errors.UserError("--samples takes no --workdir, --temperatures or --plots")
    thresholds = check_thresholds(_parse_floats(f.thresholds, "thresholds")) if f.thresholds else []
    if thresholds and not f.classifier:
      raise errors.UserError("--thresholds needs --classifier RUN (the rejection classifier)")
    if thresholds:  # before the evaluation, not after it
      check_unfiltered(f.samples)
    result = evaluate_samples(f.samples, f.features, f.max_real)
    _write_json(f.out or os.path.join(f.samples, "eval.json"), result)
    _print_table(result)
    if thresholds:
      out_dir = f.out_dir or f.samples
      png = os.path.join(out_dir, "threshold_tradeoff.png")
      rows = threshold_tradeoff(
        f.samples, f.classifier, thresholds, png, f.max_real, features=f.features
      )
      _write_json(os.path.join(out_dir, "threshold_tradeoff.json"), rows)
      _print_rows(rows)
      print(f"plot: {png}", file=sys.stderr)
    return
  if f.thresholds:
    raise errors.UserError("--thresholds needs --samples DIR (samples drawn without --classifier)")
  if f.temperatures:
    if not f.workdir:
      raise errors.UserError("--temperatures needs the priors (--workdir TOP --workdir BOTTOM ...)")
    temperatures = check_temperatures(_parse_floats(f.temperatures, "temperatures"))
    out_dir = f.out_dir or os.path.join(f.workdir[0], "plots")
    png = os.path.join(out_dir, "temperature_tradeoff.png")
    rows = temperature_tradeoff(
      f.workdir,
      f.features,
      temperatures,
      f.num,
      png,
      f.seed,
      f.stage1,
      f.max_real,
      allow_mismatch=f.allow_mismatch,
    )
    _write_json(os.path.join(out_dir, "temperature_tradeoff.json"), rows)
    _print_rows(rows)
    print(f"plot: {png}", file=sys.stderr)
    return
  if not f.workdir:
    raise errors.UserError("give --workdir RUN, or --samples DIR [--features RUN]")
  if len(f.workdir) > 1:
    raise errors.UserError("give one --workdir (several only with --temperatures)")
  workdir = f.workdir[0]
  if f.plots:  # reconstructions and code usage: a stage-1 run, told before the evaluation
    from vqjax.sampling import hierarchy

    hierarchy.check_run(workdir, "autoencoder", "--workdir (with --plots)")
  result = evaluate(workdir, f.max_batches)
  _write_json(f.out or os.path.join(workdir, "eval.json"), result)
  _print_table(result)
  if f.plots:
    paths = stage1_plots(workdir, f.out_dir or os.path.join(workdir, "plots"), f.max_batches)
    for name, path in paths.items():
      print(f"plot {name}: {path}", file=sys.stderr)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _cli.setup()  # before JAX creates its backends
  with errors.one_line("vqjax.evaluate", flags.FLAGS.verbose):
    _run(flags.FLAGS)


if __name__ == "__main__":
  define_flags()
  _cli.run(main)
