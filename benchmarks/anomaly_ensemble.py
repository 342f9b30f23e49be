"""Seed ensemble for benchmarks/anomaly.py: the ROC AUC of a score averaged over seeds' runs.

  python benchmarks/anomaly.py --protocol one-class --size long --seed 0   # and --seed 1
  python benchmarks/anomaly_ensemble.py --protocol one-class --size long --seeds 0,1
      [--score combined] [--classes 0,8] [--workdir /tmp/vqjax_anomaly]

For each class, reads the per-image scores that `benchmarks/anomaly.py` kept in each seed's
run folder (scores.npz), averages the chosen score over the seeds image by image, and prints
each seed's ROC AUC beside the average's, one row per class, then the means. Nothing is
trained: run the benchmark for every seed first.
"""

import argparse
import os
import sys
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
  sys.path.insert(0, HERE)

import anomaly as bench  # noqa: E402  (benchmarks/anomaly.py, beside this file)


class EnsembleError(Exception):
  """A missing or mismatched scores.npz: the message is one line for the user."""


def load(workdir: str, protocol: str, size: str, seed: int, k: int, score: str):
  """(labels, per-image `score`) of one seed's class-k run."""
  path = os.path.join(workdir, bench.run_name(protocol, size, seed), f"class{k}", "scores.npz")
  if not os.path.exists(path):
    raise EnsembleError(
      f"no {path}: run python benchmarks/anomaly.py --protocol {protocol} --size {size} "
      f"--seed {seed} --classes {k} --workdir {workdir} first"
    )
  try:
    with np.load(path) as f:
      if f"test_{score}" not in f:
        names = sorted(n[5:] for n in f.files if n.startswith("test_"))
        raise EnsembleError(f"{path} has no score {score!r}; it has {', '.join(names)}")
      return f["labels"], f[f"test_{score}"]
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise EnsembleError(f"{path} is damaged ({e}): delete it and run the benchmark again") from None


def ensemble_class(workdir, protocol, size, seeds, k, score) -> dict:
  """Each seed's ROC AUC of `score` for class k, and the AUC of its mean over the seeds."""
  from vqjax.evaluation.anomaly import roc_auc

  normal = [k] if protocol == "one-class" else [c for c in range(10) if c != k]
  labels, per_seed = None, []
  for seed in seeds:
    lab, s = load(workdir, protocol, size, seed, k, score)
    if labels is not None and not np.array_equal(lab, labels):
      raise EnsembleError(f"class {k}: seed {seed} scored other test images than seed {seeds[0]}")
    labels = lab
    per_seed.append(np.asarray(s, np.float64))
  is_anomaly = ~np.isin(labels, normal)
  return {
    "class": k,
    "seeds": [roc_auc(s, is_anomaly) for s in per_seed],
    "mean": roc_auc(np.mean(per_seed, axis=0), is_anomaly),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--protocol", choices=("one-class", "leave-one-out"), required=True)
  parser.add_argument("--size", choices=tuple(bench.SIZES), default="full")
  parser.add_argument("--seeds", default="0,1", help="at least two, e.g. 0,1")
  parser.add_argument("--score", default="combined", help="a score of the benchmark's lines")
  parser.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9", help="e.g. 0,8")
  parser.add_argument("--workdir", default="/tmp/vqjax_anomaly")
  args = parser.parse_args(argv)
  classes = bench.parse_classes(parser, args.classes)
  try:
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  except ValueError:
    parser.error(f"--seeds must be integers separated by commas, got {args.seeds!r}")
  if len(set(seeds)) < 2 or min(seeds) < 0:
    parser.error(f"--seeds must name at least two different seeds >= 0, got {args.seeds!r}")
  try:
    rows = [
      ensemble_class(args.workdir, args.protocol, args.size, seeds, k, args.score) for k in classes
    ]
  except EnsembleError as e:
    print(f"anomaly_ensemble: {e}", file=sys.stderr)
    return 1
  heads = " | ".join(f"seed {s}" for s in seeds)
  print(f"| class | {heads} | mean of the seeds' {args.score} |")
  print("|---|" + "---:|" * (len(seeds) + 1))
  for r in rows:
    cells = " | ".join(f"{a:.3f}" for a in r["seeds"] + [r["mean"]])
    print(f"| {r['class']} {bench.CLASSES[r['class']]} | {cells} |")
  means = np.mean([r["seeds"] + [r["mean"]] for r in rows], axis=0)
  print(f"| mean of {len(rows)} | " + " | ".join(f"**{m:.3f}**" for m in means) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
