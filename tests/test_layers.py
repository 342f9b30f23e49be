"""Tests of vqjax/models/layers.py and models/strided.py (the stride-2 convolutions in every
form, and the blocks built on them, against NumPy float64 references) and of the XLA:CPU flag
that vqjax/__init__.py sets."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqjax.models import strided
from vqjax.models.impl import Impl
from vqjax.models.layers import Decoder, DownConv, Encoder, ResBlock, UpConv


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


# channel_multiple=8: the convolution runs on zero-padded channels; same function, parameters.
@pytest.mark.parametrize("multiple", [0, 8])
@pytest.mark.parametrize("impl", ["subpixel", "lax", "adjoint"])
def test_upconv_matches_pytorch_semantics_in_float64(impl, multiple):
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 4))
  m = UpConv(6, impl=impl, channel_multiple=multiple)
  v = m.init(jax.random.key(1), x)
  y = m.apply(v, x)
  expect = _np_conv_transpose(
    np.asarray(x), np.asarray(v["params"]["kernel"]), np.asarray(v["params"]["bias"])
  )
  assert y.shape == (2, 10, 6, 6)
  np.testing.assert_allclose(np.asarray(y), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("multiple", [0, 8])
@pytest.mark.parametrize("impl", ["subpixel", "lax", "adjoint"])
def test_upconv_gradients_match_numpy_in_float64(impl, multiple):
  x = jax.random.normal(jax.random.key(0), (2, 4, 3, 3))
  m = UpConv(5, impl=impl, channel_multiple=multiple)
  v = m.init(jax.random.key(1), x)
  w = np.asarray(jax.random.normal(jax.random.key(2), (2, 8, 6, 5)), np.float64)
  gv, gx = jax.grad(lambda v, x: jnp.sum(m.apply(v, x) * w), argnums=(0, 1))(v, x)
  # L = sum(y * w) with y[2i - 1 + ky, 2j - 1 + kx] += x[i, j] @ kernel[ky, kx]: pad w by the
  # padding (1) so every tap (ky, kx) reads w at 2i + ky, 2j + kx.
  xn, kernel = np.asarray(x, np.float64), np.asarray(v["params"]["kernel"], np.float64)
  wp = np.pad(w, ((0, 0), (1, 1), (1, 1), (0, 0)))
  expect_x, expect_k = np.zeros_like(xn), np.zeros_like(kernel)
  for ky in range(4):
    for kx in range(4):
      wt = wp[:, ky : ky + 8 : 2, kx : kx + 6 : 2]  # [n, i, j, o]
      expect_x += np.einsum("nijo,co->nijc", wt, kernel[ky, kx])
      expect_k[ky, kx] = np.einsum("nijc,nijo->co", xn, wt)
  np.testing.assert_allclose(np.asarray(gx), expect_x, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gv["params"]["kernel"]), expect_k, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gv["params"]["bias"]), w.sum((0, 1, 2)), rtol=1e-5)


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


def _np_conv(x, k, b, stride=1, pad=0):
  """Cross-correlation as nn.Conv computes it, NHWC / HWIO, float64."""
  kh, kw = k.shape[:2]
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  oh, ow = (xp.shape[1] - kh) // stride + 1, (xp.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, k.shape[-1])) + b
  for dy in range(kh):
    for dx in range(kw):
      patch = xp[:, dy : dy + stride * oh : stride, dx : dx + stride * ow : stride]
      out += np.einsum("nyxc,co->nyxo", patch, k[dy, dx])
  return out


def _np_resblock(x, p):
  relu = lambda a: np.maximum(a, 0)
  h = relu(_np_conv(relu(x), p["conv3"]["kernel"], p["conv3"]["bias"], pad=1))
  return x + _np_conv(h, p["conv1"]["kernel"], p["conv1"]["bias"])


@pytest.mark.parametrize("multiple", [0, 8])
def test_encoder_and_decoder_match_numpy_in_float64(multiple):
  """Stride 4: both down convs (channels // 2, then channels) and both up convs, in order
  (with channel_multiple=8, the image-side convolutions on zero-padded channels)."""
  relu = lambda a: np.maximum(a, 0)
  x = jax.random.normal(jax.random.key(0), (1, 8, 12, 3))
  enc = Encoder(6, 4, 1, 4, impl=Impl(channel_multiple=multiple))
  ve = enc.init(jax.random.key(1), x)
  h = enc.apply(ve, x)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), ve["params"])
  assert p["down0"]["kernel"].shape == (4, 4, 3, 3) and "down2" not in p
  e = _np_conv(np.asarray(x, np.float64), p["down0"]["kernel"], p["down0"]["bias"], 2, 1)
  e = _np_conv(relu(e), p["down1"]["kernel"], p["down1"]["bias"], 2, 1)
  e = _np_conv(relu(e), p["conv_out"]["kernel"], p["conv_out"]["bias"], pad=1)
  e = relu(_np_resblock(e, p["res0"]))
  np.testing.assert_allclose(np.asarray(h), e, rtol=1e-4, atol=1e-5)

  dec = Decoder(2, 6, 4, 1, 4, impl=Impl(channel_multiple=multiple))
  vd = dec.init(jax.random.key(2), h)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), vd["params"])
  assert p["up0"]["kernel"].shape == (4, 4, 6, 3) and "up2" not in p
  d = _np_conv(np.asarray(h, np.float64), p["conv_in"]["kernel"], p["conv_in"]["bias"], pad=1)
  d = relu(_np_resblock(d, p["res0"]))
  d = relu(_np_conv_transpose(d, p["up0"]["kernel"], p["up0"]["bias"]))
  d = _np_conv_transpose(d, p["up1"]["kernel"], p["up1"]["bias"])
  y = dec.apply(vd, h)
  assert y.shape == (1, 8, 12, 2)
  np.testing.assert_allclose(np.asarray(y), d, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stride", [2, 8])
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


@pytest.mark.parametrize("multiple", [0, 8])
@pytest.mark.parametrize("impl", ["lax", "adjoint"])
# odd: "adjoint" uses XLA's rules
@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (1, 7, 5, 2), (1, 6, 4, 8)])
def test_downconv_and_its_gradients_match_numpy_in_float64(impl, shape, multiple):
  """DownConv = nn.Conv(4, stride 2, padding 1) with the same parameters; the gradients of
  L = sum(y * w) against float64 NumPy: dL/dx scatters w back through every tap."""
  x = jax.random.normal(jax.random.key(0), shape)
  m = DownConv(4, impl=impl, channel_multiple=multiple)
  v = m.init(jax.random.key(1), x)
  kernel = np.asarray(v["params"]["kernel"], np.float64)
  bias = np.asarray(v["params"]["bias"], np.float64)
  assert kernel.shape == (4, 4, shape[-1], 4)
  xn = np.asarray(x, np.float64)
  y = m.apply(v, x)
  expect = _np_conv(xn, kernel, bias, stride=2, pad=1)
  np.testing.assert_allclose(np.asarray(y), expect, rtol=1e-5, atol=1e-5)
  w = np.asarray(jax.random.normal(jax.random.key(2), y.shape), np.float64)
  gv, gx = jax.grad(lambda v, x: jnp.sum(m.apply(v, x) * w), argnums=(0, 1))(v, x)
  n, oh, ow, _ = w.shape
  xp = np.pad(xn, ((0, 0), (1, 1), (1, 1), (0, 0)))
  gxp, expect_k = np.zeros_like(xp), np.zeros_like(kernel)
  for ky in range(4):
    for kx in range(4):
      rows, cols = slice(ky, ky + 2 * oh, 2), slice(kx, kx + 2 * ow, 2)
      gxp[:, rows, cols] += np.einsum("nijo,co->nijc", w, kernel[ky, kx])
      expect_k[ky, kx] = np.einsum("nijc,nijo->co", xp[:, rows, cols], w)
  np.testing.assert_allclose(np.asarray(gx), gxp[:, 1:-1, 1:-1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gv["params"]["kernel"]), expect_k, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("out_channels", [3, 8])
def test_phase_form_of_the_transposed_conv_matches_numpy_in_float64(out_channels):
  """up_phase (one 2x2 convolution to 4x the channels) is PyTorch's ConvTranspose2d, also on a
  non-square, odd-sized input."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 4))
  w = jax.random.normal(jax.random.key(1), (4, 4, 4, out_channels)) * 0.3
  y = strided.up_phase(x, w)
  expect = _np_conv_transpose(np.asarray(x), np.asarray(w), 0.0)
  assert y.shape == (2, 10, 6, out_channels)
  np.testing.assert_allclose(np.asarray(y), expect, rtol=1e-5, atol=1e-5)


def test_adjoint_forms_give_xla_gradients_in_bfloat16():
  """The custom rules keep the input's and kernel's dtypes and agree with XLA's derivatives."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16), jnp.bfloat16)
  kd = jax.random.normal(jax.random.key(1), (4, 4, 16, 8), jnp.bfloat16) * 0.1
  ku = jax.random.normal(jax.random.key(2), (4, 4, 16, 8), jnp.bfloat16) * 0.1

  def grads(fn, kernel, impl):
    loss = lambda x, k: jnp.sum(fn(x, k, impl).astype(jnp.float32) ** 2)
    return jax.grad(loss, argnums=(0, 1))(x, kernel)

  for fn, k in ((strided.down, kd), (strided.up, ku)):
    ours, xla = grads(fn, k, "adjoint"), grads(fn, k, "lax")
    for a, b in zip(ours, xla, strict=True):
      assert a.dtype == jnp.bfloat16
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      assert np.abs(a - b).max() <= 0.02 * np.abs(b).max()


def test_bad_stride_2_forms_are_clear_errors():
  with pytest.raises(ValueError, match="unknown stride-2 conv impl 'fast'"):
    DownConv(4, impl="fast").init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  with pytest.raises(ValueError, match="unknown stride-2 conv impl 'auto'"):  # resolved at build
    UpConv(4, impl="auto").init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))


_FLAG_CHECK = """
import os
before = os.environ.get("XLA_FLAGS")
import numpy as np
import vqjax
import jax, jax.numpy as jnp
from vqjax.models import strided
from vqjax.models.impl import Impl
assert os.environ.get("XLA_FLAGS") == before  # importing sets nothing
vqjax.cli_setup()  # what every `python -m vqjax.X` does first
print("flags:" + os.environ.get("XLA_FLAGS", ""))
x = jax.random.normal(jax.random.key(0), (4, 8, 8, 16))
k = jax.random.normal(jax.random.key(1), (4, 4, 16, 8)) * 0.1
errors = []
for fn in (strided.down, strided.up):
  def grads(impl):
    return jax.grad(lambda x, k: jnp.sum(fn(x, k, impl) ** 2), argnums=(0, 1))(x, k)
  for a, b in zip(grads("adjoint"), grads("lax")):
    errors.append(float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max()))
print(max(errors))
"""


def _run_flag_check(env_changes):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "VQJAX_XLA_CPU_DEFAULTS")}
  env.update(env_changes)
  out = subprocess.run(
    [sys.executable, "-c", _FLAG_CHECK], env=env, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0, out.stderr[-2000:]
  flags, error = out.stdout.splitlines()[-2:]
  return flags.removeprefix("flags:"), float(error)


@pytest.mark.slow
def test_the_cpu_xla_flag_is_set_unless_the_user_chose_and_gradients_hold_under_it():
  from importlib import metadata

  from vqjax import _cli

  flags, error = _run_flag_check({})
  jaxlib = tuple(int(p) for p in metadata.version("jaxlib").split(".")[:2])
  # Set only for the jaxlib versions known to have the flag (an unknown flag aborts XLA).
  assert (_cli.CPU_XLA_FLAG in flags.split()) == ((0, 10) <= jaxlib <= (0, 11))
  assert error < 1e-5  # the adjoint forms' gradients equal XLA's under vqjax's flag
  flags, _ = _run_flag_check({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="})
  assert flags == "--xla_cpu_experimental_ynn_fusion_type="  # the user's own setting wins
  flags, _ = _run_flag_check({"VQJAX_XLA_CPU_DEFAULTS": "1"})
  assert "ynn_fusion_type" not in flags


def test_bad_channel_multiples_are_clear():
  from vqjax import config_checks, configs, errors

  for bad in (-2, -8):  # (ConfigDict itself refuses a float or a bool for an int field)
    c = configs.base_config()
    c.model.channel_multiple = bad
    with pytest.raises(errors.UserError, match="channel_multiple"):
      config_checks.validate(c)
