"""Tests of vqjax/sampling/rejection.py with fake generators and classifiers whose scores are
known, so every count is checked against one worked out by hand."""

import jax
import numpy as np
import pytest

from vqjax import errors
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
    gen, two_class_probs, 3, jax.random.key(0), threshold=0.7, min_acceptance=0.3, batch_size=4
  )
  assert info["batches"] == 2 and info["generated"] == 8
  assert info["max_batches"] == 3  # ceil(3 / 0.3) = 10 samples -> 3 batches of 4
  assert info["accepted"] == 4 and info["kept"] == 3
  assert info["acceptance_rate"] == pytest.approx(4 / 8)
  np.testing.assert_allclose(info["scores"], [0.9, 0.6, 0.7, 0.55, 0.6, 0.95, 0.8, 0.5])
  # The first passing samples fill the slots in order; the surplus 0.8 is dropped.
  np.testing.assert_allclose(samples[:, 0], [0.9, 0.3, 0.05])
  assert info["labels"] is None and gen.asked == [None, None]
  kept_scores = two_class_probs(samples).max(axis=1)
  assert np.all(kept_scores >= 0.7)


@pytest.mark.parametrize(
  "num, min_acceptance, batch_size, batches",
  [
    (3, 0.3, 4, 3),  # 10 samples -> 3 batches of 4
    (21, 0.7, 10, 3),  # 30 samples (21 / 0.7 is 30.000000000000004) -> 3 batches, not 4
    (57, 0.57, 100, 1),  # 100 samples (57 / 0.57 is 100.00000000000001) -> 1 batch, not 2
    (10, 0.3, 8, 5),  # ceil(33.3) = 34 samples -> 5 batches of 8
    (64, 0.05, 64, 20),  # the quickstart: 1280 samples -> 20 batches of 64
    (5, 1.0, 5, 1),  # every sample of one batch must pass
    (5, 1.0, 2, 3),  # 5 samples -> 3 batches of 2
    (0, 0.5, 1, 0),
  ],
)
def test_budget_is_ceil_num_over_rate_in_whole_batches(num, min_acceptance, batch_size, batches):
  assert rejection.budget(num, min_acceptance, batch_size) == batches


def test_impossible_minimum_rates_are_refused():
  gen = TableGenerator([[0.9]])
  for bad in (0.0, -0.5, 1.5, float("nan")):
    with pytest.raises(ValueError, match="min_acceptance must be in"):
      rejection.rejection_sample(
        gen, two_class_probs, 1, jax.random.key(0), threshold=0.5, min_acceptance=bad
      )
  assert gen.calls == 0


def test_a_spent_budget_is_one_line_error_and_no_partial_result():
  gen = TableGenerator([[0.5, 0.55, 0.9]])  # one sample in three passes 0.8
  # 5 wanted at a minimum rate of 0.5: ceil(5 / 0.5) = 10 samples -> 4 batches of 3, 4 kept.
  with pytest.raises(errors.RejectionBudgetError) as caught:
    rejection.rejection_sample(
      gen, two_class_probs, 5, jax.random.key(0), threshold=0.8, min_acceptance=0.5, batch_size=3
    )
  assert str(caught.value) == (
    "rejection sampling kept 4 of 5 wanted samples: 4 of 12 generated passed threshold 0.8 "
    "(acceptance rate 0.3333), and the minimum acceptance rate 0.5 allows at most 12 generated "
    "(4 batches of 3); lower --threshold or --min_acceptance"
  )
  assert isinstance(caught.value, errors.UserError)  # the CLIs print it as one line
  assert gen.calls == 4
  info = caught.value.info
  assert (info["batches"], info["generated"], info["accepted"], info["kept"]) == (4, 12, 4, 4)
  assert info["acceptance_rate"] == pytest.approx(4 / 12)

  # Nothing ever passes: the whole budget (2 batches of 2 for ceil(2 / 0.5) = 4) is spent.
  nothing = TableGenerator([[0.5, 0.5]])
  with pytest.raises(errors.RejectionBudgetError, match="kept 0 of 2 .* rate 0\\)"):
    rejection.rejection_sample(
      nothing, two_class_probs, 2, jax.random.key(0), threshold=0.9, min_acceptance=0.5
    )
  assert nothing.calls == 2


def test_drawing_stops_once_the_budget_left_cannot_fill_the_empty_slots():
  # ceil(5 / 0.9) = 6 samples -> 2 batches of 3. One passes in the first batch: 4 slots stay
  # empty and the last batch holds only 3 samples, so it is not drawn.
  gen = TableGenerator([[0.5, 0.55, 0.9]])
  with pytest.raises(errors.RejectionBudgetError, match="kept 1 of 5 .* 1 of 3 generated"):
    rejection.rejection_sample(
      gen, two_class_probs, 5, jax.random.key(0), threshold=0.8, min_acceptance=0.9, batch_size=3
    )
  assert gen.calls == 1


def test_a_rate_of_exactly_the_minimum_fills_the_grid():
  # One sample in four passes (the target label's probability is column 0). 2 wanted.
  for min_acceptance, batches in ((0.25, 2), (0.3, 2), (0.5, 1)):
    gen = TableGenerator([[0.9, 0.1, 0.1, 0.1]])
    kwargs = dict(threshold=0.8, min_acceptance=min_acceptance, labels=0, batch_size=4)
    if batches == 2:  # ceil(2 / 0.25) = 8 and ceil(2 / 0.3) = 7 samples: 2 batches of 4
      samples, info = rejection.rejection_sample(
        gen, target_probs(3), 2, jax.random.key(0), **kwargs
      )
      assert samples.shape == (2, 2) and info["kept"] == 2 and info["batches"] == 2
      assert info["acceptance_rate"] == 0.25
    else:  # ceil(2 / 0.5) = 4 samples: one batch, one kept
      with pytest.raises(errors.RejectionBudgetError, match="kept 1 of 2"):
        rejection.rejection_sample(gen, target_probs(3), 2, jax.random.key(0), **kwargs)
    assert gen.calls == batches


def test_labels_fill_their_own_slots_and_only_empty_slots_are_asked_for():
  classify = target_probs(3)
  want = [0, 2, 1, 2]
  # Batch 1 asks for [0, 2, 1, 2]: scores 0.2, 0.9, 0.95, 0.3 -> slots 1 (label 2) and 2
  # (label 1) filled. Batch 2 asks for the empty slots' labels [0, 2] cycled to [0, 2, 0, 2]:
  # scores 0.99, 0.1, 0.97, 0.85 -> slot 0 (label 0), the second 0 is surplus, slot 3 (label 2).
  gen = TableGenerator([[0.2, 0.9, 0.95, 0.3], [0.99, 0.1, 0.97, 0.85]])
  samples, info = rejection.rejection_sample(
    gen, classify, 4, jax.random.key(0), threshold=0.8, labels=want, min_acceptance=0.5
  )
  np.testing.assert_array_equal(gen.asked[0], [0, 2, 1, 2])
  np.testing.assert_array_equal(gen.asked[1], [0, 2, 0, 2])
  np.testing.assert_array_equal(samples[:, 1], want)  # each slot holds its own class
  np.testing.assert_allclose(samples[:, 0], [0.99, 0.9, 0.95, 0.85])
  np.testing.assert_array_equal(info["labels"], want)
  assert info["accepted"] == 5 and info["generated"] == 8 and info["batches"] == 2
  assert info["acceptance_rate"] == pytest.approx(5 / 8)  # the surplus 0.97 counts
  # The score is the target label's probability, not the largest one: 0.2 for label 0 loses
  # to the uniform rest (0.4 each) and is still scored 0.2.
  assert info["scores"][0] == pytest.approx(0.2)


class LabelGenerator:
  """Sample [score, label] with the score fixed by the requested label; fails the test if it
  is called more than `limit` times (an endless loop otherwise)."""

  def __init__(self, score_of_label, limit=100):
    self.score_of_label = score_of_label
    self.calls, self.limit, self.asked = 0, limit, []

  def __call__(self, rng, n, labels):
    del rng
    self.calls += 1
    assert self.calls <= self.limit, "drawn past any budget"
    self.asked.append(np.array(labels))
    s = np.array([self.score_of_label[int(lab)] for lab in labels], np.float64)
    return np.stack([s, np.asarray(labels, np.float64)], axis=1)


def test_a_class_never_accepted_ends_in_the_one_line_error():
  # Label 1 always scores 0.3 < 0.8, the others 0.9. ceil(4 / 0.25) = 16 samples: 4 batches.
  gen = LabelGenerator({0: 0.9, 1: 0.3, 2: 0.9})
  with pytest.raises(errors.RejectionBudgetError) as caught:
    rejection.rejection_sample(
      gen,
      target_probs(3),
      4,
      jax.random.key(0),
      threshold=0.8,
      labels=[0, 1, 2, 1],
      min_acceptance=0.25,
    )
  assert str(caught.value) == (
    "rejection sampling kept 2 of 4 wanted samples: 2 of 16 generated passed threshold 0.8 "
    "(acceptance rate 0.125), and the minimum acceptance rate 0.25 allows at most 16 generated "
    "(4 batches of 4); the empty slots want label(s) 1; lower --threshold or --min_acceptance"
  )
  assert gen.calls == 4
  np.testing.assert_array_equal(gen.asked[0], [0, 1, 2, 1])
  for asked in gen.asked[1:]:  # only the empty slots' class is asked for again
    np.testing.assert_array_equal(asked, [1, 1, 1, 1])


def test_one_label_for_every_sample():
  gen = TableGenerator([[0.9, 0.1]])
  samples, info = rejection.rejection_sample(
    gen,
    target_probs(4),
    3,
    jax.random.key(0),
    threshold=0.5,
    labels=3,
    min_acceptance=0.5,
    batch_size=2,
  )
  assert info["batches"] == 3 and np.all(samples[:, 1] == 3)
  np.testing.assert_array_equal(info["labels"], [3, 3, 3])


def random_generator(rng, n, labels):
  del labels
  return np.asarray(jax.random.uniform(rng, (n, 3)))


def labelled_uniform(rng, n, labels):
  """[u, label] with u uniform in [0, 1): with target_probs, the score is u, so a sample passes
  threshold t with probability 1 - t."""
  u = np.asarray(jax.random.uniform(rng, (n,)), np.float64)
  return np.stack([u, np.asarray(labels, np.float64)], axis=1)


def test_the_grid_is_full_and_the_rate_is_that_of_every_generated_sample():
  # Pass probability 0.25 per sample; a minimum rate of 0.1 allows 400 samples (25 batches of
  # 16) for 40 wanted: about 160 are needed, and falling short is a many-sigma event.
  want = np.arange(40) % 4
  samples, info = rejection.rejection_sample(
    labelled_uniform,
    target_probs(4),
    40,
    jax.random.key(7),
    threshold=0.75,
    min_acceptance=0.1,
    labels=want,
    batch_size=16,
  )
  assert samples.shape == (40, 2) and info["kept"] == 40
  np.testing.assert_array_equal(samples[:, 1], want)
  assert np.all(samples[:, 0] >= 0.75)
  assert len(set(samples[:, 0].tolist())) == 40  # 40 different samples, none repeated
  # The batches again, outside: batch b draws from fold_in(key, b) the empty slots' labels.
  key, filled, scores, expected = jax.random.key(7), np.zeros(40, bool), [], np.zeros((40, 2))
  for b in range(info["batches"]):
    assert not filled.all()  # no batch is drawn after the grid is full
    empty = np.flatnonzero(~filled)
    batch = labelled_uniform(jax.random.fold_in(key, b), 16, np.resize(want[empty], 16))
    scores.append(batch[:, 0])
    for u, lab in batch[batch[:, 0] >= 0.75]:
      slot = [i for i in empty if want[i] == lab and not filled[i]]
      if slot:
        filled[slot[0]], expected[slot[0]] = True, (u, lab)
  assert filled.all()
  np.testing.assert_array_equal(samples, expected)
  scores = np.concatenate(scores)
  np.testing.assert_allclose(info["scores"], scores)
  assert info["generated"] == len(scores) == 16 * info["batches"] <= 400
  assert info["accepted"] == np.sum(scores >= 0.75)
  assert info["acceptance_rate"] == np.sum(scores >= 0.75) / len(scores)
  assert 0.1 < info["acceptance_rate"] < 0.45  # about 0.25


@pytest.mark.parametrize("seed", range(6))
def test_never_more_than_the_budget_is_generated(seed):
  # Pass probability 0.25, minimum rates around it: some seeds fill the grid, some run out;
  # either way at most ceil(12 / m) samples rounded up to batches of 5 are generated.
  counted = []

  def generate(rng, n, labels):
    counted.append(n)
    return labelled_uniform(rng, n, labels)

  for min_acceptance, most in ((0.2, 60), (0.25, 50), (0.3, 40), (0.4, 30)):
    counted.clear()
    kwargs = dict(threshold=0.75, min_acceptance=min_acceptance, labels=1, batch_size=5)
    try:
      samples, info = rejection.rejection_sample(
        generate, target_probs(2), 12, jax.random.key(seed), **kwargs
      )
      assert samples.shape == (12, 2) and np.all(samples[:, 0] >= 0.75)
    except errors.RejectionBudgetError as e:
      info = e.info
      # Stopped only when the samples left in the budget could not fill the empty slots.
      assert 12 - info["kept"] > most - info["generated"]
    assert sum(counted) == info["generated"] <= most
    assert info["acceptance_rate"] == info["accepted"] / info["generated"]


def test_same_key_same_samples_and_batch_keys_follow_fold_in():
  kwargs = dict(threshold=0.7, min_acceptance=0.1, batch_size=8)
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
  # Recomputed outside: batch t draws from fold_in(key, t).
  key = jax.random.key(3)
  drawn = np.concatenate(
    [random_generator(jax.random.fold_in(key, t), 8, None) for t in range(info_a["batches"])]
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
