"""Tests of vqjax/sampling/rejection.py with fake generators and classifiers whose scores are
known, so every count is checked against one worked out by hand."""

import jax
import numpy as np
import pytest

from vqjax.sampling import rejection


class TableGenerator:
  """Batch k is `table[k]`: each sample is [score, requested label], so a fake classifier can
  read off the score it should give. Records the labels asked for."""

  def __init__(self, table):
    self.table = [np.asarray(row, np.float64) for row in table]
    self.calls = 0
    self.asked = []

  def __call__(self, rng, n, labels):
    del rng
    row = self.table[self.calls % len(self.table)]
    assert len(row) == n
    self.calls += 1
    self.asked.append(None if labels is None else np.array(labels))
    lab = np.zeros(n) if labels is None else np.asarray(labels, np.float64)
    return np.stack([row, lab], axis=1)


def two_class_probs(images):
  """p(class 0) = 1 - score, p(class 1) = score: the unconditional score is max(s, 1 - s)."""
  s = np.asarray(images)[:, 0]
  return np.stack([1 - s, s], axis=1)


def target_probs(num_classes):
  """Gives the requested label (column 1) probability `score` (column 0), the rest uniform."""

  def classify(images):
    images = np.asarray(images)
    s, lab = images[:, 0], images[:, 1].astype(int)
    probs = np.tile(((1 - s) / (num_classes - 1))[:, None], (1, num_classes))
    probs[np.arange(len(s)), lab] = s
    return probs

  return classify


def test_unconditional_counts_match_the_hand_computed_ones():
  # Threshold 0.7 on max(s, 1 - s): batch 1 scores 0.9, 0.6, 0.7, 0.55 -> 2 pass (0.9, 0.7);
  # batch 2 scores 0.6, 0.95, 0.8, 0.5 -> 2 pass (0.95, 0.8); 3 wanted -> done after 2.
  gen = TableGenerator([[0.9, 0.4, 0.3, 0.45], [0.4, 0.05, 0.8, 0.5]])
  samples, info = rejection.rejection_sample(
    gen, two_class_probs, 3, jax.random.key(0), threshold=0.7, max_attempts=10, batch_size=4
  )
  assert info["attempts"] == 2 and info["generated"] == 8
  assert info["accepted"] == 4 and info["kept"] == 3
  assert info["acceptance_rate"] == pytest.approx(4 / 8)
  np.testing.assert_allclose(info["scores"], [0.9, 0.6, 0.7, 0.55, 0.6, 0.95, 0.8, 0.5])
  # The first passing samples fill the slots in order; the surplus 0.8 is dropped.
  np.testing.assert_allclose(samples[:, 0], [0.9, 0.3, 0.05])
  assert info["labels"] is None and gen.asked == [None, None]
  kept_scores = two_class_probs(samples).max(axis=1)
  assert np.all(kept_scores >= 0.7)


def test_max_attempts_is_respected_and_a_shortfall_warns():
  gen = TableGenerator([[0.5, 0.55, 0.9]])  # one sample in three passes 0.8
  with pytest.warns(UserWarning, match="kept 2 of 5"):
    samples, info = rejection.rejection_sample(
      gen, two_class_probs, 5, jax.random.key(0), threshold=0.8, max_attempts=2, batch_size=3
    )
  assert gen.calls == 2 and info["attempts"] == 2 and info["generated"] == 6
  assert info["kept"] == 2 and samples.shape == (2, 2)
  assert info["acceptance_rate"] == pytest.approx(2 / 6)

  nothing = TableGenerator([[0.5, 0.5]])
  with pytest.warns(UserWarning):
    samples, info = rejection.rejection_sample(
      nothing, two_class_probs, 2, jax.random.key(0), threshold=0.9, max_attempts=3
    )
  assert nothing.calls == 3 and samples.shape == (0, 2) and info["acceptance_rate"] == 0.0


def test_labels_fill_their_own_slots_and_only_empty_slots_are_asked_for():
  classify = target_probs(3)
  want = [0, 2, 1, 2]
  # Batch 1 asks for [0, 2, 1, 2]: scores 0.2, 0.9, 0.95, 0.3 -> slots 1 (label 2) and 2
  # (label 1) filled. Batch 2 asks for the empty slots' labels [0, 2] cycled to [0, 2, 0, 2]:
  # scores 0.99, 0.1, 0.97, 0.85 -> slot 0 (label 0), the second 0 is surplus, slot 3 (label 2).
  gen = TableGenerator([[0.2, 0.9, 0.95, 0.3], [0.99, 0.1, 0.97, 0.85]])
  samples, info = rejection.rejection_sample(
    gen, classify, 4, jax.random.key(0), threshold=0.8, labels=want, max_attempts=5
  )
  np.testing.assert_array_equal(gen.asked[0], [0, 2, 1, 2])
  np.testing.assert_array_equal(gen.asked[1], [0, 2, 0, 2])
  np.testing.assert_array_equal(samples[:, 1], want)  # each slot holds its own class
  np.testing.assert_allclose(samples[:, 0], [0.99, 0.9, 0.95, 0.85])
  np.testing.assert_array_equal(info["labels"], want)
  assert info["accepted"] == 5 and info["generated"] == 8 and info["attempts"] == 2
  assert info["acceptance_rate"] == pytest.approx(5 / 8)
  # The score is the target label's probability, not the largest one: 0.2 for label 0 loses
  # to the uniform rest (0.4 each) and is still scored 0.2.
  assert info["scores"][0] == pytest.approx(0.2)


def test_one_label_for_every_sample():
  gen = TableGenerator([[0.9, 0.1]])
  samples, info = rejection.rejection_sample(
    gen,
    target_probs(4),
    3,
    jax.random.key(0),
    threshold=0.5,
    labels=3,
    max_attempts=5,
    batch_size=2,
  )
  assert info["attempts"] == 3 and np.all(samples[:, 1] == 3)
  np.testing.assert_array_equal(info["labels"], [3, 3, 3])


def random_generator(rng, n, labels):
  del labels
  return np.asarray(jax.random.uniform(rng, (n, 3)))


def test_same_key_same_samples_and_attempt_keys_follow_fold_in():
  kwargs = dict(threshold=0.7, max_attempts=20, batch_size=8)
  a, info_a = rejection.rejection_sample(
    random_generator, two_class_probs, 6, jax.random.key(3), **kwargs
  )
  b, info_b = rejection.rejection_sample(
    random_generator, two_class_probs, 6, jax.random.key(3), **kwargs
  )
  c, _ = rejection.rejection_sample(
    random_generator, two_class_probs, 6, jax.random.key(4), **kwargs
  )
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(info_a["scores"], info_b["scores"])
  assert not np.array_equal(a, c)
  # Recomputed outside: attempt t draws from fold_in(key, t).
  key = jax.random.key(3)
  drawn = np.concatenate(
    [random_generator(jax.random.fold_in(key, t), 8, None) for t in range(info_a["attempts"])]
  )
  scores = np.maximum(drawn[:, 0], 1 - drawn[:, 0])
  np.testing.assert_allclose(info_a["scores"], scores)
  passed = drawn[scores >= 0.7]
  np.testing.assert_array_equal(a, passed[:6])
  assert info_a["acceptance_rate"] == pytest.approx(np.mean(scores >= 0.7))


def test_acceptance_curve():
  scores = [0.1, 0.5, 0.5, 0.9]
  np.testing.assert_allclose(
    rejection.acceptance_curve(scores, [0.0, 0.5, 0.6, 1.0]), [1.0, 0.75, 0.25, 0.0]
  )
  np.testing.assert_array_equal(rejection.acceptance_curve([], [0.5]), [0.0])
