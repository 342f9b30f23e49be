"""The layers of PixelSNAIL (vqjax/models/pixelsnail.py) and their one-pixel decode mode.

Weight-normalised convolution and linear layers (w = g * v / ||v||, g per output channel,
parameters `weight_g` [out] and `weight_v`, kernels (kh, kw, in, out), NHWC, as the PyTorch
reference's weight_norm), the shifted causal convolutions built from them, the gated residual
block and strictly causal multi-head attention over the raster order.

For incremental sampling the convolutions, the residual block and the attention also compute
a single output pixel (i, j): a k x k convolution reads its input from a map kept in the "cache"
collection (`cached_input`) and attention attends one query over the cached keys and values of
the earlier pixels.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def _fan_in_uniform():
  # PyTorch's default Conv2d/Linear initialisation (kaiming_uniform with a=sqrt(5)), which
  # the reference trains from: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _weight_norm(v: jax.Array, g: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  # The norm in float32 whatever the parameter dtype: it sums the squares of a whole filter.
  v32 = v.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(v32 * v32, axis=axes, keepdims=True))
  return g.astype(jnp.float32) * v32 / norm


class WNConv(nn.Module):
  """Weight-normalised 2D convolution on NHWC maps (stride 1, explicit zero padding).

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    padding: ((top, bottom), (left, right)) zero padding.
    use_bias: whether to add a bias.
    mask: optional (kh, kw) 0/1 array multiplied into `weight_v` before the norm (the
      reference zeroes those taps of v in place, so its norm never counts them).
    impl: "masked" (one kh x kw convolution, the masked taps multiplied as zeros), "split"
      (only for `causal_conv`'s "causal" mask: the same sum as two convolutions, the kh - 1
      rows above the output pixel and the kw // 2 taps left of it, so the masked taps cost
      nothing: 22 of 25 multiplies for a 5 x 5 kernel) or "patches" (any padding and mask: one
      matrix product of the shifted input maps with the kernel's taps, skipping the masked
      taps and those that only ever read padding; no convolution op, see `_conv_patches`).
    one_hot: > 0 makes the layer take int codes [B, H, W] in place of their one-hot map over
      `one_hot` channels (the kernel's input channels): the same function, computed as a sum
      of kernel rows picked by the codes, one look-up per tap and no multiplies (`_conv_codes`);
      its gradient adds rows instead of multiplying a one-hot map (a scatter-add).
  """

  features: int
  kernel_size: tuple[int, int] = (1, 1)
  padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
  use_bias: bool = True
  mask: Any = None
  impl: str = "masked"
  one_hot: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, at: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Convolves x [B, H, W, C]; with `at=(i, j)`, only output pixel (i, j) -> [B, 1, 1, F].

    The single-pixel form is what incremental sampling needs: it gathers the kh x kw window
    (zeros outside the map, as the padding gives) and costs kh * kw * C * F per example,
    whatever the map size; (i, j) may be traced and may lie outside the map.
    With `one_hot` > 0, x is int codes [B, H, W] instead (not with `at`).
    """
    kh, kw = self.kernel_size
    if self.one_hot and (at is not None or not jnp.issubdtype(x.dtype, jnp.integer)):
      raise ValueError(f"WNConv(one_hot={self.one_hot}) takes int codes [B, H, W], without at")
    channels = self.one_hot or x.shape[-1]
    shape = (kh, kw, channels, self.features)
    mask = None if self.mask is None else jnp.asarray(self.mask, jnp.float32)[:, :, None, None]

    def masked(v):
      return v if mask is None else v * mask.astype(v.dtype)

    v = masked(self.param("weight_v", _fan_in_uniform(), shape, self.param_dtype))
    # g starts at ||v|| so that the initial weight is v itself, as torch's weight_norm does.
    g = self.param(
      "weight_g",
      lambda _, s: jnp.sqrt(jnp.sum(jnp.square(v.astype(jnp.float32)), axis=(0, 1, 2))).astype(
        self.param_dtype
      ),
      (self.features,),
    )
    w = _weight_norm(v, g, (0, 1, 2)).astype(self.dtype)
    if self.impl not in CAUSAL_IMPLS:
      raise ValueError(f"unknown conv impl {self.impl!r}; expected one of {CAUSAL_IMPLS}")
    if self.one_hot:
      y = _conv_codes(x, w, self.padding, self.mask)
    elif at is None and self.impl == "split" and kh > 1:
      if self.mask is None or self.padding != _causal_pads(kh, kw):
        raise ValueError('impl="split" is the form of causal_conv(padding="causal") only')
      y = _causal_split(x.astype(self.dtype), w)
    elif at is None and self.impl == "patches" and (kh, kw) != (1, 1):
      y = _conv_patches(x.astype(self.dtype), w, self.padding, self.mask)
    elif at is None:
      y = jax.lax.conv_general_dilated(
        x.astype(self.dtype),
        w,
        window_strides=(1, 1),
        padding=self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
      )
    else:
      y = _conv_at(x.astype(self.dtype), w, at, self.padding)
    if self.use_bias:
      b = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
      y = y + b.astype(self.dtype)
    return y


class WNDense(nn.Module):
  """Weight-normalised linear layer; `weight_v` is (in, out), `weight_g` is [out]."""

  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (x.shape[-1], self.features)
    v = self.param("weight_v", _fan_in_uniform(), shape, self.param_dtype)
    g = self.param(
      "weight_g",
      lambda _, s: jnp.sqrt(jnp.sum(jnp.square(v.astype(jnp.float32)), axis=0)).astype(
        self.param_dtype
      ),
      (self.features,),
    )
    b = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    w = _weight_norm(v, g, (0,)).astype(self.dtype)
    return x.astype(self.dtype) @ w + b.astype(self.dtype)


def upsample(x: jax.Array, scale: tuple[int, int], height: int, width: int) -> jax.Array:
  """Nearest upsampling of [B, h, w, C] by `scale` = (rows, columns), cropped to height x width."""
  if tuple(scale) != (1, 1):
    x = jnp.repeat(jnp.repeat(x, scale[0], axis=1), scale[1], axis=2)
  return x[:, :height, :width]


CAUSAL_IMPLS = ("masked", "split", "patches")


def _causal_pads(kh: int, kw: int) -> tuple[tuple[int, int], tuple[int, int]]:
  return ((kh - 1, 0), (kw // 2, kw // 2))


def _causal_split(x: jax.Array, w: jax.Array) -> jax.Array:
  """The "causal" convolution of x [B, H, W, C] as two unmasked convolutions.

  Output (i, j) = sum over rows i-kh+1..i-1 (all kw columns centred on j) of w[:kh-1], plus
  row i's columns j-kw//2..j-1 times w[kh-1, :kw//2]: every tap the mask keeps, none it
  zeroes. Output row 0 has no rows above and column 0 nothing to its left, so each part is
  computed for the other rows (columns) only, from the input without its last row (column),
  and shifted into place by a zero row (column): no convolution has a window that lies wholly
  in its padding, which keeps every padding of the gradient convolutions non-negative (XLA's
  GPU backend cannot run a negatively padded one as a cuDNN backward convolution).
  """
  kh, kw = w.shape[:2]
  h, width = x.shape[1:3]
  dims = ("NHWC", "HWIO", "NHWC")
  out = jnp.zeros((*x.shape[:3], w.shape[-1]), x.dtype)
  if h > 1:
    above = jax.lax.conv_general_dilated(
      x[:, : h - 1], w[: kh - 1], (1, 1), ((kh - 2, 0), (kw // 2, kw // 2)), dimension_numbers=dims
    )
    out = jnp.pad(above, ((0, 0), (1, 0), (0, 0), (0, 0)))
  if kw // 2 and width > 1:
    left = jax.lax.conv_general_dilated(
      x[:, :, : width - 1],
      w[kh - 1 :, : kw // 2],
      (1, 1),
      ((0, 0), (kw // 2 - 1, 0)),
      dimension_numbers=dims,
    )
    out = out + jnp.pad(left, ((0, 0), (0, 0), (1, 0), (0, 0)))
  return out


def _live_taps(kernel_size, padding, size, mask=None):
  """((out_h, out_w), taps) of a stride-1 convolution with `padding` of a map of `size`
  (H, W): the output size and the kernel taps (a, b), in raster order, that can contribute,
  i.e. not zeroed by `mask` and not reading padding for every output pixel (tap row a reads
  input rows a - top .. a - top + out_h - 1; columns alike)."""
  (kh, kw), ((top, bottom), (left, right)), (height, width) = kernel_size, padding, size
  out_h, out_w = height + top + bottom - kh + 1, width + left + right - kw + 1

  def reaches(offset: int, pad: int, size: int, out: int) -> bool:
    return offset - pad < size and offset - pad + out > 0

  taps = [
    (a, b)
    for a in range(kh)
    for b in range(kw)
    if (mask is None or mask[a][b])
    and reaches(a, top, height, out_h)
    and reaches(b, left, width, out_w)
  ]
  return (out_h, out_w), taps


def _conv_codes(codes: jax.Array, w: jax.Array, padding, mask=None) -> jax.Array:
  """The stride-1 convolution of the one-hot map of int `codes` [B, H, W] over w.shape[2]
  classes with w [kh, kw, K, F] (zero `padding`), without the one-hot map: output (i, j) is
  the sum over the live taps (a, b) of w[a, b, code at (i - top + a, j - left + b)], a
  code outside the map or outside [0, K) adding nothing (its one-hot row is zeros).

  One look-up of [B, H_out, W_out] rows per tap instead of K multiplies per row: the PixelSNAIL
  stems read the 512-code one-hot map, where the convolution spends nearly all its multiplies
  on zeros.
  """
  kh, kw, k, features = w.shape
  (top, bottom), (left, right) = padding
  (out_h, out_w), taps = _live_taps((kh, kw), padding, codes.shape[1:3], mask)
  out = jnp.zeros((codes.shape[0], out_h, out_w, features), w.dtype)
  # Padding and codes out of range index past the table: mode="fill" gives their zero rows.
  codes = jnp.where(codes < 0, k, codes)
  codes = jnp.pad(codes, ((0, 0), (top, bottom), (left, right)), constant_values=k)
  for a, b in taps:
    window = codes[:, a : a + out_h, b : b + out_w]
    out = out + jnp.take(w[a, b], window, axis=0, mode="fill", fill_value=0)
  return out


def _conv_patches(x: jax.Array, w: jax.Array, padding, mask=None) -> jax.Array:
  """A stride-1 convolution of x [B, H, W, C] with w [kh, kw, C, F] (zero `padding`
  ((top, bottom), (left, right))) as one matrix product: the input shifted by each tap
  (a, b), concatenated along channels, times the taps' [C, F] blocks stacked.

  Only the taps that can contribute are kept: not those `mask` zeroes, and not those whose
  input pixel lies in the padding for every output pixel (tap row a reads rows a - top ..
  a - top + H_out - 1 of the input). On a map smaller than the kernel that skips whole rows:
  17 of a 5 x 5 causal kernel's 25 taps on a 4 x 4 map. It exists for XLA:CPU, where a
  convolution whose kernel has more taps than the input map has pixels is rewritten with its
  operands swapped (XLA's ConvOperandSwapper) into a window-reversed convolution that runs
  without Eigen's kernels: 10-15x slower, forward and input gradient alike. The matrix
  product and its gradients (matrix products, slices and pads) have no such form.
  """
  kh, kw = w.shape[:2]
  (top, bottom), (left, right) = padding
  (out_h, out_w), taps = _live_taps((kh, kw), padding, x.shape[1:3], mask)
  if not taps:  # every tap reads padding or is masked: zeros
    return jnp.zeros((x.shape[0], out_h, out_w, w.shape[-1]), x.dtype)
  x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  shifted = jnp.concatenate([x[:, a : a + out_h, b : b + out_w] for a, b in taps], axis=-1)
  index = [a * kw + b for a, b in taps]
  rows = w.reshape(kh * kw, -1, w.shape[-1])
  if index == list(range(index[0], index[-1] + 1)):
    # A causal mask's taps are one run in raster order (the rows above, then the row's left
    # taps): one slice of the kernel, whose gradient is one pad.
    kernel = rows[index[0] : index[-1] + 1]
  else:
    kernel = jnp.stack([rows[i] for i in index])
  return jnp.einsum("bhwk,kf->bhwf", shifted, kernel.reshape(-1, w.shape[-1]))


def _conv_at(x: jax.Array, w: jax.Array, at, padding) -> jax.Array:
  """Output pixel `at` of a stride-1 convolution of x [B, H, W, C] with w [kh, kw, C, F]."""
  (top, _), (left, _) = padding
  height, width = x.shape[1:3]
  rows = at[0] - top + jnp.arange(w.shape[0])
  cols = at[1] - left + jnp.arange(w.shape[1])
  window = x[:, jnp.clip(rows, 0, height - 1)][:, :, jnp.clip(cols, 0, width - 1)]
  inside = ((rows >= 0) & (rows < height))[:, None] & ((cols >= 0) & (cols < width))[None]
  window = jnp.where(inside[None, :, :, None], window, 0)
  return jnp.einsum("bhwc,hwcf->bf", window, w)[:, None, None]


def cached_input(module: nn.Module, name: str, x: jax.Array, decode) -> jax.Array:
  """Writes x [B, 1, 1, C] at pixel (i, j) of the map cached as `name`; returns the map.

  `decode` is (i, j, height, width). Pixels not yet written are zeros; the causal
  convolutions that read the map never look at them.
  """
  i, j, height, width = decode
  shape = (x.shape[0], height, width, x.shape[-1])
  cache = module.variable("cache", name, jnp.zeros, shape, x.dtype)
  cache.value = jax.lax.dynamic_update_slice(cache.value, x.astype(cache.value.dtype), (0, i, j, 0))
  return cache.value


def causal_conv(
  features: int, kernel_size: tuple[int, int], padding: str, impl: str = "masked", **kw
) -> "WNConv":
  """A `WNConv` whose output at (i, j) never sees pixels after (i, j) in raster order.

  padding="downright": the window covers rows i-kh+1..i and columns j-kw+1..j.
  padding="down": rows i-kh+1..i and columns j-kw//2..j+kw//2.
  padding="causal": as "down", with the taps at (i, j) and right of it removed, so the output
  at (i, j) depends only on strictly earlier pixels of the input; `impl` ("masked" |
  "split", see `WNConv`) picks its form.
  """
  kh, kw_ = kernel_size
  mask = None
  if padding == "downright":
    pads = ((kh - 1, 0), (kw_ - 1, 0))
  elif padding in ("down", "causal"):
    pads = _causal_pads(kh, kw_)
    if padding == "causal":
      mask = np.ones((kh, kw_), np.float32)
      mask[-1, kw_ // 2 :] = 0.0
      mask = tuple(map(tuple, mask.tolist()))
  else:
    raise ValueError(f"unknown causal padding {padding!r}")
  impl = impl if padding == "causal" else "masked"
  return WNConv(features, (kh, kw_), padding=pads, mask=mask, impl=impl, **kw)


class GatedResBlock(nn.Module):
  """x + GLU(conv2(dropout(ELU(conv1(ELU(x)) + aux_conv(ELU(aux))))) + condition(cond)).

  conv="same": centred convolutions (zero padding kernel//2); conv="causal": `causal_conv`
  with padding "causal" (strictly earlier pixels only), in the form `causal_impl` names.
  `condition` is at the resolution of x, or `cond_scale` = (rows, columns) times coarser.
  """

  channels: int
  kernel_size: int
  conv: str = "same"
  dropout: float = 0.1
  causal_impl: str = "masked"
  cond_scale: tuple[int, int] = (1, 1)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _conv(self, features: int, name: str):
    k = self.kernel_size
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    if self.conv == "causal":
      return causal_conv(features, (k, k), "causal", impl=self.causal_impl, **kw)
    if self.conv != "same":
      raise ValueError(f"unknown conv {self.conv!r}")
    return WNConv(features, (k, k), padding=((k // 2, k // 2), (k // 2, k // 2)), **kw)

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    aux: jax.Array | None = None,
    condition: jax.Array | None = None,
    train: bool = False,
    decode: tuple | None = None,
  ) -> jax.Array:
    """The block on maps [B, H, W, C]; with `decode=(i, j, height, width)`, on pixel (i, j).

    In decode mode x and aux are that pixel's [B, 1, 1, C] features, condition the [B, 1, 1, C]
    features of the (cond_scale times coarser) pixel that covers it, and a
    k x k convolution reads its input from a map kept in the "cache" collection, to which
    this pixel is first written (1 x 1 convolutions need no cache).
    """
    in_channels = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def conv(features, name, inp):
      if decode is None or self.kernel_size == 1:
        return self._conv(features, name)(inp)
      inp = cached_input(self, f"{name}_input", inp, decode)
      return self._conv(features, name)(inp, at=decode[:2])

    out = conv(self.channels, "conv1", nn.elu(x))
    if aux is not None:
      out = out + WNConv(self.channels, name="aux_conv", **kw)(nn.elu(aux))
    out = nn.elu(out)
    out = nn.Dropout(self.dropout, deterministic=not train)(out)
    out = conv(2 * in_channels, "conv2", out)
    if condition is not None:
      proj = WNConv(2 * in_channels, use_bias=False, name="condition", **kw)(condition)
      # `condition` may come at a coarser resolution (cond_scale, see PixelSNAIL): a 1 x 1
      # projection commutes with nearest upsampling, so it is projected first. In decode mode
      # it is already the coarse pixel that covers (i, j).
      if decode is None:
        proj = upsample(proj, self.cond_scale, out.shape[1], out.shape[2])
      out = out + proj
    a, b = jnp.split(out, 2, axis=-1)
    return x.astype(self.dtype) + a * nn.sigmoid(b)


def strict_causal_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  dropout_rate: float = 0.0,
  dropout_rng: jax.Array | None = None,
) -> jax.Array:
  """Attention in which position t sees only positions s < t; position 0 outputs zeros.

  This is the reference's mask (strictly lower triangular, then the first row zeroed).
  Without dropout it runs as `jax.nn.dot_product_attention(is_causal=True)` on the queries
  moved one position earlier: query t+1 over keys 0..t is exactly the strict mask, and the
  causal case lets the backend pick a fused kernel. Attention dropout (on the probabilities,
  as the reference does) needs the probabilities, so that path computes them explicitly.

  Args:
    q, k, v: [B, T, N, D] queries, keys and values.
    dropout_rate: dropout on the attention probabilities.
    dropout_rng: its key; no dropout when None.

  Returns:
    [B, T, N, D].
  """
  t = q.shape[1]
  if dropout_rng is not None and dropout_rate > 0.0:
    logits = jnp.einsum("btnd,bsnd->bnts", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
    allowed = jnp.tril(jnp.ones((t, t), bool), k=-1)
    logits = jnp.where(allowed, logits, -1e30)
    probs = jax.nn.softmax(logits, axis=-1) * allowed.any(-1)[:, None].astype(jnp.float32)
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0).astype(v.dtype)
    return jnp.einsum("bnts,bsnd->btnd", probs, v)
  if t == 1:
    return jnp.zeros_like(q)
  out = jax.nn.dot_product_attention(q[:, 1:], k[:, :-1], v[:, :-1], is_causal=True)
  return jnp.concatenate([jnp.zeros_like(out[:, :1]), out], axis=1)


class CausalAttention(nn.Module):
  """Multi-head attention over the raster order of a map, strictly causal."""

  channels: int
  num_heads: int = 8
  dropout: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self, query: jax.Array, key: jax.Array, train: bool = False, decode: tuple | None = None
  ) -> jax.Array:
    """Attention over maps [B, H, W, C]; `decode=(i, j, height, width)`: one query pixel.

    In decode mode query and key are pixel (i, j)'s [B, 1, 1, C] features; its keys and
    values join a cache of every earlier pixel's ("cache" collection, [B, height * width,
    heads, head_dim] each), over which the query attends with the same strict mask.
    """
    b, h, w, _ = query.shape
    if self.channels % self.num_heads:
      raise ValueError(
        f"attention channels {self.channels} are not divisible by num_heads {self.num_heads}"
      )
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    heads = lambda x: x.reshape(b, h * w, self.num_heads, self.channels // self.num_heads)
    q = heads(WNDense(self.channels, name="query", **kw)(query))
    k = heads(WNDense(self.channels, name="key", **kw)(key))
    v = heads(WNDense(self.channels, name="value", **kw)(key))
    if decode is not None:
      return _attend_cached(self, q, k, v, decode).reshape(b, h, w, self.channels)
    rng = self.make_rng("dropout") if train and self.dropout > 0.0 else None
    out = strict_causal_attention(q, k, v, self.dropout, rng)
    return out.reshape(b, h, w, self.channels)


def _attend_cached(module: nn.Module, q, k, v, decode) -> jax.Array:
  """One query [B, 1, N, D] at raster position p over the cached keys and values s < p."""
  i, j, height, width = decode
  p = i * width + j
  shape = (q.shape[0], height * width, *q.shape[2:])
  keys = module.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
  values = module.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
  keys.value = jax.lax.dynamic_update_slice(keys.value, k, (0, p, 0, 0))
  values.value = jax.lax.dynamic_update_slice(values.value, v, (0, p, 0, 0))
  logits = jnp.einsum("bqnd,bsnd->bnqs", q, keys.value).astype(jnp.float32)
  logits = logits / math.sqrt(q.shape[-1])
  earlier = jnp.arange(shape[1]) < p
  logits = jnp.where(earlier, logits, -1e30)
  probs = jax.nn.softmax(logits, axis=-1).astype(values.value.dtype)
  out = jnp.einsum("bnqs,bsnd->bqnd", probs, values.value)
  # Position 0 has nothing to attend to: zeros, as in `strict_causal_attention`.
  return jnp.where(p > 0, out, jnp.zeros_like(out))
