"""Tests of vqjax/evaluation/rotation.py: the score of recognising an image's rotation.

The priors are toys whose probabilities are known: the top level's logits are a table's row of
the label, the bottom level's add a second table's row of the coarser code above the position.
References: rotations by explicit index maps, log-likelihoods by NumPy loops in float64, the
score from its definition with `math`. The stage-1 model is the quickstart's smoke VQ-VAE-2 with
NumPy-drawn weights (its codes are what it is; only their use is tested).
"""

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from vqjax.evaluation import rotation


class _LabelPrior(nn.Module):
  """logits[b, i, j] = by_label[label[b]] (+ by_coarser[coarser code over (i, j)])."""

  by_label: tuple  # num_classes rows of K logits
  by_coarser: tuple = ()  # K rows of K logits; () = a top level, no condition
  num_classes: int = rotation.ROTATIONS

  @nn.compact
  def __call__(self, codes, condition=None, label=None, train=False):
    logits = jnp.asarray(self.by_label, jnp.float32)[label][:, None, None, :]
    logits = jnp.broadcast_to(logits, (*codes.shape, logits.shape[-1]))
    if self.by_coarser:
      (coarser,) = condition
      step = codes.shape[1] // coarser.shape[1]
      above = jnp.repeat(jnp.repeat(coarser, step, axis=1), step, axis=2)
      logits = logits + jnp.asarray(self.by_coarser, jnp.float32)[above]
    return logits


def _tuple(a: np.ndarray) -> tuple:
  return tuple(tuple(float(v) for v in row) for row in a)


def _quarter_turn(x: np.ndarray) -> np.ndarray:
  """One counter-clockwise quarter turn of [B, H, W, C]: out[b, i, j] = x[b, j, W - 1 - i]."""
  n = x.shape[1]
  out = np.empty_like(x)
  for i in range(n):
    for j in range(n):
      out[:, i, j] = x[:, j, n - 1 - i]
  return out


def _log_softmax(row: np.ndarray) -> np.ndarray:
  row = np.asarray(row, np.float64)
  return row - math.log(sum(math.exp(v) for v in row))


def test_rotate_is_the_counter_clockwise_quarter_turn():
  x = np.arange(2 * 3 * 3 * 2, dtype=np.float32).reshape(2, 3, 3, 2)
  expected = x
  for turns in range(5):
    np.testing.assert_array_equal(rotation.rotate(x, turns), expected)
    np.testing.assert_array_equal(np.asarray(rotation.rotate(jnp.asarray(x), turns)), expected)
    expected = _quarter_turn(expected)
  with pytest.raises(ValueError, match="square NHWC"):
    rotation.rotate(np.zeros((1, 4, 6, 1)), 1)


def test_recognition_scores_follow_their_definition():
  rng = np.random.default_rng(0)
  ll = rng.normal(size=(3, 4, 4)) * 20 - 300  # large nats, as code maps give
  got = rotation.recognition_scores(ll)
  for b in range(3):
    cross_entropy = nll = 0.0
    for t in range(4):
      log_norm = max(ll[b, t]) + math.log(sum(math.exp(v - max(ll[b, t])) for v in ll[b, t]))
      cross_entropy += (log_norm - ll[b, t, t]) / 4
      nll += -ll[b, t, t] / 4
    assert got["rotation"][b] == pytest.approx(cross_entropy, rel=1e-12)
    assert got["rotation_nll"][b] == pytest.approx(nll, rel=1e-12)
  # An image whose rotations are named with certainty scores 0; a flat row scores log 4.
  sure = np.where(np.eye(4, dtype=bool), 0.0, -1e4)[None]
  flat = np.zeros((1, 4, 4))
  assert rotation.recognition_scores(sure)["rotation"][0] == pytest.approx(0.0, abs=1e-12)
  assert rotation.recognition_scores(flat)["rotation"][0] == pytest.approx(math.log(4))
  with pytest.raises(ValueError, match=r"\[B, T, T\]"):
    rotation.recognition_scores(np.zeros((2, 4, 3)))


@pytest.mark.slow
def test_scorer_log_likelihoods_are_the_numpy_sums_over_rotations_and_labels(numpy_smoke_vqvae2):
  config, model, variables = numpy_smoke_vqvae2
  k = config.vq.num_codes
  rng = np.random.default_rng(1)
  by_label = [rng.normal(size=(4, k)) * 2 for _ in range(2)]
  by_coarser = rng.normal(size=(k, k))
  priors = [
    (_LabelPrior(_tuple(by_label[0])), {"params": {}}),
    (_LabelPrior(_tuple(by_label[1]), _tuple(by_coarser)), {"params": {}}),
  ]
  scorer = rotation.RotationScorer(model, variables, priors)
  images = rng.uniform(-1, 1, (3, 32, 32, 1)).astype(np.float32)
  got = scorer.log_likelihoods(images)
  assert got.shape == (3, 4, 4) and got.dtype == np.float64

  expected = np.zeros((3, 4, 4))
  rotated = images
  for t in range(4):
    maps = model.apply(variables, rotated, method="encode_to_indices")
    top, bottom = (np.asarray(c) for c in maps)
    step = bottom.shape[1] // top.shape[1]
    for b in range(3):
      for s in range(4):
        total = sum(_log_softmax(by_label[0][s])[c] for c in top[b].ravel())
        for i in range(bottom.shape[1]):
          for j in range(bottom.shape[2]):
            row = by_label[1][s] + by_coarser[top[b, i // step, j // step]]
            total += _log_softmax(row)[bottom[b, i, j]]
        expected[b, t, s] = total
    rotated = _quarter_turn(rotated)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  scores = scorer.score(images)
  reference = rotation.recognition_scores(expected)
  for name in ("rotation", "rotation_nll"):
    np.testing.assert_allclose(scores[name], reference[name], rtol=1e-4)


def test_scorer_refuses_priors_that_are_not_rotation_priors(numpy_smoke_vqvae2):
  _, model, variables = numpy_smoke_vqvae2
  unconditional = _LabelPrior(((0.0,),), num_classes=0)
  with pytest.raises(ValueError, match="num_classes=0, not 4"):
    rotation.RotationScorer(model, variables, [(unconditional, {"params": {}})])
  with pytest.raises(ValueError, match="needs a rotation prior per code level"):
    rotation.RotationScorer(model, variables, [])
