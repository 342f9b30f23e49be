"""Anomaly scores combined: the mean of several scores' z-scores over normal images.

The scores of `vqjax.anomaly` come in their own units: nats, distances between latents,
probabilities. Each is standardised by its mean and standard deviation over a reference set of
normal images (no anomaly is seen), and a combination is the mean of its parts' z-scores. An
image scores high when it is unusual by several scores at once, or far out by one: the parts
are right on different images (on Fashion-MNIST, nearest normal latents on sandals and shirts,
the likelihood ratio on T-shirts and ankle boots; benchmarks/RESULTS.md).

COMBINATIONS are the ones vqjax reports, each wherever all of its parts are scored. They were
chosen on Fashion-MNIST (`benchmarks/anomaly.py`, where each one's history is told): the mean
ROC AUC over the ten classes, one-class / leave-one-out, seed 0, was 0.938 / 0.720 for
"combined", 0.942 / 0.760 for "combined_rotation", - / 0.786 for "combined_classifier" and
- / 0.804 for "combined_mahalanobis" (the classifier's scores need several normal classes).

  standard = combined.Standardiser.fit({"knn": ref_knn, "nll_ratio": ref_ratio})  # normal
  scores.update(standard.combinations(scores))   # {"combined": float64 [N]}
"""

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

COMBINATIONS = {
  "combined": ("knn", "nll_ratio"),
  "combined_rotation": ("knn", "nll_ratio", "rotation"),
  "combined_classifier": ("knn", "nll_ratio", "rotation", "classifier"),
  "combined_mahalanobis": ("knn", "nll_ratio", "rotation", "classifier", "mahalanobis"),
}
# Added to every standard deviation, as the benchmark's lines were computed with it.
EPS = 1e-12


def available(names: Iterable[str]) -> tuple[str, ...]:
  """The COMBINATIONS whose parts are all in `names`, in COMBINATIONS order."""
  have = set(names)
  return tuple(c for c, parts in COMBINATIONS.items() if set(parts) <= have)


def parts(combinations: Iterable[str]) -> tuple[str, ...]:
  """Every score the `combinations` read, each once, in order of first use.

  Raises:
    ValueError: a name that is not in COMBINATIONS.
  """
  out: list[str] = []
  for c in combinations:
    if c not in COMBINATIONS:
      raise ValueError(f"unknown combination {c!r}; known: {', '.join(COMBINATIONS)}")
    out += [k for k in COMBINATIONS[c] if k not in out]
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class Standardiser:
  """Each score's mean and standard deviation over the normal reference images.

  Attributes:
    mean, std: per score name, floats (the standard deviation over N, not N - 1).
    num_images: the reference images per score.
  """

  mean: Mapping[str, float]
  std: Mapping[str, float]
  num_images: int

  @classmethod
  def fit(cls, reference: Mapping[str, Any]) -> "Standardiser":
    """The statistics of `reference`: per score name, its values [N] on normal images.

    Raises:
      ValueError: no score, scores of different lengths, fewer than 2 images, a value that is
        not finite, or a score with the same value on every image (nothing to scale by).
    """
    if not reference:
      raise ValueError("no reference scores to standardise")
    values = {k: np.asarray(v, np.float64).reshape(-1) for k, v in reference.items()}
    sizes = {len(v) for v in values.values()}
    if len(sizes) != 1:
      raise ValueError(f"the reference scores differ in length: {sorted(sizes)}")
    (n,) = sizes
    if n < 2:
      raise ValueError(f"standardising needs at least 2 normal reference images, got {n}")
    mean, std = {}, {}
    for k, v in values.items():
      if not np.all(np.isfinite(v)):
        raise ValueError(f"the reference {k!r} scores are not all finite")
      mean[k], std[k] = float(v.mean()), float(v.std())
      if std[k] == 0.0:
        raise ValueError(f"the reference {k!r} scores are all {mean[k]:.6g}: no spread")
    return cls(mean, std, n)

  def z(self, name: str, values: Any) -> np.ndarray:
    """float64 z-scores of one score's values (any shape)."""
    if name not in self.mean:
      raise ValueError(f"no reference for {name!r}; standardised: {', '.join(self.mean)}")
    return (np.asarray(values, np.float64) - self.mean[name]) / (self.std[name] + EPS)

  def combine(self, scores: Mapping[str, Any], names: Iterable[str]) -> np.ndarray:
    """The mean z-score of `names` (each a key of `scores` and of the reference), float64."""
    return np.mean([self.z(k, scores[k]) for k in names], axis=0)

  def combinations(
    self, scores: Mapping[str, Any], which: Iterable[str] | None = None
  ) -> dict[str, np.ndarray]:
    """{combination: float64 [N]} for `which` (default: every COMBINATIONS entry whose parts
    are all standardised and in `scores`).

    Raises:
      ValueError: an unknown combination, or one whose part is missing from `scores` or from
        the reference.
    """
    if which is None:
      which = available(set(scores) & set(self.mean))
    out = {}
    for c in which:
      missing = [k for k in parts([c]) if k not in scores or k not in self.mean]
      if missing:
        raise ValueError(f"{c} needs the scores {', '.join(missing)}")
      out[c] = self.combine(scores, COMBINATIONS[c])
    return out
