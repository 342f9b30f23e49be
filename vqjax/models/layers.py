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

RELU_IMPLS = ("auto", "jax", "output", "stored")


@jax.custom_vjp
def _relu_from_output(x: jax.Array) -> jax.Array:
  return jnp.maximum(x, 0)


def _relu_fwd(x):
  y = jnp.maximum(x, 0)
  return y, y


def _relu_bwd(y, g):
  # y > 0 exactly where x > 0: the same derivative as jax.nn.relu's (0 at x = 0).
  return (jnp.where(y > 0, g, jnp.zeros_like(g)),)


_relu_from_output.defvjp(_relu_fwd, _relu_bwd)


def _relu_branch(x: jax.Array) -> jax.Array:
  return jnp.maximum(x, 0)


@jax.custom_jvp
def _relu_stored(x: jax.Array) -> jax.Array:
  return _relu_branch(x)


@_relu_stored.defjvp
def _relu_stored_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  # Both branches are the same function: the data-dependent predicate only makes the
  # conditional opaque to XLA's fusion, so the activation is computed once, into its own buffer.
  # A JVP rule (not a VJP one), so forward-mode differentiation works too; reverse mode keeps
  # the mask y > 0 (the same derivative as jax.nn.relu's, 0 at x = 0).
  y = jax.lax.cond(x.reshape(-1)[0] > 0, _relu_branch, _relu_branch, x)
  return y, jnp.where(y > 0, t, jnp.zeros_like(t))


def resolve_relu(impl: str) -> str:
  """`impl`, with "auto" replaced by the form measured fastest on this platform: "stored" on the
  CPU, "jax" elsewhere (benchmarks/RESULTS.md)."""
  if impl not in RELU_IMPLS:
    raise ValueError(f"unknown relu impl {impl!r}; expected one of {', '.join(RELU_IMPLS)}")
  if impl == "auto":
    return "stored" if jax.default_backend() == "cpu" else "jax"
  return impl


def relu(x: jax.Array, impl: str = "jax") -> jax.Array:
  """max(x, 0) with the derivative of `jax.nn.relu` (0 at x = 0), in one of three forms that
  compute the same values and gradients and differ only in what XLA keeps for the backward pass:

  - "jax": `jax.nn.relu`; the backward pass reads the mask x > 0 from the pre-activation.
  - "output": the mask is read from the output, so the pre-activation (a convolution's output
    plus its bias) has one user, which lets XLA fuse bias and ReLU into a cuDNN convolution.
    A `jax.custom_vjp` rule: reverse mode only (`jax.jvp` through it raises).
  - "stored": the mask from the output too, and under differentiation (forward or reverse
    mode) the activation is computed inside a `lax.cond` whose branches are both max(x, 0).
    XLA:CPU otherwise recomputes bias + ReLU inside each transpose that feeds a kernel-gradient
    convolution, and a transpose with an elementwise op fused in runs 3-6x slower than a plain
    transposing copy (jaxlib 0.10). Made for the CPU; undifferentiated calls (inference) get
    plain max(x, 0).
  - "auto": "stored" on the CPU, "jax" elsewhere.
  """
  impl = resolve_relu(impl)
  if impl == "jax":
    return nn.relu(x)
  x = jnp.asarray(x)
  if impl == "output":
    return _relu_from_output(x)
  return _relu_stored(x) if x.size else jnp.maximum(x, 0)


class UpConv(nn.Module):
  """ConvTranspose2d(kernel 4, stride 2, padding 1) as in PyTorch: doubles H and W.

  `impl` picks one of the exact forms of models/strided.py ("auto": the fastest measured on
  the platform); every form computes the same function of the same parameters.
  `channel_multiple` > 1 pads the convolution's output channels to a multiple of it (cropped
  after; strided.up).
  """

  features: int
  impl: str = "auto"
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
  models/strided.py ("auto": the fastest measured on the platform); `channel_multiple` > 1
  pads the input channels to a multiple of it (strided.down).
  """

  features: int
  impl: str = "auto"
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
  relu_impl: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = relu(x, self.relu_impl)
    h = nn.Conv(
      self.res_channels,
      (3, 3),
      padding=1,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="conv3",
    )(h)
    h = relu(h, self.relu_impl)
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
  downconv_impl: str = "auto"
  relu_impl: str = "auto"
  channel_multiple: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x.astype(self.dtype)
    for i in range(_log2_stride(self.stride)):
      features = self.channels // 2 if i == 0 else self.channels
      if i > 0:
        x = relu(x, self.relu_impl)
      # Only the image side's channel count (e.g. RGB) is ever not a multiple of 8.
      multiple = self.channel_multiple if i == 0 else 0
      x = DownConv(features, self.downconv_impl, multiple, name=f"down{i}", **kw)(x)
    x = relu(x, self.relu_impl)
    x = nn.Conv(self.channels, (3, 3), padding=1, name="conv_out", **kw)(x)
    for i in range(self.num_res_blocks):
      x = ResBlock(self.res_channels, self.relu_impl, name=f"res{i}", **kw)(x)
    return relu(x, self.relu_impl)


class Decoder(nn.Module):
  """Decoder: a 3x3 conv, residual blocks, ReLU, then log2(stride) 4x4 stride-2 transposed
  convs (ReLU between; intermediate ones have channels // 2 outputs)."""

  out_channels: int
  channels: int
  res_channels: int
  num_res_blocks: int
  stride: int
  upconv_impl: str = "auto"
  relu_impl: str = "auto"
  channel_multiple: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x.astype(self.dtype)
    x = nn.Conv(self.channels, (3, 3), padding=1, name="conv_in", **kw)(x)
    for i in range(self.num_res_blocks):
      x = ResBlock(self.res_channels, self.relu_impl, name=f"res{i}", **kw)(x)
    x = relu(x, self.relu_impl)
    n = _log2_stride(self.stride)
    for i in range(n):
      last = i == n - 1
      features = self.out_channels if last else self.channels // 2
      multiple = self.channel_multiple if last else 0
      x = UpConv(features, self.upconv_impl, multiple, name=f"up{i}", **kw)(x)
      if not last:
        x = relu(x, self.relu_impl)
    return x


class Upsampler(nn.Module):
  """A chain of stride-2 transposed convs (ReLU between) that keeps the channel count."""

  features: int
  factor: int
  upconv_impl: str = "auto"
  relu_impl: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(_log2_stride(self.factor)):
      if i > 0:
        x = relu(x, self.relu_impl)
      x = UpConv(
        self.features,
        impl=self.upconv_impl,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f"up{i}",
      )(x)
    return x
