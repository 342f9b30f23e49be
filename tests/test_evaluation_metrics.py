"""Tests of vqjax/evaluation/metrics.py and the reconstruction / codebook evaluators.

References are direct NumPy float64 implementations written here (SSIM from its definition
with explicit windows and central moments), never the code under test.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqjax.evaluation import CodebookEvaluator, ReconstructionEvaluator, SsimEvaluator, metrics


def _gaussian_window(size=11, sigma=1.5):
  r = np.arange(size) - (size - 1) / 2
  w = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
  return w / w.sum()


def _ssim_reference(x, y, data_range=2.0, size=11, sigma=1.5, k1=0.01, k2=0.03):
  """Per-image SSIM: every valid window, every channel, central moments, float64."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  w = _gaussian_window(size, sigma)
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  b, h, wd, c = x.shape
  out = np.zeros(b)
  for n in range(b):
    vals = []
    for ch in range(c):
      for i in range(h - size + 1):
        for j in range(wd - size + 1):
          px = x[n, i : i + size, j : j + size, ch]
          py = y[n, i : i + size, j : j + size, ch]
          mx, my = np.sum(w * px), np.sum(w * py)
          vx = np.sum(w * (px - mx) ** 2)
          vy = np.sum(w * (py - my) ** 2)
          cxy = np.sum(w * (px - mx) * (py - my))
          vals.append(
            ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
          )
    out[n] = np.mean(vals)
  return out


def _images(rng, shape):
  return rng.uniform(-1, 1, shape).astype(np.float32)


def test_ssim_matches_numpy_reference():
  rng = np.random.default_rng(0)
  x = _images(rng, (2, 14, 15, 2))
  y = np.clip(x + 0.3 * rng.normal(size=x.shape), -1, 1).astype(np.float32)
  got = np.asarray(jax.jit(metrics.ssim)(x, y))
  np.testing.assert_allclose(got, _ssim_reference(x, y), rtol=1e-4, atol=1e-5)


def test_ssim_of_identical_images_is_one():
  x = _images(np.random.default_rng(1), (3, 16, 16, 1))
  np.testing.assert_allclose(np.asarray(metrics.ssim(x, x)), 1.0, atol=1e-5)


def test_ssim_of_constant_shift_has_closed_form():
  # Constant images: no variance, so SSIM is the luminance term (2ab + C1) / (a^2 + b^2 + C1).
  a, b = -0.2, 0.3
  c1 = (0.01 * 2.0) ** 2
  x = np.full((1, 12, 12, 3), a, np.float32)
  y = np.full((1, 12, 12, 3), b, np.float32)
  expected = (2 * a * b + c1) / (a * a + b * b + c1)
  np.testing.assert_allclose(float(metrics.ssim(x, y)[0]), expected, rtol=1e-4)
  # A textured image shifted by a constant keeps its structure: only luminance drops.
  t = _images(np.random.default_rng(2), (1, 12, 12, 1)) * 0.5
  got = float(metrics.ssim(t, t + 0.4)[0])
  np.testing.assert_allclose(got, _ssim_reference(t, t + 0.4)[0], rtol=1e-4)
  assert 0.0 < got < 1.0


def test_ssim_rejects_small_images():
  with pytest.raises(ValueError, match="at least 11x11"):
    metrics.ssim(np.zeros((1, 8, 8, 1)), np.zeros((1, 8, 8, 1)))


def test_mse_psnr_and_bits_per_dim():
  rng = np.random.default_rng(3)
  x = _images(rng, (4, 5, 5, 3))
  y = _images(rng, (4, 5, 5, 3))
  mask = np.array([1, 1, 0, 1], np.float32)
  per_image = ((x.astype(np.float64) - y) ** 2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(float(metrics.mse(x, y)), per_image.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics.mse(x, y, mask)), per_image[[0, 1, 3]].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics.psnr(0.01)), 10 * np.log10(4 / 0.01), rtol=1e-6)
  np.testing.assert_allclose(float(metrics.bits_per_dim(np.log(2.0) * 300, 100)), 3.0, rtol=1e-6)


def test_codebook_metrics_per_level():
  out = metrics.codebook_metrics({"top": np.array([2, 2, 0, 0]), "bottom": np.array([1, 0, 0, 3])})
  assert out["top/usage"] == pytest.approx(0.5)
  assert out["top/perplexity"] == pytest.approx(2.0, rel=1e-5)
  assert out["top/top_share"] == pytest.approx(0.5)
  p = np.array([0.25, 0.75])
  assert out["bottom/perplexity"] == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-5)


def test_gaussian_blur_keeps_constants_at_the_border():
  x = np.full((1, 7, 9, 2), 0.7, np.float32)
  np.testing.assert_allclose(np.asarray(metrics.gaussian_blur(x, 1.5)), 0.7, rtol=1e-5)


class _Halve(nn.Module):
  """Stand-in stage-1 model: reconstructs x * scale; codes are binned pixel values."""

  num_codes: int = 8

  def setup(self):
    self.scale = self.param("scale", nn.initializers.constant(0.5), ())

  def __call__(self, x, train=False):
    return x * self.scale, {}

  def encode_to_indices(self, x):
    q = jnp.clip(jnp.floor((x[..., 0] + 1) / 2 * self.num_codes), 0, self.num_codes - 1)
    q = q.astype(jnp.int32)
    return q[:, ::4, ::4], q[:, ::2, ::2]


def _batches(rng):
  """Two padded batches of 16x16 images; padding rows hold junk that must not count."""
  images = _images(rng, (6, 16, 16, 1)) * 0.8
  first = {"image": images[:4], "mask": np.ones(4, np.float32)}
  second = {
    "image": np.concatenate([images[4:], np.full((2, 16, 16, 1), 5.0, np.float32)]),
    "mask": np.array([1, 1, 0, 0], np.float32),
  }
  return images, [first, second]


def test_reconstruction_evaluator_ignores_padding():
  images, batches = _batches(np.random.default_rng(4))
  model = _Halve()
  variables = {"params": {"scale": jnp.float32(0.5)}}
  out = ReconstructionEvaluator(model).run(variables, batches)
  out.update(SsimEvaluator(model).run(variables, batches))
  recons = images.astype(np.float64) * 0.5
  mse = ((recons - images) ** 2).mean()
  assert out["examples"] == 6
  np.testing.assert_allclose(out["mse"], mse, rtol=1e-5)
  np.testing.assert_allclose(out["psnr"], 10 * np.log10(4 / mse), rtol=1e-5)
  np.testing.assert_allclose(out["ssim"], _ssim_reference(images, recons).mean(), rtol=1e-4)


def test_codebook_evaluator_counts_real_codes_per_level():
  images, batches = _batches(np.random.default_rng(5))
  model = _Halve(num_codes=8)
  variables = {"params": {"scale": jnp.float32(0.5)}}
  out = CodebookEvaluator(model, num_codes=8).run(variables, batches)
  q = np.clip(np.floor((images[..., 0].astype(np.float64) + 1) / 2 * 8), 0, 7).astype(int)
  for name, codes in (("top", q[:, ::4, ::4]), ("bottom", q[:, ::2, ::2])):
    counts = np.bincount(codes.reshape(-1), minlength=8)
    p = counts / counts.sum()
    nz = p[p > 0]
    assert out[f"{name}/usage"] == pytest.approx(np.mean(counts > 0))
    assert out[f"{name}/perplexity"] == pytest.approx(np.exp(-np.sum(nz * np.log(nz))), rel=1e-5)
    assert out[f"{name}/top_share"] == pytest.approx(p.max(), rel=1e-5)
  assert out["examples"] == 6
