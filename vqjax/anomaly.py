"""Anomaly scores and maps of a stage-1 run and, optionally, its priors, from the command line.

  python -m vqjax.anomaly --workdir STAGE1 [--priors TOP,BOTTOM] [--anomaly_labels 8]
      [--quantile 0.95] [--max_examples 0] [--score max] [--restore_threshold 0.01]
      [--memory 10000] [--k 5] [--rotation_priors TOP,BOTTOM] [--classifier RUN]
      [--classifier_images 10000] [--out DIR]

A VQ-VAE trained on normal images only (`config.data.exclude_labels` leaves some classes out of
training, e.g. `experiments/fashion_mnist_anomaly.py`) reconstructs what it never saw worse, and
its priors find the codes of such images unlikely (evaluation/anomaly.py has the maps and
scores). Every image gets these scores (higher = more anomalous):

  * recon_max, recon_mean: the maximum of the blurred reconstruction-error map, and its mean;
  * with --priors (one per code level, unconditional): nll_level0, nll_level1, ... (nats of each
    level's codes under its prior) and nll (their sum); restoration_max, the maximum of the
    blurred restoration map: the codes the prior finds unlikely (probability below
    --restore_threshold) are redrawn from it in raster order, the result is decoded, and the
    map is its squared difference from the input;
  * knn (unless --memory 0): the mean distance of the image's quantized latents (every level's
    code vectors) to the --k nearest of the first --memory normal training images' latents
    (the run's train split without the anomaly labels; evaluation/memory.py);
  * nll_ratio (with --priors, unless --memory 0): nll minus the nats of the same codes under
    the code frequencies of those normal training images, a model without context: what the
    frequencies explain (plain or busy images) cancels, and what is left is whether the codes
    fit together as in normal images (a likelihood ratio, Ren et al. 2019);
  * with --rotation_priors (one per code level, trained on `extract_codes --rotations 4` codes
    with config.prior.class_conditional=True, num_classes=4): rotation, how badly the priors
    name which of four quarter turns each rotated copy of the image has (GEOM's principle,
    evaluation/rotation.py), and rotation_nll, the nats of the four copies' codes;
  * with --classifier (a classifier run trained on the normal classes' labels, with the anomaly
    labels in its data.exclude_labels): classifier, one minus its maximum softmax probability
    over the normal labels (evaluation/open_set.py). It needs normal data of several classes.
    And (unless --classifier_images 0) mahalanobis: the squared Mahalanobis distance of the
    classifier's pooled features to the nearest normal class, with class means and a shared
    covariance fitted to the first --classifier_images images of the classifier's own train
    split (Lee et al. 2018);
  * combined, combined_rotation, combined_classifier, combined_mahalanobis, wherever all of
    their parts are scored (evaluation/combined.py): the mean of the z-scores of knn and
    nll_ratio, then also rotation, classifier and mahalanobis, each standardised by its mean
    and spread over the held-out normal images below. On Fashion-MNIST they are the best
    scores of benchmarks/anomaly.py.

This reads the run's eval split without the label filter and splits it by label:

  * anomalous: labels in --anomaly_labels (default: the run's own `data.exclude_labels`);
  * normal, held out: every other normal image in split order (the 1st, 3rd, 5th, ...); only
    these choose each score's threshold, the --quantile of their scores, so about
    1 - quantile of normal images score above it (the chosen false-positive rate);
  * normal, scored: the remaining normal images (the 2nd, 4th, ...).

The scored normal and the anomalous images give each score's ROC AUC (threshold free) and its
true / false positive rates at its threshold. Written to DIR (default WORKDIR):

  * anomaly.json: `scores`, one entry per score; the top-level `auc`, `threshold`, `tpr`, `fpr`
    are those of --score;
  * anomaly_scores.csv: every image's scores in split order, with its label, its role (heldout,
    normal, anomalous) and whether --score flags it;
  * anomaly.png: some scored normal images, then as many anomalous ones, one per row: input,
    reconstruction, restoration (with priors) and the map of --score's kind (the restoration
    map for restoration_max and the nll scores, else the error map), on one colour scale.

To screen a folder of images against a folder of normal ones, lay them out as an image-folder
dataset labelled by directory (docs/anomaly.md): SCANS/train/normal/ (training),
SCANS/test/normal/ (held out: they choose the thresholds) and SCANS/test/screen/ (label 1).
"""

import contextlib
import json
import math
import os
import sys
from typing import Any

from absl import app, flags, logging
from etils import epath

from vqjax import _cli, errors, paths

# The library, and JAX with it, is imported inside the functions that use it, so that --help
# and flag errors answer at once (JAX alone takes seconds to import).

# Per-image scores without priors; "max" and "mean" name the first two (the older flag values).
RECON_SCORES = ("recon_max", "recon_mean")
ALIASES = {"max": "recon_max", "mean": "recon_mean"}
ROTATION_SCORES = ("rotation", "rotation_nll")  # with --rotation_priors
CLASSIFIER_SCORES = ("classifier", "mahalanobis")  # with --classifier
# evaluation/combined.py's COMBINATIONS (a test keeps the two equal), named here so that a flag
# error answers before JAX loads; and what each of their parts needs.
COMBINED_SCORES = ("combined", "combined_rotation", "combined_classifier", "combined_mahalanobis")
PART_NEEDS = {
  "knn": "--memory above 0",
  "nll_ratio": "--priors and --memory above 0",
  "rotation": "--rotation_priors",
  "classifier": "--classifier",
  "mahalanobis": "--classifier and --classifier_images above 0",
}


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program: several CLIs share names
  like --workdir, and tests import them together)."""
  flags.DEFINE_string("workdir", None, "The stage-1 run (load_run reads it).")
  flags.DEFINE_list(
    "priors", [], "The priors of the run's code levels, e.g. TOP,BOTTOM (optional)."
  )
  flags.DEFINE_list(
    "anomaly_labels",
    None,
    "Labels that count as anomalous, e.g. 8 or 8,9 (default: the run's data.exclude_labels).",
  )
  flags.DEFINE_float("quantile", 0.95, "Quantile of held-out normal scores used as threshold.")
  flags.DEFINE_integer("max_examples", 0, "Read only the first N eval images (0 = all).")
  flags.DEFINE_string(
    "score",
    "max",
    "The score thresholded first and shown: max, mean, knn, nll, nll_level0, ..., nll_ratio, "
    "restoration_max, rotation, rotation_nll, classifier, mahalanobis, combined, "
    "combined_rotation, combined_classifier, combined_mahalanobis.",
  )
  flags.DEFINE_float("restore_threshold", 0.01, "Restoration redraws codes less likely than this.")
  flags.DEFINE_integer(
    "memory", 10000, "Normal training images in the knn score's bank (0 = no knn score)."
  )
  flags.DEFINE_integer("k", 5, "Nearest neighbours the knn score averages.")
  flags.DEFINE_list(
    "rotation_priors", [], "Rotation priors of the run's code levels, TOP,BOTTOM (optional)."
  )
  flags.DEFINE_string(
    "classifier", "", "A classifier run trained on the normal labels only (optional)."
  )
  flags.DEFINE_integer(
    "classifier_images",
    10000,
    "Images of the classifier's train split that fit the mahalanobis score (0 = no such score).",
  )
  flags.DEFINE_integer("seed", 0, "Seed of the restoration draws.")
  flags.DEFINE_bool(
    "allow_mismatch",
    False,
    "Use priors or rotation priors trained on another stage-1 run's codes anyway (a warning).",
  )
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


def score_names(num_levels: int, knn: bool = False) -> tuple[str, ...]:
  """Every score `run` reports with priors over `num_levels` code levels (0 = none), and with
  the memory bank's knn score or without."""
  first = RECON_SCORES + (("knn",) if knn else ())
  if not num_levels:
    return first
  levels = tuple(f"nll_level{i}" for i in range(num_levels))
  return first + levels + ("nll",) + (("nll_ratio",) if knn else ()) + ("restoration_max",)


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
  num_shown: int = 4,
  priors: list[str] | None = None,
  restore_threshold: float = 0.01,
  seed: int = 0,
  memory: int = 10000,
  k: int = 5,
  rotation_priors: list[str] | None = None,
  classifier: str = "",
  classifier_images: int = 10000,
  allow_mismatch: bool = False,
) -> dict:
  """Scores a stage-1 run's eval split for anomalies and writes anomaly.json and anomaly.png.

  Args:
    workdir: a stage-1 (autoencoder) run or a `vqjax.convert` output.
    out: the directory written (created if needed).
    anomaly_labels: labels that count as anomalous; None = the run's `data.exclude_labels`.
    quantile: in (0, 1); each threshold is this quantile of the held-out normal scores.
    max_examples: read only the first this many eval images; 0 = the whole split.
    score: the score reported at the top level and whose map the PNG shows (`score_names`;
      "max" and "mean" are recon_max and recon_mean).
    sigma: blur of the maps before their maximum, in pixels.
    num_shown: normal and anomalous images each in the PNG (fewer when fewer are scored).
    priors: the priors' workdirs, one per code level (any order); None or [] = none.
    restore_threshold: restoration redraws codes whose probability is below it.
    seed: seed of the restoration draws.
    memory: normal training images in the knn score's bank (the first of the run's train
      split without the anomaly labels); 0 = no knn score.
    k: nearest neighbours the knn score averages.
    rotation_priors: the rotation priors' workdirs, one per code level (any order): adds the
      "rotation" and "rotation_nll" scores; None or [] = none.
    classifier: a classifier run trained on the normal labels only: adds the "classifier"
      score; "" = none.
    classifier_images: with `classifier`, the first this many images of its own train split
      fit the class Gaussians of the "mahalanobis" score; 0 = no mahalanobis score.
    allow_mismatch: use priors and rotation priors trained on another stage-1 run's codes
      (a warning instead of an error).

  Returns:
    What anomaly.json holds: "scores" (per score: "auc", "threshold", "tpr" = share of
    anomalous images above the threshold, "fpr" = share of scored normal images above it,
    "heldout_fpr" = of the held-out normal images, about 1 - quantile by construction),
    "auc_<score>" for each score ("auc_max", "auc_mean" for the reconstruction scores),
    --score's "auc", "threshold", "tpr", "fpr", "heldout_fpr", "num_heldout", "num_normal"
    (scored), "num_anomalous", with priors "replaced_normal" / "replaced_anomalous" (mean share
    of codes restoration redrew), with the knn score "memory" (the bank's size) and "k", the
    settings and the paths written ("png", "csv", "json"). "scores" includes every
    combination of evaluation/combined.py whose parts are scored, each part standardised over
    the held-out normal images (left out, with a warning, where they cannot scale a part: fewer
    than two, or all one value).

  Raises:
    errors.UserError: a quantile outside (0, 1), an unknown score, a negative --memory, a
      bank with fewer than --k images or over anomaly_runs.MAX_BANK_BYTES, a run that is not an
      autoencoder, priors that do not belong to it or are class-conditional, rotation priors
      that do not belong to it or are not conditioned on 4 rotations, a classifier run of
      other data or trained on the anomaly labels (or without a normal one), a negative
      --classifier_images or too few of them to hold every normal label, no anomaly
      labels, eval data without labels, no anomalous images, fewer than two normal images, or
      a combined --score without all of its parts or whose parts the held-out normal images
      cannot scale, or an `out` whose nearest existing directory is a file or refuses a file
      (checked before any scoring).
  """
  # Checked before the (slow) imports of JAX and the model code.
  if not 0.0 < quantile < 1.0:
    raise errors.UserError(f"--quantile must be in (0, 1), got {quantile}")
  if max_examples < 0:
    raise errors.UserError(f"--max_examples must be >= 0, got {max_examples}")
  if not 0.0 <= restore_threshold < 1.0:
    raise errors.UserError(f"--restore_threshold must be in [0, 1), got {restore_threshold}")
  if memory < 0:
    raise errors.UserError(f"--memory must be >= 0 (0 = no knn score), got {memory}")
  if k < 1:
    raise errors.UserError(f"--k must be >= 1, got {k}")
  if 0 < memory < k:
    raise errors.UserError(f"--k {k} is more than the {memory} images --memory keeps in the bank")
  priors = [p for p in (priors or []) if p]
  rotation_priors = [p for p in (rotation_priors or []) if p]
  knn = memory > 0
  score = ALIASES.get(score, score)
  if score in ROTATION_SCORES and not rotation_priors:
    raise errors.UserError(f"--score {score} needs --rotation_priors")
  if classifier_images < 0:
    raise errors.UserError(
      f"--classifier_images must be >= 0 (0 = no mahalanobis score), got {classifier_images}"
    )
  if score in CLASSIFIER_SCORES and not classifier:
    raise errors.UserError(f"--score {score} needs --classifier")
  if score == "mahalanobis" and not classifier_images:
    raise errors.UserError("--score mahalanobis needs --classifier_images above 0")
  extra = ROTATION_SCORES + CLASSIFIER_SCORES
  if score not in extra + COMBINED_SCORES and (
    score not in score_names(max(len(priors), 1), knn)
    or (not priors and score not in score_names(0, knn))
  ):
    known = ", ".join(("max", "mean") + score_names(len(priors), knn)[2:] + extra + COMBINED_SCORES)
    more = "" if priors else " (the nll and restoration scores need --priors)"
    if score == "knn":
      more = " (knn needs --memory above 0)"
    raise errors.UserError(f"--score must be one of {known}, not {score!r}{more}")
  labels = _parse_labels(anomaly_labels)
  _check_out(out)

  import jax
  import numpy as np

  from vqjax import anomaly_runs
  from vqjax.data import pipeline
  from vqjax.evaluation import anomaly, anomaly_figures, combined
  from vqjax.evaluation import memory as memory_lib

  config, model, variables, loaded = anomaly_runs.load(workdir, priors, allow_mismatch)
  if knn and not memory_lib.has_encode(model):
    # A plugin autoencoder needs only the code contract (encode_to_indices); the latents need
    # its `encode` too. Without it the two bank scores are left out, and said so.
    if score in ("knn", "nll_ratio"):
      raise errors.UserError(
        f"--score {score} needs the model's latents: {type(model).__name__} has no `encode` "
        "method (quantized maps, per-level aux with 'indices')"
      )
    logging.warning(
      "%s has no `encode` method: knn and nll_ratio are left out (--memory 0 says so too)",
      type(model).__name__,
    )
    knn = False
  rotations = anomaly_runs.rotation_scorer(
    workdir, rotation_priors, model, variables, allow_mismatch
  )
  if labels is None:
    labels = _parse_labels(list(config.data.exclude_labels))
  if not labels:
    raise errors.UserError(
      f"no anomaly labels: {workdir} left no label out of training (data.exclude_labels is "
      "empty); pass --anomaly_labels"
    )
  classifier_scorer = anomaly_runs.classifier_scorer(classifier, config, labels, classifier_images)
  names = (
    score_names(len(loaded), knn)
    + (ROTATION_SCORES if rotations else ())
    + (classifier_scorer.names if classifier_scorer else ())
  )
  combos = combined.available(names)
  if score in combined.COMBINATIONS and score not in combos:
    missing = [k for k in combined.COMBINATIONS[score] if k not in names]
    raise errors.UserError(
      f"--score {score} combines {', '.join(combined.COMBINATIONS[score])}; scoring "
      + "; ".join(f"{k} needs {PART_NEEDS[k]}" for k in missing)
    )
  if score not in names + combos:
    raise errors.UserError(f"--score {score!r} needs a prior per level: got {len(loaded)}")
  bank = anomaly_runs.memory_bank(config, model, variables, labels, memory, k) if knn else None
  scorer = anomaly.PriorScorer(model, variables, loaded, sigma, restore_threshold, bank)
  error_map = RECON_SCORES + ("knn",) + extra + COMBINED_SCORES
  map_key = "recon_map" if score in error_map else "restoration_map"

  # The eval split as it is, normal and anomalous images alike.
  data = config.data.copy_and_resolve_references()
  data.exclude_labels = ()
  split = data.eval_split
  max_batches = math.ceil(max_examples / data.eval_batch_size) if max_examples else 0
  scores: dict[str, list[Any]] = {k: [] for k in names + (("replaced",) if loaded else ())}
  found: list[Any] = []
  shown: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
  normal_seen = read = 0
  rng = jax.random.key(seed)
  for b, batch in enumerate(pipeline.make_eval_iterator(data, max_batches=max_batches)):
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
    # The whole padded batch goes through the models, so every batch has one shape (one compile).
    got = scorer.score(batch["image"], jax.random.fold_in(rng, b))
    if rotations:
      got.update(rotations.score(batch["image"]))
    if classifier_scorer:
      got.update(classifier_scorer.score(batch["image"]))
    for k in scores:
      scores[k].append(np.asarray(got[k], np.float64)[keep])
    first = read - len(keep)  # this batch's first kept image, in split order
    found.append(y)
    # The PNG shows the first scored normal images (odd normal positions) and anomalous ones.
    is_anomaly = np.isin(y, labels)
    positions = normal_seen + np.cumsum(~is_anomaly) - 1
    normal_seen += int(np.sum(~is_anomaly))
    for j, i in enumerate(keep):
      group = bool(is_anomaly[j])
      if len(shown[group]) < num_shown and (group or positions[j] % 2 == 1):
        shown[group].append(
          {
            "input": batch["image"][i],
            "reconstruction": got["recon"][i],
            "restoration": got["restored"][i] if loaded else None,
            "map": got[map_key][i],
            "index": first + j,  # its score is read once every score is known
          }
        )

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
  if combos:
    # Each part standardised over the held-out normal images, which choose the thresholds too.
    try:
      standard = combined.Standardiser.fit({k: s[k][heldout] for k in combined.parts(combos)})
    except ValueError as e:
      if score in combos:
        raise errors.UserError(
          f"--score {score}: the held-out normal images cannot scale it: {e}"
        ) from None
      logging.warning("no combined scores: the held-out normal images cannot scale them: %s", e)
      combos = ()
    if combos:
      s.update(standard.combinations(s, combos))
      names += combos
  test = np.concatenate([normal, anomalous])
  per_score = {}
  for k in names:
    threshold = anomaly.choose_threshold(s[k][heldout], quantile)
    flagged = s[k] > threshold
    per_score[k] = {
      "auc": anomaly.roc_auc(s[k][test], is_anomaly[test]),
      "threshold": threshold,
      "tpr": float(np.mean(flagged[anomalous])),
      "fpr": float(np.mean(flagged[normal])),
      "heldout_fpr": float(np.mean(flagged[heldout])),
    }
  result = {
    "scores": per_score,
    **{f"auc_{k.removeprefix('recon_')}": v["auc"] for k, v in per_score.items()},
    **per_score[score],
    "num_heldout": int(len(heldout)),
    "num_normal": int(len(normal)),
    "num_anomalous": int(len(anomalous)),
    "anomaly_labels": labels,
    "quantile": float(quantile),
    "score": score,
    "sigma": float(sigma),
    "eval_split": split,
    "workdir": paths.absolute(workdir),
    "priors": [paths.absolute(p) for p in priors],
    "rotation_priors": [paths.absolute(p) for p in rotation_priors],
    "classifier": paths.absolute(classifier) if classifier else "",
  }
  if classifier_scorer and classifier_images:
    result["classifier_images"] = classifier_scorer.gaussians.num_images
  if bank is not None:
    result["memory"], result["k"] = len(bank.bank), bank.k
  if loaded:
    result["restore_threshold"] = float(restore_threshold)
    result["seed"] = int(seed)
    result["replaced_normal"] = float(np.mean(s["replaced"][normal]))
    result["replaced_anomalous"] = float(np.mean(s["replaced"][anomalous]))
  k = min(len(shown[False]), len(shown[True]))
  picked = shown[False][:k] + shown[True][:k]
  columns = {"input": np.stack([p["input"] for p in picked])}
  columns["reconstruction"] = np.stack([p["reconstruction"] for p in picked])
  if loaded:
    columns["restoration"] = np.stack([p["restoration"] for p in picked])
  # Three lines, so that a long score name stays within its row.
  titles = [
    f"{'anomalous' if r >= k else 'normal'}\n{score}\n{s[score][p['index']]:.4g}"
    for r, p in enumerate(picked)
  ]
  map_title = "restoration map" if map_key == "restoration_map" else "error map"
  result["png"] = os.path.join(out, "anomaly.png")
  result["png_rows"] = (
    f"{k} scored normal images, then {k} anomalous ones: {', '.join(columns)}, {map_title}"
  )
  result["csv"] = os.path.join(out, "anomaly_scores.csv")
  result["json"] = os.path.join(out, "anomaly.json")
  role = np.full(len(y), "anomalous", object)
  role[heldout], role[normal] = "heldout", "normal"
  flagged = s[score] > per_score[score]["threshold"]
  written = [result[key] for key in ("png", "csv", "json")]
  epath.Path(out).mkdir(parents=True, exist_ok=True)
  # Each written under a name of its own, then all three renamed: a failure (a full disk) or a
  # kill before the renames leaves the previous run's outputs as they were, not a mix of two.
  try:
    anomaly_figures.save_anomaly_figure(
      _partial(result["png"]),
      columns,
      np.stack([p["map"] for p in picked]),
      titles,
      map_title=map_title,
    )
    with epath.Path(_partial(result["csv"])).open("w") as f:
      f.write(",".join(["index", "label", "role", *names, f"flagged_by_{score}"]) + "\n")
      for i in range(len(y)):
        values = [f"{s[k][i]:.6g}" for k in names]
        f.write(",".join([str(i), str(y[i]), role[i], *values, str(int(flagged[i]))]) + "\n")
    with epath.Path(_partial(result["json"])).open("w") as f:
      json.dump(result, f, indent=2, sort_keys=True)
  except BaseException:
    for path in written:
      with contextlib.suppress(OSError):
        epath.Path(_partial(path)).unlink(missing_ok=True)
    raise
  for path in written:
    epath.Path(_partial(path)).replace(path)
  return result


def _partial(path: str) -> str:
  """Where an output is written before it is renamed to `path` (one per process)."""
  return f"{path}.partial-{os.getpid()}"


def _check_out(out: str) -> None:
  """Fails in one line, before the scoring instead of after it, where --out cannot be written:
  its nearest existing directory (itself, or the one it would be created in) is a file or
  refuses a file. Nothing is left behind. A bucket has no directories to check."""
  if paths.is_remote(out):
    return
  place = epath.Path(paths.absolute(out))
  while not place.exists():
    place = place.parent
  if not place.is_dir():
    raise errors.UserError(f"--out {out}: {place} is a file, not a directory")
  probe = place / os.path.basename(_partial(".anomaly-write-check"))
  try:
    probe.write_text("")
  except OSError as e:
    raise errors.UserError(f"--out {out}: cannot write in {place} ({e.strerror or e})") from None
  probe.unlink()


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
      priors=flags.FLAGS.priors,
      restore_threshold=flags.FLAGS.restore_threshold,
      seed=flags.FLAGS.seed,
      memory=flags.FLAGS.memory,
      k=flags.FLAGS.k,
      rotation_priors=flags.FLAGS.rotation_priors,
      classifier=flags.FLAGS.classifier,
      classifier_images=flags.FLAGS.classifier_images,
      allow_mismatch=flags.FLAGS.allow_mismatch,
    )
  width = max(len(k) for k in result)
  for key in sorted(result):
    value = result[key]
    if key == "scores":
      continue  # the same numbers as the auc_* lines and the table below
    shown = f"{value:.6g}" if isinstance(value, float) else value
    print(f"{key:<{width}}  {shown}")
  w = max(len(name) for name in result["scores"])
  print(f"\n{'score':<{w}} {'ROC AUC':>8} {'TPR':>6} {'FPR':>6}  (at the thresholds)")
  for name, v in result["scores"].items():
    print(f"{name:<{w}} {v['auc']:8.4f} {v['tpr']:6.3f} {v['fpr']:6.3f}")
  print(f"written to {result['json']} and {result['png']}", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  _cli.run(main)
