"""Anomaly maps of a stage-1 run: the VQ-VAE article's medical example, from the command line.

  python -m vqjax.anomaly --workdir STAGE1 [--anomaly_labels 8] [--quantile 0.95]
      [--max_examples 0] [--score max] [--out DIR]

A VQ-VAE trained on normal images only (`config.data.exclude_labels` leaves some classes out of
training, e.g. `experiments/fashion_mnist_anomaly.py`) reconstructs what it never saw worse, so
the reconstruction error flags it (evaluation/anomaly.py has the maps and scores). This reads
the run's eval split without the label filter and splits it by label:

  * anomalous: labels in --anomaly_labels (default: the run's own `data.exclude_labels`);
  * normal, held out: every other normal image in split order (the 1st, 3rd, 5th, ...); only
    these choose the threshold, the --quantile of their scores, so about 1 - quantile of
    normal images score above it;
  * normal, scored: the remaining normal images (the 2nd, 4th, ...).

The scored normal and the anomalous images give the ROC AUC of the per-image score (threshold
free) and the true / false positive rates at the threshold. Writes DIR/anomaly.json and
DIR/anomaly.png (default DIR = WORKDIR): inputs, reconstructions and error maps (one colour
scale) of some scored normal images, then of as many anomalous ones.
"""

import json
import math
import os
import sys
from typing import Any

from absl import app, flags
from etils import epath

from vqjax import _cli, errors, paths

# The library, and JAX with it, is imported inside the functions that use it, so that --help
# and flag errors answer at once (JAX alone takes seconds to import).

SCORES = ("max", "mean")


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program: several CLIs share names
  like --workdir, and tests import them together)."""
  flags.DEFINE_string("workdir", None, "The stage-1 run (load_run reads it).")
  flags.DEFINE_list(
    "anomaly_labels",
    None,
    "Labels that count as anomalous, e.g. 8 or 8,9 (default: the run's data.exclude_labels).",
  )
  flags.DEFINE_float("quantile", 0.95, "Quantile of held-out normal scores used as threshold.")
  flags.DEFINE_integer("max_examples", 0, "Read only the first N eval images (0 = all).")
  flags.DEFINE_enum("score", "max", SCORES, "Per-image score: blurred-map maximum or mean.")
  flags.DEFINE_string("out", "", "Output directory (default WORKDIR).")
  flags.DEFINE_bool("verbose", False, "Show the traceback of user errors too.")


def _parse_labels(values: list[Any] | None) -> list[int] | None:
  """Integer labels from the flag (strings) or a caller (ints); None stays None."""
  if values is None:
    return None
  labels = []
  for v in values:
    if isinstance(v, bool):
      raise errors.UserError(f"anomaly labels must be integers, got {v!r}")
    try:
      labels.append(int(str(v).strip()))
    except ValueError:
      raise errors.UserError(f"anomaly labels must be integers, got {v!r}") from None
  return sorted(set(labels))


def split_indices(is_anomaly: Any) -> tuple[Any, Any, Any]:
  """Which images choose the threshold, which normal images are scored, which are anomalous.

  Args:
    is_anomaly: bool [N], in split order.

  Returns:
    (held-out normal, scored normal, anomalous) index arrays into the N images: the normal
    images alternate between the first two, starting with the held-out set.
  """
  import numpy as np

  is_anomaly = np.asarray(is_anomaly, bool)
  normal = np.flatnonzero(~is_anomaly)
  return normal[0::2], normal[1::2], np.flatnonzero(is_anomaly)


def run(
  workdir: str,
  out: str,
  anomaly_labels: list[int] | None = None,
  quantile: float = 0.95,
  max_examples: int = 0,
  score: str = "max",
  sigma: float = 1.0,
  num_shown: int = 8,
) -> dict:
  """Scores a stage-1 run's eval split for anomalies and writes anomaly.json and anomaly.png.

  Args:
    workdir: a stage-1 (autoencoder) run or a `vqjax.convert` output.
    out: the directory written (created if needed).
    anomaly_labels: labels that count as anomalous; None = the run's `data.exclude_labels`.
    quantile: in (0, 1); the threshold is this quantile of the held-out normal scores.
    max_examples: read only the first this many eval images; 0 = the whole split.
    score: the per-image score thresholded and reported as "auc": "max" (of the error map
      blurred with `sigma`) or "mean" (of the map); both AUCs are reported.
    sigma: blur of the error maps before their maximum, in pixels.
    num_shown: normal and anomalous images each in the PNG (fewer when fewer are scored).

  Returns:
    What anomaly.json holds: "auc" (of `score`), "auc_max", "auc_mean", "threshold", "tpr"
    (share of anomalous images above the threshold), "fpr" (share of scored normal images
    above it), "heldout_fpr" (of the held-out normal images, about 1 - quantile by
    construction), "num_heldout", "num_normal" (scored), "num_anomalous", the settings
    ("anomaly_labels", "quantile", "score", "sigma", "eval_split") and the paths written.

  Raises:
    errors.UserError: a quantile outside (0, 1), an unknown score, a run that is not an
      autoencoder, no anomaly labels, eval data without labels, no anomalous images, or fewer
      than two normal images.
  """
  # Checked before the (slow) imports of JAX and the model code.
  if not 0.0 < quantile < 1.0:
    raise errors.UserError(f"--quantile must be in (0, 1), got {quantile}")
  if score not in SCORES:
    raise errors.UserError(f"--score must be one of {', '.join(SCORES)}, not {score!r}")
  if max_examples < 0:
    raise errors.UserError(f"--max_examples must be >= 0, got {max_examples}")
  labels = _parse_labels(anomaly_labels)

  import numpy as np

  from vqjax import runs
  from vqjax.data import pipeline
  from vqjax.evaluation import anomaly
  from vqjax.models import registry

  config, model, variables = runs.load_run(workdir)
  if config.task != "autoencoder" or not registry.is_autoencoder(config):
    raise errors.UserError(
      f"{workdir} is a {config.task} run of {config.model.name!r}, not a stage-1 autoencoder "
      f"({', '.join(registry.AUTOENCODERS)}): anomaly maps need reconstructions"
    )
  if labels is None:
    labels = _parse_labels(list(config.data.exclude_labels))
  if not labels:
    raise errors.UserError(
      f"no anomaly labels: {workdir} left no label out of training (data.exclude_labels is "
      "empty); pass --anomaly_labels"
    )

  # The eval split as it is, normal and anomalous images alike.
  data = config.data.copy_and_resolve_references()
  data.exclude_labels = ()
  split = data.eval_split
  max_batches = math.ceil(max_examples / data.eval_batch_size) if max_examples else 0
  scores: dict[str, list[Any]] = {k: [] for k in SCORES}
  found: list[Any] = []
  shown: dict[bool, list[tuple[Any, Any, Any]]] = {False: [], True: []}
  normal_seen = read = 0
  for batch in pipeline.make_eval_iterator(data, max_batches=max_batches):
    if "label" not in batch:
      raise errors.UserError(
        f"eval split {split!r} of {data.name!r} has no 'label' feature (it has "
        f"{sorted(k for k in batch if k != 'mask')}): anomaly evaluation needs labelled images"
      )
    keep = np.flatnonzero(batch["mask"] > 0)
    if max_examples:
      keep = keep[: max_examples - read]
    read += len(keep)
    if not len(keep):
      continue
    y = np.asarray(batch["label"])[keep].reshape(len(keep), -1)[:, 0].astype(np.int64)
    # The whole padded batch goes through the model, so every batch has one shape (one compile).
    recons, maps = anomaly.reconstruct(model, variables, batch["image"])
    images, recons, maps = batch["image"][keep], np.asarray(recons)[keep], np.asarray(maps)[keep]
    for k, v in anomaly.image_scores(maps, sigma).items():
      scores[k].append(np.asarray(v, np.float64))
    found.append(y)
    # The PNG shows the first scored normal images (odd normal positions) and anomalous ones.
    is_anomaly = np.isin(y, labels)
    positions = normal_seen + np.cumsum(~is_anomaly) - 1
    normal_seen += int(np.sum(~is_anomaly))
    for j in range(len(keep)):
      group = bool(is_anomaly[j])
      if len(shown[group]) < num_shown and (group or positions[j] % 2 == 1):
        shown[group].append((images[j], recons[j], maps[j]))

  y = np.concatenate(found) if found else np.zeros(0, np.int64)
  s = {k: np.concatenate(v) if v else np.zeros(0) for k, v in scores.items()}
  is_anomaly = np.isin(y, labels)
  heldout, normal, anomalous = split_indices(is_anomaly)
  if not len(anomalous):
    raise errors.UserError(
      f"no anomalous examples: none of the {len(y)} images read from eval split {split!r} has "
      f"a label in {labels} (labels found: {sorted(set(y.tolist()))})"
    )
  if len(normal) == 0:
    raise errors.UserError(
      f"eval split {split!r} has {len(heldout) + len(normal)} normal image(s) among the "
      f"{len(y)} read; at least 2 are needed (one to choose the threshold, one to score)"
    )
  threshold = anomaly.choose_threshold(s[score][heldout], quantile)
  test = np.concatenate([normal, anomalous])
  flagged = s[score] > threshold
  result = {
    "auc": anomaly.roc_auc(s[score][test], is_anomaly[test]),
    "auc_max": anomaly.roc_auc(s["max"][test], is_anomaly[test]),
    "auc_mean": anomaly.roc_auc(s["mean"][test], is_anomaly[test]),
    "threshold": threshold,
    "tpr": float(np.mean(flagged[anomalous])),
    "fpr": float(np.mean(flagged[normal])),
    "heldout_fpr": float(np.mean(flagged[heldout])),
    "num_heldout": int(len(heldout)),
    "num_normal": int(len(normal)),
    "num_anomalous": int(len(anomalous)),
    "anomaly_labels": labels,
    "quantile": float(quantile),
    "score": score,
    "sigma": float(sigma),
    "eval_split": split,
    "workdir": paths.absolute(workdir),
  }
  epath.Path(out).mkdir(parents=True, exist_ok=True)
  k = min(len(shown[False]), len(shown[True]))
  picked = shown[False][:k] + shown[True][:k]
  png = os.path.join(out, "anomaly.png")
  anomaly.save_anomaly_png(
    png, *(np.stack(parts) for parts in zip(*picked, strict=True)), per_row=k
  )
  result["png"] = png
  result["png_rows"] = (
    f"input, reconstruction, error of {k} scored normal images, then of {k} anomalous ones"
  )
  result["json"] = os.path.join(out, "anomaly.json")
  with epath.Path(result["json"]).open("w") as f:
    json.dump(result, f, indent=2, sort_keys=True)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS.workdir:
    raise SystemExit("vqjax.anomaly: --workdir is required")
  _cli.setup()  # before JAX creates its backends
  with errors.one_line("vqjax.anomaly", flags.FLAGS.verbose):
    result = run(
      flags.FLAGS.workdir,
      flags.FLAGS.out or flags.FLAGS.workdir,
      anomaly_labels=flags.FLAGS.anomaly_labels,
      quantile=flags.FLAGS.quantile,
      max_examples=flags.FLAGS.max_examples,
      score=flags.FLAGS.score,
    )
  width = max(len(k) for k in result)
  for key in sorted(result):
    value = result[key]
    shown = f"{value:.6g}" if isinstance(value, float) else value
    print(f"{key:<{width}}  {shown}")
  print(f"written to {result['json']} and {result['png']}", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  _cli.run(main)
