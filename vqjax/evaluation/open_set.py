"""Anomaly score of a classifier trained on the normal classes' labels (open-set recognition).

Where the normal images come in several labelled classes (the leave-one-out protocol: nine
Fashion-MNIST classes normal, the tenth anomalous), a classifier trained on those labels alone
learns what tells the normal classes apart, and an image of a class it never saw tends to get
a less confident answer. The score is one minus the maximum softmax probability, the baseline
of Hendrycks and Gimpel 2017 ("A Baseline for Detecting Misclassified and Out-of-Distribution
Examples"): high when the classifier cannot name any normal class with confidence. The softmax
runs over the normal labels only; a head with more classes (a run that kept the full dataset's
`num_classes` and left some labels out of training) has those logits dropped first.

A second score reads the classifier's pooled features instead of its head: the Mahalanobis
distance to the nearest normal class, under one Gaussian per class with a covariance shared by
all (Lee et al. 2018, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
Adversarial Attacks"; here on the last features only, without their input perturbation). The
means and covariance come from labelled normal training images (`ClassifierScorer.fit`). It
answers where the head is confidently wrong: an unseen class whose features fall far from every
normal class even when one logit is large.

The classifier is the library's own (models/classifier.py, the judge of rejection sampling),
trained with `python -m vqjax.train --config experiments/classifier_fashion_mnist.py` and
`config.data.exclude_labels` set to the anomalous classes. It needs labels, so it has no
place in the one-class protocol, where the normal data is a single class.

  scorer = open_set.ClassifierScorer(model, variables, normal_labels=[0, 1, ...])
  scores = scorer.score(images)   # {"classifier": float64 [B]}
  scorer = scorer.fit(train_batches)  # eval-iterator dicts: "image", "label", "mask"
  scores = scorer.score(images)   # {"classifier": ..., "mahalanobis": float64 [B]}
"""

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from vqjax.evaluation import model_jit


def max_softmax_score(logits: Any, labels: Any = None) -> np.ndarray:
  """1 - max_c softmax(logits[:, labels])_c, float64 [B], from logits [B, C]; `labels` None
  keeps every column."""
  z = np.asarray(logits, np.float64)
  if z.ndim != 2:
    raise ValueError(f"expected logits [B, C], got shape {z.shape}")
  if labels is not None:
    z = z[:, np.asarray(labels, np.int64)]
  # max softmax = 1 / sum_c exp(z_c - max z), computed without overflow.
  return 1.0 - 1.0 / np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1)


@dataclasses.dataclass(frozen=True)
class ClassGaussians:
  """Class-conditional Gaussians with a shared covariance, fitted to features.

  Attributes:
    labels: the label of each mean, sorted.
    means: float64 [K, D], the mean feature of each label.
    precision: float64 [D, D], the pseudo-inverse of the shared covariance.
    num_images: how many features they were fitted to.
  """

  labels: tuple[int, ...]
  means: np.ndarray
  precision: np.ndarray
  num_images: int


def fit_gaussians(features: Any, labels: Any, normal_labels: Any) -> ClassGaussians:
  """The `ClassGaussians` of features [N, D] with their labels [N], over `normal_labels`.

  The covariance is the mean outer product of each feature's deviation from its own class mean
  (the maximum-likelihood estimate, shared by the classes); its pseudo-inverse keeps directions
  the features never vary in from dividing by zero.

  Raises:
    ValueError: mismatched shapes, a label outside `normal_labels`, or a normal label with no
      feature.
  """
  f = np.asarray(features, np.float64)
  y = np.asarray(labels, np.int64).reshape(-1)
  if f.ndim != 2 or len(f) != len(y):
    raise ValueError(f"expected features [N, D] and labels [N], got {f.shape} and {y.shape}")
  normal = sorted({int(k) for k in normal_labels})
  others = sorted(set(np.unique(y).tolist()) - set(normal))
  if others:
    raise ValueError(f"the fitting images have labels {others} outside the normal {normal}")
  missing = [k for k in normal if not np.any(y == k)]
  if missing:
    raise ValueError(f"no fitting image has the normal labels {missing}")
  means = np.stack([f[y == k].mean(axis=0) for k in normal])
  centred = f - means[np.searchsorted(normal, y)]
  covariance = centred.T @ centred / len(f)
  precision = np.linalg.pinv(covariance, hermitian=True)
  return ClassGaussians(tuple(normal), means, precision, len(f))


def mahalanobis_score(features: Any, gaussians: ClassGaussians) -> np.ndarray:
  """min_k (f - mean_k)^T precision (f - mean_k), float64 [B], for features [B, D]: the
  squared Mahalanobis distance to the nearest class."""
  f = np.asarray(features, np.float64)
  d = f[:, None, :] - gaussians.means[None]
  return np.einsum("bkd,de,bke->bk", d, gaussians.precision, d).min(axis=1)


@model_jit.per_model
def _features_and_logits_fn(model: Any):
  """The jitted `(variables, images) -> (float32 features, float32 logits)` of a classifier in
  eval mode: the pooled features and the head applied to them."""

  def fn(variables, images):
    features = model.apply(variables, images, train=False, method="features")
    logits = model.apply(variables, features, method=lambda m, f: m.head(f))
    return features.astype(jnp.float32), logits.astype(jnp.float32)

  return fn


class ClassifierScorer:
  """The "classifier" score (module docstring) of a trained classifier, and with `fit` the
  "mahalanobis" score of its features.

  Attributes:
    model, variables: the classifier (`model.apply(variables, images, train=False)` -> logits;
      `method="features"` -> its pooled features, the head's input).
    normal_labels: the labels it was trained on, the columns the softmax keeps (sorted).
    gaussians: the `ClassGaussians` of its features, None before `fit`.
  """

  def __init__(
    self,
    model: Any,
    variables: Any,
    normal_labels: Any,
    gaussians: ClassGaussians | None = None,
  ):
    labels = sorted({int(k) for k in normal_labels})
    classes = getattr(model, "num_classes", None)
    if len(labels) < 2:
      raise ValueError(
        f"the classifier score needs at least 2 normal labels, got {labels}: with one normal "
        "class there is nothing for a classifier to tell apart"
      )
    if classes is not None and (labels[0] < 0 or labels[-1] >= classes):
      raise ValueError(f"normal labels {labels} are outside the classifier's {classes} classes")
    self.model, self.variables, self.normal_labels = model, variables, labels
    self.gaussians = gaussians

  @property
  def names(self) -> tuple[str, ...]:
    """The scores `score` returns: "classifier", and "mahalanobis" once fitted."""
    return ("classifier",) + (("mahalanobis",) if self.gaussians is not None else ())

  def features_and_logits(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
    """float64 features [B, D] and logits [B, num_classes] of images [B, H, W, C] in [-1, 1]."""
    images = jnp.asarray(images, jnp.float32)
    features, logits = _features_and_logits_fn(self.model)(self.variables, images)
    return np.asarray(features, np.float64), np.asarray(logits, np.float64)

  def logits(self, images: Any) -> np.ndarray:
    """float64 logits [B, num_classes] of images [B, H, W, C] in [-1, 1]."""
    return self.features_and_logits(images)[1]

  def fit(self, batches: Any, max_images: int = 0) -> "ClassifierScorer":
    """This scorer with the `ClassGaussians` of the features of labelled normal images.

    Args:
      batches: an iterable of dicts with "image" (float [B, H, W, C] in [-1, 1]), "label" [B]
        and optionally "mask" [B] (> 0 marks a real image, as the eval iterator pads): normal
        training images, each label a normal one (the classifier's own training images serve:
        Lee et al. fit on the training set). Only features are kept, batch by batch.
      max_images: use the first this many real images; 0 = all.

    Raises:
      ValueError: as `fit_gaussians` (every normal label must occur).
    """
    features, labels, have = [], [], 0
    for batch in batches:
      keep = np.ones(len(batch["image"]), bool)
      if "mask" in batch:
        keep = np.asarray(batch["mask"]) > 0
      features.append(self.features_and_logits(batch["image"])[0][keep])
      labels.append(np.asarray(batch["label"]).reshape(len(keep), -1)[keep, 0])
      have += int(keep.sum())
      if max_images and have >= max_images:
        break
    end = max_images or None
    features = np.concatenate(features)[:end] if features else np.zeros((0, 0))
    labels = np.concatenate(labels)[:end] if labels else np.zeros((0,), np.int64)
    gaussians = fit_gaussians(features, labels, self.normal_labels)
    return ClassifierScorer(self.model, self.variables, self.normal_labels, gaussians)

  def score(self, images: Any) -> dict[str, np.ndarray]:
    """{"classifier": float64 [B]}: `max_softmax_score` over the normal labels; after `fit`
    also "mahalanobis": `mahalanobis_score` of the features."""
    features, logits = self.features_and_logits(images)
    out = {"classifier": max_softmax_score(logits, self.normal_labels)}
    if self.gaussians is not None:
      out["mahalanobis"] = mahalanobis_score(features, self.gaussians)
    return out


def check_inputs(classifier_data: Any, data: Any, anomaly_labels: Any) -> list[str]:
  """What makes a classifier run unfit to score a stage-1 run's images: problems, one line each
  (empty when fit).

  Args:
    classifier_data: the classifier run's config.data.
    data: the stage-1 run's config.data (its images are the ones scored).
    anomaly_labels: the labels that count as anomalous.
  """
  problems = []
  for key in ("name", "image_size", "channels", "resize"):
    mine, theirs = classifier_data.get(key), data.get(key)
    if mine != theirs:
      problems.append(f"its data.{key} is {mine!r}, the stage-1 run's {theirs!r}")
  anomalous, excluded = {int(k) for k in anomaly_labels}, set(classifier_data.exclude_labels)
  seen, unseen = sorted(anomalous - excluded), sorted(excluded - anomalous)
  if seen:
    problems.append(
      f"it was trained on the anomaly labels {seen} (its data.exclude_labels is "
      f"{sorted(excluded)}): train it without them"
    )
  if unseen:
    problems.append(
      f"it was trained without the normal labels {unseen} (its data.exclude_labels is "
      f"{sorted(excluded)}): it would call every normal image of them unfamiliar"
    )
  return problems
