"""A small residual image classifier: the judge of samples and the feature space of evaluation.

The VQ-VAE-2 paper rejects prior samples that a pretrained classifier does not recognise as
their class (sampling/rejection.py); the same network's pooled penultimate features serve as
the feature space of Frechet distance, precision/recall and an Inception-style score on
datasets where an Inception network is a poor fit (Fashion-MNIST, small images).

Layout: a conv stem (optionally strided, patchify-style, for large images), `num_stages`
stages of `num_blocks` pre-activation residual blocks, the first block of every stage after
the first halving the resolution with a stride-2 conv while the width doubles, then a final
norm, global average pooling (`features`) and one dense layer to the logits.

GroupNorm instead of batch norm: the classifier then has no running statistics, so the train
state is params + optimiser state like every other task, and eval does not depend on the batch.

Contract (NHWC, images in [-1, 1]):
  variables = model.init({"params": rng, "dropout": rng}, x, train=False) -> {"params": ...}
  logits = model.apply(variables, x, train=True, rngs={"dropout": rng})  # [B, num_classes]
  feats = model.apply(variables, x, method="features")  # [B, feature_dim], float32
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def _norm(
  channels: int, groups: int, dtype: Dtype, param_dtype: Dtype, name: str | None = None
) -> nn.Module:
  # The largest group count <= `groups` that divides the width, so any width works.
  return nn.GroupNorm(
    num_groups=math.gcd(channels, groups), dtype=dtype, param_dtype=param_dtype, name=name
  )


class ResBlock(nn.Module):
  """Pre-activation residual block: norm-act-conv3x3, norm-act-dropout-conv3x3, plus a skip.

  Attributes:
    channels: output width.
    stride: 1, or 2 to halve the resolution (the skip then is a strided 1x1 conv).
    dropout: dropout rate before the second conv (train only).
    norm_groups: GroupNorm groups (reduced to a divisor of the width).
  """

  channels: int
  stride: int = 1
  dropout: float = 0.0
  norm_groups: int = 8
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.swish(_norm(x.shape[-1], self.norm_groups, self.dtype, self.param_dtype, "norm1")(x))
    skip = x
    if self.stride != 1 or x.shape[-1] != self.channels:
      # Projected from the normalised input, as in pre-activation ResNets.
      skip = nn.Conv(self.channels, (1, 1), strides=self.stride, name="skip", **kw)(h)
    h = nn.Conv(self.channels, (3, 3), strides=self.stride, name="conv1", **kw)(h)
    h = nn.swish(_norm(self.channels, self.norm_groups, self.dtype, self.param_dtype, "norm2")(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    # Zero-initialised: every block starts as the identity, so deeper nets train from step 0.
    h = nn.Conv(self.channels, (3, 3), kernel_init=nn.initializers.zeros, name="conv2", **kw)(h)
    return skip + h


class Classifier(nn.Module):
  """Residual CNN classifier with a `features` entry point (see the module docstring).

  Attributes:
    num_classes: number of logits.
    channels: width of the first stage; stage i has channels * 2**i.
    num_stages: stages; every one after the first halves the resolution.
    num_blocks: residual blocks per stage.
    stem_stride: stride (and kernel size, when > 1) of the stem conv: 1 for small images, 4
      for 256px ImageNet (a patchify stem, so the first stage runs at 64x64).
    dropout: dropout rate inside the residual blocks (train only).
    norm_groups: GroupNorm groups.
    dtype: compute dtype; the pooled features and logits are returned in float32.
    param_dtype: parameter dtype.
  """

  num_classes: int
  channels: int = 32
  num_stages: int = 3
  num_blocks: int = 1
  stem_stride: int = 1
  dropout: float = 0.0
  norm_groups: int = 8
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.stem_stride > 1:
      self.stem = nn.Conv(
        self.channels, (self.stem_stride,) * 2, strides=self.stem_stride, padding="VALID", **kw
      )
    else:
      self.stem = nn.Conv(self.channels, (3, 3), **kw)
    blocks = []
    for stage in range(self.num_stages):
      for b in range(self.num_blocks):
        blocks.append(
          ResBlock(
            channels=self.channels * 2**stage,
            stride=2 if stage > 0 and b == 0 else 1,
            dropout=self.dropout,
            norm_groups=self.norm_groups,
            **kw,
          )
        )
    self.blocks = blocks
    self.final_norm = _norm(self.feature_dim, self.norm_groups, self.dtype, self.param_dtype)
    # The head stays float32: the logits feed a softmax and a log-likelihood.
    self.head = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype)

  @property
  def feature_dim(self) -> int:
    """Width of `features`: the last stage's channels."""
    return self.channels * 2 ** (self.num_stages - 1)

  def features(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Pooled penultimate features.

    Args:
      images: float [B, H, W, C] in [-1, 1].
      train: apply dropout (needs a "dropout" rng).

    Returns:
      float32 [B, feature_dim]: the global average of the last stage after its norm and
      activation, the input of the dense head.
    """
    h = self.stem(images.astype(self.dtype))
    for block in self.blocks:
      h = block(h, train)
    h = nn.swish(self.final_norm(h))
    return jnp.mean(h.astype(jnp.float32), axis=(1, 2))

  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Class logits.

    Args:
      images: float [B, H, W, C] in [-1, 1].
      train: apply dropout (needs a "dropout" rng).

    Returns:
      float32 [B, num_classes].
    """
    return self.head(self.features(images, train))


def from_config(config: Any, dtype: Dtype, param_dtype: Dtype) -> Classifier:
  """The classifier of a run config (what `models/registry.py` builds for "classifier").

  Args:
    config: the run config: `config.classifier.num_classes` and `.stem_stride`;
      `config.model.channels` (first-stage width), `.num_blocks` (stages), `.num_res_blocks`
      (residual blocks per stage) and `.dropout`.
    dtype: compute dtype.
    param_dtype: parameter dtype.

  Returns:
    The module.
  """
  m = config.model
  return Classifier(
    num_classes=config.classifier.num_classes,
    channels=m.channels,
    num_stages=m.num_blocks,
    num_blocks=m.num_res_blocks,
    stem_stride=config.classifier.stem_stride,
    dropout=m.dropout,
    dtype=dtype,
    param_dtype=param_dtype,
  )
