"""The single-level VQ-VAE (van den Oord et al. 2017).

Encoder: stride-2 4x4 convs (2 of them for the paper's CIFAR-10 setup, /4), a 3x3 conv and
residual blocks (ReLU, 3x3 conv, ReLU, 1x1 conv); a 1x1 conv to the code dimension; the
quantizer; decoder: a 3x3 conv, residual blocks and stride-2 4x4 transposed convs.
This is exactly the one-level case of the hierarchy, so it is built from the same module and
has the same API (`__call__`, `encode_to_indices`, `decode_from_indices`).
"""

from typing import Any

import jax.numpy as jnp

from vqjax.models.hierarchy import VQVAE2
from vqjax.models.impl import Impl


def VQVAE(  # noqa: N802 - a module constructor, named like the class it builds
  out_channels: int = 3,
  channels: int = 256,
  res_channels: int = 256,
  num_res_blocks: int = 2,
  downsample: int = 2,
  quantizer: dict | None = None,
  impl: Impl | None = None,
  dtype: Any = jnp.float32,
  param_dtype: Any = jnp.float32,
) -> VQVAE2:
  """Builds a single-level VQ-VAE.

  Args:
    out_channels: image channels.
    channels: hidden channels (256 in the paper).
    res_channels: hidden channels inside residual blocks.
    num_res_blocks: residual blocks in encoder and decoder (2 in the paper).
    downsample: number of stride-2 convs; codes are 2**downsample times smaller than images.
    quantizer: VectorQuantizer keyword arguments (num_codes, code_dim, beta, ema, ...).
    impl: the forms the layers compute in (models/impl.py; the same function); None: `Impl()`.
    dtype: compute dtype.
    param_dtype: parameter dtype.

  Returns:
    A VQVAE2 module with one level.
  """
  return VQVAE2(
    out_channels=out_channels,
    channels=channels,
    res_channels=res_channels,
    num_res_blocks=num_res_blocks,
    levels=1,
    first_stride=2**downsample,
    quantizer=quantizer,
    impl=Impl() if impl is None else impl,
    dtype=dtype,
    param_dtype=param_dtype,
  )
