"""Image and code metrics of a stage-1 model: MSE, PSNR, SSIM, codebook usage, bits per dim.

Every function here is pure over arrays, so an evaluator can jit the per-batch part and sum
over a split on the host. Images are float [B, H, W, C] in [-1, 1], so the peak-to-peak range
of PSNR and SSIM is 2 (`DATA_RANGE`).

SSIM is the Gaussian-window index of Wang, Bovik, Sheikh and Simoncelli (2004): an 11x11
Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, computed on the "valid" part of the
image (as the authors' MATLAB code and `tf.image.ssim`), per channel, then averaged over
channels and positions. Unlike the authors' later MATLAB script, the images are never
downsampled first: the index is that of the images as given.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vqjax.models import quantizer

DATA_RANGE = 2.0  # images in [-1, 1]
HIGHEST = jax.lax.Precision.HIGHEST


def squared_error(images: jax.Array, recons: jax.Array) -> jax.Array:
  """Per-image mean squared error over height, width and channels.

  Args:
    images: float [B, H, W, C].
    recons: float [B, H, W, C].

  Returns:
    float32 [B].
  """
  diff = recons.astype(jnp.float32) - images.astype(jnp.float32)
  return jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))


def mse(images: jax.Array, recons: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean squared error over the real images of a batch.

  Args:
    images: float [B, H, W, C].
    recons: float [B, H, W, C].
    mask: optional float [B], 0 on padding rows.

  Returns:
    float32 scalar: the mean of the per-image MSEs over the examples with mask 1.
  """
  per_image = squared_error(images, recons)
  if mask is None:
    return jnp.mean(per_image)
  mask = jnp.asarray(mask, jnp.float32)
  return jnp.sum(per_image * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def psnr(mse_value: jax.Array | float, data_range: float = DATA_RANGE) -> jax.Array:
  """Peak signal-to-noise ratio in dB of a mean squared error.

  Pass the split's mean MSE (not per-image values to be averaged afterwards): this is the
  PSNR the training logs report, 10 log10(4 / MSE) for images in [-1, 1].

  Args:
    mse_value: mean squared error (scalar or array).
    data_range: peak-to-peak range of the images (2 for [-1, 1]).

  Returns:
    float32, the shape of `mse_value`; MSEs below 1e-12 count as 1e-12 (a finite PSNR).
  """
  m = jnp.maximum(jnp.asarray(mse_value, jnp.float32), 1e-12)
  return 10.0 * jnp.log10(data_range**2 / m)


def gaussian_kernel_1d(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  """Normalised 1-D Gaussian taps centred on the middle one (float64 [size])."""
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  g = np.exp(-(x**2) / (2.0 * sigma**2))
  return g / g.sum()


def _separable_filter(x: jax.Array, taps: np.ndarray, padding: str) -> jax.Array:
  """Filters each channel of x [B, H, W, C] with the outer product of `taps` with itself.

  Two 1-D depthwise convolutions: the 2-D Gaussian is separable, and the separable form costs
  2k instead of k^2 multiplications per pixel.
  """
  c = x.shape[-1]
  k = jnp.asarray(taps, x.dtype)
  dn = ("NHWC", "HWIO", "NHWC")
  rows = jnp.tile(k.reshape(-1, 1, 1, 1), (1, 1, 1, c))
  cols = jnp.tile(k.reshape(1, -1, 1, 1), (1, 1, 1, c))
  for kernel in (rows, cols):
    x = jax.lax.conv_general_dilated(
      x, kernel, (1, 1), padding, dimension_numbers=dn, feature_group_count=c, precision=HIGHEST
    )
  return x


def gaussian_blur(x: jax.Array, sigma: float, size: int | None = None) -> jax.Array:
  """Gaussian blur of each channel of x [B, H, W, C], same size as x.

  Positions near the border average only the pixels inside the image (the filter of the
  zero-padded image is divided by the filter of ones), so borders are not darkened.

  Args:
    x: float [B, H, W, C].
    sigma: standard deviation in pixels.
    size: window side; default 2 * ceil(3 sigma) + 1.

  Returns:
    float32 [B, H, W, C].
  """
  size = 2 * int(np.ceil(3.0 * sigma)) + 1 if size is None else size
  taps = gaussian_kernel_1d(size, sigma)
  x = jnp.asarray(x, jnp.float32)
  weight = _separable_filter(jnp.ones((1, *x.shape[1:3], 1), jnp.float32), taps, "SAME")
  return _separable_filter(x, taps, "SAME") / weight


def ssim_map(
  images: jax.Array,
  recons: jax.Array,
  data_range: float = DATA_RANGE,
  window_size: int = 11,
  sigma: float = 1.5,
  k1: float = 0.01,
  k2: float = 0.03,
) -> jax.Array:
  """Local SSIM of every valid window position and channel.

  Args:
    images: float [B, H, W, C]; H and W at least `window_size`.
    recons: float [B, H, W, C].
    data_range: peak-to-peak range L of the images (C1 = (K1 L)^2, C2 = (K2 L)^2).
    window_size: side of the Gaussian window.
    sigma: standard deviation of the Gaussian window.
    k1: the constant K1.
    k2: the constant K2.

  Returns:
    float32 [B, H - window_size + 1, W - window_size + 1, C].
  """
  if images.shape != recons.shape:
    raise ValueError(f"ssim of images {images.shape} and recons {recons.shape}")
  if images.ndim != 4 or min(images.shape[1:3]) < window_size:
    raise ValueError(
      f"ssim needs NHWC images of at least {window_size}x{window_size}, got {images.shape}"
    )
  x = images.astype(jnp.float32)
  y = recons.astype(jnp.float32)
  taps = gaussian_kernel_1d(window_size, sigma)
  # One filter pass over the five moments stacked along channels.
  c = x.shape[-1]
  moments = _separable_filter(jnp.concatenate([x, y, x * x, y * y, x * y], -1), taps, "VALID")
  mu_x, mu_y, xx, yy, xy = (moments[..., i * c : (i + 1) * c] for i in range(5))
  var_x = xx - mu_x * mu_x
  var_y = yy - mu_y * mu_y
  cov = xy - mu_x * mu_y
  c1 = (k1 * data_range) ** 2
  c2 = (k2 * data_range) ** 2
  num = (2.0 * mu_x * mu_y + c1) * (2.0 * cov + c2)
  den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
  return num / den


def ssim(
  images: jax.Array,
  recons: jax.Array,
  data_range: float = DATA_RANGE,
  window_size: int = 11,
  sigma: float = 1.5,
  k1: float = 0.01,
  k2: float = 0.03,
) -> jax.Array:
  """Mean SSIM of each image pair (Wang et al. 2004; see the module docstring).

  Args:
    images: float [B, H, W, C] (reference images).
    recons: float [B, H, W, C] (e.g. reconstructions).
    data_range: peak-to-peak range of the images (2 for [-1, 1]).
    window_size: side of the Gaussian window (11).
    sigma: standard deviation of the window (1.5).
    k1: the constant K1 (0.01).
    k2: the constant K2 (0.03).

  Returns:
    float32 [B]: per channel the mean over window positions, then the mean over channels
    (with equal sizes per channel this is the mean of the whole SSIM map).
  """
  m = ssim_map(images, recons, data_range, window_size, sigma, k1, k2)
  return jnp.mean(m, axis=(1, 2, 3))


def masked_mean(values: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean of per-example values [B] over the examples with mask 1 (all when mask is None)."""
  values = jnp.asarray(values, jnp.float32)
  if mask is None:
    return jnp.mean(values)
  mask = jnp.asarray(mask, jnp.float32)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def code_counts(indices: jax.Array, num_codes: int, mask: jax.Array | None = None) -> jax.Array:
  """Histogram of a code map's indices over the real examples of a batch.

  Args:
    indices: int code map [B, h, w].
    num_codes: codebook size K.
    mask: optional float [B], 0 on padding rows (their codes are not counted).

  Returns:
    float32 [K] (see `quantizer.code_histogram`).
  """
  return quantizer.code_histogram(indices, num_codes, weights=mask)


def codebook_metrics(counts: Mapping[str, jax.Array | np.ndarray]) -> dict[str, float]:
  """Usage, perplexity and top share of each level's code histogram.

  Args:
    counts: level name ("top", "bottom", ...) -> [K] histogram summed over a split.

  Returns:
    {"{level}/usage", "{level}/perplexity", "{level}/top_share"} as floats, from
    `quantizer.usage_metrics`.
  """
  out = {}
  for level, c in counts.items():
    for key, value in quantizer.usage_metrics(jnp.asarray(c)).items():
      out[f"{level}/{key}"] = float(value)
  return out


def bits_per_dim(nll_nats_total: float | jax.Array, num_dims: int | float) -> jax.Array:
  """Negative log-likelihood in bits per dimension.

  Args:
    nll_nats_total: total negative log-likelihood in nats (e.g. summed over a split's code
      maps).
    num_dims: the number of dimensions it covers (e.g. examples * H * W * C of the images).

  Returns:
    float32 nll / (num_dims * ln 2).
  """
  return jnp.asarray(nll_nats_total, jnp.float32) / (float(num_dims) * float(np.log(2.0)))


def unigram_bits_per_code(
  train_counts: np.ndarray, test_counts: np.ndarray, smoothing: float = 1.0
) -> float:
  """Held-out bits per code of the unigram baseline: every position drawn independently from
  the training split's code frequencies (add-`smoothing` counts, so an unseen code costs a
  finite number of bits). A prior that does not beat it has learnt nothing about context.

  Args:
    train_counts: [K] how often each code occurs in the training code maps.
    test_counts: [K] how often each occurs in the held-out code maps.
    smoothing: pseudo-count added to every code (Laplace's rule for 1).

  Returns:
    The cross-entropy -sum_k test_k log2 p_k / sum_k test_k, in bits, float64.
  """
  train = np.asarray(train_counts, np.float64) + smoothing
  test = np.asarray(test_counts, np.float64)
  if train.shape != test.shape or train.ndim != 1 or test.sum() <= 0:
    raise ValueError(f"need [K] counts with held-out codes, got {train.shape} and {test.shape}")
  log_p = np.log2(train) - np.log2(train.sum())
  return float(-(test * log_p).sum() / test.sum())
