"""Tests of vqjax/models/gumbel.py against NumPy and hand-derived values."""

import jax
import jax.numpy as jnp
import numpy as np

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


def test_hard_samples_are_codewords_and_gradients_reach_the_logits():
  q, z, v = _setup()

  def f(params):
    zq, _ = q.apply({"params": params}, z, train=True, rngs={"vq": jax.random.key(2)})
    return jnp.sum(zq**2), zq

  (_, zq), g = jax.value_and_grad(f, has_aux=True)(v["params"])
  book = np.asarray(v["params"]["codebook"])
  # Every hard sample is exactly one codeword.
  d = ((np.asarray(zq).reshape(-1, 1, 3) - book[None]) ** 2).sum(-1).min(1)
  np.testing.assert_allclose(d, 0.0, atol=1e-10)
  assert float(jnp.sum(g["to_logits"]["kernel"] ** 2)) > 0


def test_gumbel_kind_in_the_hierarchy():
  m = VQVAE2(out_channels=1, channels=8, res_channels=4, num_res_blocks=1,
             quantizer=dict(kind="gumbel", num_codes=8, code_dim=4))
  x = jax.ShapeDtypeStruct((2, 16, 16, 1), jnp.float32)
  v = jax.eval_shape(lambda x: m.init({"params": jax.random.key(0)}, x), x)
  assert v["params"]["quantizers_0"]["codebook"].shape == (8, 4)
  codes = jax.eval_shape(lambda v, x: m.apply(v, x, method="encode_to_indices"), v, x)
  assert [c.shape for c in codes] == [(2, 2, 2), (2, 4, 4)]
