"""PixelSNAIL (Chen et al. 2018), the autoregressive prior over VQ-VAE-2 code maps.

The layer structure follows rosinality/vq-vae-2-pytorch's `PixelSNAIL`, so its checkpoints
import by renaming (`vqjax/convert/pixelsnail.py`):

  codes -> one-hot -> `horizontal` (rows above, shifted down) + `vertical` (pixels to the
  left in the current and two rows above, shifted right)
  -> `num_blocks` x PixelBlock:
       `num_res_blocks` gated residual blocks with causal convolutions (+ conditioning),
       then either causal self-attention over the raster order (queries from the block output,
       keys/values from the block input and output, both with two coordinate channels) or a
       1x1 convolution of the output and the coordinates
  -> `num_out_res_blocks` 1x1 gated residual blocks -> ELU -> 1x1 conv to `num_codes` logits.

Every convolution and linear layer is weight-normalised (w = g * v / ||v||, g per output
channel), with parameters `weight_g` [out] and `weight_v` (kernels (kh, kw, in, out), NHWC).
Parameter paths mirror the PyTorch keys: `blocks.0.resblocks.1.conv1.conv.conv.weight_v`
is ("blocks_0", "resblocks_1", "conv1", "weight_v") here (the `.conv` wrappers are dropped).

Conditioning on coarser code maps (the bottom prior of VQ-VAE-2 on the top codes): each map is
one-hot encoded, run through a conditioning ResNet (`cond_resnet`, then `cond_resnet_1`, ...)
and upsampled by nearest neighbour to the code map's size; the sum is added through a 1x1
convolution inside every causal residual block. Class labels (not in the reference) add a
learned embedding to that conditioning.
"""

import math
from collections.abc import Sequence
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
  """

  features: int
  kernel_size: tuple[int, int] = (1, 1)
  padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
  use_bias: bool = True
  mask: Any = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, at: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Convolves x [B, H, W, C]; with `at=(i, j)`, only output pixel (i, j) -> [B, 1, 1, F].

    The single-pixel form is what incremental sampling needs: it gathers the kh x kw window
    (zeros outside the map, as the padding gives) and costs kh * kw * C * F per example,
    whatever the map size; (i, j) may be traced and may lie outside the map.
    """
    kh, kw = self.kernel_size
    shape = (kh, kw, x.shape[-1], self.features)
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
    if at is None:
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


def _cached_input(module: nn.Module, name: str, x: jax.Array, decode) -> jax.Array:
  """Writes x [B, 1, 1, C] at pixel (i, j) of the map cached as `name`; returns the map.

  `decode` is (i, j, height, width). Pixels not yet written are zeros; the causal
  convolutions that read the map never look at them.
  """
  i, j, height, width = decode
  shape = (x.shape[0], height, width, x.shape[-1])
  cache = module.variable("cache", name, jnp.zeros, shape, x.dtype)
  cache.value = jax.lax.dynamic_update_slice(cache.value, x.astype(cache.value.dtype), (0, i, j, 0))
  return cache.value


def _pad(x: jax.Array, top: int, bottom: int, left: int, right: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))


def causal_conv(features: int, kernel_size: tuple[int, int], padding: str, **kw) -> "WNConv":
  """A `WNConv` whose output at (i, j) never sees pixels after (i, j) in raster order.

  padding="downright": the window covers rows i-kh+1..i and columns j-kw+1..j.
  padding="down": rows i-kh+1..i and columns j-kw//2..j+kw//2.
  padding="causal": as "down", with the taps at (i, j) and right of it removed, so the output
  at (i, j) depends only on strictly earlier pixels of the input.
  """
  kh, kw_ = kernel_size
  mask = None
  if padding == "downright":
    pads = ((kh - 1, 0), (kw_ - 1, 0))
  elif padding in ("down", "causal"):
    pads = ((kh - 1, 0), (kw_ // 2, kw_ // 2))
    if padding == "causal":
      mask = np.ones((kh, kw_), np.float32)
      mask[-1, kw_ // 2 :] = 0.0
      mask = tuple(map(tuple, mask.tolist()))
  else:
    raise ValueError(f"unknown causal padding {padding!r}")
  return WNConv(features, (kh, kw_), padding=pads, mask=mask, **kw)


class GatedResBlock(nn.Module):
  """x + GLU(conv2(dropout(ELU(conv1(ELU(x)) + aux_conv(ELU(aux))))) + condition(cond)).

  conv="same": centred convolutions (zero padding kernel//2); conv="causal": `causal_conv`
  with padding "causal" (strictly earlier pixels only).
  """

  channels: int
  kernel_size: int
  conv: str = "same"
  dropout: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _conv(self, features: int, name: str):
    k = self.kernel_size
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    if self.conv == "causal":
      return causal_conv(features, (k, k), "causal", **kw)
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

    In decode mode x, aux and condition are that pixel's [B, 1, 1, C] features and a
    k x k convolution reads its input from a map kept in the "cache" collection, to which
    this pixel is first written (1 x 1 convolutions need no cache).
    """
    in_channels = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def conv(features, name, inp):
      if decode is None or self.kernel_size == 1:
        return self._conv(features, name)(inp)
      inp = _cached_input(self, f"{name}_input", inp, decode)
      return self._conv(features, name)(inp, at=decode[:2])

    out = conv(self.channels, "conv1", nn.elu(x))
    if aux is not None:
      out = out + WNConv(self.channels, name="aux_conv", **kw)(nn.elu(aux))
    out = nn.elu(out)
    out = nn.Dropout(self.dropout, deterministic=not train)(out)
    out = conv(2 * in_channels, "conv2", out)
    if condition is not None:
      out = out + WNConv(2 * in_channels, use_bias=False, name="condition", **kw)(condition)
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


class PixelBlock(nn.Module):
  """Causal gated residual blocks, then attention (or a 1x1 conv) with coordinates."""

  res_channels: int
  kernel_size: int
  num_res_blocks: int
  attention: bool = True
  num_heads: int = 8
  dropout: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    background: jax.Array,
    condition: jax.Array | None = None,
    train: bool = False,
    decode: tuple | None = None,
  ) -> jax.Array:
    """Maps [B, H, W, C]; `decode=(i, j, height, width)`: pixel (i, j)'s [B, 1, 1, C]."""
    c = x.shape[-1]
    kw = dict(dropout=self.dropout, dtype=self.dtype, param_dtype=self.param_dtype)
    out = x
    for i in range(self.num_res_blocks):
      block = GatedResBlock(
        self.res_channels, self.kernel_size, conv="causal", name=f"resblocks_{i}", **kw
      )
      out = block(out, condition=condition, train=train, decode=decode)
    background = background.astype(out.dtype)
    if not self.attention:
      conv = WNConv(c, dtype=self.dtype, param_dtype=self.param_dtype, name="out")
      return conv(jnp.concatenate([out, background], -1))
    key = GatedResBlock(c, 1, name="key_resblock", **kw)(
      jnp.concatenate([x.astype(out.dtype), out, background], -1), train=train
    )
    query = GatedResBlock(c, 1, name="query_resblock", **kw)(
      jnp.concatenate([out, background], -1), train=train
    )
    attn = CausalAttention(c // 2, self.num_heads, name="causal_attention", **kw)(
      query, key, train=train, decode=decode
    )
    return GatedResBlock(c, 1, name="out_resblock", **kw)(out, aux=attn, train=train)


class CondResNet(nn.Module):
  """A centred conv then `num_res_blocks` gated residual blocks (the conditioning ResNet)."""

  channels: int
  kernel_size: int
  num_res_blocks: int
  dropout: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    k = self.kernel_size
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    same = ((k // 2, k // 2), (k // 2, k // 2))
    out = WNConv(self.channels, (k, k), padding=same, name="blocks_0", **kw)(x)
    for i in range(self.num_res_blocks):
      block = GatedResBlock(self.channels, k, dropout=self.dropout, name=f"blocks_{i + 1}", **kw)
      out = block(out, train=train)
    return out


def background(height: int, width: int) -> np.ndarray:
  """The two coordinate channels [H, W, 2]: (row - H/2) / H and (column - W/2) / W."""
  rows = (np.arange(height, dtype=np.float32) - height / 2) / height
  cols = (np.arange(width, dtype=np.float32) - width / 2) / width
  return np.stack(
    [np.broadcast_to(rows[:, None], (height, width)), np.broadcast_to(cols[None], (height, width))],
    axis=-1,
  )


class PixelSNAIL(nn.Module):
  """PixelSNAIL prior: int32 codes [B, H, W] -> float32 logits [B, H, W, num_codes].

  The logits at (i, j) depend only on codes strictly before (i, j) in raster order, on the
  whole of every conditioning map and on the label.

  Attributes:
    shape: (H, W) of the code maps (sets the coordinate channels; shorter maps use its top rows).
    num_codes: codebook size K (input one-hot size and number of logits).
    channels: width of the residual stream.
    kernel_size: causal convolution size (odd).
    num_blocks: PixelBlocks.
    num_res_blocks: causal gated residual blocks per PixelBlock.
    res_channels: hidden channels of those blocks.
    attention: causal self-attention at the end of each PixelBlock (else a 1x1 conv).
    num_heads: attention heads (over channels // 2 attention channels).
    dropout: dropout rate of every residual block and of the attention probabilities (the
      reference fixes it at 0.1 in the conditioning and output blocks; here one rate).
    num_cond_res_blocks: gated residual blocks of each conditioning ResNet.
    cond_res_channels: channels of the conditioning features; > 0 makes the model expect
      `condition` (coarser code maps).
    cond_res_kernel: kernel size of the conditioning ResNet (odd).
    num_out_res_blocks: 1x1 gated residual blocks before the output convolution.
    num_classes: > 0 makes the model expect `label` (class-conditional prior).
  """

  shape: tuple[int, int] = (32, 32)
  num_codes: int = 512
  channels: int = 256
  kernel_size: int = 5
  num_blocks: int = 4
  num_res_blocks: int = 4
  res_channels: int = 256
  attention: bool = True
  num_heads: int = 8
  dropout: float = 0.1
  num_cond_res_blocks: int = 0
  cond_res_channels: int = 0
  cond_res_kernel: int = 3
  num_out_res_blocks: int = 0
  num_classes: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _conditioning(self, condition, label, batch: int, height: int, width: int):
    """The conditioning features [B, H, W, C] (or None) fed to every causal residual block."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if isinstance(condition, jax.Array | np.ndarray):  # one map given bare
      condition = (condition,)
    if self.cond_res_channels > 0 and not condition:
      raise ValueError(
        "this PixelSNAIL is conditioned on coarser code maps (cond_res_channels="
        f"{self.cond_res_channels}): pass condition=(coarser int32 code maps, coarsest first)"
      )
    if self.cond_res_channels == 0 and condition:
      raise ValueError("this PixelSNAIL has cond_res_channels=0: it takes no condition maps")
    if self.num_classes > 0 and label is None:
      raise ValueError(
        f"this PixelSNAIL is class-conditional (num_classes={self.num_classes}): pass label="
        "int32 [B] class ids"
      )
    if self.num_classes == 0 and label is not None:
      raise ValueError("this PixelSNAIL has num_classes=0: it takes no label")
    cond = None
    if condition:
      for i, c in enumerate(condition):
        h, w = c.shape[1:]
        # The reference upsamples with scale 2 and crops; integer ratios cover every level.
        full_h, full_w = self.shape
        if full_h % h or full_w % w:
          raise ValueError(
            f"condition map {i} is {h}x{w}, which does not divide the {full_h}x{full_w} map"
          )
        name = "cond_resnet" if i == 0 else f"cond_resnet_{i}"
        feats = CondResNet(
          self.cond_res_channels,
          self.cond_res_kernel,
          self.num_cond_res_blocks,
          dropout=self.dropout,
          name=name,
          **kw,
        )(jax.nn.one_hot(c, self.num_codes, dtype=self.dtype))
        feats = jnp.repeat(jnp.repeat(feats, full_h // h, axis=1), full_w // w, axis=2)
        feats = feats[:, :height, :width]
        cond = feats if cond is None else cond + feats
    if self.num_classes > 0:
      dim = self.cond_res_channels or self.res_channels
      emb = nn.Embed(self.num_classes, dim, name="label_embed", **kw)(label)
      emb = emb[:, None, None, :].astype(self.dtype)
      cond = jnp.broadcast_to(emb, (batch, height, width, dim)) if cond is None else cond + emb
    return cond

  def _decode(self, codes, condition, label, train, position) -> jax.Array:
    """Logits [B, num_codes] at raster position `position`, one pixel of work per layer.

    Per position each k x k causal convolution computes one output pixel (k^2 C_in C_out),
    each attention layer attends one query over at most H * W cached keys, and the 1 x 1
    layers run on one pixel; the caches hold one [B, H, W, C] map per k x k convolution
    input, the keys and values, the one-hot codes and the conditioning features.
    """
    if train:
      raise ValueError("decode_position is for sampling: train must be False")
    b, h, w = codes.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    k = self.kernel_size
    position = jnp.asarray(position, jnp.int32)
    i, j = position // w, position % w
    decode = (i, j, h, w)
    # The code at p - 1 was drawn after the previous call: it joins the one-hot map now (at
    # p = 0 a zero row is written at 0, which the call at p = 1 overwrites).
    prev = jnp.maximum(position - 1, 0)
    code = jax.lax.dynamic_index_in_dim(codes.reshape(b, h * w), prev, 1, keepdims=False)
    onehot = jax.nn.one_hot(code, self.num_codes, dtype=self.dtype) * (position > 0)
    x = _cached_input(self, "onehot", onehot[:, None, None], (prev // w, prev % w, h, w))
    # The full forward shifts the two stems' outputs down one row and right one column.
    above = causal_conv(self.channels, (k // 2, k), "down", name="horizontal", **kw)(
      x, at=(i - 1, j)
    )
    left = causal_conv(self.channels, ((k + 1) // 2, k // 2), "downright", name="vertical", **kw)(
      x, at=(i, j - 1)
    )
    out = jnp.where(i > 0, above, 0) + jnp.where(j > 0, left, 0)
    bg = jax.lax.dynamic_slice(jnp.asarray(background(*self.shape)), (i, j, 0), (1, 1, 2))
    bg = jnp.broadcast_to(bg[None], (b, 1, 1, 2))
    if self.has_variable("cache", "condition"):
      cond = self.get_variable("cache", "condition")
    else:
      cond = self._conditioning(condition, label, b, h, w)
      if cond is not None:
        self.put_variable("cache", "condition", cond)
    if cond is not None:
      cond = jax.lax.dynamic_slice(cond, (0, i, j, 0), (b, 1, 1, cond.shape[-1]))
    for n in range(self.num_blocks):
      out = PixelBlock(
        self.res_channels,
        self.kernel_size,
        self.num_res_blocks,
        attention=self.attention,
        num_heads=self.num_heads,
        dropout=self.dropout,
        name=f"blocks_{n}",
        **kw,
      )(out, bg, condition=cond, decode=decode)
    for n in range(self.num_out_res_blocks):
      out = GatedResBlock(self.res_channels, 1, dropout=self.dropout, name=f"out_{n}", **kw)(out)
    logits = WNConv(self.num_codes, name=f"out_{self.num_out_res_blocks + 1}", **kw)(nn.elu(out))
    return logits.reshape(b, self.num_codes).astype(jnp.float32)

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
    """Logits of every position given the codes before it.

    Args:
      codes: int32 [B, H, W] code map (H may be less than shape[0] while sampling).
      condition: None, or a tuple of int32 coarser code maps, coarsest first, each dividing
        `shape` (rosinality's bottom prior: one map at half resolution).
      label: None, or int32 [B] class ids (when num_classes > 0).
      train: enables dropout (needs a "dropout" rng).
      decode_position: incremental decoding (sampling): the int32 raster position p; only
        its logits are computed, from the features of earlier positions kept in the
        mutable "cache" collection, which the first such call creates (it reads `condition`
        and `label` then; later calls ignore them). Calls must go p = 0, 1, 2, ...; codes
        is the current map, of which only the code at p - 1 is read (it enters the cache).

    Returns:
      float32 [B, H, W, num_codes] logits ([B, num_codes] at decode_position).
    """
    b, h, w = codes.shape
    for name in ("kernel_size", "cond_res_kernel"):
      # An even kernel would make the centred and "causal" convolutions change the width
      # (the reference fails the same way).
      if getattr(self, name) % 2 == 0:
        raise ValueError(f"PixelSNAIL {name} must be odd, got {getattr(self, name)}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if decode_position is not None:
      return self._decode(codes, condition, label, train, decode_position)
    k = self.kernel_size
    x = jax.nn.one_hot(codes, self.num_codes, dtype=self.dtype)
    # Rows above (the "down" window sees the current row, so shift one row down) plus the
    # pixels to the left (the "downright" window sees the current pixel, so shift right).
    above = causal_conv(self.channels, (k // 2, k), "down", name="horizontal", **kw)(x)
    left = causal_conv(self.channels, ((k + 1) // 2, k // 2), "downright", name="vertical", **kw)(x)
    out = _pad(above, 1, 0, 0, 0)[:, :h] + _pad(left, 0, 0, 1, 0)[:, :, :w]
    bg = jnp.broadcast_to(jnp.asarray(background(*self.shape))[:h, :w], (b, h, w, 2))
    with jax.named_scope("conditioning"):  # conditioning ResNets, upsampling, label: one scope
      cond = self._conditioning(condition, label, b, h, w)
    for i in range(self.num_blocks):
      out = PixelBlock(
        self.res_channels,
        self.kernel_size,
        self.num_res_blocks,
        attention=self.attention,
        num_heads=self.num_heads,
        dropout=self.dropout,
        name=f"blocks_{i}",
        **kw,
      )(out, bg, condition=cond, train=train)
    for i in range(self.num_out_res_blocks):
      block = GatedResBlock(self.res_channels, 1, dropout=self.dropout, name=f"out_{i}", **kw)
      out = block(out, train=train)
    # Index num_out_res_blocks is the reference's ELU in its nn.Sequential.
    logits = WNConv(self.num_codes, name=f"out_{self.num_out_res_blocks + 1}", **kw)(nn.elu(out))
    return logits.astype(jnp.float32)
