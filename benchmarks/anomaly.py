"""Fashion-MNIST anomaly benchmark: ROC AUC per class of every vqjax anomaly score.

  python benchmarks/anomaly.py --protocol one-class       # train on one class, 9 anomalous
  python benchmarks/anomaly.py --protocol leave-one-out   # train on nine, the tenth anomalous
      [--classes 0,8] [--size full|long|long_stage1|smoke] [--seed 0]
      [--workdir /tmp/vqjax_anomaly] [--out FILE.jsonl]

For each class of the protocol: a small VQ-VAE-2 (`vqjax.train` on the normal classes, through
`data.exclude_labels`), its codes (`vqjax.extract_codes`), a PixelSNAIL prior per level on the
normal images' codes, then `vqjax.evaluation.anomaly.PriorScorer` on the whole test split
(10,000 images, labels only for the AUC). Scores (higher = more anomalous):

  recon_max, recon_mean      reconstruction error: blurred-map maximum, mean
  knn                        mean distance of the image's quantized latents (both levels) to
                             the 5 nearest of the first 10,000 normal training images'
  knn_pixels                 the same on raw pixels, no model at all: the reference point
  nll_level0, nll_level1     nats of the top (4x4) and bottom (8x8) codes under their prior
  nll                        their sum: the codes' negative log-likelihood
  nll_ratio                  nll minus the codes' nats under the bank's code frequencies (a
                             likelihood ratio against a model without context)
  restoration_max            blurred maximum of the restoration map
  combined                   the mean of the z-scores of knn and nll_ratio, each standardised
                             by its mean and standard deviation on 1,000 normal training
                             images (their knn leaves each image's own bank entry out). No
                             anomaly weighs it, but the pair was chosen after both scores'
                             test AUCs were seen (benchmarks/RESULTS.md says so)
  rotation, rotation_nll     how badly priors conditioned on the quarter turn (0-3) name the
                             turn of the image's four rotated copies, and the copies' nats
                             (evaluation/rotation.py)
  combined_rotation          the mean z-score of knn, nll_ratio and rotation
  classifier                 leave-one-out only: one minus the maximum softmax probability of
                             a classifier trained on the nine normal classes' labels
                             (evaluation/open_set.py); it uses the labels, which the other
                             scores do not
  combined_classifier        leave-one-out only: the mean z-score of knn, nll_ratio, rotation
                             and classifier
  mahalanobis                leave-one-out only: the squared Mahalanobis distance of the
                             classifier's features to the nearest normal class (class means
                             and a shared covariance from 10,000 of its training images)
  combined_mahalanobis       leave-one-out only: the mean z-score of knn, nll_ratio, rotation,
                             classifier and mahalanobis

Each class writes one JSON line (AUCs, timings) to --out, replacing the line of an earlier run
of the same class, protocol, size and seed; keeps every per-image score in its
run folder (scores.npz), and prints a progress line; the end prints the Markdown table of
benchmarks/RESULTS.md. Every setting is the same for all classes.
Runs are kept under --workdir and reused when complete (delete it to retrain).
"""

import argparse
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

CLASSES = (
  "T-shirt/top",
  "trouser",
  "pullover",
  "dress",
  "coat",
  "sandal",
  "shirt",
  "sneaker",
  "bag",
  "ankle boot",
)
SCORES = (
  "recon_max",
  "recon_mean",
  "knn",
  "knn_pixels",
  "nll_level0",
  "nll_level1",
  "nll",
  "nll_ratio",
  "restoration_max",
  "rotation",
  "rotation_nll",
  "combined",
  "combined_rotation",
  "classifier",
  "combined_classifier",
  "mahalanobis",
  "combined_mahalanobis",
)
# The combinations (`vqjax.evaluation.combined.COMBINATIONS`) z-score these, standardised on the
# reference images (normal training images, never the test split).
STANDARDISED = ("knn", "nll_ratio", "rotation", "classifier", "mahalanobis")
ROTATION_SCORES = ("rotation", "rotation_nll")  # RotationScorer's
# ClassifierScorer's, and what needs it: leave-one-out only, since one normal class has no
# labels to tell apart.
CLASSIFIER_SCORES = ("classifier", "combined_classifier", "mahalanobis", "combined_mahalanobis")
# PriorScorer's
MODEL_SCORES = tuple(
  k
  for k in SCORES
  if k not in ("knn_pixels", "combined", "combined_rotation") + ROTATION_SCORES + CLASSIFIER_SCORES
)
# The classifier trains on the train split without its first rows, so that the normal images
# that standardise its score (the first of the split) are images it never saw.
CLASSIFIER_SKIP = 2000
# The classifier's training images whose features fit the mahalanobis score's class Gaussians
# (the first of its train split; smoke: all of its few).
MAHALANOBIS_IMAGES = 10000
# Sizes: (stage-1 steps, prior steps, normal training images for the z-scores, test images,
# normal training images in the knn bank, rotation-prior steps, classifier steps).
# The rotation priors train on four rotated copies of every normal image: twice the steps.
# "long" trains every model 1,000 steps instead of 300, with nothing else changed: the test of
# whether longer training moves the scores (it did not, benchmarks/RESULTS.md). About twice the
# time: leave-one-out alone took 22.3 minutes on the 2-core CPU, against 10.9.
SIZES = {
  "full": (300, 300, 1000, 0, 10000, 600, 1500),
  "long": (1000, 1000, 1000, 0, 10000, 2000, 1500),
  # The long stage 1 with the full size's priors: which of the two moved the long scores (the
  # codes did, benchmarks/RESULTS.md).
  "long_stage1": (1000, 300, 1000, 0, 10000, 600, 1500),
  "smoke": (2, 2, 16, 64, 32, 2, 2),
}
RESTORE_THRESHOLD = 0.01  # probability below which restoration replaces a code (K = 64: 1/64)
# Batches of the trainer's own final eval of each model (500 images or codes each; its figures go
# to the run's metrics.jsonl, and no score reads them). The whole test split took seconds a
# model: each rotation prior's holds 36,000 rotated codes.
EVAL_BATCHES = 2


def stage1_config(normal: list[int], steps: int, smoke: bool, seed: int = 0):
  """The small VQ-VAE-2 of experiments/fashion_mnist_anomaly.py on the `normal` classes."""
  from vqjax import configs

  c = configs.load_experiment("fashion_mnist_anomaly")
  c.seed = seed
  c.data.exclude_labels = tuple(k for k in range(10) if k not in normal)
  c.train.steps = c.ckpt.every_steps = steps
  c.log.eval_batches = EVAL_BATCHES
  if smoke:
    c.data.update(
      train_split="train[:512]", eval_split="test[:64]", batch_size=8, eval_batch_size=8
    )
    c.data.update(num_workers=0, worker_processes=0)
    c.log.every_steps = 1
  return c


def prior_config(
  level: int, codes_dir: str, steps: int, smoke: bool, seed: int = 0, rotations: bool = False
):
  """The small unconditional PixelSNAIL of experiments/fashion_mnist_anomaly_prior.py; with
  `rotations`, its rotation variant (codes of `extract_codes --rotations 4`)."""
  from vqjax import configs, pipeline

  name = "fashion_mnist_anomaly_prior"
  variant = "_".join(["bottom"] * bool(level) + ["rotation"] * rotations)  # e.g. bottom_rotation
  c = configs.load_experiment(f"{name}:{variant}" if variant else name)
  c.seed = seed
  c.train.steps = c.ckpt.every_steps = steps
  c.log.eval_batches = EVAL_BATCHES
  if smoke:
    c.data.update(batch_size=8, eval_batch_size=8, num_workers=0, worker_processes=0)
    c.log.every_steps = 1
  return pipeline.prior_config(c, codes_dir, c.vq.num_codes)


def classifier_config(normal: list[int], steps: int, smoke: bool, seed: int = 0):
  """The residual classifier of experiments/classifier_fashion_mnist.py:anomaly on the `normal`
  classes' labels, without the train split's first rows (CLASSIFIER_SKIP)."""
  from vqjax import configs

  c = configs.load_experiment("classifier_fashion_mnist:anomaly")
  c.seed = seed
  c.data.exclude_labels = tuple(k for k in range(10) if k not in normal)
  c.data.train_split = f"train[{CLASSIFIER_SKIP}:]"
  c.train.steps = c.ckpt.every_steps = steps
  c.log.eval_batches = EVAL_BATCHES
  if smoke:
    c.data.train_split = "train[64:512]"  # the smoke bank's rows are the first 512's
    c.data.update(batch_size=8, eval_batch_size=8, num_workers=0, worker_processes=0)
    c.log.every_steps = 1
  return c


def _train(config, workdir: str) -> None:
  """Trains (or resumes) one model; a run stopped by a signal stops the benchmark too."""
  from vqjax import errors, runs
  from vqjax.training import trainer

  result = trainer.train_and_evaluate(config, workdir, make_task=runs.make_task)
  if "stopped" in result:
    # The trainer saved and returned on SIGINT/SIGTERM; going on would train the next model
    # and score with this one unfinished.
    raise errors.Stopped(
      f"{workdir} stopped at step {result['step']} of {config.train.steps}, checkpoint saved; "
      "run the same command to go on",
      int(result["stopped"]),
    )


def merge_lines(old: list[dict], new: dict) -> list[dict]:
  """`old` without any line of `new`'s protocol, size, seed and class, then `new`: a class run
  again (after a stop, or to check it) replaces its line instead of counting twice."""
  key = ("protocol", "size", "seed", "class")
  return [line for line in old if [line.get(k) for k in key] != [new[k] for k in key]] + [new]


def write_line(path: str, line: dict) -> None:
  """Adds `line` to the JSON-lines file at `path` through `merge_lines`, replacing the file
  whole (`paths.write_text`), so that a kill leaves the old file or the new one."""
  from vqjax import paths

  old = []
  if os.path.exists(path):
    with open(path) as f:
      old = [json.loads(text) for text in f if text.strip()]
  paths.write_text(path, "".join(json.dumps(each) + "\n" for each in merge_lines(old, line)))


def _images(data, max_examples: int):
  """(images, labels) of the first `max_examples` (0 = all) of `data`'s eval split."""
  import math

  from vqjax.data import pipeline

  batches = math.ceil(max_examples / data.eval_batch_size) if max_examples else 0
  images, labels = [], []
  for batch in pipeline.make_eval_iterator(data, max_batches=batches):
    keep = np.asarray(batch["mask"]) > 0
    images.append(np.asarray(batch["image"], np.float32)[keep])
    labels.append(np.asarray(batch["label"]).reshape(len(keep), -1)[keep, 0])
  images, labels = np.concatenate(images), np.concatenate(labels).astype(np.int64)
  return (images[:max_examples], labels[:max_examples]) if max_examples else (images, labels)


def score_all(
  scorer, images, batch_size: int, seed: int, rotations=None, classifier=None
) -> dict[str, np.ndarray]:
  """Every per-image score of `images`, in batches (the last one padded to the same shape);
  with a `rotation.RotationScorer` or an `open_set.ClassifierScorer`, their scores too."""
  import jax

  out: dict[str, list] = {}
  n = len(images)
  for start in range(0, n, batch_size):
    batch = images[start : start + batch_size]
    real = len(batch)
    if real < batch_size:
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
    s = scorer.score(batch, jax.random.fold_in(jax.random.key(seed), start))
    keys = MODEL_SCORES + ("replaced",)
    if rotations is not None:
      s = {**s, **rotations.score(batch)}
      keys += ROTATION_SCORES
    if classifier is not None:
      s = {**s, **classifier.score(batch)}
      keys += classifier.names
    for k in keys:
      out.setdefault(k, []).append(s[k][:real])
  return {k: np.concatenate(v) for k, v in out.items()}


def run_class(anomalous: int, protocol: str, size: str, workdir: str, seed: int = 0) -> dict:
  """Trains and scores one class of the protocol; returns its JSON line."""
  import jax

  from vqjax import extract_codes, runs
  from vqjax.data import pipeline
  from vqjax.evaluation import anomaly, combined, memory, open_set, rotation
  from vqjax.sampling import hierarchy

  smoke = size == "smoke"
  size_settings = SIZES[size]
  stage1_steps, prior_steps, num_ref, num_test, num_bank = size_settings[:5]
  rotation_steps, classifier_steps = size_settings[5:]
  normal = [anomalous] if protocol == "one-class" else [k for k in range(10) if k != anomalous]
  # Seed 0 at the full size keeps the layout of the first runs; another size or seed has runs of
  # its own.
  root = os.path.join(workdir, run_name(protocol, size, seed), f"class{anomalous}")
  times = {}
  t = time.perf_counter()
  config = stage1_config(normal, stage1_steps, smoke, seed)
  _train(config, os.path.join(root, "stage1"))
  times["stage1"] = time.perf_counter() - t
  t = time.perf_counter()
  codes = os.path.join(root, "codes")
  extract_codes.extract(os.path.join(root, "stage1"), codes)
  times["codes"] = time.perf_counter() - t
  t = time.perf_counter()
  priors = [os.path.join(root, f"prior{level}") for level in (0, 1)]
  for level, path in enumerate(priors):
    _train(prior_config(level, codes, prior_steps, smoke, seed), path)
  times["priors"] = time.perf_counter() - t
  # The rotation priors (evaluation/rotation.py): the same priors, conditioned on how many
  # quarter turns the image was rotated, on the codes of every rotation of the normal images.
  t = time.perf_counter()
  rotated_codes = os.path.join(root, "codes_rotated")
  extract_codes.extract(os.path.join(root, "stage1"), rotated_codes, rotations=rotation.ROTATIONS)
  rotation_priors = [os.path.join(root, f"rotation_prior{level}") for level in (0, 1)]
  for level, path in enumerate(rotation_priors):
    config_r = prior_config(level, rotated_codes, rotation_steps, smoke, seed, rotations=True)
    _train(config_r, path)
  times["rotation_priors"] = time.perf_counter() - t
  # Leave-one-out's normal images have nine labels: a classifier of them (evaluation/open_set.py).
  classifier = None
  if protocol == "leave-one-out":
    t = time.perf_counter()
    _train(
      classifier_config(normal, classifier_steps, smoke, seed), os.path.join(root, "classifier")
    )
    clf_config, clf_model, clf_variables = runs.load_run(os.path.join(root, "classifier"))
    classifier = open_set.ClassifierScorer(clf_model, clf_variables, normal)
    # Its own training images (labelled, normal, and none of the reference images) fit the
    # Gaussians of the mahalanobis score.
    fit_data = clf_config.data.copy_and_resolve_references()
    fit_data.eval_split = fit_data.train_split
    fit_images = 0 if smoke else MAHALANOBIS_IMAGES
    fit_batches = -(-fit_images // fit_data.eval_batch_size)
    classifier = classifier.fit(
      pipeline.make_eval_iterator(fit_data, max_batches=fit_batches), fit_images
    )
    times["classifier"] = time.perf_counter() - t

  t = time.perf_counter()
  gen = hierarchy.Generator.from_runs(os.path.join(root, "stage1"), priors)
  _, model, variables = gen.stage1
  data = config.data.copy_and_resolve_references()
  batch = data.eval_batch_size
  # Normal training images: the knn bank, and (the first num_ref) the scale of each score for
  # the combination. No anomaly is seen.
  data.eval_split = data.train_split
  bank_images, _ = _images(data, num_bank)
  batches = np.array_split(bank_images, -(-len(bank_images) // batch))
  bank = memory.Memory.build(model, variables, batches, num_bank, config.vq.num_codes)
  scorer = anomaly.PriorScorer(
    model,
    variables,
    [p[1:] for p in gen.priors],
    restore_threshold=RESTORE_THRESHOLD,
    memory=bank,
  )
  rotation_gen = hierarchy.Generator.from_runs(os.path.join(root, "stage1"), rotation_priors)
  rotations = rotation.RotationScorer(model, variables, [p[1:] for p in rotation_gen.priors])
  ref_images = bank_images[:num_ref]
  ref = score_all(scorer, ref_images, batch, seed + 1, rotations, classifier)
  # The reference images are bank rows: their own row (distance 0) is left out of their knn.
  own = memory.Memory(bank.bank, bank.k + 1)
  ref["knn"] = np.concatenate(
    [
      own.score(memory.latents(model, variables, ref_images[i : i + batch]))
      for i in range(0, len(ref_images), batch)
    ]
  ) * ((bank.k + 1) / bank.k)
  data.exclude_labels = ()
  data.eval_split = "test"
  images, labels = _images(data, num_test)
  scores = score_all(scorer, images, batch, seed, rotations, classifier)
  pixels = memory.Memory(bank_images.reshape(len(bank_images), -1))
  flat = images.reshape(len(images), -1)
  scores["knn_pixels"] = np.concatenate(
    [pixels.score(flat[i : i + batch]) for i in range(0, len(flat), batch)]
  )
  standard = combined.Standardiser.fit({k: ref[k] for k in STANDARDISED if k in ref})
  scores.update(standard.combinations(scores))
  is_anomaly = ~np.isin(labels, normal)
  # Every per-image score, so that another combination can be measured without retraining:
  # test_NAME for the test images (with their labels), ref_NAME for the normal training images
  # that standardise the combination. Written beside, then renamed: a kill leaves no half file.
  path = os.path.join(root, "scores.npz")
  with open(path + ".tmp", "wb") as f:
    np.savez(
      f,
      labels=labels,
      **{f"test_{k}": v for k, v in scores.items()},
      **{f"ref_{k}": ref[k] for k in STANDARDISED if k in ref},
    )
  os.replace(path + ".tmp", path)
  times["score"] = time.perf_counter() - t
  return {
    "protocol": protocol,
    "class": anomalous,
    "name": CLASSES[anomalous],
    "size": size,
    "seed": seed,
    "auc": {k: anomaly.roc_auc(scores[k], is_anomaly) for k in SCORES if k in scores},
    "replaced_normal": float(scores["replaced"][~is_anomaly].mean()),
    "replaced_anomalous": float(scores["replaced"][is_anomaly].mean()),
    "num_normal": int((~is_anomaly).sum()),
    "num_anomalous": int(is_anomaly.sum()),
    "seconds": {k: round(v, 1) for k, v in times.items()},
    "devices": str(jax.devices()[0].platform),
  }


def run_name(protocol: str, size: str, seed: int) -> str:
  """PROTOCOL[_SIZE][_seedN]: the folder of a protocol's runs and its default JSON lines."""
  return protocol + (f"_{size}" if size != "full" else "") + (f"_seed{seed}" if seed else "")


def table(lines: list[dict]) -> str:
  """The Markdown table: one row per class, then the mean, one column per score that some line
  has ("-" where a line lacks it: the classifier scores of one-class lines)."""
  names = [k for k in SCORES if any(k in r["auc"] for r in lines)]
  head = "| class | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names) + "\n"
  rows = []
  for r in sorted(lines, key=lambda r: r["class"]):
    cells = " | ".join(f"{r['auc'][k]:.3f}" if k in r["auc"] else "-" for k in names)
    rows.append(f"| {r['class']} {r['name']} | {cells} |")

  def mean_cell(k):
    values = [r["auc"][k] for r in lines if k in r["auc"]]
    return f"**{np.mean(values):.3f}**" if len(values) == len(lines) else "-"

  means = " | ".join(mean_cell(k) for k in names)
  rows.append(f"| mean of {len(lines)} | {means} |")
  return head + "\n".join(rows) + "\n"


def parse_classes(parser: argparse.ArgumentParser, text: str) -> list[int]:
  """--classes "0,8" as [0, 8]; anything else is the parser's usage error."""
  try:
    classes = [int(k) for k in text.split(",") if k.strip()]
  except ValueError:
    parser.error(f"--classes must be integers 0-9 separated by commas, got {text!r}")
  if not classes or any(not 0 <= k <= 9 for k in classes):
    parser.error(f"--classes must be integers 0-9, got {text!r}")
  return classes


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--protocol", choices=("one-class", "leave-one-out"), required=True)
  parser.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9", help="e.g. 0,8")
  parser.add_argument("--size", choices=tuple(SIZES), default="full")
  parser.add_argument("--seed", type=int, default=0, help="of every training and draw")
  parser.add_argument("--workdir", default="/tmp/vqjax_anomaly")
  parser.add_argument(
    "--out", default="", help="JSON lines (default WORKDIR/PROTOCOL[_SIZE][_seedN].jsonl)"
  )
  args = parser.parse_args(argv)
  classes = parse_classes(parser, args.classes)
  if args.seed < 0:
    parser.error(f"--seed must be >= 0, got {args.seed}")

  from vqjax import _cli, errors

  _cli.setup()
  # A user's mistake (a workdir that is a file, an unwritable disk, a damaged checkpoint) and
  # Ctrl-C end in one line; a run stopped by a signal exits 128 + the signal.
  with errors.one_line("benchmarks/anomaly.py"):
    return _run(args, classes)


def _run(args: argparse.Namespace, classes: list[int]) -> int:
  from vqjax.training import trainer

  trainer.setup_compilation_cache(os.path.join(args.workdir, "jax_cache"))
  out = args.out or os.path.join(
    args.workdir, run_name(args.protocol, args.size, args.seed) + ".jsonl"
  )
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  lines, t0 = [], time.perf_counter()
  for n, k in enumerate(classes):
    line = run_class(k, args.protocol, args.size, args.workdir, args.seed)
    lines.append(line)
    write_line(out, line)
    elapsed = time.perf_counter() - t0
    eta = elapsed / (n + 1) * (len(classes) - n - 1)
    aucs = " ".join(f"{s}={line['auc'][s]:.3f}" for s in SCORES if s in line["auc"])
    print(
      f"[{n + 1}/{len(classes)}] {args.protocol} class {k} ({CLASSES[k]}): {aucs} | "
      f"{sum(line['seconds'].values()):.0f} s, elapsed {elapsed / 60:.1f} min, "
      f"ETA {eta / 60:.1f} min",
      flush=True,
    )
  print(table(lines))
  print(f"total {(time.perf_counter() - t0) / 60:.1f} min; lines written to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
