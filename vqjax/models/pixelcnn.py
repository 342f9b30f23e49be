"""Gated PixelCNN prior over VQ-VAE code maps (van den Oord et al. 2016, "Conditional Image
Generation with PixelCNN Decoders").

The model gives, for every position of an integer code map [B, H, W], logits over the code at
that position given the codes before it in raster order (and, optionally, a class label and
coarser code maps, which are fully known). It is the stage-2 prior of VQ-VAE and VQ-VAE-2.

Causality comes from padding + slicing, not from masked kernels: every convolution is a VALID
convolution over an input padded on the top / left only, so no weight can ever see the future
and no parameter is wasted on zeroed taps.

- The vertical stack uses (k//2 + 1, k) kernels over rows i - k//2 .. i: its output at row i
  sees rows <= i, every column within reach. It reaches the horizontal stack only after a
  one-row down-shift, so the horizontal stack at row i sees rows < i of it. It is never fed
  back from the horizontal stack.
- The horizontal stack uses (1, w) kernels over the current row: columns j - k//2 .. j - 1 in
  the first layer (type "A", which excludes the current pixel) and j - k//2 .. j in later
  layers (type "B"; the horizontal features at j already exclude code j).
- The first layer has no residual connection, since its input still holds code (i, j).

Because the vertical stack covers whole rows above (its width grows by k//2 per layer on each
side), the receptive field has no blind spot: with enough layers the prediction at (i, j)
depends on every earlier position, including those above and to the right.

Each layer computes tanh(a) * sigmoid(b) where [a, b] is the stack's 2C pre-activation plus the
conditioning terms: a per-layer bias from a class label embedding (num_classes > 0), and a
per-layer 1x1 projection of spatial features built from coarser code maps (cond_channels > 0),
each embedded, processed by a small residual conv block at its own resolution and
nearest-upsampled to H x W. Horizontal gated outputs feed a residual 1x1 and a skip 1x1; the
skips are summed, then ReLU -> 1x1 -> ReLU -> 1x1 gives the logits, float32 whatever the
compute dtype (float64 under float64).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def down_shift(x: jax.Array) -> jax.Array:
  """Shifts [B, H, W, C] down by one row (zeros enter at the top): row i gets row i - 1."""
  return jnp.pad(x, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]


def gate(x: jax.Array) -> jax.Array:
  """Gated activation tanh(a) * sigmoid(b) of x = [a, b] split on the last axis."""
  a, b = jnp.split(x, 2, axis=-1)
  return jnp.tanh(a) * jax.nn.sigmoid(b)


class VerticalConv(nn.Module):
  """Convolution whose output at row i sees input rows i - k//2 .. i and columns j +- k//2.

  Attributes:
    features: output channels.
    kernel_size: odd width k of the window; its height is k//2 + 1.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  features: int
  kernel_size: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps [B, H, W, C] -> [B, H, W, features]."""
    r = self.kernel_size // 2
    # Padding only above (and on both sides) makes the VALID window end at the current row.
    x = jnp.pad(x, ((0, 0), (r, 0), (r, r), (0, 0)))
    conv = nn.Conv(
      self.features,
      (r + 1, self.kernel_size),
      padding="VALID",
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="conv",
    )
    return conv(x)


class HorizontalConv(nn.Module):
  """Convolution along the current row: columns j - k//2 .. j - 1 (mask "A") or .. j ("B").

  Attributes:
    features: output channels.
    kernel_size: odd k; the window covers k//2 pixels to the left (plus the current one for B).
    mask_type: "A" excludes the current pixel, "B" includes it.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  features: int
  kernel_size: int
  mask_type: str = "B"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps [B, H, W, C] -> [B, H, W, features]."""
    r = self.kernel_size // 2
    width = r if self.mask_type == "A" else r + 1
    w = x.shape[2]
    # Left padding by `width` puts the window for output j on columns j - width .. j - 1 (type
    # A); one column less of padding moves it to j - width + 1 .. j (type B). VALID then yields
    # W + 1 (or W) columns, of which the first W are the causal outputs.
    pad = width if self.mask_type == "A" else width - 1
    x = jnp.pad(x, ((0, 0), (0, 0), (pad, 0), (0, 0)))
    conv = nn.Conv(
      self.features,
      (1, width),
      padding="VALID",
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="conv",
    )
    return conv(x)[:, :, :w]


class ConditionEncoder(nn.Module):
  """Turns coarser code maps into one spatial feature map at the prior's resolution.

  Each map is embedded, passed through one residual block (ReLU -> 3x3 conv -> ReLU -> 1x1
  conv) at its own resolution, nearest-upsampled to H x W, and the levels are summed. The
  coarse maps are fully known, so these convolutions need no causality.

  Attributes:
    num_codes: vocabulary of the coarser maps.
    features: width of the conditioning features (cond_channels).
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  num_codes: int
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, condition: Sequence[jax.Array], height: int, width: int) -> jax.Array:
    """Maps a sequence of int [B, h_i, w_i] (coarsest first) -> [B, height, width, features]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    total = None
    for level, codes in enumerate(condition):
      h, w = codes.shape[1:]
      x = nn.Embed(self.num_codes, self.features, name=f"embed_{level}", **kw)(codes)
      y = nn.Conv(self.features, (3, 3), padding="SAME", name=f"conv3_{level}", **kw)(nn.relu(x))
      y = nn.Conv(self.features, (1, 1), name=f"conv1_{level}", **kw)(nn.relu(y))
      x = x + y
      x = jnp.repeat(jnp.repeat(x, height // h, axis=1), width // w, axis=2)
      total = x if total is None else total + x
    return total


class GatedLayer(nn.Module):
  """One gated layer of both stacks, with its conditioning terms.

  Attributes:
    channels: width C of both stacks.
    kernel_size: odd kernel size k.
    mask_type: "A" for the first layer (no residual, current pixel excluded), else "B".
    num_classes: > 0 adds a per-layer bias embedded from the class label.
    dropout: dropout rate on the gated outputs (train only).
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  channels: int
  kernel_size: int
  mask_type: str = "B"
  num_classes: int = 0
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self,
    v: jax.Array,
    h: jax.Array,
    cond: jax.Array | None,
    label: jax.Array | None,
    train: bool,
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (vertical out, horizontal out, skip), each [B, H, W, C]."""
    c2 = 2 * self.channels
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    v_pre = VerticalConv(c2, self.kernel_size, name="v_conv", **kw)(v)
    h_pre = HorizontalConv(c2, self.kernel_size, self.mask_type, name="h_conv", **kw)(h)
    # The vertical pre-activation at row i has seen row i; the down-shift keeps the horizontal
    # stack at row i to rows < i.
    h_pre = h_pre + nn.Dense(c2, name="v_to_h", **kw)(down_shift(v_pre))
    if cond is not None:
      v_pre = v_pre + nn.Dense(c2, name="cond_v", **kw)(cond)
      h_pre = h_pre + nn.Dense(c2, name="cond_h", **kw)(cond)
    if label is not None:
      bias = nn.Embed(self.num_classes, 2 * c2, name="label_bias", **kw)(label)
      bias_v, bias_h = jnp.split(bias[:, None, None, :], 2, axis=-1)
      v_pre = v_pre + bias_v
      h_pre = h_pre + bias_h
    drop = nn.Dropout(self.dropout, deterministic=not train)
    v_out = drop(gate(v_pre))
    h_gated = drop(gate(h_pre))
    skip = nn.Dense(self.channels, name="skip", **kw)(h_gated)
    h_res = nn.Dense(self.channels, name="h_out", **kw)(h_gated)
    # Type A: h still holds code (i, j) itself, which a residual would leak into (i, j).
    h_out = h_res if self.mask_type == "A" else h + h_res
    return v_out, h_out, skip


class GatedPixelCNN(nn.Module):
  """Gated PixelCNN without blind spot over integer code maps.

  Attributes:
    num_codes: codebook size K (vocabulary of the codes and of any conditioning maps).
    channels: width C of the vertical and horizontal stacks.
    num_layers: number of gated layers (the first is type A, the rest type B).
    kernel_size: odd kernel size k (>= 3) of the stacks.
    num_classes: > 0 makes the model class-conditional; `label` is then required.
    cond_channels: > 0 makes the model conditional on coarser code maps; `condition` is then
      required.
    dropout: dropout rate on the gated outputs, applied only when train=True ("dropout" rng).
    dtype: compute dtype; the logits are float32 for any lower precision (float64 for float64).
    param_dtype: parameter dtype.
  """

  num_codes: int = 512
  channels: int = 128
  num_layers: int = 15
  kernel_size: int = 5
  num_classes: int = 0
  cond_channels: int = 0
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _check(self, codes, condition, label):
    if self.kernel_size < 3 or self.kernel_size % 2 == 0:
      raise ValueError(f"kernel_size must be odd and >= 3, got {self.kernel_size}")
    if codes.ndim != 3 or not jnp.issubdtype(codes.dtype, jnp.integer):
      raise ValueError(f"codes must be integer [B, H, W], got {codes.dtype} {codes.shape}")
    if self.num_classes > 0 and label is None:
      raise ValueError(f"label [B] is required when num_classes={self.num_classes} > 0")
    if self.num_classes == 0 and label is not None:
      raise ValueError("label given but num_classes=0: the model is not class-conditional")
    if label is not None and label.shape != codes.shape[:1]:
      raise ValueError(f"label must have shape {codes.shape[:1]}, got {label.shape}")
    if condition is not None and not isinstance(condition, (tuple, list)):
      raise ValueError("condition must be a tuple of code maps (coarsest first), not an array")
    if self.cond_channels > 0 and not condition:
      raise ValueError(
        f"condition (coarser code maps) is required when cond_channels={self.cond_channels} > 0"
      )
    if self.cond_channels == 0 and condition:
      raise ValueError("condition given but cond_channels=0: the model is not conditioned")
    b, height, width = codes.shape
    for level, c in enumerate(condition or ()):
      if c.ndim != 3 or c.shape[0] != b or height % c.shape[1] or width % c.shape[2]:
        raise ValueError(
          f"condition[{level}] must be [B={b}, h, w] with {height} % h == 0 and "
          f"{width} % w == 0, got {c.shape}"
        )

  @nn.compact
  def __call__(
    self,
    codes: jax.Array,
    condition: Sequence[jax.Array] | None = None,
    label: jax.Array | None = None,
    train: bool = False,
  ) -> jax.Array:
    """Logits of each code given the codes before it in raster order.

    Args:
      codes: int [B, H, W] in [0, num_codes).
      condition: None, or a sequence of int code maps of coarser levels, coarsest first, each
        [B, h_i, w_i] with H % h_i == 0 and W % w_i == 0.
      label: None, or int [B] class labels in [0, num_classes).
      train: enables dropout.

    Returns:
      float32 (float64 if dtype is) [B, H, W, num_codes] logits; position (i, j) depends
      only on codes before it in raster order (and on all of condition and label).
    """
    self._check(codes, condition, label)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    _, height, width = codes.shape
    x = nn.Embed(self.num_codes, self.channels, name="embed", **kw)(codes)
    cond = None
    if condition:
      cond = ConditionEncoder(self.num_codes, self.cond_channels, name="condition", **kw)(
        tuple(condition), height, width
      )
    v, h, skips = x, x, None
    for i in range(self.num_layers):
      layer = GatedLayer(
        self.channels,
        self.kernel_size,
        "A" if i == 0 else "B",
        self.num_classes,
        self.dropout,
        name=f"layer_{i}",
        **kw,
      )
      v, h, skip = layer(v, h, cond, label, train)
      skips = skip if skips is None else skips + skip
    y = nn.Dense(self.channels, name="head_hidden", **kw)(nn.relu(skips))
    # The last projection runs in at least float32 (float64 stays float64): softmax and
    # sampling over K codes want the precision, and it is a small part of the compute.
    out_dtype = jnp.promote_types(self.dtype, jnp.float32)
    logits = nn.Dense(
      self.num_codes, dtype=out_dtype, param_dtype=self.param_dtype, name="head_logits"
    )(nn.relu(y).astype(out_dtype))
    return logits
