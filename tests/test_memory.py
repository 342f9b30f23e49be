"""Tests of the memory-bank score (vqjax/evaluation/memory.py): the k-nearest-neighbour distance
against a float64 NumPy brute force, the latents against the codewords of the model's codes
looked up by hand, and the bank's construction from padded eval batches."""

import flax.linen as nn
import numpy as np
import pytest
from test_anomaly import _numpy_variables

from vqjax import configs
from vqjax.evaluation import memory
from vqjax.models import registry


def _numpy_knn(bank: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
  """Mean of the k smallest Euclidean distances, every pair computed in float64."""
  diff = queries.astype(np.float64)[:, None, :] - bank.astype(np.float64)[None, :, :]
  dist = np.sqrt(np.sum(diff**2, axis=-1))
  return np.sort(dist, axis=1)[:, :k].mean(axis=1)


@pytest.mark.parametrize("k", [1, 5, 300])
def test_knn_distance_matches_a_float64_brute_force(k):
  rng = np.random.default_rng(k)
  bank = rng.normal(size=(300, 40)).astype(np.float32)
  queries = rng.normal(size=(17, 40)).astype(np.float32)
  queries[:3] = bank[[7, 100, 299]]  # exact members: nearest distance 0
  got = memory.Memory(bank, k).score(queries)
  expected = _numpy_knn(bank, queries, k)
  assert got.dtype == np.float64 and got.shape == (17,)
  # Distances are about 9 here; a member's zero comes out of a float32 cancellation.
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=5e-3)
  if k == 1:
    assert np.all(got[:3] < 5e-3) and np.all(got[3:] > 1.0)
  # A wrong k changes the figure (the test can tell k from k + 1).
  if k < 300:
    assert not np.allclose(_numpy_knn(bank, queries, k + 1), expected, rtol=1e-3)


def test_mistakes_are_value_errors():
  bank = np.zeros((4, 3), np.float32)
  with pytest.raises(ValueError, match=r"k must be in \[1, 4\]"):
    memory.Memory(bank, 5)
  with pytest.raises(ValueError, match=r"k must be in \[1, 4\]"):
    memory.Memory(bank, 0)
  with pytest.raises(ValueError, match="non-empty"):
    memory.Memory(np.zeros((0, 3)), 1)
  with pytest.raises(ValueError, match=r"queries must be \[B, 3\]"):
    memory.Memory(bank, 1).score(np.zeros((2, 4)))


@pytest.fixture(scope="module")
def smoke():
  config = configs.load_experiment("fashion_mnist:smoke")
  model = registry.build_model(config)
  return model, _numpy_variables(model, (1, 32, 32, 1))


def _codewords(model, variables, images) -> np.ndarray:
  """Each level's codes looked up in its codebook array by NumPy indexing, flattened."""
  codes = model.apply(variables, images, method="encode_to_indices")
  rows = []
  for level, c in enumerate(codes):
    book = np.asarray(variables["vq_state"][f"quantizers_{level}"]["codebook"])
    rows.append(book[np.asarray(c)].reshape(len(images), -1))
  return np.concatenate(rows, axis=1)


def test_has_encode_tells_the_built_in_autoencoder_from_a_bare_module(smoke):
  class CodesOnly(nn.Module):
    def encode_to_indices(self, x):
      return (x,)

  assert memory.has_encode(smoke[0])
  assert not memory.has_encode(CodesOnly())


@pytest.mark.slow
def test_latents_are_the_codewords_of_every_level_and_the_bank_skips_padding(smoke):
  model, variables = smoke
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (10, 32, 32, 1)).astype(np.float32)
  z = np.asarray(memory.latents(model, variables, images))
  expected = _codewords(model, variables, images)
  assert z.shape == (10, 4 * 4 * 8 + 8 * 8 * 8)
  np.testing.assert_allclose(z, expected, rtol=1e-5, atol=1e-5)

  # Eval-iterator batches: padded rows (mask 0) stay out, and the bank stops at `size`.
  mask = np.array([1, 1, 0, 1, 1], np.float32)
  batches = [
    {"image": images[:5], "mask": mask},
    {"image": images[5:], "mask": np.ones(5, np.float32)},
  ]
  bank = memory.Memory.build(model, variables, batches, size=6, num_codes=32, k=2)
  kept = [0, 1, 3, 4, 5, 6]
  np.testing.assert_allclose(bank.bank, expected[kept], rtol=1e-5, atol=1e-5)
  assert bank.k == 2
  # The same images' codes, counted per level; a test image's nats under the add-one-smoothed
  # frequencies, by hand in float64.
  codes = [np.asarray(c) for c in model.apply(variables, images, method="encode_to_indices")]
  hand = 0.0
  for level, c in enumerate(codes):
    counts = np.array([np.sum(c[kept] == j) for j in range(32)])
    np.testing.assert_array_equal(bank.counts[level], counts)
    p = (counts + 1.0) / (counts.sum() + 32)
    hand = hand + np.array([-np.sum(np.log(p[c[i]])) for i in range(len(c))])
  np.testing.assert_allclose(bank.code_nll(codes), hand, rtol=1e-12)
  got = bank.score(z[7:])
  np.testing.assert_allclose(got, _numpy_knn(expected[kept], expected[7:], 2), rtol=1e-4)
  # 6 latents of 640 float32 numbers take 15,360 bytes: over a 10,000-byte limit, 3 fit.
  too_large = r"of 640 numbers .* allowed; use at most 3 images"
  with pytest.raises(memory.BankTooLargeError, match=too_large):
    memory.Memory.build(model, variables, batches, size=6, num_codes=32, max_bytes=10_000)
  with pytest.raises(ValueError, match="size >= 1"):
    memory.Memory.build(model, variables, batches, size=0, num_codes=32)
  with pytest.raises(ValueError, match="expected 2 code maps"):
    bank.code_nll(codes[:1])
  with pytest.raises(ValueError, match="counted no codes"):
    memory.Memory(bank.bank).code_nll(codes)
