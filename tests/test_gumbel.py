"""Tests of vqjax/models/gumbel.py against NumPy and hand-derived values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqjax.models.gumbel import GumbelQuantizer
from vqjax.models.hierarchy import VQVAE2


def _setup():
  q = GumbelQuantizer(num_codes=6, code_dim=3, kl_weight=0.1)
  z = jax.random.normal(jax.random.key(0), (2, 4, 3))
  v = q.init({"params": jax.random.key(1)}, z, train=False)
  return q, z, v


def test_eval_picks_the_argmax_codeword_and_kl_matches_numpy():
  q, z, v = _setup()
  zq, aux = q.apply(v, z, train=False)
  p = v["params"]
  logits = np.asarray(z, np.float64) @ np.asarray(p["to_logits"]["kernel"]) + np.asarray(
    p["to_logits"]["bias"]
  )
  idx = logits.argmax(-1)
  np.testing.assert_array_equal(np.asarray(aux["indices"]), idx)
  np.testing.assert_allclose(np.asarray(zq), np.asarray(p["codebook"])[idx], rtol=1e-6)
  qd = np.exp(logits - logits.max(-1, keepdims=True))
  qd /= qd.sum(-1, keepdims=True)
  kl = np.mean(np.sum(qd * np.log(qd * 6), axis=-1))
  np.testing.assert_allclose(float(aux["kl"]), kl, rtol=1e-4)
  np.testing.assert_allclose(float(aux["latent_loss"]), 0.1 * kl, rtol=1e-4)


def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_hard_straight_through_values_and_gradients_match_numpy(monkeypatch):
  """Forward: the codeword of argmax(logits + g); backward: the relaxed softmax gradient."""
  tau = 0.7
  q = GumbelQuantizer(num_codes=6, code_dim=3, temperature=tau, kl_weight=0.1)
  z = jax.random.normal(jax.random.key(0), (2, 4, 3))
  v = q.init({"params": jax.random.key(1)}, z, train=False)
  g = np.random.default_rng(0).gumbel(size=(2, 4, 6)).astype(np.float32)
  # Pin the noise so the NumPy reference sees the same sample.
  monkeypatch.setattr(jax.random, "gumbel", lambda key, shape, dtype: jnp.asarray(g, dtype))

  def f(params):
    zq, _ = q.apply({"params": params}, z, train=True, rngs={"vq": jax.random.key(2)})
    return jnp.sum(zq**2), zq

  (_, zq), grads = jax.value_and_grad(f, has_aux=True)(v["params"])
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
  zn = np.asarray(z, np.float64).reshape(-1, 3)
  book, kernel, bias = p["codebook"], p["to_logits"]["kernel"], p["to_logits"]["bias"]
  logits = zn @ kernel + bias
  y = _np_softmax((logits + g.reshape(-1, 6)) / tau)
  hard = np.eye(6)[y.argmax(-1)]
  expect_zq = hard @ book
  np.testing.assert_allclose(np.asarray(zq).reshape(-1, 3), expect_zq, rtol=1e-6, atol=1e-6)
  # L = sum(zq^2) with zq = (hard + y - sg[y]) @ book.
  dl_dy = 2 * expect_zq @ book.T
  dl_dlogits = y * (dl_dy - (y * dl_dy).sum(-1, keepdims=True)) / tau
  np.testing.assert_allclose(
    np.asarray(grads["codebook"]), hard.T @ (2 * expect_zq), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    np.asarray(grads["to_logits"]["kernel"]), zn.T @ dl_dlogits, rtol=1e-4, atol=1e-6
  )
  np.testing.assert_allclose(
    np.asarray(grads["to_logits"]["bias"]), dl_dlogits.sum(0), rtol=1e-4, atol=1e-6
  )


def test_training_samples_follow_softmax_of_the_logits():
  """Gumbel-max: argmax(logits + g) is distributed as softmax(logits), whatever tau."""
  q = GumbelQuantizer(num_codes=4, code_dim=2, temperature=3.0)
  z = jnp.tile(jnp.array([[0.5, -1.0]]), (20000, 1))
  v = q.init({"params": jax.random.key(1)}, z, train=False)
  zq, _ = jax.jit(lambda v, z: q.apply(v, z, train=True, rngs={"vq": jax.random.key(3)}))(v, z)
  book = np.asarray(v["params"]["codebook"], np.float64)
  picks = ((np.asarray(zq, np.float64)[:, None] - book[None]) ** 2).sum(-1).argmin(1)
  p = v["params"]["to_logits"]
  logits = np.array([0.5, -1.0]) @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"])
  freq = np.bincount(picks, minlength=4) / picks.size
  np.testing.assert_allclose(freq, _np_softmax(logits), atol=0.015)


@pytest.mark.slow
def test_gumbel_kind_in_the_hierarchy():
  m = VQVAE2(
    out_channels=1,
    channels=8,
    res_channels=4,
    num_res_blocks=1,
    quantizer=dict(kind="gumbel", num_codes=8, code_dim=4),
  )
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1), minval=-1.0, maxval=1.0)
  v = jax.jit(m.init)({"params": jax.random.key(0)}, x)
  assert v["params"]["quantizers_0"]["codebook"].shape == (8, 4)

  def run(mdl, x):
    recon, aux = mdl(x)
    codes = mdl.encode_to_indices(x)
    return recon, aux, codes, mdl.decode_from_indices(codes)

  recon, aux, codes, decoded = jax.jit(lambda v, x: m.apply(v, x, method=run))(v, x)
  assert [c.shape for c in codes] == [(2, 2, 2), (2, 4, 4)]
  # Evaluation is deterministic and codes alone reproduce the reconstruction.
  np.testing.assert_allclose(np.asarray(decoded), np.asarray(recon), rtol=1e-5, atol=1e-6)
  for i, c in enumerate(codes):
    np.testing.assert_array_equal(np.asarray(aux[f"level{i}/indices"]), np.asarray(c))
    np.testing.assert_array_equal(
      np.asarray(aux[f"level{i}/counts"]), np.bincount(np.asarray(c).ravel(), minlength=8)
    )
