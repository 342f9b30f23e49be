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
Those layers, the gated residual block and the causal attention are in
`vqjax/models/pixelsnail_layers.py` (re-exported here); this module assembles them.
Parameter paths mirror the PyTorch keys: `blocks.0.resblocks.1.conv1.conv.conv.weight_v`
is ("blocks_0", "resblocks_1", "conv1", "weight_v") here (the `.conv` wrappers are dropped).

Conditioning on coarser code maps (the bottom prior of VQ-VAE-2 on the top codes): each map is
one-hot encoded, run through a conditioning ResNet (`cond_resnet`, then `cond_resnet_1`, ...)
and upsampled by nearest neighbour to the code map's size; the sum is added through a 1x1
convolution inside every causal residual block. Class labels (not in the reference) add a
learned embedding to that conditioning.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqjax.models import prior
from vqjax.models.impl import Impl
from vqjax.models.pixelsnail_layers import (
  CausalAttention,
  GatedResBlock,
  WNConv,
  WNDense,
  cached_input,
  causal_conv,
  strict_causal_attention,
  upsample,
)

__all__ = [
  "CausalAttention",
  "CondResNet",
  "GatedResBlock",
  "PixelBlock",
  "PixelSNAIL",
  "WNConv",
  "WNDense",
  "background",
  "causal_conv",
  "strict_causal_attention",
]

Dtype = Any


def _pad(x: jax.Array, top: int, bottom: int, left: int, right: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))


class PixelBlock(nn.Module):
  """Causal gated residual blocks, then attention (or a 1x1 conv) with coordinates.
  `condition` comes `cond_scale` times coarser than x (see `GatedResBlock`)."""

  res_channels: int
  kernel_size: int
  num_res_blocks: int
  attention: bool = True
  num_heads: int = 8
  dropout: float = 0.1
  causal_impl: str = "masked"
  cond_scale: tuple[int, int] = (1, 1)
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
        self.res_channels,
        self.kernel_size,
        conv="causal",
        causal_impl=self.causal_impl,
        cond_scale=self.cond_scale,
        name=f"resblocks_{i}",
        **kw,
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
  """A centred conv then `num_res_blocks` gated residual blocks (the conditioning ResNet).
  `one_hot` > 0: the input is int codes standing for their one-hot map (WNConv's `one_hot`)."""

  channels: int
  kernel_size: int
  num_res_blocks: int
  dropout: float = 0.1
  one_hot: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    k = self.kernel_size
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    same = ((k // 2, k // 2), (k // 2, k // 2))
    first = WNConv(self.channels, (k, k), padding=same, one_hot=self.one_hot, name="blocks_0", **kw)
    out = first(x)
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
    remat: in training, recompute each PixelBlock's activations in the backward pass
      (`nn.remat`) instead of keeping them: the same function and parameters, much less memory
      (the blocks' inputs are kept, not their insides), about a third more compute.
    impl: the forms it computes in (models/impl.py), the same function in each:
      `causal_conv`, the k x k causal convolutions in training ("masked" | "split" |
      "patches", pixelsnail_layers.WNConv: "split" skips the masked taps, "patches" is one
      matrix product over the taps that can contribute); `onehot`, the convolutions of
      one-hot code maps (the two stems in training and each conditioning ResNet's first):
      "conv" (the one-hot map convolved, as the reference) or "lookup" (the kernel rows the
      codes pick, summed: pixelsnail_layers.WNConv's `one_hot`).

  Full and decode mode follow models/prior.py (`decode_mode`).
  """

  decode_mode = True  # models/prior.py: `decode_position` calls, a "cache" collection

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
  remat: bool = False
  impl: Impl = Impl()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _one_hot(self, codes: jax.Array) -> tuple[jax.Array, dict]:
    """(input, WNConv arguments) of a convolution of the one-hot map of `codes`, in the form
    `impl.onehot` names: the codes with one_hot=num_codes ("lookup"), or the map itself."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.impl.onehot == "lookup":
      return codes, dict(kw, one_hot=self.num_codes)
    return jax.nn.one_hot(codes, self.num_codes, dtype=self.dtype), kw

  def _conditioning(self, condition, label, batch: int, height: int, width: int):
    """The conditioning features fed to every causal residual block, and their scale.

    Returns (None, (1, 1)) without conditioning, else (features, (sh, sw)): features
    [B, ceil(height / sh), ceil(width / sw), C] at the finest condition map's resolution (the
    coarser maps' features repeated to it, a label's embedding added: it is the same at every
    pixel), `upsample(features, (sh, sw), height, width)` being the conditioning at every pixel
    of the map. The blocks project the features (1 x 1 convolutions) before upsampling them:
    the same sums as projecting the upsampled map, sh * sw times fewer of them.
    """
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
    cond, scale = None, (1, 1)
    full_h, full_w = self.shape
    if condition:
      for i, c in enumerate(condition):
        h, w = c.shape[1:]
        # The reference upsamples with scale 2 and crops; integer ratios cover every level.
        if full_h % h or full_w % w:
          raise ValueError(
            f"condition map {i} is {h}x{w}, which does not divide the {full_h}x{full_w} map"
          )
      scale = self._cond_scale(condition, label, height, width)
      rows, cols = -(-height // scale[0]), -(-width // scale[1])
      for i, c in enumerate(condition):
        h, w = c.shape[1:]
        name = "cond_resnet" if i == 0 else f"cond_resnet_{i}"
        inputs, first = self._one_hot(c)
        feats = CondResNet(
          self.cond_res_channels,
          self.cond_res_kernel,
          self.num_cond_res_blocks,
          dropout=self.dropout,
          one_hot=first.get("one_hot", 0),
          name=name,
          **kw,
        )(inputs)
        ratio = (full_h // h // scale[0], full_w // w // scale[1])
        feats = upsample(feats, ratio, rows, cols)
        cond = feats if cond is None else cond + feats
    if self.num_classes > 0:
      dim = self.cond_res_channels or self.res_channels
      emb = nn.Embed(self.num_classes, dim, name="label_embed", **kw)(label)
      emb = emb[:, None, None, :].astype(self.dtype)
      if cond is None:  # the label alone: one pixel of features, the same everywhere
        cond, scale = emb, (height, width)
      else:
        cond = cond + emb
    return cond, scale

  def _blocks(self, scale: tuple[int, int], remat: bool) -> list[nn.Module]:
    """The PixelBlocks, the one place they are built (both modes call them); `remat` wraps
    them in `nn.remat` (the same parameters: a training memory choice)."""
    # `train` is a Python bool: static for nn.remat (argument 4, counting the module as 0).
    block_class = nn.remat(PixelBlock, static_argnums=(4,)) if remat else PixelBlock
    return [
      block_class(
        self.res_channels,
        self.kernel_size,
        self.num_res_blocks,
        attention=self.attention,
        num_heads=self.num_heads,
        dropout=self.dropout,
        causal_impl=self.impl.causal_conv,
        cond_scale=scale,
        name=f"blocks_{n}",
        dtype=self.dtype,
        param_dtype=self.param_dtype,
      )
      for n in range(self.num_blocks)
    ]

  def _head(self, out: jax.Array, train: bool) -> jax.Array:
    """The output residual blocks, ELU and the 1 x 1 convolution to logits (both modes)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for n in range(self.num_out_res_blocks):
      block = GatedResBlock(self.res_channels, 1, dropout=self.dropout, name=f"out_{n}", **kw)
      out = block(out, train=train)
    # Index num_out_res_blocks is the reference's ELU in its nn.Sequential.
    logits = WNConv(self.num_codes, name=f"out_{self.num_out_res_blocks + 1}", **kw)(nn.elu(out))
    return logits.astype(prior.logits_dtype(self.dtype))

  def _cond_scale(self, condition, label, height: int, width: int) -> tuple[int, int]:
    """The scale of `_conditioning`'s features for these inputs, from their shapes alone (so a
    decode call after the first, whose features come from the cache, knows it too)."""
    full_h, full_w = self.shape
    if isinstance(condition, jax.Array | np.ndarray):  # one map given bare
      condition = (condition,)
    if condition:
      scales = [(full_h // c.shape[1], full_w // c.shape[2]) for c in condition]
      scale = (min(s[0] for s in scales), min(s[1] for s in scales))
      if any(s[0] % scale[0] or s[1] % scale[1] for s in scales):
        return (1, 1)  # maps whose ratios do not nest: everything at full resolution
      return scale
    return (height, width) if self.num_classes > 0 and label is not None else (1, 1)

  def _decode(self, codes, condition, label, position) -> jax.Array:
    """Logits [B, num_codes] at raster position `position`, one pixel of work per layer.

    Per position each k x k causal convolution computes one output pixel (k^2 C_in C_out),
    each attention layer attends one query over at most H * W cached keys, and the 1 x 1
    layers run on one pixel; the caches hold one [B, H, W, C] map per k x k convolution
    input, the keys and values, the one-hot codes and the conditioning features (at their
    own resolution, computed by the first call from `condition` and `label`).
    """
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
    x = cached_input(self, "onehot", onehot[:, None, None], (prev // w, prev % w, h, w))
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
      scale = self._cond_scale(condition, label, h, w)
    else:
      cond, scale = self._conditioning(condition, label, b, h, w)
      if cond is not None:
        self.put_variable("cache", "condition", cond)
    if cond is not None:  # pixel (i, j)'s features, at their own resolution
      at = (0, i // scale[0], j // scale[1], 0)
      cond = jax.lax.dynamic_slice(cond, at, (b, 1, 1, cond.shape[-1]))
    for block in self._blocks(scale, remat=False):
      out = block(out, bg, cond, False, decode=decode)
    return self._head(out, train=False).reshape(b, self.num_codes)

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
    """Logits of every position given the codes before it (models/prior.py's contract).

    Args:
      codes: int32 [B, H, W] code map (H may be less than shape[0] while sampling).
      condition: None, or a tuple of int32 coarser code maps, coarsest first, each dividing
        `shape` (rosinality's bottom prior: one map at half resolution).
      label: None, or int32 [B] class ids (when num_classes > 0).
      train: enables dropout (needs a "dropout" rng).
      decode_position: incremental decoding (sampling): the int32 raster position p; only
        its logits are computed, from the features of earlier positions kept in the
        mutable "cache" collection, which the first such call creates (it reads `condition`
        and `label` then; later calls read them from the cache). Calls must go p = 0, 1,
        2, ...; codes is the current map, of which only the code at p - 1 is read (it
        enters the cache).

    Returns:
      [B, H, W, num_codes] logits ([B, num_codes] at decode_position), of
      `prior.logits_dtype(dtype)` (float32, or float64 under float64).
    """
    b, h, w = codes.shape
    for name in ("kernel_size", "cond_res_kernel"):
      # An even kernel would make the centred and "causal" convolutions change the width
      # (the reference fails the same way).
      if getattr(self, name) % 2 == 0:
        raise ValueError(f"PixelSNAIL {name} must be odd, got {getattr(self, name)}")
    if decode_position is not None:
      if train:
        raise ValueError("decode_position is for sampling: train must be False")
      return self._decode(codes, condition, label, decode_position)
    k = self.kernel_size
    # The stems take the codes themselves ("lookup") or their one-hot map.
    x, stem = self._one_hot(codes)
    # Rows above (the "down" window sees the current row, so shift one row down) plus the
    # pixels to the left (the "downright" window sees the current pixel, so shift right).
    above = causal_conv(self.channels, (k // 2, k), "down", name="horizontal", **stem)(x)
    left_kernel = ((k + 1) // 2, k // 2)
    left = causal_conv(self.channels, left_kernel, "downright", name="vertical", **stem)(x)
    out = _pad(above, 1, 0, 0, 0)[:, :h] + _pad(left, 0, 0, 1, 0)[:, :, :w]
    bg = jnp.broadcast_to(jnp.asarray(background(*self.shape))[:h, :w], (b, h, w, 2))
    with jax.named_scope("conditioning"):  # conditioning ResNets, upsampling, label: one scope
      cond, scale = self._conditioning(condition, label, b, h, w)
    for block in self._blocks(scale, remat=self.remat):
      out = block(out, bg, cond, train)
    return self._head(out, train)
