"""Tests of vqjax/evaluation/open_set.py: the classifier score against its definition computed with
`math`, the scorer against a NumPy softmax of the classifier's logits over the normal labels only,
the Mahalanobis score against a hand-derived case and a per-class loop with `np.linalg.solve`,
and the checks that refuse a classifier unfit for a stage-1 run's images."""

import math

import jax
import ml_collections
import numpy as np
import pytest

from vqjax.evaluation import open_set
from vqjax.models import classifier


def test_max_softmax_score_matches_its_definition():
  logits = [[0.0, math.log(3.0)], [2.0, 2.0], [-50.0, 700.0]]
  # softmax max: 3/4, 1/2, and (without overflow) 1.
  np.testing.assert_allclose(open_set.max_softmax_score(logits), [0.25, 0.5, 0.0], atol=1e-15)
  # Only the listed columns enter the softmax: the huge logit of column 0 is dropped.
  picked = open_set.max_softmax_score([[900.0, 0.0, math.log(3.0)]], labels=[2, 1])
  assert math.isclose(picked[0], 0.25, rel_tol=1e-12)
  rng = np.random.default_rng(0)
  z = rng.normal(size=(5, 7)) * 3
  cols = [0, 3, 4, 6]
  expected = [
    1 - max(math.exp(z[i, c]) for c in cols) / sum(math.exp(z[i, c]) for c in cols)
    for i in range(5)
  ]
  np.testing.assert_allclose(open_set.max_softmax_score(z, cols), expected, rtol=1e-12)
  with pytest.raises(ValueError, match=r"expected logits \[B, C\]"):
    open_set.max_softmax_score(np.zeros(3))


def test_scorer_uses_the_normal_labels_of_the_classifier_logits():
  model = classifier.Classifier(num_classes=10, channels=8, num_stages=2)
  x = jax.random.uniform(jax.random.key(0), (6, 16, 16, 1), minval=-1, maxval=1)
  variables = jax.jit(model.init)({"params": jax.random.key(1, impl="rbg")}, x)
  normal = [9, 0, 1, 2, 3, 4, 5, 7, 8]  # label 6 held out; any order
  scorer = open_set.ClassifierScorer(model, variables, normal)
  assert scorer.normal_labels == sorted(normal)
  logits = np.asarray(model.apply(variables, x), np.float64)
  np.testing.assert_allclose(scorer.logits(x), logits, rtol=1e-6, atol=1e-6)
  kept = logits[:, sorted(normal)]
  p = np.exp(kept - kept.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  got = scorer.score(x)
  assert list(got) == ["classifier"] and got["classifier"].dtype == np.float64
  np.testing.assert_allclose(got["classifier"], 1 - p.max(1), rtol=1e-5, atol=1e-7)
  # All ten columns would give another score: the held-out logit is really dropped.
  assert not np.allclose(open_set.max_softmax_score(logits), got["classifier"])


def test_mahalanobis_score_of_a_hand_derived_case():
  # Class 0 at the corners (+-1, +-2) around (0, 0), class 5 the same around (4, 0): class means
  # (0, 0) and (4, 0), shared covariance diag(1, 4) exactly.
  corners = np.array([[1, 2], [1, -2], [-1, 2], [-1, -2]], np.float64)
  features = np.concatenate([corners, corners + [4, 0]])
  g = open_set.fit_gaussians(features, [0] * 4 + [5] * 4, normal_labels=[5, 0])
  assert g.labels == (0, 5)
  np.testing.assert_allclose(g.means, [[0, 0], [4, 0]], atol=1e-15)
  np.testing.assert_allclose(g.precision, [[1, 0], [0, 0.25]], atol=1e-12)
  # (1, 2): 1 + 4/4 = 2 from class 0, 9 + 1 = 10 from class 5. (3, 0): 9 or 1. (2, 4): 4 + 4 both.
  got = open_set.mahalanobis_score([[1, 2], [3, 0], [2, 4]], g)
  np.testing.assert_allclose(got, [2.0, 1.0, 8.0], rtol=1e-12)


def test_mahalanobis_score_matches_a_loop_over_classes():
  rng = np.random.default_rng(1)
  labels = rng.choice([1, 3, 4], size=300)
  features = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5)) + labels[:, None] * 0.7
  g = open_set.fit_gaussians(features, labels, [1, 3, 4])
  means = {k: features[labels == k].mean(0) for k in (1, 3, 4)}
  dev = np.concatenate([features[labels == k] - means[k] for k in (1, 3, 4)])
  cov = np.cov(dev.T, bias=True)
  x = rng.normal(size=(7, 5)) * 2
  expected = [min(float((f - m) @ np.linalg.solve(cov, f - m)) for m in means.values()) for f in x]
  np.testing.assert_allclose(open_set.mahalanobis_score(x, g), expected, rtol=1e-9)


def test_fit_gaussians_refuses_labels_that_do_not_fit():
  f = np.zeros((4, 2))
  with pytest.raises(ValueError, match=r"labels \[7\] outside the normal \[0, 1\]"):
    open_set.fit_gaussians(f, [0, 1, 7, 1], [0, 1])
  with pytest.raises(ValueError, match=r"no fitting image has the normal labels \[2\]"):
    open_set.fit_gaussians(f, [0, 1, 0, 1], [0, 1, 2])
  with pytest.raises(ValueError, match=r"expected features \[N, D\] and labels \[N\]"):
    open_set.fit_gaussians(f, [0, 1], [0, 1])


def test_fitted_scorer_adds_the_mahalanobis_score_of_the_features():
  model = classifier.Classifier(num_classes=4, channels=8, num_stages=2)
  rng = jax.random.split(jax.random.key(2), 2)
  train = jax.random.uniform(rng[0], (40, 16, 16, 1), minval=-1, maxval=1)
  test = jax.random.uniform(rng[1], (6, 16, 16, 1), minval=-1, maxval=1)
  variables = jax.jit(model.init)({"params": jax.random.key(3, impl="rbg")}, test)
  labels = np.arange(40) % 3  # label 3 held out
  scorer = open_set.ClassifierScorer(model, variables, [0, 1, 2])
  # Eval-iterator batches of 16, the last padded with 8 rows that the mask leaves out; the fit
  # stops at 39 images, so the 40th (label 0) is not in it.
  padded = np.concatenate([np.asarray(train), np.zeros((8, 16, 16, 1), np.float32)])
  padded_labels = np.concatenate([labels, np.full(8, 3)])
  mask = np.arange(48) < 40
  batches = [
    {"image": padded[i : i + 16], "label": padded_labels[i : i + 16], "mask": mask[i : i + 16]}
    for i in range(0, 48, 16)
  ]
  fitted = scorer.fit(batches, max_images=39)
  train, labels = train[:39], labels[:39]
  assert scorer.gaussians is None and fitted.gaussians.num_images == 39
  assert (scorer.names, fitted.names) == (("classifier",), ("classifier", "mahalanobis"))
  feats = lambda x: np.asarray(model.apply(variables, x, method="features"), np.float64)
  ft, fx = feats(train), feats(test)
  means = [ft[labels == k].mean(0) for k in range(3)]
  dev = ft - np.stack(means)[labels]
  precision = np.linalg.pinv(dev.T @ dev / len(ft))
  expected = [min((f - m) @ precision @ (f - m) for m in means) for f in fx]
  got = fitted.score(test)
  assert sorted(got) == ["classifier", "mahalanobis"]
  np.testing.assert_allclose(got["mahalanobis"], expected, rtol=1e-3)
  np.testing.assert_allclose(got["classifier"], scorer.score(test)["classifier"], rtol=1e-12)


def test_scorer_refuses_too_few_or_unknown_labels():
  model = classifier.Classifier(num_classes=4, channels=8, num_stages=1)
  with pytest.raises(ValueError, match="at least 2 normal labels"):
    open_set.ClassifierScorer(model, {}, [2])
  with pytest.raises(ValueError, match=r"outside the classifier's 4 classes"):
    open_set.ClassifierScorer(model, {}, [0, 4])


def _data(**kw):
  base = dict(name="fashion_mnist", image_size=32, channels=1, resize="pad", exclude_labels=(8,))
  return ml_collections.ConfigDict({**base, **kw})


def test_check_inputs_names_every_mismatch():
  assert open_set.check_inputs(_data(), _data(), [8]) == []
  problems = open_set.check_inputs(_data(image_size=28, exclude_labels=()), _data(), [8])
  assert problems == [
    "its data.image_size is 28, the stage-1 run's 32",
    "it was trained on the anomaly labels [8] (its data.exclude_labels is []): train it "
    "without them",
  ]
  (problem,) = open_set.check_inputs(_data(exclude_labels=(8,)), _data(), [8, 9])
  assert "anomaly labels [9]" in problem
  (problem,) = open_set.check_inputs(_data(exclude_labels=(3, 8)), _data(), [8])
  assert problem.startswith("it was trained without the normal labels [3] (its data.exclude")
  (problem,) = open_set.check_inputs(_data(name="mnist"), _data(), [8])
  assert problem == "its data.name is 'mnist', the stage-1 run's 'fashion_mnist'"
