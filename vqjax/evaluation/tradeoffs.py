"""Quality against its price: the rejection-threshold and sampling-temperature trade-offs.

  threshold_tradeoff(samples_dir, classifier, thresholds, png, features=...)  # rejection
  temperature_tradeoff(priors, features, temperatures, num, png)   # quality vs diversity

Both judge samples as `samples.evaluate_samples` does (the evaluation network's features,
beside held-out real and blurred images of the same count) and draw the curves as PNG.
"""

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vqjax import errors
from vqjax.evaluation import plots
from vqjax.evaluation.samples import (
  BATCH_SIZE,
  K_NEIGHBOURS,
  MIN_SAMPLES,
  Judge,
  References,
  _quality,
  _read_samples,
  _real_features,
  _stage1_data,
  _with_ratio,
  check_unfiltered,
  judge_for,
)
from vqjax.sampling import hierarchy, rejection
from vqjax.training import logs


def check_thresholds(thresholds: list[float]) -> list[float]:
  thresholds = [float(t) for t in thresholds]
  if not thresholds:
    raise errors.UserError("give at least one threshold, e.g. --thresholds 0.5,0.7,0.9")
  for t in thresholds:
    if not 0.0 < t < 1.0:
      raise errors.UserError(f"threshold {t:g} is not in (0, 1): it is a class probability")
  return thresholds


def _scores(probs: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
  """The classifier's probability of each sample's label (its top class when unlabelled),
  what rejection sampling thresholds."""
  if labels is None:
    return probs.max(axis=1)
  if labels.min() < 0 or labels.max() >= probs.shape[1]:
    raise errors.UserError(
      f"sample labels span [{labels.min()}, {labels.max()}], the classifier has "
      f"{probs.shape[1]} classes"
    )
  return probs[np.arange(len(labels)), labels]


def threshold_tradeoff(
  samples_dir: str,
  classifier: str,
  thresholds: list[float],
  out_png: str,
  max_real: int = 10000,
  features: str = "",
  min_samples: int = MIN_SAMPLES,
) -> list[dict]:
  """Quality and diversity of the samples that classifier-based rejection would keep.

  Each sample's score is the rejection classifier's probability of its label (of its top
  class when the samples are unlabelled), as in `vqjax.sampling.rejection`; a threshold keeps
  the samples scoring at least that much. The kept samples are judged by another network
  (`features`), so the filter is not also the judge.

  Args:
    samples_dir: a `python -m vqjax.sample` directory drawn without --classifier.
    classifier: the rejection classifier run that scores the samples.
    thresholds: thresholds in (0, 1).
    out_png: where the plot goes (acceptance rate, FD, precision, recall against threshold).
    max_real: at most this many real eval images.
    features: the run whose features judge them; default the dataset's evaluation network.
    min_samples: below this many kept samples, precision / recall are NaN.

  Returns:
    One dict per threshold: "threshold", "acceptance_rate" (share kept), "kept",
    "num_samples", and "frechet_distance", "precision", "recall" of the kept samples (NaN,
    with a "note", when too few are kept), the same three of a random subset of the
    unfiltered samples of the same size ("unfiltered_frechet_distance", ...: FD and recall
    grow as a set shrinks, so the kept samples are compared with a set of their own size),
    and the held-out real and blurred references of that size ("real_images/...",
    "blurred_images/...").
  """
  thresholds = check_thresholds(thresholds)
  images, labels, settings = _read_samples(samples_dir)
  check_unfiltered(samples_dir, settings)
  data = _stage1_data(settings["stage1"])
  scorer = Judge(classifier)
  scorer.check(images.shape[1:], f"the samples in {samples_dir}")
  scores = _scores(scorer.probs(images), labels)
  judge = judge_for(features, data)
  judge.check(images.shape[1:], f"the samples in {samples_dir}")
  gen_f = judge.features(images)
  real_f, _ = _real_features(data, max_real, judge)
  references = References(judge, data, len(images))
  acceptance = rejection.acceptance_curve(scores, thresholds)
  order = np.random.default_rng(0).permutation(len(images))  # the same-size random subsets
  rows = []
  for t, rate in zip(thresholds, acceptance, strict=True):
    keep = scores >= t
    kept = int(keep.sum())
    row = {"threshold": t, "acceptance_rate": float(rate), "kept": kept, "num_samples": len(images)}
    row.update(_quality(real_f, gen_f[keep], min_samples=min_samples))
    same_size = _quality(real_f, gen_f[order[:kept]], min_samples=min_samples)
    row.update(
      {f"unfiltered_{k}": same_size[k] for k in ("frechet_distance", "precision", "recall")}
    )
    if kept >= 2:
      row.update(references.rows(real_f, kept, min_samples))
    rows.append(_with_ratio(row))
  column = lambda key: [r.get(key, float("nan")) for r in rows]  # noqa: E731
  plots.line_panels(
    out_png,
    thresholds,
    "classifier threshold",
    [
      (
        "Frechet distance (lower is better)",
        {
          "kept samples": column("frechet_distance"),
          "random unfiltered, same size": column("unfiltered_frechet_distance"),
          "real images, same size": column("real_images/frechet_distance"),
          "blurred images, same size": column("blurred_images/frechet_distance"),
        },
      ),
      (
        "share",
        {
          "acceptance rate": column("acceptance_rate"),
          "precision": column("precision"),
          "recall": column("recall"),
        },
      ),
    ],
    title=f"rejection sampling trade-off ({len(images)} samples)",
  )
  return rows


def check_temperatures(temperatures: list[float]) -> list[float]:
  temperatures = [float(t) for t in temperatures]
  if not temperatures:
    raise errors.UserError("give at least one temperature, e.g. --temperatures 0.7,0.85,1.0")
  for t in temperatures:
    if not (math.isfinite(t) and t > 0.0):
      raise errors.UserError(f"temperature {t:g} must be > 0")
  return temperatures


def _decoder(gen: Any) -> Any:
  """The stage-1 decoder of a Generator, jitted once: (variables, code maps) -> images in
  [-1, 1], as `Generator.decode` computes them."""
  model = gen.stage1[1]

  def decode(variables, maps):
    images = model.apply(variables, tuple(maps), method="decode_from_indices")
    return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)

  return jax.jit(decode)


def _generate(
  gen: Any, decode: Any, num: int, seed: int, temperature: float, labels: Any
) -> np.ndarray:
  """`num` uint8 samples drawn in equal batches (the last one padded and cut): each example's
  draw depends on its global index only, so the batching changes nothing."""
  variables = gen.stage1[2]
  batch = min(num, BATCH_SIZE)
  out = []
  for start in range(0, num, batch):
    maps = gen.sample_codes(
      batch,
      jax.random.key(seed),
      None if labels is None else labels[start : start + batch],
      temperature=temperature,
      example_offset=start,
    )
    images = decode(variables, maps)
    out.append(logs.to_uint8(np.asarray(images))[: num - start])
  return np.concatenate(out)


def temperature_tradeoff(
  priors: list[str],
  features: str,
  temperatures: list[float],
  num: int,
  out_png: str,
  seed: int = 0,
  stage1: str = "",
  max_real: int = 10000,
  min_samples: int = MIN_SAMPLES,
  allow_mismatch: bool = False,
) -> list[dict]:
  """Quality against diversity of fresh samples at several sampling temperatures.

  Every temperature draws `num` samples with the same seed (class-conditional priors cycle
  through the classes) through one compiled sampler per level: the temperature is a traced
  argument of `vqjax.sampling`, so a new temperature does not compile again.

  Args:
    priors: the priors' workdirs, one per code level.
    features: the run whose features and probabilities judge the samples; "" = the evaluation
      network of the dataset (shipped with vqjax, else cached).
    temperatures: softmax temperatures > 0.
    num: samples per temperature (more than 3).
    out_png: where the plot goes (FD, precision and recall against temperature).
    seed: the sampling seed.
    stage1: the autoencoder run; default the one the priors' codes came from.
    max_real: at most this many real eval images of the stage-1 run's data.
    min_samples: below this many samples, precision / recall, IS and CAS are NaN.
    allow_mismatch: use a stage-1 run and priors that do not belong together anyway
      (`hierarchy.Generator.from_runs`).

  Returns:
    One dict per temperature: "temperature", "num_samples", "seconds" (sampling and
    scoring; the first temperature's include the compilation), the statistics of
    `evaluate_samples` and its real / blurred references of `num` images.
  """
  temperatures = check_temperatures(temperatures)
  if num <= K_NEIGHBOURS:
    raise errors.UserError(f"num must be > {K_NEIGHBOURS} for precision / recall, got {num}")
  if not priors:
    raise errors.UserError("give the priors' workdirs: --workdir TOP --workdir BOTTOM ...")
  stage1 = stage1 or hierarchy.stage1_of(priors[0])
  gen = hierarchy.Generator.from_runs(stage1, priors, allow_mismatch)
  data = gen.stage1[0].data
  judge = judge_for(features, data)
  judge.check((data.image_size, data.image_size, data.channels), f"the images of {stage1}")
  real_f, real_labels = _real_features(data, max_real, judge)
  num_classes = max(
    (p[0].prior.num_classes for p in gen.priors if p[0].prior.class_conditional), default=0
  )
  references = References(judge, data, num).rows(
    real_f, num, min_samples, real_labels if num_classes else None
  )
  # Labels for the padded last batch too, cycling as `hierarchy.labels_for` does.
  padded = -(-num // min(num, BATCH_SIZE)) * min(num, BATCH_SIZE)
  labels = hierarchy.labels_for(padded, None, num_classes)
  decode = _decoder(gen)
  rows = []
  for t in temperatures:
    t0 = time.perf_counter()
    images = _generate(gen, decode, num, seed, t, labels)
    gen_f, probs = judge(images)
    gen_labels = None if labels is None else labels[:num].astype(np.int64)
    row = {"temperature": t, "num_samples": num}
    row.update(
      _quality(
        real_f, gen_f, probs, real_labels, gen_labels, judge.num_classes, min_samples=min_samples
      )
    )
    row.update(references)
    row["seconds"] = round(time.perf_counter() - t0, 3)
    rows.append(_with_ratio(row))
  column = lambda key: [r[key] for r in rows]  # noqa: E731
  plots.line_panels(
    out_png,
    temperatures,
    "temperature",
    [
      (
        "Frechet distance (lower is better)",
        {
          "samples": column("frechet_distance"),
          "real images": column("real_images/frechet_distance"),
          "blurred images": column("blurred_images/frechet_distance"),
        },
      ),
      (
        "share",
        {"precision (quality)": column("precision"), "recall (diversity)": column("recall")},
      ),
    ],
    title=f"temperature trade-off ({num} samples each)",
  )
  return rows
