"""Sample quality of drawn images, with the references that say where a number stands.

  evaluate_samples(samples_dir, features)     # FD, precision / recall, IS, CAS, class shares

(the rejection-threshold and temperature trade-offs, built on these, are in tradeoffs.py)

Every statistic is computed in the feature space of a classifier run, by default the evaluation
network of the dataset that ships with vqjax, else the cached one
(`vqjax.evaluation.feature_network`), against at most
`max_real` images of the eval split of the stage-1 run the samples came from. Beside each
number stand the same statistics of two reference sets of the same size, embedded by the same
network: held-out real images (the train split, never the eval images compared with) and those
images blurred (a 2x2 average, upsampled back). A reader sees at once whether the samples stand
nearer to real images or to blurred ones; `fd_ratio_to_blurred` is the samples' Frechet distance
over the blurred images'. Precision / recall, the Inception-style score and CAS of fewer than
`MIN_SAMPLES` samples are NaN with a "note": on a handful of samples they mean nothing (16
samples gave an Inception-style score of 1.0 with standard deviation 0).
"""

import functools
import json
import math
import os
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from vqjax import errors, links, runs
from vqjax.data import pipeline
from vqjax.evaluation import feature_network, frechet
from vqjax.evaluation.evaluators import SampleQualityEvaluator

# Neighbour rank of the precision / recall radii.
K_NEIGHBOURS = 3
# Precision / recall, the Inception-style score and CAS of fewer samples are NaN with a note.
MIN_SAMPLES = 100
# Images per network call and per generated batch (every call has this shape: one compile).
BATCH_SIZE = 256


@functools.cache
def _features_and_probs() -> Any:
  """(model, variables, images) -> a classifier's pooled features and softmax probabilities
  (float32), jitted once per process. The model is static and compares by value, so runs of
  the same architecture share one compilation; the variables are an argument, not constants
  baked into the program."""

  def fn(model, variables, images):
    f = model.apply(variables, images, method="features")
    logits = model.apply(variables, images)
    return f.astype(jnp.float32), jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  return jax.jit(fn, static_argnums=0)


class Judge:
  """A classifier run as the feature and probability extractor of sample-quality statistics.

  Args:
    workdir: the classifier run (an evaluation network, or the rejection classifier when
      scoring samples for rejection).

  Attributes:
    step: the checkpoint step whose weights were read (None for a converted model).
  """

  def __init__(self, workdir: str):
    config, model, variables, step = runs.load_run_with_step(workdir)
    if config.task != "classifier":
      raise errors.UserError(f"{workdir} is not a classifier run (its task is {config.task!r})")
    self._set(config, model, variables, workdir, step)
    self._described = feature_network.describe(workdir, step)

  def _set(self, config: Any, model: Any, variables: dict, workdir: str, step: int | None):
    self.workdir, self.step = workdir, step
    self.image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    self.num_classes = int(config.classifier.num_classes)
    self._model, self._variables = model, variables

  @classmethod
  def packaged(cls, dataset: str) -> "Judge":
    """The evaluation network of `dataset` that ships with vqjax (feature_network.packaged)."""
    config, model, variables, record = feature_network.packaged(dataset)
    judge = cls.__new__(cls)
    judge._set(config, model, variables, record["run"], record["step"])
    judge._described = {
      "features_run": record["run"],
      "features_step": record["step"],
      "features_test_accuracy": record["accuracy"],
      "features_sha256": record["sha256"],
    }
    return judge

  def describe(self) -> dict[str, Any]:
    """Which network made the features: its run (or shipped file), step and, for evaluation
    networks, test accuracy."""
    return dict(self._described)

  def check(self, shape: tuple[int, ...], what: str) -> None:
    """UserError unless images of `shape` [H, W, C] fit the classifier."""
    if tuple(shape) != self.image_shape:
      h, w, c = self.image_shape
      raise errors.UserError(
        f"the classifier {self.workdir} takes {h}x{w}x{c} images, {what} are "
        f"{'x'.join(str(d) for d in shape)}: use a classifier trained on the samples' data"
      )

  def features(self, images: np.ndarray) -> np.ndarray:
    """Features float64 [N, D] of images (see `__call__`)."""
    return self(images)[0]

  def probs(self, images: np.ndarray) -> np.ndarray:
    """Class probabilities float64 [N, K] of images (see `__call__`)."""
    return self(images)[1]

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(features float64 [N, D], probabilities float64 [N, K]) of uint8 images or floats
    in [-1, 1], in padded batches of `BATCH_SIZE`."""
    features, probs = [], []
    for start in range(0, len(images), BATCH_SIZE):
      chunk = _to_float(images[start : start + BATCH_SIZE])
      n = len(chunk)
      if n < BATCH_SIZE:
        chunk = np.concatenate([chunk, np.zeros((BATCH_SIZE - n, *chunk.shape[1:]), np.float32)])
      f, p = _features_and_probs()(self._model, self._variables, chunk)
      features.append(np.asarray(f, np.float64)[:n])
      probs.append(np.asarray(p, np.float64)[:n])
    if not features:
      raise ValueError("no images to judge")
    return np.concatenate(features), np.concatenate(probs)


def judge_for(features: str, data_config: Any) -> Judge:
  """The judge of samples of `data_config`'s dataset: the run `features`, or, when empty, the
  evaluation network of the dataset that ships with vqjax, else the cached one (a one-line
  error tells how to train it)."""
  if not features and feature_network.has_packaged(data_config.name):
    return Judge.packaged(data_config.name)
  if not features:
    workdir = feature_network.default_dir(data_config.name)
    if feature_network.read_record(workdir) is None:
      feature_network.experiment(data_config.name)  # no network for this dataset: one line
      raise errors.UserError(
        f"no trained evaluation network of {data_config.name!r} in {workdir}: train it once "
        f"with python -m vqjax.features --data {data_config.name}, or pass --features RUN"
      )
    features = workdir
  return Judge(features)


def _to_float(images: np.ndarray) -> np.ndarray:
  """uint8 images -> float32 in [-1, 1] as the data pipeline scales them (floats pass)."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
  return images.astype(np.float32)


def blur(images: np.ndarray) -> np.ndarray:
  """The degraded reference: each 2x2 block replaced by its mean (nearest upsampling back).

  Args:
    images: uint8 [N, H, W, C], or floats in [-1, 1]; H and W even.

  Returns:
    float32 [N, H, W, C] in [-1, 1].
  """
  x = _to_float(images)
  n, h, w, c = x.shape
  if h % 2 or w % 2:
    raise ValueError(f"blur needs even image sides, got {h}x{w}")
  pooled = x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  return np.repeat(np.repeat(pooled, 2, axis=1), 2, axis=2)


def _split_images(data_config: Any, split: str, count: int) -> tuple[np.ndarray, np.ndarray | None]:
  """The first `count` images of `split` in file order (uint8 [n, H, W, C], n <= count), and
  their labels (None when the split has none)."""
  config = data_config.copy_and_resolve_references()
  config.eval_split = split
  images, labels, labelled, have = [], [], True, 0
  for batch in pipeline.make_eval_iterator(config):
    take = np.flatnonzero(np.asarray(batch["mask"]) > 0)[: count - have]
    images.append(np.asarray(batch["image"])[take])
    labelled = labelled and "label" in batch
    if labelled:
      labels.append(np.asarray(batch["label"])[take])
    have += len(take)
    if have >= count:
      break
  if not have:
    raise errors.UserError(f"the split {split!r} of {data_config.name!r} gave no images")
  return np.concatenate(images), (np.concatenate(labels).astype(np.int64) if labelled else None)


class References:
  """Held-out real images and their blurred copies, embedded once, as calibration points.

  The real images come from the training split, so they are never among the eval images the
  samples are compared with; the same statistics of `n` of them, and of the same images
  blurred, stand beside the statistics of `n` samples.

  Args:
    judge: the network that embeds them.
    data_config: the stage-1 run's `config.data`.
    count: how many held-out images (the largest set they will stand beside).
  """

  def __init__(self, judge: Judge, data_config: Any, count: int):
    images, self.labels = _split_images(data_config, data_config.train_split, count)
    self.count = len(images)
    self.num_classes = judge.num_classes
    self.real = judge.features(images)
    self.blurred = judge.features(blur(images))

  def rows(
    self,
    real_f: np.ndarray,
    n: int,
    min_samples: int = MIN_SAMPLES,
    real_labels: np.ndarray | None = None,
  ) -> dict[str, Any]:
    """FD, precision and recall of `n` held-out real and of `n` blurred images against
    `real_f`: keys "real_images/..." and "blurred_images/...". With `real_labels` (the labels
    of `real_f`) and a labelled train split, also their classification accuracy score: a
    classifier trained on the `n` held-out (or blurred) images, tested on `real_f`."""
    n = min(n, self.count)
    out: dict[str, Any] = {"reference_count": n}
    labels = self.labels[:n] if self.labels is not None and real_labels is not None else None
    keys = ["frechet_distance", "precision", "recall"]
    if labels is not None:
      keys.append("classification_accuracy_score")
    for name, f in (("real_images", self.real), ("blurred_images", self.blurred)):
      q = _quality(
        real_f, f[:n], None, real_labels, labels, self.num_classes, min_samples=min_samples
      )
      out.update({f"{name}/{k}": q.get(k, float("nan")) for k in keys})
    return out


def _with_ratio(row: dict[str, Any]) -> dict[str, Any]:
  """Adds "fd_ratio_to_blurred": the samples' FD over the blurred images' (< 1: nearer to
  real images than blurred ones are)."""
  fd, blurred = row.get("frechet_distance"), row.get("blurred_images/frechet_distance")
  if fd is not None and blurred and math.isfinite(fd) and math.isfinite(blurred):
    row["fd_ratio_to_blurred"] = fd / blurred
  return row


def _real_features(
  data_config: Any, max_real: int, judge: Judge
) -> tuple[np.ndarray, np.ndarray | None]:
  """Features of at most `max_real` images of the eval split, and their labels (None when
  the split has none)."""
  if max_real <= K_NEIGHBOURS:
    raise errors.UserError(f"max_real must be > {K_NEIGHBOURS}, got {max_real}")
  judge.check(
    (data_config.image_size, data_config.image_size, data_config.channels),
    f"the eval images of {data_config.name!r}",
  )
  images, labels = _split_images(data_config, data_config.eval_split, max_real)
  if len(images) <= K_NEIGHBOURS:
    raise errors.UserError(
      f"the eval split {data_config.eval_split!r} gave {len(images)} images: sample-quality "
      f"statistics need more than {K_NEIGHBOURS}"
    )
  return judge.features(images), labels


def check_unfiltered(samples_dir: str, settings: dict | None = None) -> None:
  """A threshold trade-off replays rejection sampling: its samples must be drawn without it."""
  if settings is None:
    try:
      with epath.Path(samples_dir, "settings.json").open() as f:
        settings = json.load(f)
    except (OSError, ValueError):
      return  # _read_samples names what is missing or damaged
  if settings.get("classifier"):
    raise errors.UserError(
      f"{samples_dir} holds samples already filtered by rejection sampling (threshold "
      f"{settings.get('threshold')}): draw samples without --classifier for a trade-off"
    )


def _read_samples(samples_dir: str) -> tuple[np.ndarray, np.ndarray | None, dict]:
  """(uint8 images [N, H, W, C], labels [N] or None, settings) of a vqjax.sample directory."""
  path = os.path.join(samples_dir, "images.npz")
  if not epath.Path(path).is_file():
    raise errors.UserError(
      f"no images.npz in {samples_dir}: give a directory written by python -m vqjax.sample"
    )
  settings_path = os.path.join(samples_dir, "settings.json")
  if not epath.Path(settings_path).is_file():
    raise errors.UserError(f"no settings.json in {samples_dir}: it names the stage-1 run")
  try:
    with epath.Path(path).open("rb") as f, np.load(f) as saved:
      images = saved["image"]
      labels = saved["label"].astype(np.int64) if "label" in saved else None
    with epath.Path(settings_path).open() as f:
      settings = json.load(f)
  except (KeyError, ValueError, zipfile.BadZipFile) as e:
    raise errors.UserError(f"{samples_dir} holds unreadable samples: {e}") from None
  if images.ndim != 4 or images.dtype != np.uint8:
    raise errors.UserError(
      f"{path} must hold uint8 images [N, H, W, C], got {images.dtype} {images.shape}"
    )
  if not len(images):
    raise errors.UserError(f"{path} holds no samples")
  if not settings.get("stage1"):
    raise errors.UserError(f"{settings_path} names no stage-1 run")
  # The runs drawn from are recorded relative to the samples where they can be (links.py).
  for key in ("stage1", "classifier"):
    if isinstance(settings.get(key), str):
      settings[key] = links.resolve(settings[key], samples_dir)
  settings["priors"] = [links.resolve(p, samples_dir) for p in settings.get("priors") or []]
  return images, labels, settings


def _stage1_data(stage1: str) -> Any:
  """`config.data` of the stage-1 run (its eval split holds the real images)."""
  return runs.load_run(stage1)[0].data


def _class_shares(probs: np.ndarray) -> dict[str, Any]:
  """How the judge classifies the samples: the share of each class among their top classes
  (a prior that never draws some class shows here, whatever labels it was asked for)."""
  top = np.argmax(probs, axis=1)
  shares = np.bincount(top, minlength=probs.shape[1]) / len(top)
  return {
    "class_shares": [round(float(x), 4) for x in shares],
    "class_share_min": float(shares.min()),
    "class_share_max": float(shares.max()),
  }


def _quality(
  real_f: np.ndarray,
  gen_f: np.ndarray,
  probs: np.ndarray | None = None,
  real_labels: np.ndarray | None = None,
  gen_labels: np.ndarray | None = None,
  num_classes: int | None = None,
  min_samples: int = MIN_SAMPLES,
) -> dict[str, Any]:
  """Sample-quality statistics of generated features against real ones.

  The Frechet distance needs 2 samples; precision / recall, the Inception-style score and CAS
  need `min_samples` (at least k + 1): below that they are NaN, with a "note".
  """
  n = len(gen_f)
  nan = float("nan")
  out: dict[str, Any] = {"frechet_distance": nan, "precision": nan, "recall": nan}
  if probs is not None:
    out.update(inception_score=nan, inception_score_std=nan)
    if n:
      out.update(_class_shares(probs))
  if n >= max(min_samples, K_NEIGHBOURS + 1):
    labelled = real_labels is not None and gen_labels is not None
    out.update(
      SampleQualityEvaluator(None, k=K_NEIGHBOURS).compute_from_features(
        real_f,
        gen_f,
        probs,
        real_labels if labelled else None,
        gen_labels if labelled else None,
        num_classes=num_classes,
      )
    )
    return out
  if n >= 2:
    out["frechet_distance"] = frechet.frechet_distance_from_features(real_f, gen_f)
    out["note"] = (
      f"only {n} samples: precision / recall, the Inception-style score and CAS need "
      f"{max(min_samples, K_NEIGHBOURS + 1)}"
    )
  else:
    out["note"] = f"only {n} sample(s): no statistics (Frechet distance needs 2)"
  return out


def evaluate_samples(
  samples_dir: str, features: str = "", max_real: int = 10000, min_samples: int = MIN_SAMPLES
) -> dict[str, Any]:
  """Sample-quality statistics of a `python -m vqjax.sample` directory, with references.

  Args:
    samples_dir: holds images.npz (uint8 "image" [N, H, W, C], optional "label" [N]) and
      settings.json (its "stage1" run's eval split gives the real images).
    features: a classifier run whose pooled features are the feature space and whose softmax
      gives the Inception-style score; default the evaluation network of the dataset
      (shipped, else cached).
    max_real: at most this many real eval images.
    min_samples: below this many samples, precision / recall, IS and CAS are NaN.

  Returns:
    {"frechet_distance", "precision", "recall", "inception_score", "inception_score_std",
    "class_shares" (the judge's top-class shares), "class_share_min", "class_share_max",
    "num_samples", "num_real"}, "classification_accuracy_score" when the samples and the real
    images are labelled; the references "real_images/{frechet_distance,precision,recall}" and
    "blurred_images/..." of `reference_count` held-out images, "fd_ratio_to_blurred"; and the
    network: "features_run", "features_step", "features_test_accuracy" (evaluation networks),
    "features_sha256" (the shipped one).

  Raises:
    errors.UserError: missing files, fewer than 4 samples, or images of another shape than
      the network's.
  """
  images, labels, settings = _read_samples(samples_dir)
  if len(images) <= K_NEIGHBOURS:
    raise errors.UserError(
      f"{samples_dir} holds {len(images)} samples: sample-quality statistics need more than "
      f"{K_NEIGHBOURS}"
    )
  data = _stage1_data(settings["stage1"])
  judge = judge_for(features, data)
  judge.check(images.shape[1:], f"the samples in {samples_dir}")
  real_f, real_labels = _real_features(data, max_real, judge)
  gen_f, probs = judge(images)
  out = _quality(
    real_f, gen_f, probs, real_labels, labels, judge.num_classes, min_samples=min_samples
  )
  references = References(judge, data, len(images))
  out.update(references.rows(real_f, len(images), min_samples, real_labels))
  out.update(num_samples=float(len(images)), num_real=float(len(real_f)), **judge.describe())
  return _with_ratio(out)
