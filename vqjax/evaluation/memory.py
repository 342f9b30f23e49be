"""Memory-bank anomaly score: distance to the nearest normal images in the quantized latents.

A stage-1 model maps every image to its quantized code maps, one per level, in the codebooks'
own units. Normal images cluster there; an image of something the normal set never shows lies
far from all of them. The score of an image is the mean Euclidean distance from its latent
(every level's quantized map, flattened and concatenated) to the `k` nearest latents of a bank
of normal training images. No network besides the autoencoder is involved: the nearest-
neighbour rule on fixed features is the deep-kNN family of one-class detectors (Bergman,
Cohen and Hoshen 2020, "Deep Nearest Neighbor Anomaly Detection", with pretrained features);
here the features are the autoencoder's own.

  bank = memory.Memory.build(model, variables, normal_batches, size=10_000)
  scores = bank.score(memory.latents(model, variables, images))     # float64 [B]

The squared distances are expanded (|q|^2 + |b|^2 - 2 q.b) with the product at full float32
precision (also on TPUs, whose default would be bfloat16), clamped at zero before the root.
"""

import functools
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_K = 5


def latents(model: Any, variables: Any, images: Any) -> jax.Array:
  """Every level's quantized map of `images`, flattened and concatenated: float32 [B, D]."""
  return _latent_fn(model)(variables, jnp.asarray(images, jnp.float32))


# A few recently used models and their jitted encoder, found by identity (linen modules
# holding dicts cannot be hashed).
_JITTED: list[tuple[Any, Any]] = []


def _latent_fn(model: Any):
  for m, fn in _JITTED:
    if m is model:
      return fn

  def fn(variables, images):
    quantized, _ = model.apply(variables, images, method="encode")
    flat = [q.reshape(q.shape[0], -1).astype(jnp.float32) for q in quantized]
    return jnp.concatenate(flat, axis=-1)

  fn = jax.jit(fn)
  _JITTED[:] = [(model, fn), *_JITTED[:3]]
  return fn


@functools.partial(jax.jit, static_argnames="k")
def _mean_knn_distance(bank: jax.Array, bank_sq: jax.Array, queries: jax.Array, k: int):
  cross = jnp.matmul(queries, bank.T, precision=jax.lax.Precision.HIGHEST)
  sq = jnp.sum(jnp.square(queries), axis=-1, keepdims=True) + bank_sq[None, :] - 2.0 * cross
  nearest, _ = jax.lax.top_k(-sq, k)
  return jnp.mean(jnp.sqrt(jnp.maximum(-nearest, 0.0)), axis=-1)


class Memory:
  """A bank of normal latents and the k-nearest-neighbour distance to it.

  Attributes:
    bank: float32 [N, D] latents of normal images (`latents`).
    k: neighbours averaged; 1 <= k <= N.
  """

  def __init__(self, bank: Any, k: int = DEFAULT_K):
    bank = np.asarray(bank, np.float32)
    if bank.ndim != 2 or not len(bank):
      raise ValueError(f"the memory bank must be a non-empty [N, D] array, got {bank.shape}")
    if not 1 <= k <= len(bank):
      raise ValueError(f"k must be in [1, {len(bank)}] (the bank's size), got {k}")
    self.bank, self.k = bank, int(k)
    self._bank = jnp.asarray(bank)
    self._bank_sq = jnp.sum(jnp.square(self._bank), axis=-1)

  def score(self, queries: Any) -> np.ndarray:
    """Mean Euclidean distance of each query [B, D] to its k nearest bank rows: float64 [B]."""
    queries = jnp.asarray(queries, jnp.float32)
    if queries.ndim != 2 or queries.shape[1] != self.bank.shape[1]:
      raise ValueError(
        f"queries must be [B, {self.bank.shape[1]}] like the bank, got {tuple(queries.shape)}"
      )
    d = _mean_knn_distance(self._bank, self._bank_sq, queries, self.k)
    return np.asarray(d, np.float64)

  @classmethod
  def build(
    cls, model: Any, variables: Any, batches: Iterable[Any], size: int, k: int = DEFAULT_K
  ) -> "Memory":
    """The bank of the first `size` images of `batches` (arrays [B, H, W, C], or eval-iterator
    dicts whose "mask" marks padding), encoded by the stage-1 `model`."""
    if size < 1:
      raise ValueError(f"the memory bank needs size >= 1, got {size}")
    rows, have = [], 0
    for batch in batches:
      images, keep = batch, None
      if isinstance(batch, dict):
        images, keep = batch["image"], np.asarray(batch["mask"]) > 0
      z = np.asarray(latents(model, variables, images))
      z = z[keep] if keep is not None else z
      rows.append(z[: size - have])
      have += len(rows[-1])
      if have >= size:
        break
    if not have:
      raise ValueError("no images to build the memory bank from")
    return cls(np.concatenate(rows), k)
