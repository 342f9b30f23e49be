"""Generates images with trained priors and a stage-1 decoder.

  python -m vqjax.sample --workdir PRIOR_TOP --workdir PRIOR_BOTTOM --num 64 --out DIR
      [--stage1 STAGE1_WORKDIR] [--label 3] [--seed 0]
      [--temperature 1.0 --top_k 0 --top_p 1.0]
      [--classifier CLASSIFIER_RUN --threshold 0.9 --min_acceptance 0.05]

The stage-1 run defaults to the one the priors' code dataset was extracted from. Writes
DIR/samples.png (a grid), DIR/codes.npz (the code maps, coarsest first, and the labels),
DIR/images.npz (the images as uint8 [N, H, W, C] under "image", and "label" when the priors
are class-conditional, so `python -m vqjax.evaluate --samples DIR` needs no decoder) and
DIR/settings.json (everything needed to draw the same samples again). With --classifier,
classifier-based rejection sampling (Razavi et al. 2019) keeps only the samples the classifier
gives at least --threshold probability of their label (of its top class for unconditional
priors), generating batches of --num until --num are kept: the grid is always full. The budget
is --min_acceptance, the least acceptance rate worth waiting for: at most
ceil(num / min_acceptance) samples are generated (in whole batches of --num), and when they
are spent before --num pass, the command stops with one line (RejectionBudgetError: how many
were kept, the acceptance rate reached, what to lower) and writes nothing. settings.json's
"rejection" holds "acceptance_rate", the share of all generated samples that passed the
threshold (accepted / generated, passing samples beyond what the grid needed included), with
"generated", "accepted", "kept", "batches" and "max_batches" (the budget); images.npz holds each
kept sample's score ("score") and the score of every generated sample, kept or not, too
("generated_score").
"""

import json
import math
import os
import sys
import time

from absl import app, flags, logging
from etils import epath

from vqjax import _cli, errors, links

# The library, and JAX with it, is imported inside the functions that use it, so that --help
# and flag errors answer at once (JAX alone takes seconds to import).


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program: several CLIs share names
  like --workdir, and tests import them together)."""
  flags.DEFINE_multi_string("workdir", [], "A prior's workdir (one per level).")
  flags.DEFINE_string("stage1", "", "The autoencoder run (default: from the codes).")
  flags.DEFINE_integer("num", 64, "How many images.")
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_integer("seed", 0, "Random seed: the same seed gives the same images.")
  flags.DEFINE_integer(
    "label",
    None,
    "Class of every image (class-conditional priors; default: cycle through the classes).",
  )
  flags.DEFINE_float("temperature", 1.0, "Softmax temperature (0 = greedy).")
  flags.DEFINE_integer("top_k", 0, "Keep the k most likely codes (0 = all).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus: keep the codes of this much mass (1 = all).")
  flags.DEFINE_string("classifier", "", "A classifier run for rejection sampling.")
  flags.DEFINE_float("threshold", 0.9, "Rejection: the least probability kept.")
  flags.DEFINE_float(
    "min_acceptance",
    0.05,
    "Rejection: the budget, as the least acceptance rate in (0, 1] worth waiting for: at most "
    "ceil(num / min_acceptance) samples are generated, else an error (no partial grid).",
  )
  flags.DEFINE_bool(
    "allow_mismatch",
    False,
    "Use a stage-1 run and priors that do not belong together (trained on codes of another "
    "run or step) anyway.",
  )
  flags.DEFINE_bool("verbose", False, "Show the traceback of user errors too.")


def run(
  priors: list[str],
  out: str,
  num: int,
  seed: int = 0,
  stage1: str = "",
  label: int | None = None,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  classifier: str = "",
  threshold: float = 0.9,
  min_acceptance: float = 0.05,
  allow_mismatch: bool = False,
) -> dict:
  """Samples `num` images (see the module docstring); returns the settings written."""
  import jax
  import numpy as np

  from vqjax.sampling import hierarchy
  from vqjax.training import logs

  if not priors:
    raise errors.UserError("give the priors' workdirs: --workdir TOP --workdir BOTTOM ...")
  _check_settings(
    num,
    temperature,
    top_k,
    top_p,
    threshold if classifier else None,
    min_acceptance if classifier else None,
  )
  # Each run's kind from its config alone, before any weights are read or samples drawn.
  for prior in priors:
    hierarchy.check_run(prior, "prior", "--workdir")
  if stage1:
    hierarchy.check_run(stage1, "autoencoder", "--stage1")
  if classifier:
    hierarchy.check_run(classifier, "classifier", "--classifier")
  stage1 = stage1 or hierarchy.stage1_of(priors[0])
  gen = hierarchy.Generator.from_runs(stage1, priors, allow_mismatch)
  num_classes = max(
    (p[0].prior.num_classes for p in gen.priors if p[0].prior.class_conditional), default=0
  )
  if label is not None and not num_classes:
    raise errors.UserError(f"--label {label}: the priors are not class-conditional")
  labels = hierarchy.labels_for(num, label, num_classes)
  t0 = time.perf_counter()
  settings = dict(temperature=temperature, top_k=top_k, top_p=top_p)
  rejection, scores, steps = None, {}, dict(gen.steps)
  if classifier:
    images, maps, rejection, labels, scores, steps["classifier"] = _rejection(
      gen, classifier, num, seed, labels, threshold, min_acceptance, settings
    )
  else:
    images, maps = gen.generate(num, jax.random.key(seed), labels, **settings)
    images = np.asarray(jax.block_until_ready(images))
  requested, num = num, len(images)
  seconds = time.perf_counter() - t0
  epath.Path(out).mkdir(parents=True, exist_ok=True)
  # settings.json is written last and marks the directory complete: an older one goes first, so
  # a write killed half-way never leaves old settings beside new (or half-written) arrays.
  settings_path = os.path.join(out, "settings.json")
  if epath.Path(settings_path).exists():
    epath.Path(settings_path).unlink()
  per_row = int(np.ceil(np.sqrt(num)))
  rows = [images[i : i + per_row] for i in range(0, num, per_row)]
  if len(rows[-1]) < per_row:
    blank = np.ones((per_row - len(rows[-1]),) + images.shape[1:], np.float32)
    rows[-1] = np.concatenate([rows[-1], blank])
  logs.save_png(os.path.join(out, "samples.png"), logs.image_grid(rows))
  arrays = {f"codes{i}": np.asarray(m) for i, m in enumerate(maps)}
  labelled = {} if labels is None else {"label": np.asarray(labels, np.int32)}
  with epath.Path(out, "codes.npz").open("wb") as f:
    np.savez(f, **arrays, **labelled)
  # The images as a PNG would hold them (uint8), so evaluation needs no decoder.
  with epath.Path(out, "images.npz").open("wb") as f:
    np.savez(f, image=logs.to_uint8(images), **labelled, **scores)
  # The runs drawn from, relative to `out` where they share its parent directory (links.py).
  settings = {
    "stage1": links.record(stage1, out),
    "priors": [links.record(p, out) for p in priors],
    "num": num,
    "requested": requested,
    "seed": seed,
    "label": label,
    "temperature": temperature,
    "top_k": top_k,
    "top_p": top_p,
    "seconds": round(seconds, 3),
    "device": jax.devices()[0].device_kind,
    "classifier": links.record(classifier, out) if classifier else None,
    "threshold": threshold if classifier else None,
    "min_acceptance": min_acceptance if classifier else None,
    "rejection": rejection,
    "steps": steps,
  }
  with epath.Path(settings_path).open("w") as f:
    json.dump(settings, f, indent=2)
  logging.info("%d images in %.1f s (compilation included) -> %s/samples.png", num, seconds, out)
  return settings


def _rejection(gen, classifier, num, seed, labels, threshold, min_acceptance, settings):
  """Rejection sampling with a classifier run; returns (images, code maps, summary, labels of
  the kept samples, {"score": kept samples' scores, "generated_score": every score}). Raises
  errors.RejectionBudgetError (one line) when the budget is spent before `num` pass."""
  import jax
  import numpy as np

  from vqjax import runs
  from vqjax.sampling import hierarchy, rejection

  clf_config, clf, clf_vars, clf_step = runs.load_run_with_step(classifier)
  hierarchy.check_run(classifier, "classifier", "--classifier", clf_config.task)
  probs = jax.jit(lambda x: jax.nn.softmax(clf.apply(clf_vars, x).astype(jax.numpy.float32)))
  drawn = []  # every generated batch with its code maps, to recover the kept samples' codes

  def generate(rng, n, batch_labels):
    images, maps = gen.generate(n, rng, batch_labels, **settings)
    drawn.append((np.asarray(images), [np.asarray(m) for m in maps]))
    return drawn[-1][0]

  samples, info = rejection.rejection_sample(
    generate,
    lambda x: np.asarray(probs(x)),
    num,
    jax.random.key(seed),
    threshold=threshold,
    min_acceptance=min_acceptance,
    labels=labels,
  )
  # The code maps of the kept samples: find each kept image among the generated batches.
  # info["scores"] follows the generated samples in order, as the pool does.
  pool = np.concatenate([b[0] for b in drawn])
  pool_maps = [np.concatenate([b[1][i] for b in drawn]) for i in range(len(drawn[0][1]))]
  index = [int(np.argmin(np.abs(pool - s).reshape(len(pool), -1).sum(1))) for s in samples]
  maps = [m[index] for m in pool_maps]
  kept_scores = np.asarray(info["scores"], np.float64)[index]
  keys = ("acceptance_rate", "generated", "accepted", "kept", "batches", "max_batches")
  summary = {k: info[k] for k in keys}
  logging.info(
    "rejection sampling: kept %d; %d of %d generated passed (acceptance rate %.3f, %d batches)",
    info["kept"],
    info["accepted"],
    info["generated"],
    info["acceptance_rate"],
    info["batches"],
  )
  scores = {"score": kept_scores, "generated_score": np.asarray(info["scores"], np.float64)}
  return samples, maps, summary, info["labels"], scores, clf_step


def _check_settings(num, temperature, top_k, top_p, threshold, min_acceptance) -> None:
  """One-line errors for settings no sampler can use, before any run is read (threshold and
  min_acceptance are None without a classifier)."""
  problems = []
  if num < 1:
    problems.append(f"--num {num}: at least 1")
  if not (math.isfinite(temperature) and temperature > 0):  # as evaluate's check_temperatures
    problems.append(f"--temperature {temperature}: above 0")
  if top_k < 0:
    problems.append(f"--top_k {top_k}: 0 (off) or more")
  if not 0 < top_p <= 1:
    problems.append(f"--top_p {top_p}: in (0, 1]")
  if threshold is not None and not 0 < threshold <= 1:
    problems.append(f"--threshold {threshold}: in (0, 1]")
  if min_acceptance is not None and not 0 < min_acceptance <= 1:  # NaN too
    problems.append(f"--min_acceptance {min_acceptance}: in (0, 1]")
  if problems:
    raise errors.UserError("; ".join(problems))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS.out:
    raise SystemExit("vqjax.sample: --out is required")
  _cli.setup()  # before JAX creates its backends
  with errors.one_line("vqjax.sample", flags.FLAGS.verbose):
    settings = run(
      flags.FLAGS.workdir,
      flags.FLAGS.out,
      flags.FLAGS.num,
      flags.FLAGS.seed,
      flags.FLAGS.stage1,
      flags.FLAGS.label,
      flags.FLAGS.temperature,
      flags.FLAGS.top_k,
      flags.FLAGS.top_p,
      flags.FLAGS.classifier,
      flags.FLAGS.threshold,
      flags.FLAGS.min_acceptance,
      flags.FLAGS.allow_mismatch,
    )
  out = flags.FLAGS.out
  print(f"wrote {settings['num']} samples to {out} (samples.png, images.npz)", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  _cli.run(main)
