"""Building blocks shared by the autoencoders: residual blocks, strided encoders and decoders,
and an exact, fast stride-2 transposed convolution.

All modules are NHWC. Kernels are stored as (kh, kw, in, out); the transposed convolution keeps
PyTorch's ConvTranspose2d orientation (weight[ky, kx] multiplies input pixel i into output pixel
2*i - padding + ky), so weights imported from PyTorch stay valid whichever way it is computed.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Output phase r (even/odd) of a k=4, s=2, p=1 transposed conv, as a 3-tap window over the
# input padded by one: tap t of the window multiplies kernel row _PHASE_TAPS[r][t] (-1 = none).
# Derived from o = 2*i - 1 + k: even o = 2m uses x[m-1]*w[3] + x[m]*w[1], odd o = 2m+1 uses
# x[m]*w[2] + x[m+1]*w[0].
_PHASE_TAPS = ((3, 1, -1), (-1, 2, 0))


def _phase_kernel(kernel: jax.Array) -> jax.Array:
  """(4, 4, I, O) transposed-conv kernel -> (3, 3, I, 4*O) kernel of the equivalent conv whose
  output channels are the four (row phase, column phase) outputs, phase-major."""
  zero = jnp.zeros_like(kernel[0, 0])
  phases = []
  for ry in range(2):
    for rx in range(2):
      rows = []
      for ty in range(3):
        row = []
        for tx in range(3):
          ky, kx = _PHASE_TAPS[ry][ty], _PHASE_TAPS[rx][tx]
          row.append(zero if ky < 0 or kx < 0 else kernel[ky, kx])
        rows.append(jnp.stack(row))
      phases.append(jnp.stack(rows))  # (3, 3, I, O)
  return jnp.concatenate(phases, axis=-1)


def depth_to_space2(y: jax.Array, out_channels: int) -> jax.Array:
  """[B, H, W, 4*C] with channels ordered (ry, rx, c) -> [B, 2H, 2W, C]."""
  b, h, w, _ = y.shape
  y = y.reshape(b, h, w, 2, 2, out_channels)
  y = y.transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(b, 2 * h, 2 * w, out_channels)


class UpConv(nn.Module):
  """ConvTranspose2d(kernel 4, stride 2, padding 1) as in PyTorch: doubles H and W.

  impl="subpixel" computes it as one 3x3 convolution to 4x the channels followed by
  depth-to-space (much faster to differentiate on CPUs than XLA's transposed conv); impl="lax"
  uses `jax.lax.conv_transpose`. Both compute the same function of the same parameters.
  """

  features: int
  impl: str = "subpixel"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_features = x.shape[-1]
    fan_in = in_features * 16
    kernel = self.param(
      "kernel",
      nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
      (4, 4, in_features, self.features),
      self.param_dtype,
    )
    bound = 1.0 / math.sqrt(fan_in)
    bias = self.param(
      "bias",
      lambda rng, shape, dtype: jax.random.uniform(rng, shape, dtype, -bound, bound),
      (self.features,),
      self.param_dtype,
    )
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    if self.impl == "subpixel":
      y = jax.lax.conv_general_dilated(
        x,
        _phase_kernel(kernel),
        window_strides=(1, 1),
        padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
      )
      with jax.named_scope("depth_to_space"):  # the interleave, apart from the conv in a profile
        y = depth_to_space2(y, self.features)
    elif self.impl == "lax":
      # A transposed conv is the gradient of a conv: flip the kernel, dilate the input by 2
      # and pad by k - 1 - p = 2 on each side.
      y = jax.lax.conv_general_dilated(
        x,
        kernel[::-1, ::-1],
        window_strides=(1, 1),
        padding=((2, 2), (2, 2)),
        lhs_dilation=(2, 2),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
      )
    else:
      raise ValueError(f"unknown UpConv impl {self.impl!r}; expected 'subpixel' or 'lax'")
    return y + bias.astype(self.dtype)


class ResBlock(nn.Module):
  """x + conv1x1(relu(conv3x3(relu(x)))), the residual block of VQ-VAE and VQ-VAE-2."""

  res_channels: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.relu(x)
    h = nn.Conv(
      self.res_channels,
      (3, 3),
      padding=1,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="conv3",
    )(h)
    h = nn.relu(h)
    h = nn.Conv(x.shape[-1], (1, 1), dtype=self.dtype, param_dtype=self.param_dtype, name="conv1")(
      h
    )
    return x + h


def _log2_stride(stride: int) -> int:
  n = int(round(math.log2(stride))) if stride > 0 else -1
  if n < 1 or 2**n != stride:
    raise ValueError(f"stride must be a power of two >= 2, got {stride}")
  return n


class Encoder(nn.Module):
  """Strided encoder: log2(stride) 4x4 stride-2 convs (ReLU between), a 3x3 conv, residual
  blocks and a final ReLU. The first down conv has channels // 2 outputs, as in VQ-VAE-2."""

  channels: int
  res_channels: int
  num_res_blocks: int
  stride: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x.astype(self.dtype)
    for i in range(_log2_stride(self.stride)):
      features = self.channels // 2 if i == 0 else self.channels
      if i > 0:
        x = nn.relu(x)
      x = nn.Conv(features, (4, 4), strides=2, padding=1, name=f"down{i}", **kw)(x)
    x = nn.relu(x)
    x = nn.Conv(self.channels, (3, 3), padding=1, name="conv_out", **kw)(x)
    for i in range(self.num_res_blocks):
      x = ResBlock(self.res_channels, name=f"res{i}", **kw)(x)
    return nn.relu(x)


class Decoder(nn.Module):
  """Decoder: a 3x3 conv, residual blocks, ReLU, then log2(stride) 4x4 stride-2 transposed
  convs (ReLU between; intermediate ones have channels // 2 outputs)."""

  out_channels: int
  channels: int
  res_channels: int
  num_res_blocks: int
  stride: int
  upconv_impl: str = "subpixel"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x.astype(self.dtype)
    x = nn.Conv(self.channels, (3, 3), padding=1, name="conv_in", **kw)(x)
    for i in range(self.num_res_blocks):
      x = ResBlock(self.res_channels, name=f"res{i}", **kw)(x)
    x = nn.relu(x)
    n = _log2_stride(self.stride)
    for i in range(n):
      last = i == n - 1
      features = self.out_channels if last else self.channels // 2
      x = UpConv(features, impl=self.upconv_impl, name=f"up{i}", **kw)(x)
      if not last:
        x = nn.relu(x)
    return x


class Upsampler(nn.Module):
  """A chain of stride-2 transposed convs (ReLU between) that keeps the channel count."""

  features: int
  factor: int
  upconv_impl: str = "subpixel"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(_log2_stride(self.factor)):
      if i > 0:
        x = nn.relu(x)
      x = UpConv(
        self.features,
        impl=self.upconv_impl,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f"up{i}",
      )(x)
    return x
