"""Tests of vqjax/models/layers.py: the transposed conv against a NumPy float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqjax.models.layers import Decoder, Encoder, ResBlock, UpConv


def _np_conv_transpose(x, w, b, stride=2, padding=1):
  """PyTorch ConvTranspose2d semantics in float64 loops: every input pixel i scatters
  x[i] * w[k] into output pixel stride * i - padding + k. x: NHWC, w: (kh, kw, I, O)."""
  n, h, wd, _ = x.shape
  kh, kw, _, o = w.shape
  full = np.zeros((n, (h - 1) * stride + kh, (wd - 1) * stride + kw, o))
  for i in range(h):
    for j in range(wd):
      full[:, i * stride : i * stride + kh, j * stride : j * stride + kw] += np.einsum(
          "nc,yxco->nyxo", x[:, i, j].astype(np.float64), w.astype(np.float64)
      )
  out_h, out_w = (h - 1) * stride - 2 * padding + kh, (wd - 1) * stride - 2 * padding + kw
  return full[:, padding : padding + out_h, padding : padding + out_w] + b


@pytest.mark.parametrize("impl", ["subpixel", "lax"])
def test_upconv_matches_pytorch_semantics_in_float64(impl):
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 4))
  m = UpConv(6, impl=impl)
  v = m.init(jax.random.key(1), x)
  y = m.apply(v, x)
  expect = _np_conv_transpose(
      np.asarray(x), np.asarray(v["params"]["kernel"]), np.asarray(v["params"]["bias"])
  )
  assert y.shape == (2, 10, 6, 6)
  np.testing.assert_allclose(np.asarray(y), expect, rtol=1e-5, atol=1e-5)


def test_upconv_implementations_have_the_same_gradients():
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  a, b = UpConv(5, impl="subpixel"), UpConv(5, impl="lax")
  v = a.init(jax.random.key(1), x)
  w = jax.random.normal(jax.random.key(2), (2, 8, 8, 5))
  loss = lambda m: (lambda v, x: jnp.sum(m.apply(v, x) * w))
  ga = jax.grad(loss(a), argnums=(0, 1))(v, x)
  gb = jax.grad(loss(b), argnums=(0, 1))(v, x)
  for p, q in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(np.asarray(p), np.asarray(q), rtol=1e-4, atol=1e-4)


def test_resblock_matches_numpy():
  x = jax.random.normal(jax.random.key(0), (1, 4, 4, 3))
  m = ResBlock(2)
  v = m.init(jax.random.key(1), x)["params"]
  xn = np.asarray(x, np.float64)
  relu = lambda a: np.maximum(a, 0)
  # 3x3 conv with zero padding, written out.
  k3, b3 = np.asarray(v["conv3"]["kernel"]), np.asarray(v["conv3"]["bias"])
  xp = np.pad(relu(xn), ((0, 0), (1, 1), (1, 1), (0, 0)))
  h = np.zeros((1, 4, 4, 2)) + b3
  for dy in range(3):
    for dx in range(3):
      h += np.einsum("nyxc,co->nyxo", xp[:, dy : dy + 4, dx : dx + 4], k3[dy, dx])
  k1, b1 = np.asarray(v["conv1"]["kernel"]), np.asarray(v["conv1"]["bias"])
  expect = xn + np.einsum("nyxc,co->nyxo", relu(h), k1[0, 0]) + b1
  np.testing.assert_allclose(np.asarray(m.apply({"params": v}, x)), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [2, 4, 8])
def test_encoder_decoder_strides(stride):
  x = jnp.zeros((2, 32, 16, 3))
  enc = Encoder(8, 4, 1, stride)
  h = jax.eval_shape(lambda: enc.init_with_output(jax.random.key(0), x)[0])
  assert h.shape == (2, 32 // stride, 16 // stride, 8)
  dec = Decoder(3, 8, 4, 1, stride)
  y = jax.eval_shape(lambda: dec.init_with_output(jax.random.key(0), jnp.zeros(h.shape))[0])
  assert y.shape == x.shape


def test_bad_stride_is_a_clear_error():
  with pytest.raises(ValueError, match="power of two"):
    Encoder(8, 4, 1, 3).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
