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

Decode mode (`decode_position=p`, for incremental sampling, `vqjax/sampling/cached.py`) computes
only the logits at p from features of earlier positions kept in a mutable "cache" collection.
The vertical stack at row i - 1 needs only rows < i, so when row i starts (j == 0, under a
`nn.cond`) every layer computes that one whole row: a (k//2 + 1)-row window of its input (kept
in a ring of the last k//2 + 1 rows) gives the row of vertical features, of which the
horizontal stack of row i reads the down-shifted 1x1 projection. Each position then runs, per
layer, one horizontal output pixel from the cached inputs of the current row, its gate, skip and
residual. The coarser-code features are computed once (first call) and cached.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqjax.models import prior


def down_shift(x: jax.Array) -> jax.Array:
  """Shifts [B, H, W, C] down by one row (zeros enter at the top): row i gets row i - 1."""
  return jnp.pad(x, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]


def gate(x: jax.Array) -> jax.Array:
  """Gated activation tanh(a) * sigmoid(b) of x = [a, b] split on the last axis."""
  a, b = jnp.split(x, 2, axis=-1)
  return jnp.tanh(a) * jax.nn.sigmoid(b)


def window_indices(end: jax.Array, size: int) -> jax.Array:
  """The `size` indices end - size + 1 .. end (some may be negative: outside the map)."""
  return end - size + 1 + jnp.arange(size)


def zero_outside(x: jax.Array, indices: jax.Array, axis: int) -> jax.Array:
  """Zeroes the entries of x along `axis` whose index is negative (the causal zero padding)."""
  shape = [1] * x.ndim
  shape[axis] = indices.shape[0]
  return jnp.where((indices >= 0).reshape(shape), x, jnp.zeros((), x.dtype))


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
  def __call__(self, x: jax.Array, one_row: bool = False) -> jax.Array:
    """Maps [B, H, W, C] -> [B, H, W, features].

    With one_row=True, x holds only the k//2 + 1 input rows i - k//2 .. i (zeros for rows
    above the map) and the output is row i alone, [B, 1, W, features] (decode mode).
    """
    r = self.kernel_size // 2
    # Padding only above (and on both sides) makes the VALID window end at the current row.
    x = jnp.pad(x, ((0, 0), (0 if one_row else r, 0), (r, r), (0, 0)))
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

  @property
  def width(self) -> int:
    """Width of the window: k//2 (type A) or k//2 + 1 (type B) pixels ending at j - 1 or j."""
    return self.kernel_size // 2 + (self.mask_type != "A")

  @nn.compact
  def __call__(self, x: jax.Array, one_pixel: bool = False) -> jax.Array:
    """Maps [B, H, W, C] -> [B, H, W, features].

    With one_pixel=True, x is the window of one output pixel, [B, 1, width, C] (zeros left of
    the map), and the output is that pixel, [B, 1, 1, features] (decode mode).
    """
    width = self.width
    w = x.shape[2]
    # Left padding by `width` puts the window for output j on columns j - width .. j - 1 (type
    # A); one column less of padding moves it to j - width + 1 .. j (type B). VALID then yields
    # W + 1 (or W) columns, of which the first W are the causal outputs.
    pad = 0 if one_pixel else width if self.mask_type == "A" else width - 1
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

  Besides the whole-map `__call__`, decode mode uses its two halves: `vertical_row` (one row
  of the vertical stack, run when a row starts) and `horizontal_pixel` (one pixel of the
  horizontal stack). The three share the same parameters and arithmetic.

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

  def setup(self):
    c2 = 2 * self.channels
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.v_conv = VerticalConv(c2, self.kernel_size, **kw)
    self.h_conv = HorizontalConv(c2, self.kernel_size, self.mask_type, **kw)
    self.v_to_h = nn.Dense(c2, **kw)
    self.cond_v = nn.Dense(c2, **kw)
    self.cond_h = nn.Dense(c2, **kw)
    self.label_bias = nn.Embed(max(self.num_classes, 1), 2 * c2, **kw)
    self.skip = nn.Dense(self.channels, **kw)
    self.h_out = nn.Dense(self.channels, **kw)
    self.drop = nn.Dropout(self.dropout)

  def _conditioned(self, pre, cond, label, stack: int) -> jax.Array:
    """pre + the conditioning terms of the vertical (stack 0) or horizontal (1) stack."""
    if cond is not None:
      pre = pre + (self.cond_v if stack == 0 else self.cond_h)(cond)
    if label is not None:
      bias = jnp.split(self.label_bias(label), 2, axis=-1)[stack]
      pre = pre + bias[:, None, None, :]
    return pre

  def _horizontal(self, h_pre, h, cond, label, train) -> tuple[jax.Array, jax.Array]:
    """(horizontal out, skip) from the horizontal pre-activation and the layer input h."""
    h_gated = self.drop(gate(self._conditioned(h_pre, cond, label, 1)), deterministic=not train)
    skip = self.skip(h_gated)
    h_res = self.h_out(h_gated)
    # Type A: h still holds code (i, j) itself, which a residual would leak into (i, j).
    h_out = h_res if self.mask_type == "A" else h + h_res
    return h_out, skip

  def __call__(
    self,
    v: jax.Array,
    h: jax.Array,
    cond: jax.Array | None,
    label: jax.Array | None,
    train: bool,
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (vertical out, horizontal out, skip), each [B, H, W, C]."""
    v_pre = self.v_conv(v)
    # The vertical pre-activation at row i has seen row i; the down-shift keeps the horizontal
    # stack at row i to rows < i.
    h_pre = self.h_conv(h) + self.v_to_h(down_shift(v_pre))
    v_out = self.drop(gate(self._conditioned(v_pre, cond, label, 0)), deterministic=not train)
    h_out, skip = self._horizontal(h_pre, h, cond, label, train)
    return v_out, h_out, skip

  def vertical_row(
    self,
    window: jax.Array,
    cond_row: jax.Array | None,
    label: jax.Array | None,
    inside: jax.Array,
  ) -> tuple[jax.Array, jax.Array]:
    """One row m of the vertical stack (decode mode).

    Args:
      window: [B, k//2 + 1, W, C] vertical inputs of rows m - k//2 .. m (zeros above the map).
      cond_row: None or [B, 1, W, cond_channels] conditioning features of row m.
      label: None or int [B].
      inside: bool scalar, False when m = -1 (the row above the map, whose down-shifted
        features are zeros; window and cond_row are then ignored).

    Returns:
      (the horizontal stack's vertical term for row m + 1, [B, 1, W, 2C]; the vertical output
      of row m, [B, 1, W, C]).
    """
    v_pre = self.v_conv(window, one_row=True)
    to_h = self.v_to_h(jnp.where(inside, v_pre, jnp.zeros((), v_pre.dtype)))
    return to_h, gate(self._conditioned(v_pre, cond_row, label, 0))

  def horizontal_pixel(
    self,
    window: jax.Array,
    h: jax.Array | None,
    from_v: jax.Array,
    cond: jax.Array | None,
    label: jax.Array | None,
  ) -> tuple[jax.Array, jax.Array]:
    """One pixel (i, j) of the horizontal stack (decode mode).

    Args:
      window: [B, 1, width, C] horizontal inputs of the row's columns ending at j - 1 (type A)
        or j (type B), zeros left of the map.
      h: [B, 1, 1, C] horizontal input at (i, j) (type B; None for type A).
      from_v: [B, 1, 1, 2C] the vertical term at (i, j) (`vertical_row` of row i - 1).
      cond: None or [B, 1, 1, cond_channels] conditioning features at (i, j).
      label: None or int [B].

    Returns:
      (horizontal out, skip), each [B, 1, 1, C].
    """
    return self._horizontal(self.h_conv(window, one_pixel=True) + from_v, h, cond, label, False)


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
    dtype: compute dtype; the logits are `prior.logits_dtype(dtype)` (float32 for any lower
      precision, float64 for float64).
    param_dtype: parameter dtype.

  Full and decode mode follow models/prior.py (`decode_mode`).
  """

  decode_mode = True  # models/prior.py: `decode_position` calls, a "cache" collection

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

  def _decode(self, codes, cond, label, position, embed, layers) -> jax.Array:
    """Pre-head skip sum [B, 1, 1, C] at raster position `position` (see the module docstring).

    `cond` is the whole [B, H, W, cond_channels] conditioning map (or None). Per position the
    horizontal stack runs one pixel per layer ((k//2 + 1) * C * 2C); when a row starts the
    vertical stack runs that row above, W * (k//2 + 1) * k * C * 2C per layer, the same total
    as one full forward's vertical stack, spread over the rows.
    """
    b, height, width = codes.shape
    c, r, n = self.channels, self.kernel_size // 2, self.num_layers
    position = jnp.asarray(position, jnp.int32)
    i, j = position // width, position % width

    def cache(name, shape):
      return self.variable("cache", name, jnp.zeros, (b, *shape), self.dtype)

    # Created before the nn.cond, whose branches may only update existing variables. The
    # vertical inputs of layers >= 1 live in a ring of their last r + 1 rows (row m at m % (r +
    # 1)); the horizontal inputs in the current row (columns > j still hold the row above,
    # which no window reads).
    for layer in range(n):
      cache(f"from_v_{layer}", (1, width, 2 * c))
      if layer:
        cache(f"v_input_{layer}", (r + 1, width, c))
        cache(f"h_input_{layer}", (1, width, c))

    def embed_codes(index, size, axis):
      """Embedded codes of the window ending at `index` along axis 1 (rows of all columns)
      or axis 2 (columns of row i), zeros outside the map."""
      at = window_indices(index, size)
      if axis == 1:
        window = jnp.take(codes, jnp.maximum(at, 0), axis=1, mode="clip")
      else:
        window = jnp.take(codes[:, i], jnp.maximum(at, 0), axis=1, mode="clip")[:, None]
      return zero_outside(embed(window), at, axis)

    def slice_row(x, row):
      return None if x is None else jax.lax.dynamic_slice_in_dim(x, row, 1, axis=1)

    def vertical_rows(module, label):
      # Row m = i - 1 of every layer's vertical stack (all its codes are known); at i = 0 the
      # row above the map, whose down-shifted term is the v_to_h bias alone.
      m = jnp.maximum(i - 1, 0)
      at = window_indices(m, r + 1)
      slot = m % (r + 1)
      cond_row = slice_row(cond, m)
      for layer, gated in enumerate(layers):
        if layer == 0:
          window = embed_codes(m, r + 1, axis=1)
        else:
          ring = module.get_variable("cache", f"v_input_{layer}")
          window = zero_outside(jnp.take(ring, at % (r + 1), axis=1, mode="clip"), at, 1)
        from_v, v_out = gated.vertical_row(window, cond_row, label, i > 0)
        module.put_variable("cache", f"from_v_{layer}", from_v.astype(self.dtype))
        if layer + 1 < n:
          name = f"v_input_{layer + 1}"
          ring = module.get_variable("cache", name)
          ring = jax.lax.dynamic_update_slice_in_dim(ring, v_out.astype(ring.dtype), slot, axis=1)
          module.put_variable("cache", name, ring)

    # The once-per-row vertical stack, apart from the per-pixel horizontal one in a profile.
    with jax.named_scope("vertical_rows"):
      if self.is_initializing():
        vertical_rows(self, label)  # nn.cond cannot create parameters
      else:
        nn.cond(j == 0, vertical_rows, lambda module, label: None, self, label)

    cond_pixel = None if cond is None else jax.lax.dynamic_slice_in_dim(slice_row(cond, i), j, 1, 2)
    h, skips = None, None
    for layer, gated in enumerate(layers):
      if layer == 0:
        window = embed_codes(j - 1, r, axis=2)
      else:
        row = self.get_variable("cache", f"h_input_{layer}")
        row = jax.lax.dynamic_update_slice_in_dim(row, h.astype(row.dtype), j, axis=2)
        self.put_variable("cache", f"h_input_{layer}", row)
        at = window_indices(j, r + 1)
        window = zero_outside(jnp.take(row, jnp.maximum(at, 0), axis=2, mode="clip"), at, 2)
      from_v = self.get_variable("cache", f"from_v_{layer}")
      from_v = jax.lax.dynamic_slice_in_dim(from_v, j, 1, axis=2)
      h, skip = gated.horizontal_pixel(window, h, from_v, cond_pixel, label)
      skips = skip if skips is None else skips + skip
    return skips

  @nn.compact
  def __call__(
    self,
    codes: jax.Array,
    condition: Sequence[jax.Array] | None = None,
    label: jax.Array | None = None,
    train: bool = False,
    *,
    decode_position: jax.Array | None = None,
  ) -> jax.Array:
    """Logits of each code given the codes before it in raster order (models/prior.py's
    contract).

    Args:
      codes: int [B, H, W] in [0, num_codes).
      condition: None, or a sequence of int code maps of coarser levels, coarsest first, each
        [B, h_i, w_i] with H % h_i == 0 and W % w_i == 0.
      label: None, or int [B] class labels in [0, num_classes).
      train: enables dropout.
      decode_position: incremental decoding (sampling): the int32 raster position p; only its
        logits are computed, from the features of earlier positions kept in the mutable
        "cache" collection, which the first such call creates (it encodes `condition` and
        keeps `label` then; later calls read both from the cache). Calls must go p = 0, 1, 2,
        ...; of codes (the current map) only the codes before p are read.

    Returns:
      float32 (float64 if dtype is) [B, H, W, num_codes] logits ([B, num_codes] at
      decode_position); position (i, j) depends only on codes before it in raster order (and
      on all of condition and label).
    """
    self._check(codes, condition, label)
    if decode_position is not None and train:
      raise ValueError("decode_position is for sampling: train must be False")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    batch, height, width = codes.shape
    embed = nn.Embed(self.num_codes, self.channels, name="embed", **kw)
    layers = [
      GatedLayer(
        self.channels,
        self.kernel_size,
        "A" if i == 0 else "B",
        self.num_classes,
        self.dropout,
        name=f"layer_{i}",
        **kw,
      )
      for i in range(self.num_layers)
    ]
    if decode_position is not None and label is not None:
      # models/prior.py: the first decode call's label enters the cache; later calls read it
      # from there, as the coarser codes' features.
      if self.has_variable("cache", "label"):
        label = self.get_variable("cache", "label")
      else:
        self.put_variable("cache", "label", jnp.asarray(label, jnp.int32))
    if decode_position is not None and self.has_variable("cache", "cond_features"):
      cond = self.get_variable("cache", "cond_features")
    else:
      cond = None
      if condition:
        cond = ConditionEncoder(self.num_codes, self.cond_channels, name="condition", **kw)(
          tuple(condition), height, width
        )
      if decode_position is not None and cond is not None:
        self.put_variable("cache", "cond_features", cond)
    if decode_position is not None:
      skips = self._decode(codes, cond, label, decode_position, embed, layers)
    else:
      x = embed(codes)
      v, h, skips = x, x, None
      for layer in layers:
        v, h, skip = layer(v, h, cond, label, train)
        skips = skip if skips is None else skips + skip
    y = nn.Dense(self.channels, name="head_hidden", **kw)(nn.relu(skips))
    # The last projection runs in at least float32 (float64 stays float64): softmax and
    # sampling over K codes want the precision, and it is a small part of the compute.
    out_dtype = prior.logits_dtype(self.dtype)
    logits = nn.Dense(
      self.num_codes, dtype=out_dtype, param_dtype=self.param_dtype, name="head_logits"
    )(nn.relu(y).astype(out_dtype))
    return logits if decode_position is None else logits.reshape(batch, self.num_codes)
