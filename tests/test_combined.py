"""Combined anomaly scores (vqjax/evaluation/combined.py) against z-scores worked out by hand."""

import math
import statistics

import numpy as np
import pytest

from vqjax import anomaly
from vqjax.evaluation import combined


def _z(values, reference):
  """z-scores from Python's statistics module: the population standard deviation, in floats."""
  mu, sd = statistics.fmean(reference), statistics.pstdev(reference)
  return [(v - mu) / sd for v in values]


def test_combination_is_the_mean_of_the_parts_z_scores():
  reference = {"knn": [1.0, 2.0, 3.0, 6.0], "nll_ratio": [10.0, 14.0, 10.0, 14.0]}
  scores = {"knn": [3.0, 0.0, 9.0], "nll_ratio": [12.0, 20.0, 6.0], "nll": [5.0, 5.0, 5.0]}
  standard = combined.Standardiser.fit(reference)
  assert standard.num_images == 4
  # By hand: knn mean 3, spread sqrt(3.5); nll_ratio mean 12, spread 2.
  assert math.isclose(standard.std["knn"], math.sqrt(3.5)) and standard.mean["nll_ratio"] == 12
  out = standard.combinations(scores)
  assert list(out) == ["combined"]  # the only combination whose parts are both there
  zk, zr = _z(scores["knn"], reference["knn"]), _z(scores["nll_ratio"], reference["nll_ratio"])
  np.testing.assert_allclose(out["combined"], [(a + b) / 2 for a, b in zip(zk, zr)], atol=1e-12)
  # An image at the reference mean of both scores gets 0; one 1 spread above in both gets 1.
  edge = standard.combinations({"knn": [3.0, 3 + math.sqrt(3.5)], "nll_ratio": [12.0, 14.0]})
  np.testing.assert_allclose(edge["combined"], [0.0, 1.0], atol=1e-12)


def test_every_combination_with_all_its_parts():
  rng = np.random.default_rng(0)
  names = ("knn", "nll_ratio", "rotation", "classifier", "mahalanobis")
  reference = {k: rng.normal(i, i + 1, 50) for i, k in enumerate(names)}
  scores = {k: rng.normal(0, 3, 7) for k in names}
  out = combined.Standardiser.fit(reference).combinations(scores)
  parts = {
    "combined": names[:2],
    "combined_rotation": names[:3],
    "combined_classifier": names[:4],
    "combined_mahalanobis": names,
  }
  assert list(out) == list(parts)
  for name, used in parts.items():
    z = [_z(scores[k].tolist(), reference[k].tolist()) for k in used]
    np.testing.assert_allclose(out[name], np.mean(z, axis=0), rtol=1e-10)
  # Only what the scored parts allow; the order of first use.
  assert combined.available(["rotation", "knn", "nll_ratio"]) == ("combined", "combined_rotation")
  assert combined.available(["knn", "rotation", "classifier"]) == ()
  assert combined.parts(["combined_rotation", "combined_mahalanobis"]) == names


def test_the_command_line_names_the_same_combinations():
  # vqjax/anomaly.py names them without importing JAX, for its flag errors.
  assert anomaly.COMBINED_SCORES == tuple(combined.COMBINATIONS)
  assert set(combined.parts(combined.COMBINATIONS)) == set(anomaly.PART_NEEDS)


@pytest.mark.parametrize(
  "reference, message",
  [
    ({}, "no reference scores"),
    ({"knn": [1.0]}, "at least 2 normal reference images, got 1"),
    ({"knn": [1.0, 2.0], "nll_ratio": [1.0, 2.0, 3.0]}, r"differ in length: \[2, 3\]"),
    ({"knn": [1.0, float("nan")]}, "'knn' scores are not all finite"),
    ({"knn": [2.5, 2.5, 2.5]}, "'knn' scores are all 2.5: no spread"),
  ],
)
def test_references_that_cannot_scale_are_refused(reference, message):
  with pytest.raises(ValueError, match=message):
    combined.Standardiser.fit(reference)


def test_unknown_or_incomplete_combinations_are_refused():
  standard = combined.Standardiser.fit({"knn": [0.0, 1.0], "nll_ratio": [0.0, 2.0]})
  with pytest.raises(ValueError, match="unknown combination 'combined_all'"):
    standard.combinations({"knn": [1.0]}, ["combined_all"])
  with pytest.raises(ValueError, match="combined needs the scores nll_ratio"):
    standard.combinations({"knn": [1.0]}, ["combined"])
  with pytest.raises(ValueError, match="combined_rotation needs the scores rotation"):
    standard.combinations(
      {"knn": [1.0], "nll_ratio": [1.0], "rotation": [1.0]}, ["combined_rotation"]
    )
  with pytest.raises(ValueError, match="no reference for 'rotation'"):
    standard.z("rotation", [1.0])
