"""Anomaly score of a classifier trained on the normal classes' labels (open-set recognition).

Where the normal images come in several labelled classes (the leave-one-out protocol: nine
Fashion-MNIST classes normal, the tenth anomalous), a classifier trained on those labels alone
learns what tells the normal classes apart, and an image of a class it never saw tends to get
a less confident answer. The score is one minus the maximum softmax probability, the baseline
of Hendrycks and Gimpel 2017 ("A Baseline for Detecting Misclassified and Out-of-Distribution
Examples"): high when the classifier cannot name any normal class with confidence. The softmax
runs over the normal labels only; a head with more classes (a run that kept the full dataset's
`num_classes` and left some labels out of training) has those logits dropped first.

The classifier is the library's own (models/classifier.py, the judge of rejection sampling),
trained with `python -m vqjax.train --config experiments/classifier_fashion_mnist.py` and
`config.data.exclude_labels` set to the anomalous classes. It needs labels, so it has no
place in the one-class protocol, where the normal data is a single class.

  scorer = open_set.ClassifierScorer(model, variables, normal_labels=[0, 1, ...])
  scores = scorer.score(images)   # {"classifier": float64 [B]}
"""

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


@model_jit.per_model
def _logits_fn(model: Any):
  """The jitted `(variables, images) -> float32 logits` of a classifier in eval mode."""

  def fn(variables, images):
    return model.apply(variables, images, train=False).astype(jnp.float32)

  return fn


class ClassifierScorer:
  """The "classifier" score (module docstring) of a trained classifier.

  Attributes:
    model, variables: the classifier (`model.apply(variables, images, train=False)` -> logits).
    normal_labels: the labels it was trained on, the columns the softmax keeps (sorted).
  """

  def __init__(self, model: Any, variables: Any, normal_labels: Any):
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

  def logits(self, images: Any) -> np.ndarray:
    """float64 logits [B, num_classes] of images [B, H, W, C] in [-1, 1]."""
    images = jnp.asarray(images, jnp.float32)
    return np.asarray(_logits_fn(self.model)(self.variables, images), np.float64)

  def score(self, images: Any) -> dict[str, np.ndarray]:
    """{"classifier": float64 [B]}: `max_softmax_score` over the normal labels."""
    return {"classifier": max_softmax_score(self.logits(images), self.normal_labels)}


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
