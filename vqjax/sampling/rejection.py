"""Classifier-based rejection sampling (Razavi et al. 2019, "Generating Diverse High-Fidelity
Images with VQ-VAE-2", section 3.3).

Samples from a (class-conditional) prior are scored by a pretrained classifier and kept only
when the classifier gives their target class a probability of at least `threshold`; a higher
threshold trades diversity for quality. `acceptance_curve` turns the recorded scores into the
fraction kept at each threshold, for the quality/diversity plot.

Both the generator and the classifier are plain callables, so any sampler and any classifier
(a jitted `Classifier.apply`, a user's own) plug in:

  generate(rng, n, labels) -> images [n, ...]     labels int [n] or None (unconditional)
  classify(images) -> probabilities [n, num_classes]
"""

import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def _scores(probs: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
  """The probability of each sample's target label, or its largest one when unconditional."""
  if probs.ndim != 2:
    raise ValueError(f"classify must return probabilities [n, num_classes], got {probs.shape}")
  if labels is None:
    return probs.max(axis=1)
  return probs[np.arange(len(labels)), labels]


def rejection_sample(
  generate: Callable[[jax.Array, int, np.ndarray | None], Any],
  classify: Callable[[Any], Any],
  num: int,
  rng: jax.Array,
  *,
  threshold: float,
  max_attempts: int,
  labels: Any = None,
  batch_size: int | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
  """Draws batches until `num` samples pass the classifier, or `max_attempts` batches are spent.

  Every batch has the same size, so a jitted generator and classifier compile once. With
  `labels`, slot i of the result wants a sample of class labels[i]: each batch asks for the
  labels of the slots still empty (cycled to fill the batch), and a sample that passes fills
  the first empty slot of its label; passing samples beyond what the slots need are dropped
  (they still count as accepted).

  Args:
    generate: (rng, n, labels) -> n images; labels is int32 [n] or None.
    classify: images -> probabilities [n, num_classes] (rows sum to 1).
    num: how many samples are wanted.
    rng: a JAX key; attempt a uses `fold_in(rng, a)`, so the result is a function of the key.
    threshold: keep a sample when its score (probability of the target label; the largest
      probability when unconditional) is >= threshold.
    max_attempts: the most batches generated.
    labels: None (unconditional), one int (every sample of that class) or ints [num].
    batch_size: samples per batch; default `num`.

  Returns:
    (samples, info): samples is a NumPy array [k, ...] with k <= num, in slot order (fewer
    than `num` with a warning when the attempts ran out); info holds
      "acceptance_rate": accepted / generated (float; 0.0 when nothing was generated),
      "attempts": batches generated, "generated": samples generated,
      "accepted": samples that passed (including surplus), "kept": k,
      "scores": float64 [generated], every generated sample's score in order,
      "labels": int32 [k] the label of each kept sample (None when unconditional).
  """
  if num < 0 or max_attempts < 1:
    raise ValueError(f"need num >= 0 and max_attempts >= 1, got {num} and {max_attempts}")
  batch_size = num if batch_size is None else batch_size
  if batch_size < 1 and num > 0:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  want = None
  if labels is not None:
    want = np.broadcast_to(np.asarray(labels, np.int32), (num,)).copy()

  slots: list[Any] = [None] * num
  filled = np.zeros(num, bool)
  scores, accepted, attempts = [], 0, 0
  sample_shape: tuple[int, ...] = ()
  while not filled.all() and attempts < max_attempts:
    empty = np.flatnonzero(~filled)
    batch_labels = None if want is None else np.resize(want[empty], batch_size)
    images = generate(jax.random.fold_in(rng, attempts), batch_size, batch_labels)
    attempts += 1
    sample_shape = tuple(np.shape(images)[1:])
    s = _scores(np.asarray(classify(images), np.float64), batch_labels)
    scores.append(s)
    passed = np.flatnonzero(s >= threshold)
    accepted += len(passed)
    if len(passed):
      images = np.asarray(images)
    for j in passed:
      if want is None:
        candidates = empty
      else:
        candidates = empty[want[empty] == batch_labels[j]]
      candidates = candidates[~filled[candidates]]
      if len(candidates):
        slots[candidates[0]] = images[j]
        filled[candidates[0]] = True

  scores = np.concatenate(scores) if scores else np.zeros((0,), np.float64)
  kept = np.flatnonzero(filled)
  if len(kept) < num:
    warnings.warn(
      f"rejection sampling kept {len(kept)} of {num} samples after {attempts} attempts at "
      f"threshold {threshold}: lower the threshold or raise max_attempts",
      stacklevel=2,
    )
  samples = np.stack([slots[i] for i in kept]) if len(kept) else np.zeros((0, *sample_shape))
  info = {
    "acceptance_rate": accepted / len(scores) if len(scores) else 0.0,
    "attempts": attempts,
    "generated": len(scores),
    "accepted": accepted,
    "kept": len(kept),
    "scores": scores,
    "labels": None if want is None else want[kept],
  }
  return samples, info


def acceptance_curve(scores: Any, thresholds: Any) -> np.ndarray:
  """The fraction of samples a threshold keeps, for each threshold.

  Args:
    scores: the classifier scores of generated samples (e.g. `info["scores"]`), [n].
    thresholds: [t] thresholds.

  Returns:
    float64 [t]: mean(scores >= threshold) for each threshold (0.0 for no scores).
  """
  scores = np.asarray(scores, np.float64).reshape(-1)
  thresholds = np.asarray(thresholds, np.float64).reshape(-1)
  if scores.size == 0:
    return np.zeros(thresholds.shape, np.float64)
  return (scores[None, :] >= thresholds[:, None]).mean(axis=1)
