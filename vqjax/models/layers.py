"""Building blocks shared by the autoencoders: residual blocks, strided encoders and decoders,
and the stride-2 convolution and transposed convolution (computed by models/strided.py).

All modules are NHWC. Kernels are stored as (kh, kw, in, out); the transposed convolution keeps
PyTorch's ConvTranspose2d orientation (weight[ky, kx] multiplies input pixel i into output pixel
2*i - padding + ky), so weights imported from PyTorch stay valid whichever way it is computed.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqjax.models import strided
from vqjax.models.impl import Impl


class UpConv(nn.Module):
  """ConvTranspose2d(kernel 4, stride 2, padding 1) as in PyTorch: doubles H and W.

  `impl` picks one of the exact forms of models/strided.py (`Impl.upconv`, chosen when the
  model is built); every form computes the same function of the same parameters.
  `channel_multiple` > 1 pads the convolution's output channels to a multiple of it (cropped
  after; strided.up).
  """

  features: int
  impl: str = "subpixel"
  channel_multiple: int = 0
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
    y = strided.up(
      x.astype(self.dtype), kernel.astype(self.dtype), self.impl, self.channel_multiple
    )
    return y + bias.astype(self.dtype)


class DownConv(nn.Module):
  """Conv2d(kernel 4, stride 2, padding 1): halves H and W. The parameters are those of
  `nn.Conv(features, (4, 4), strides=2, padding=1)` (names, shapes, initialisers), so
  checkpoints and imported PyTorch weights are unchanged; `impl` picks a form of
  models/strided.py (`Impl.downconv`, chosen when the model is built); `channel_multiple` > 1
  pads the input channels to a multiple of it (strided.down).
  """

  features: int
  impl: str = "lax"
  channel_multiple: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    kernel = self.param(
      "kernel", nn.initializers.lecun_normal(), (4, 4, c, self.features), self.param_dtype
    )
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    y = strided.down(
      x.astype(self.dtype), kernel.astype(self.dtype), self.impl, self.channel_multiple
    )
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
  impl: Impl = Impl()
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
      # Only the image side's channel count (e.g. RGB) is ever not a multiple of 8.
      multiple = self.impl.channel_multiple if i == 0 else 0
      x = DownConv(features, self.impl.downconv, multiple, name=f"down{i}", **kw)(x)
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
  impl: Impl = Impl()
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
      multiple = self.impl.channel_multiple if last else 0
      x = UpConv(features, self.impl.upconv, multiple, name=f"up{i}", **kw)(x)
      if not last:
        x = nn.relu(x)
    return x


class Upsampler(nn.Module):
  """A chain of stride-2 transposed convs (ReLU between) that keeps the channel count."""

  features: int
  factor: int
  impl: Impl = Impl()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(_log2_stride(self.factor)):
      if i > 0:
        x = nn.relu(x)
      x = UpConv(
        self.features,
        impl=self.impl.upconv,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f"up{i}",
      )(x)
    return x
