"""Classifier-based rejection sampling (Razavi et al. 2019, "Generating Diverse High-Fidelity
Images with VQ-VAE-2", section 3.3).

Samples from a (class-conditional) prior are scored by a pretrained classifier and kept only
when the classifier gives their target class a probability of at least `threshold`; a higher
threshold trades diversity for quality. Batches are drawn until every wanted sample is kept: the
result is always complete. The budget is a minimum acceptance rate: at most
ceil(num / min_acceptance) samples are generated (rounded up to whole batches), and a budget
spent first raises `errors.RejectionBudgetError`, never a shorter result. `acceptance_curve`
turns the recorded scores into the fraction kept at each threshold, for the quality/diversity
plot.

Both the generator and the classifier are plain callables, so any sampler and any classifier
(a jitted `Classifier.apply`, a user's own) plug in:

  generate(rng, n, labels) -> images [n, ...]     labels int [n] or None (unconditional)
  classify(images) -> probabilities [n, num_classes]
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from vqjax import errors


def _scores(probs: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
  """The probability of each sample's target label, or its largest one when unconditional."""
  if probs.ndim != 2:
    raise ValueError(f"classify must return probabilities [n, num_classes], got {probs.shape}")
  if labels is None:
    return probs.max(axis=1)
  return probs[np.arange(len(labels)), labels]


def budget(num: int, min_acceptance: float, batch_size: int) -> int:
  """The most batches rejection sampling draws: ceil(num / min_acceptance) samples, rounded up
  to whole batches of `batch_size` (0 when num is 0).

  Args:
    num: how many samples are wanted.
    min_acceptance: the least acceptance rate that keeps `num`, in (0, 1].
    batch_size: samples per batch (>= 1).

  Returns:
    the number of batches.
  """
  if not 0 < min_acceptance <= 1:  # NaN fails too
    raise ValueError(f"min_acceptance must be in (0, 1], got {min_acceptance}")
  # The relative slack keeps a quotient that is whole but for rounding (21 / 0.7 is
  # 30.000000000000004) at its whole value.
  samples = math.ceil(num / min_acceptance * (1 - 1e-12))
  return -(-samples // batch_size)


def rejection_sample(
  generate: Callable[[jax.Array, int, np.ndarray | None], Any],
  classify: Callable[[Any], Any],
  num: int,
  rng: jax.Array,
  *,
  threshold: float,
  min_acceptance: float,
  labels: Any = None,
  batch_size: int | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
  """Draws batches until `num` samples pass the classifier, within a minimum acceptance rate.

  Every batch has the same size, so a jitted generator and classifier compile once. With
  `labels`, slot i of the result wants a sample of class labels[i]: each batch asks for the
  labels of the slots still empty (cycled to fill the batch), and a sample that passes fills
  the first empty slot of its label; passing samples beyond what the slots need are dropped
  (they still count as accepted). At most `budget(num, min_acceptance, batch_size)` batches are
  drawn; drawing stops early once the batches left cannot fill the empty slots (each sample
  fills at most one).

  Args:
    generate: (rng, n, labels) -> n images; labels is int32 [n] or None.
    classify: images -> probabilities [n, num_classes] (rows sum to 1).
    num: how many samples are wanted.
    rng: a JAX key; batch b uses `fold_in(rng, b)`, so the result is a function of the key.
    threshold: keep a sample when its score (probability of the target label; the largest
      probability when unconditional) is >= threshold.
    min_acceptance: the budget, as the least acceptance rate in (0, 1] that is worth waiting
      for: at most ceil(num / min_acceptance) samples are generated, rounded up to whole
      batches (1.0: one pass of `num` samples, each of which must pass).
    labels: None (unconditional), one int (every sample of that class) or ints [num].
    batch_size: samples per batch; default `num`.

  Returns:
    (samples, info): samples is a NumPy array [num, ...] in slot order, always complete;
    info holds
      "acceptance_rate": accepted / generated, the share of all generated samples that passed
        the threshold (surplus passing samples included; 0.0 when nothing was generated),
      "generated": samples generated, "accepted": samples that passed (including surplus),
      "kept": num, "batches": batches generated, "max_batches": the budget in batches,
      "scores": float64 [generated], every generated sample's score in order,
      "labels": int32 [num] the label of each kept sample (None when unconditional).

  Raises:
    errors.RejectionBudgetError: the budget ran out before `num` samples passed (a class the
      classifier never accepts included); one line with the counts, the acceptance rate, the
      threshold and the minimum rate. Its `info` holds the counts above (no samples).
  """
  if num < 0:
    raise ValueError(f"need num >= 0, got {num}")
  batch_size = num if batch_size is None else batch_size
  if batch_size < 1 and num > 0:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  max_batches = budget(num, min_acceptance, max(batch_size, 1))
  want = None
  if labels is not None:
    want = np.broadcast_to(np.asarray(labels, np.int32), (num,)).copy()

  slots: list[Any] = [None] * num
  filled = np.zeros(num, bool)
  scores, accepted, batches = [], 0, 0
  sample_shape: tuple[int, ...] = ()
  while not filled.all():
    empty = np.flatnonzero(~filled)
    if len(empty) > (max_batches - batches) * batch_size:
      break  # the budget left cannot fill the empty slots
    batch_labels = None if want is None else np.resize(want[empty], batch_size)
    images = generate(jax.random.fold_in(rng, batches), batch_size, batch_labels)
    batches += 1
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
  info = {
    "acceptance_rate": accepted / len(scores) if len(scores) else 0.0,
    "generated": len(scores),
    "accepted": accepted,
    "kept": int(filled.sum()),
    "batches": batches,
    "max_batches": max_batches,
    "scores": scores,
    "labels": None if want is None else want,
  }
  if not filled.all():
    missing = ""
    if want is not None:
      missing = "; the empty slots want label(s) " + ", ".join(
        str(c) for c in np.unique(want[~filled])
      )
    raise errors.RejectionBudgetError(
      f"rejection sampling kept {info['kept']} of {num} wanted samples: {accepted} of "
      f"{info['generated']} generated passed threshold {threshold} (acceptance rate "
      f"{info['acceptance_rate']:.4g}), and the minimum acceptance rate {min_acceptance} "
      f"allows at most {max_batches * batch_size} generated ({max_batches} batches of "
      f"{batch_size}){missing}; lower --threshold or --min_acceptance",
      {k: v for k, v in info.items() if k != "labels"},
    )
  samples = np.stack(slots) if num else np.zeros((0, *sample_shape))
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
