"""Tests of vqjax/evaluation/frechet.py and the sample-quality evaluator.

References: closed forms of the Frechet distance between Gaussians, hand-counted k-NN balls,
the Inception-score extremes, and synthetic features whose CAS is known.
"""

import numpy as np
import pytest

from vqjax.evaluation import SampleQualityEvaluator, frechet


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
  s1, s2 = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  got = frechet.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
  assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_full_covariances():
  rng = np.random.default_rng(1)
  a = rng.normal(size=(6, 6))
  sigma = a @ a.T + 0.1 * np.eye(6)
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  # Same covariance: only the means differ.
  assert frechet.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(
    np.sum((mu1 - mu2) ** 2), rel=1e-8
  )
  # sigma2 = c^2 sigma1: tr((sigma1 sigma2)^(1/2)) = c tr(sigma1), so d^2 = (1 - c)^2 tr(sigma1).
  c = 1.7
  assert frechet.frechet_distance(mu1, sigma, mu1, c * c * sigma) == pytest.approx(
    (1 - c) ** 2 * np.trace(sigma), rel=1e-8
  )


def test_frechet_distance_against_scipy_sqrtm():
  linalg = pytest.importorskip("scipy.linalg")
  rng = np.random.default_rng(2)
  a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 8))
  s1, s2 = a @ a.T, b @ b.T / 8
  mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
  covmean = np.real(linalg.sqrtm(s1 @ s2))
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
  assert frechet.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)


def test_frechet_distance_from_samples_approaches_the_closed_form():
  rng = np.random.default_rng(3)
  s1, s2 = np.array([1.0, 0.5, 2.0]), np.array([0.5, 0.5, 1.0])
  x = rng.normal(size=(40000, 3)) * np.sqrt(s1)
  y = rng.normal(size=(40000, 3)) * np.sqrt(s2) + np.array([1.0, 0.0, 0.0])
  expected = 1.0 + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  assert frechet.frechet_distance_from_features(x, y) == pytest.approx(expected, abs=0.05)
  assert frechet.frechet_distance_from_features(x, x) == pytest.approx(0.0, abs=1e-8)


def test_precision_recall_extremes():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(200, 4))
  assert frechet.precision_recall(x, x) == {"precision": 1.0, "recall": 1.0}
  assert frechet.precision_recall(x, x + 100.0) == {"precision": 0.0, "recall": 0.0}


def test_precision_recall_hand_counted():
  # k = 1. Real radii: 0 -> 1, 1 -> 1, 3 -> 2, 12 -> 9: balls [-1,1], [0,2], [1,5], [3,21].
  # Generated -2 lies outside them all; 0.5, 4.5, 6, 8 inside: precision 4/5.
  # Generated radii: -2 -> 2.5, 0.5 -> 2.5, 4.5 -> 1.5, 6 -> 1.5, 8 -> 2: balls [-4.5,0.5],
  # [-2,3], [3,6], [4.5,7.5], [6,10]; real 0, 1, 3 are inside, 12 is not: recall 3/4.
  real = np.array([[0.0], [1.0], [3.0], [12.0]])
  gen = np.array([[-2.0], [0.5], [4.5], [6.0], [8.0]])
  pad = lambda a: np.concatenate([a, np.zeros_like(a)], 1)  # noqa: E731 - 2-D features
  out = frechet.precision_recall(pad(real), pad(gen), k=1)
  assert out == pytest.approx({"precision": 0.8, "recall": 0.75})
  np.testing.assert_allclose(frechet.knn_radii(real, 1), [1, 1, 2, 9])


def test_inception_score_extremes():
  k = 5
  one_hot = np.eye(k)[np.arange(4 * k) % k]
  mean, std = frechet.inception_score(one_hot, splits=2)
  assert mean == pytest.approx(k, rel=1e-10)
  assert std == pytest.approx(0.0, abs=1e-10)
  same = np.tile(np.array([[0.1, 0.2, 0.3, 0.4]]), (30, 1))
  assert frechet.inception_score(same, splits=3)[0] == pytest.approx(1.0, rel=1e-10)


def test_inception_score_of_two_mixed_predictions():
  # Half the samples predict (0.9, 0.1), half (0.1, 0.9): p(y) = (1/2, 1/2), every sample's
  # KL is 0.9 log 1.8 + 0.1 log 0.2.
  probs = np.array([[0.9, 0.1], [0.1, 0.9]] * 10)
  expected = np.exp(0.9 * np.log(1.8) + 0.1 * np.log(0.2))
  assert frechet.inception_score(probs, splits=1)[0] == pytest.approx(expected, rel=1e-10)


def _clusters(rng, n, k=4, d=6, spread=0.5):
  centres = rng.normal(size=(k, d)) * 3
  labels = rng.integers(0, k, n)
  return centres[labels] + spread * rng.normal(size=(n, d)), labels


def test_cas_on_separable_and_shuffled_features():
  rng = np.random.default_rng(5)
  feats, labels = _clusters(rng, 2400)
  train, test = slice(0, 1200), slice(1200, None)
  acc = frechet.classification_accuracy_score(
    feats[train], labels[train], feats[test], labels[test]
  )
  assert acc > 0.9
  # Labels shuffled against features that carry no class structure: nothing to learn, so
  # the accuracy on fresh data is at chance (1/4, about +-0.013 for 1,200 test points).
  noise = rng.normal(size=(2400, 6))
  shuffled = rng.permutation(labels)
  chance = frechet.classification_accuracy_score(
    noise[train], shuffled[train], noise[test], shuffled[test], num_classes=4
  )
  assert abs(chance - 0.25) < 0.05


def test_sample_quality_evaluator():
  rng = np.random.default_rng(6)
  real = rng.uniform(-1, 1, (60, 4, 4, 1)).astype(np.float32)
  shift = np.linspace(-0.2, 0.2, 16).reshape(1, 4, 4, 1).astype(np.float32)

  def features(images):
    return np.asarray(images, np.float64).reshape(len(images), -1)

  def probs(images):
    # Two classes by the sign of the mean pixel, confidently.
    m = np.asarray(images).reshape(len(images), -1).mean(1)
    p = 1 / (1 + np.exp(-50 * m))
    return np.stack([p, 1 - p], 1)

  ev = SampleQualityEvaluator(features, probs, splits=2, batch_size=16)
  # A constant shift leaves the covariance as it is: the distance is ||shift||^2.
  out = ev.run(None, {"real": real, "generated": real + shift})
  assert out["frechet_distance"] == pytest.approx(
    float(np.sum(shift.astype(np.float64) ** 2)), rel=1e-4
  )
  assert 0 < out["precision"] <= 1 and 0 < out["recall"] <= 1
  assert 1.0 <= out["inception_score"] <= 2.0
  same = ev.compute(real, real)
  assert same["frechet_distance"] == pytest.approx(0.0, abs=1e-9)
  assert same["precision"] == same["recall"] == 1.0
  labels = (features(real).mean(1) > 0).astype(int)
  cas = ev.compute(real, real, real_labels=labels, generated_labels=labels)
  assert cas["classification_accuracy_score"] > 0.9
