"""Tests of the prior scores of vqjax/evaluation/anomaly.py: code likelihood and restoration.

The priors are toy Markov chains in raster order whose probabilities are known: the logits at a
position are a fixed table's row of the code before it. References are NumPy loops over that
table; the stage-1 model is the quickstart's smoke VQ-VAE-2 with NumPy-drawn weights.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqjax.evaluation import anomaly, memory


class _MarkovPrior(nn.Module):
  """logits(p) = table[code at p - 1] (table[K] at p = 0), with the priors' decode mode."""

  table: tuple  # K + 1 rows of K logits

  @nn.compact
  def __call__(self, codes, condition=None, label=None, train=False, *, decode_position=None):
    table = jnp.asarray(self.table, jnp.float32)
    k = table.shape[1]
    b = codes.shape[0]
    flat = codes.reshape(b, -1)
    if decode_position is None:
      previous = jnp.concatenate([jnp.full((b, 1), k, flat.dtype), flat[:, :-1]], axis=1)
      return table[previous].reshape(*codes.shape, k)
    # A decode cache as the real priors keep (restoration passes it on between positions).
    calls = self.variable("cache", "calls", lambda: jnp.zeros((), jnp.int32))
    calls.value += 1
    p = decode_position
    previous = jnp.where(p == 0, k, flat[:, jnp.maximum(p - 1, 0)])
    return table[previous]


def _table(logits: np.ndarray) -> tuple:
  return tuple(tuple(float(v) for v in row) for row in logits)


def _numpy_nll(table: np.ndarray, codes: np.ndarray) -> np.ndarray:
  """Per-position nats of codes [B, H, W] under the Markov table, in float64."""
  t = np.asarray(table, np.float64)
  logp = t - np.log(np.exp(t - t.max(1, keepdims=True)).sum(1, keepdims=True)) - t.max(1)[:, None]
  flat = codes.reshape(len(codes), -1)
  out = np.zeros(flat.shape)
  for b in range(len(flat)):
    previous = len(t) - 1
    for p, c in enumerate(flat[b]):
      out[b, p] = -logp[previous, c]
      previous = c
  return out.reshape(codes.shape)


def test_code_nll_matches_numpy_log_softmax():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 4, 7)) * 3
  codes = rng.integers(0, 7, (2, 3, 4))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -np.take_along_axis(logp, codes[..., None], -1)[..., 0]
  got = np.asarray(anomaly.code_nll(logits.astype(np.float32), codes))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_prior_scores_are_the_numpy_likelihood_of_the_codes(numpy_smoke_vqvae2):
  config, model, variables = numpy_smoke_vqvae2
  k = config.vq.num_codes
  rng = np.random.default_rng(1)
  tables = [rng.normal(size=(k + 1, k)) * 2 for _ in range(2)]
  priors = [(_MarkovPrior(_table(t)), {"params": {}}) for t in tables]
  scorer = anomaly.PriorScorer(model, variables, priors, restore_threshold=0.0)
  images = rng.uniform(-1, 1, (4, 32, 32, 1)).astype(np.float32)
  out = scorer.score(images, jax.random.key(0))
  codes = model.apply(variables, images, method="encode_to_indices")
  total = 0
  for level, table in enumerate(tables):
    expected = _numpy_nll(table, np.asarray(codes[level]))
    np.testing.assert_allclose(out[f"nll_map{level}"], expected, rtol=1e-5, atol=1e-5)
    per_image = expected.sum(axis=(1, 2))
    np.testing.assert_allclose(out[f"nll_level{level}"], per_image, rtol=1e-5)
    total = total + per_image
  np.testing.assert_allclose(out["nll"], total, rtol=1e-5)
  assert "nll_ratio" not in out and "knn" not in out  # no memory given

  # With a memory: nll_ratio is nll minus the nats under its code counts (add-one smoothed).
  counts = [rng.integers(0, 50, k) for _ in range(2)]
  bank = memory.Memory(rng.normal(size=(8, 4 * 4 * 8 + 8 * 8 * 8)), 2, counts)
  with_memory = anomaly.PriorScorer(model, variables, priors, memory=bank)
  ratio = with_memory.score(images, jax.random.key(0))["nll_ratio"]
  frequency_nats = sum(
    -np.log((c[np.asarray(codes[level])] + 1.0) / (c.sum() + k)).sum(axis=(1, 2))
    for level, c in enumerate(counts)
  )
  np.testing.assert_allclose(ratio, total - frequency_nats, rtol=1e-5)
  # Threshold 0 replaces nothing: the restoration is the reconstruction.
  assert np.all(out["replaced"] == 0)
  np.testing.assert_allclose(out["restored"], np.clip(out["recon"], -1, 1), atol=1e-5)


@pytest.mark.slow
def test_restoration_keeps_an_image_whose_codes_are_all_likely(numpy_smoke_vqvae2):
  config, model, variables = numpy_smoke_vqvae2
  k = config.vq.num_codes
  # Every code has probability 1/K everywhere: above a threshold of 1/(2K), so none changes.
  priors = [(_MarkovPrior(_table(np.zeros((k + 1, k)))), {"params": {}}) for _ in range(2)]
  scorer = anomaly.PriorScorer(model, variables, priors, restore_threshold=0.5 / k)
  images = np.random.default_rng(2).uniform(-1, 1, (3, 32, 32, 1)).astype(np.float32)
  out = scorer.score(images, jax.random.key(1))
  assert np.all(out["replaced"] == 0)
  recon = np.clip(np.asarray(model.apply(variables, images, train=False)[0], np.float64), -1, 1)
  np.testing.assert_allclose(out["restored"], recon, atol=1e-5)
  expected_map = ((recon - images) ** 2).mean(-1)
  np.testing.assert_allclose(out["restoration_map"], expected_map, rtol=1e-4, atol=1e-6)


def test_restore_codes_follows_the_restored_prefix_in_raster_order():
  # Code c is followed by (c + 1) % K with probability ~1 and by anything else with ~e^-30:
  # a code off that chain (given the restored code before it) is replaced by its successor.
  k = 5
  table = np.full((k + 1, k), -30.0)
  for c in range(k):
    table[c, (c + 1) % k] = 0.0
  table[k, :] = 0.0  # the first code: uniform, always likely
  prior = _MarkovPrior(_table(table))
  codes = np.random.default_rng(3).integers(0, k, (6, 3, 4)).astype(np.int32)
  restored, replaced = anomaly.restore_codes(prior, {"params": {}}, codes, jax.random.key(2), 0.01)
  expected, flags = codes.reshape(6, -1).copy(), np.zeros((6, 12), bool)
  for b in range(6):
    for p in range(1, 12):
      successor = (expected[b, p - 1] + 1) % k
      flags[b, p] = expected[b, p] != successor
      expected[b, p] = successor
  np.testing.assert_array_equal(np.asarray(restored).reshape(6, -1), expected)
  np.testing.assert_array_equal(np.asarray(replaced).reshape(6, -1), flags)
  # A threshold of 0 keeps every code.
  kept, none = anomaly.restore_codes(prior, {"params": {}}, codes, jax.random.key(2), 0.0)
  np.testing.assert_array_equal(np.asarray(kept), codes)
  assert not np.asarray(none).any()
