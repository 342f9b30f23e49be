"""Tests of vqjax/models/hierarchy.py and vqvae.py: shapes, API round trips, gradients, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqjax.models.hierarchy import VQVAE2
from vqjax.models.vqvae import VQVAE

QKW = dict(num_codes=32, code_dim=8, codebook_init="normal")


def _model(levels, channels=1, **kw):
  return VQVAE2(
    out_channels=channels,
    channels=16,
    res_channels=8,
    num_res_blocks=1,
    levels=levels,
    quantizer=QKW,
    **kw,
  )


def _init(m, x):
  return jax.jit(m.init)({"params": jax.random.key(0)}, x)


def _apply(m, v, x, **kw):
  """Jitted apply: op-by-op dispatch of an un-jitted model is slow on the CPU."""
  return jax.jit(lambda v, x: m.apply(v, x, **kw))(v, x)


def _images(shape, seed=0):
  return jax.random.uniform(jax.random.key(seed), shape, minval=-1.0, maxval=1.0)


@pytest.mark.parametrize(
  "levels,size,channels,code_sizes",
  [(1, 32, 1, [8]), (2, 32, 3, [4, 8]), (3, 64, 3, [4, 8, 16]), (2, 48, 1, [6, 12])],
)
def test_shapes_per_level(levels, size, channels, code_sizes):
  # Shapes only: jax.eval_shape traces the model without compiling or running it.
  m = _model(levels, channels)
  x = jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32)
  v = jax.eval_shape(lambda x: m.init({"params": jax.random.key(0)}, x), x)
  recon, aux = jax.eval_shape(lambda v, x: m.apply(v, x), v, x)
  assert recon.shape == x.shape
  codes = jax.eval_shape(lambda v, x: m.apply(v, x, method="encode_to_indices"), v, x)
  assert [c.shape for c in codes] == [(2, s, s) for s in code_sizes]
  assert all(c.dtype == jnp.int32 for c in codes)
  assert all(f"level{i}/usage" in aux for i in range(levels))
  decoded = jax.eval_shape(lambda v, c: m.apply(v, c, method="decode_from_indices"), v, codes)
  assert decoded.shape == x.shape
  # One quantizer (and codebook) per level.
  assert len(v["vq_state"]) == levels


@pytest.fixture(scope="module")
def two_level():
  """One small 2-level model run once (a single compile) for the tests that read its outputs."""
  m = _model(2, 1)
  x = _images((2, 16, 16, 1))
  v = _init(m, x)

  def run(mdl, x):
    recon, aux = mdl(x)
    codes = mdl.encode_to_indices(x)
    # The quantizer inputs, rebuilt from the layout of the module docstring: the top from the
    # top encoder, the bottom from [decoded top codewords, bottom encoder features].
    h_bottom = mdl.encoders[1](x)
    z_top = mdl.pre_quant[0](mdl.encoders[0](h_bottom))
    cond = mdl.cond_decoders[0](mdl.quantizers[0].lookup(codes[0]))
    z_bottom = mdl.pre_quant[1](jnp.concatenate([cond, h_bottom], axis=-1))
    return recon, aux, codes, mdl.decode_from_indices(codes), (z_top, z_bottom)

  return m, v, x, *_apply(m, v, x, method=run)


def test_decode_from_indices_reproduces_the_forward_pass(two_level):
  _, _, _, recon, _, _, decoded, _ = two_level
  np.testing.assert_allclose(np.asarray(decoded), np.asarray(recon), rtol=1e-5, atol=1e-6)


def _np_nearest(z, book):
  return ((z[:, None] - book[None]) ** 2).sum(-1).argmin(1)


def test_codes_are_the_nearest_codewords_of_the_encoder_outputs(two_level):
  _, v, _, _, _, codes, _, zs = two_level
  for level, z in enumerate(zs):  # the bottom level is conditioned on the top codes
    z = np.asarray(z, np.float64).reshape(-1, 8)
    book = np.asarray(v["vq_state"][f"quantizers_{level}"]["codebook"], np.float64)
    np.testing.assert_array_equal(np.asarray(codes[level]).reshape(-1), _np_nearest(z, book))


def test_loss_is_mse_plus_beta_commitment(two_level):
  _, v, x, recon, aux, _, _, zs = two_level
  mse = np.mean((np.asarray(recon, np.float64) - np.asarray(x, np.float64)) ** 2)
  np.testing.assert_allclose(float(aux["mse"]), mse, rtol=1e-5)
  commit = 0.0
  for level, z in enumerate(zs):
    z = np.asarray(z, np.float64).reshape(-1, 8)
    book = np.asarray(v["vq_state"][f"quantizers_{level}"]["codebook"], np.float64)
    c = np.mean((z - book[_np_nearest(z, book)]) ** 2)
    np.testing.assert_allclose(float(aux[f"level{level}/commitment"]), c, rtol=1e-4)
    commit += c
  np.testing.assert_allclose(float(aux["latent_loss"]), 0.25 * commit, rtol=1e-4)
  np.testing.assert_allclose(float(aux["loss"]), mse + 0.25 * commit, rtol=1e-4)


def test_reconstruction_gradients_reach_the_encoders_through_the_quantizers(two_level):
  m, v, x = two_level[:3]
  grads = jax.jit(jax.grad(lambda p: m.apply({**v, "params": p}, x)[1]["mse"]))(v["params"])
  for name in ("encoders_0", "encoders_1", "pre_quant_0", "pre_quant_1"):
    norm = sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads[name]))
    assert norm > 0, name


@pytest.mark.slow
def test_bfloat16_forward_is_close_to_float32():
  x = _images((4, 32, 32, 3))
  m32, m16 = _model(2, 3), _model(2, 3, dtype=jnp.bfloat16)
  v = _init(m32, x)
  run = lambda mdl, x: (mdl(x)[0], mdl.encode_to_indices(x))
  r32, c32 = _apply(m32, v, x, method=run)
  r16, c16 = _apply(m16, v, x, method=run)
  assert r16.dtype == jnp.bfloat16
  assert jax.tree.leaves(v["params"])[0].dtype == jnp.float32
  rel = float(jnp.linalg.norm(r16.astype(jnp.float32) - r32) / jnp.linalg.norm(r32))
  assert rel < 3e-2, rel
  for a, b in zip(c32, c16):
    assert float(jnp.mean(a == b)) > 0.9


def test_training_step_updates_ema_codebooks_and_eval_does_not(two_level):
  m, v, x = two_level[:3]
  zs = two_level[-1]
  _, upd = _apply(m, v, x, train=True, mutable=["vq_state"])
  for level, z in enumerate(zs):
    # One EMA step (decay 0.99, eps 1e-5, no bias correction) from sums = codebook, counts = 0,
    # in float64 from the VQ-VAE appendix equations.
    z = np.asarray(z, np.float64).reshape(-1, 8)
    book = np.asarray(v["vq_state"][f"quantizers_{level}"]["codebook"], np.float64)
    onehot = np.eye(32)[_np_nearest(z, book)]
    count = 0.01 * onehot.sum(0)
    total = 0.99 * book + 0.01 * onehot.T @ z
    smoothed = (count + 1e-5) / (count.sum() + 32 * 1e-5) * count.sum()
    np.testing.assert_allclose(
      np.asarray(upd["vq_state"][f"quantizers_{level}"]["codebook"]),
      total / smoothed[:, None],
      rtol=1e-4,
      atol=1e-5,
    )
  before = v["vq_state"]["quantizers_1"]["codebook"]
  _, same = _apply(m, v, x, train=False, mutable=["vq_state"])
  np.testing.assert_array_equal(np.asarray(same["vq_state"]["quantizers_1"]["codebook"]), before)


def test_single_level_vqvae_has_the_paper_layout():
  m = VQVAE(out_channels=3, channels=32, res_channels=32, quantizer=dict(QKW, code_dim=10))
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  v = jax.eval_shape(lambda x: m.init({"params": jax.random.key(0)}, x), x)
  (codes,) = jax.eval_shape(lambda v, x: m.apply(v, x, method="encode_to_indices"), v, x)
  assert codes.shape == (2, 8, 8)  # CIFAR-10: 32x32 -> 8x8 latents
  enc = v["params"]["encoders_0"]
  assert enc["down0"]["kernel"].shape[:2] == (4, 4) and "down1" in enc and "down2" not in enc
  assert v["vq_state"]["quantizers_0"]["codebook"].shape == (32, 10)


def test_bad_input_sizes_are_clear_errors():
  m = _model(3, 1)
  with pytest.raises(ValueError, match="divisible by 16"):
    jax.eval_shape(lambda: m.init({"params": jax.random.key(0)}, jnp.zeros((1, 24, 24, 1))))
  with pytest.raises(ValueError, match="levels must be"):
    jax.eval_shape(lambda: _model(0).init({"params": jax.random.key(0)}, jnp.zeros((1, 16, 16, 1))))
