"""VQ-VAE-2: a hierarchy of code maps, coarse codes for global structure, fine codes for detail.

Layout (the paper's and the common PyTorch re-implementation's, generalised to N levels):
  * the bottom encoder reduces the image by `first_stride` (4), each encoder above it reduces
    the features below by `level_stride` (2);
  * the top features are projected by a 1x1 conv to `code_dim` and quantized first;
  * every lower level concatenates [decoder(quantized codes of the level above), its own
    encoder features], projects them by a 1x1 conv and quantizes them, so fine codes are
    conditioned on coarse ones;
  * the final decoder sees [upsampled codes of every upper level, ..., bottom codes] and
    upsamples by `first_stride` back to the image.
Levels are numbered coarsest first: level 0 is the top. In code a level is this index (the
metrics here are "level{i}/..."); the names a user reads in logs, metrics and code datasets
("top", "bottom", ...; stored, so kept for existing runs and datasets) come from one function
of the training layer, `level_names`, applied where metrics and datasets are written. With
`levels=1` this is the single-level VQ-VAE (see vqvae.py). NHWC, images in [-1, 1], any channel
count, any size divisible by `first_stride * level_stride ** (levels - 1)`.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqjax import plugins
from vqjax.models.gumbel import GumbelQuantizer
from vqjax.models.impl import Impl
from vqjax.models.layers import Decoder, Encoder, Upsampler
from vqjax.models.quantizer import VectorQuantizer

# The built-in quantizer kinds; any other kind is a plugin (vqjax/plugins.py).
QUANTIZERS = {"vq": VectorQuantizer, "gumbel": GumbelQuantizer}


def quantizer_class(kind: str):
  """The quantizer module class of `kind`: a built-in, or a registered / importable plugin."""
  if kind in QUANTIZERS:
    return QUANTIZERS[kind]
  return plugins.module_class(plugins.find("quantizer", kind))


class VQVAE2(nn.Module):
  """Hierarchical VQ-VAE with `levels` code maps (see the module docstring).

  Attributes:
    out_channels: image channels (1 for Fashion-MNIST, 3 for RGB).
    channels: hidden channels of encoders and decoders.
    res_channels: hidden channels inside residual blocks.
    num_res_blocks: residual blocks per encoder / decoder.
    levels: number of code maps (2 = top + bottom; FFHQ-1024 uses 3).
    first_stride: downsampling of the bottom encoder (power of two).
    level_stride: downsampling between consecutive levels (power of two).
    quantizer: keyword arguments of every level's quantizer (num_codes, code_dim, ...);
      "kind" picks VectorQuantizer ("vq", the default), GumbelQuantizer ("gumbel") or a
      plugin's module (a registered name or an import path, vqjax/plugins.py).
    impl: the forms the layers compute in (models/impl.py: the stride-2 convolutions, the
      image-side channel padding, the built-in quantizer's statistics, matmuls and search),
      resolved when the model is built; every form is the same function of the same weights.
    dtype: compute dtype; quantizer distances and statistics stay float32.
    param_dtype: parameter dtype.
  """

  out_channels: int = 3
  channels: int = 128
  res_channels: int = 32
  num_res_blocks: int = 2
  levels: int = 2
  first_stride: int = 4
  level_stride: int = 2
  quantizer: dict | None = None
  impl: Impl = Impl()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    if self.levels < 1:
      raise ValueError(f"levels must be >= 1, got {self.levels}")
    qkw = dict(self.quantizer or {})
    kind = qkw.pop("kind", "vq")
    quantizer = quantizer_class(kind)
    if kind == "vq":  # the built-in nearest-code quantizer computes in the model's forms
      qkw["impl"] = self.impl
    self.code_dim = qkw.get("code_dim", 64)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n = self.levels
    bottom = n - 1
    self.encoders = [
      Encoder(
        self.channels,
        self.res_channels,
        self.num_res_blocks,
        self.first_stride if i == bottom else self.level_stride,
        impl=self.impl,
        **kw,
      )
      for i in range(n)
    ]
    self.pre_quant = [nn.Conv(self.code_dim, (1, 1), **kw) for _ in range(n)]
    self.quantizers = [quantizer(**qkw, **kw) for _ in range(n)]
    # cond_decoders[i] maps the codes of level i (i < bottom) to the resolution of level i + 1.
    self.cond_decoders = [
      Decoder(
        self.code_dim,
        self.channels,
        self.res_channels,
        self.num_res_blocks,
        self.level_stride,
        # Code-side channels: the image-side padding (channel_multiple) is not theirs.
        impl=dataclasses.replace(self.impl, channel_multiple=0),
        **kw,
      )
      for _ in range(n - 1)
    ]
    # upsamplers[i] brings the codes of level i (i < bottom) to the bottom code resolution.
    self.upsamplers = [
      Upsampler(
        self.code_dim,
        self.level_stride ** (bottom - i),
        impl=self.impl,
        **kw,
      )
      for i in range(n - 1)
    ]
    self.decoder = Decoder(
      self.out_channels,
      self.channels,
      self.res_channels,
      self.num_res_blocks,
      self.first_stride,
      impl=self.impl,
      **kw,
    )

  @property
  def total_stride(self) -> int:
    return self.first_stride * self.level_stride ** (self.levels - 1)

  def _check_input(self, x: jax.Array) -> None:
    s = self.total_stride
    if x.ndim != 4 or x.shape[1] % s or x.shape[2] % s:
      raise ValueError(
        f"expected NHWC images with H and W divisible by {s}, got shape {tuple(x.shape)}"
      )

  def encode(self, x: jax.Array, train: bool = False):
    """Encodes images to quantized code maps.

    Returns:
      (quantized, aux): quantized is a list of [B, h_i, w_i, code_dim] maps, coarsest first;
      aux is the list of each level's quantizer aux dict (indices, losses, counts, metrics).
    """
    self._check_input(x)
    n = self.levels
    features = [None] * n
    h = x
    for i in reversed(range(n)):  # bottom encoder first, on the image
      h = self.encoders[i](h)
      features[i] = h
    quantized, aux = [], []
    for i in range(n):  # top level first: each lower level is conditioned on the one above
      # One scope per level (0 = top), so a profile reads by level: conditioning, quantizer.
      with jax.named_scope(f"level{i}"):
        h = features[i]
        if i > 0:
          h = jnp.concatenate([self.cond_decoders[i - 1](quantized[-1]), h], axis=-1)
        q, a = self.quantizers[i](self.pre_quant[i](h), train=train)
      quantized.append(q)
      aux.append(a)
    return quantized, aux

  def decode(self, quantized: list[jax.Array]) -> jax.Array:
    """Decodes quantized code maps (coarsest first) to images [B, H, W, out_channels]."""
    parts = [self.upsamplers[i](q) for i, q in enumerate(quantized[:-1])]
    return self.decoder(jnp.concatenate(parts + [quantized[-1]], axis=-1))

  def encode_to_indices(self, x: jax.Array) -> tuple[jax.Array, ...]:
    """Images -> one int32 code map per level, coarsest first ([B, h_i, w_i])."""
    _, aux = self.encode(x, train=False)
    return tuple(a["indices"] for a in aux)

  def decode_from_indices(self, codes) -> jax.Array:
    """One int code map per level, coarsest first -> images [B, H, W, out_channels]."""
    if len(codes) != self.levels:
      raise ValueError(f"expected {self.levels} code maps, got {len(codes)}")
    return self.decode([qz.lookup(c) for qz, c in zip(self.quantizers, codes)])

  def __call__(self, x: jax.Array, train: bool = False):
    """Reconstructs x.

    Returns:
      (recon, aux): recon [B, H, W, out_channels] in the compute dtype; aux has "loss"
      (mse + latent losses), "mse", "latent_loss" and per level i (0 = top)
      "level{i}/{perplexity,usage,top_share,commitment,counts,indices}" (indices: the int32
      code map of level i, as `encode_to_indices` returns it).
    """
    quantized, level_aux = self.encode(x, train=train)
    recon = self.decode(quantized)
    mse = jnp.mean(jnp.square(recon.astype(jnp.float32) - x.astype(jnp.float32)))
    latent = sum(a["latent_loss"] for a in level_aux)
    aux = {"loss": mse + latent, "mse": mse, "latent_loss": latent}
    for i, a in enumerate(level_aux):
      for key in ("perplexity", "usage", "top_share", "commitment", "counts", "indices"):
        aux[f"level{i}/{key}"] = a[key]
    return recon, aux
