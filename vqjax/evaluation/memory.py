"""Anomaly scores measured against a memory of normal training images: nearest neighbours in the
quantized latents, and the code frequencies behind the likelihood ratio.

A stage-1 model maps every image to its quantized code maps, one per level, in the codebooks'
own units. Normal images cluster there; an image of something the normal set never shows lies
far from all of them. The score of an image is the mean Euclidean distance from its latent
(every level's quantized map, flattened and concatenated) to the `k` nearest latents of a bank
of normal training images. No network besides the autoencoder is involved: the nearest-
neighbour rule on fixed features is the deep-kNN family of one-class detectors (Bergman,
Cohen and Hoshen 2020, "Deep Nearest Neighbor Anomaly Detection", with pretrained features);
here the features are the autoencoder's own.

  bank = memory.Memory.build(model, variables, normal_batches, size=10_000, num_codes=512)
  scores = bank.score(memory.latents(model, variables, images))     # float64 [B]

The same pass counts each level's codes. Their add-one-smoothed frequencies are the simplest
model of the codes there is: no context at all. `code_nll` is an image's nats under it, and the
prior's nats minus these ("nll_ratio", evaluation/anomaly.py) is the log-likelihood ratio of a
model with context against one without (Ren et al. 2019, "Likelihood Ratios for
Out-of-Distribution Detection"; Serra et al. 2020, "Input Complexity and Out-of-distribution
Detection with Likelihood-based Generative Models", who subtract a generic compressor's code
length). What the frequencies explain, an image's share of cheap, common codes (plain
background) or of rare ones (texture), cancels; what is left is whether the codes fit
together the way they do in normal images.

The squared distances are expanded (|q|^2 + |b|^2 - 2 q.b) with the product at full float32
precision (also on TPUs, whose default would be bfloat16), clamped at zero before the root.
"""

import functools
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vqjax.evaluation import model_jit

DEFAULT_K = 5


def latents(model: Any, variables: Any, images: Any) -> jax.Array:
  """Every level's quantized map of `images`, flattened and concatenated: float32 [B, D]."""
  return latents_and_codes(model, variables, images)[0]


def latents_and_codes(model: Any, variables: Any, images: Any) -> tuple[jax.Array, list]:
  """`latents`, and each level's int code map [B, h_i, w_i] (coarsest first)."""
  return _latent_fn(model)(variables, jnp.asarray(images, jnp.float32))


def encode_latents(model: Any, variables: Any, images: jax.Array) -> tuple[jax.Array, list]:
  """`latents_and_codes` unjitted, to trace inside a caller's own jitted function. Needs the
  stage-1 model's `encode` method (quantized maps and per-level aux with "indices"), which the
  built-in autoencoders have; `has_encode` says whether a model does."""
  quantized, aux = model.apply(variables, images, method="encode")
  flat = [q.reshape(q.shape[0], -1).astype(jnp.float32) for q in quantized]
  return jnp.concatenate(flat, axis=-1), [a["indices"] for a in aux]


def has_encode(model: Any) -> bool:
  """Whether `model` has the `encode` method the latents need (a plugin may not)."""
  return callable(getattr(type(model), "encode", None))


@model_jit.per_model
def _latent_fn(model: Any):
  return functools.partial(encode_latents, model)


@functools.partial(jax.jit, static_argnames="k")
def _mean_knn_distance(bank: jax.Array, bank_sq: jax.Array, queries: jax.Array, k: int):
  cross = jnp.matmul(queries, bank.T, precision=jax.lax.Precision.HIGHEST)
  sq = jnp.sum(jnp.square(queries), axis=-1, keepdims=True) + bank_sq[None, :] - 2.0 * cross
  nearest, _ = jax.lax.top_k(-sq, k)
  return jnp.mean(jnp.sqrt(jnp.maximum(-nearest, 0.0)), axis=-1)


class BankTooLargeError(ValueError):
  """The bank asked for would not fit the memory allowed."""


def _size(num_bytes: int) -> str:
  return f"{num_bytes / 2**30:.1f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


class Memory:
  """A bank of normal latents and the k-nearest-neighbour distance to it, and the normal
  images' code counts.

  Attributes:
    bank: float32 [N, D] latents of normal images (`latents`).
    k: neighbours averaged; 1 <= k <= N.
    counts: per level, int64 [K] occurrences of each code in the same images; None = none
      counted (then `code_nll` cannot be asked).
  """

  def __init__(self, bank: Any, k: int = DEFAULT_K, counts: list[Any] | None = None):
    bank = np.asarray(bank, np.float32)
    if bank.ndim != 2 or not len(bank):
      raise ValueError(f"the memory bank must be a non-empty [N, D] array, got {bank.shape}")
    if not 1 <= k <= len(bank):
      raise ValueError(f"k must be in [1, {len(bank)}] (the bank's size), got {k}")
    self.bank, self.k = bank, int(k)
    self.counts = None if counts is None else [np.asarray(c, np.int64) for c in counts]
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

  def code_nll(self, codes: Any) -> np.ndarray:
    """Nats of each image's codes (one int map [B, h_i, w_i] per level) under the levels'
    add-one-smoothed code frequencies, summed over positions and levels: float64 [B]."""
    if self.counts is None:
      raise ValueError("this memory counted no codes (build it with Memory.build)")
    if len(codes) != len(self.counts):
      raise ValueError(f"expected {len(self.counts)} code maps, got {len(codes)}")
    total = 0.0
    for c, counts in zip(codes, self.counts, strict=True):
      logp = np.log((counts + 1.0) / (counts.sum() + len(counts)))
      c = np.asarray(c)
      total = total - logp[c].reshape(len(c), -1).sum(axis=1)
    return total

  @classmethod
  def build(
    cls,
    model: Any,
    variables: Any,
    batches: Iterable[Any],
    size: int,
    num_codes: int,
    k: int = DEFAULT_K,
    max_bytes: int | None = None,
  ) -> "Memory":
    """The memory of the first `size` images of `batches` (arrays [B, H, W, C], or eval-
    iterator dicts whose "mask" marks padding), encoded by the stage-1 `model` whose levels
    have `num_codes` codes each.

    Raises:
      BankTooLargeError: a bank of `size` float32 latents larger than `max_bytes` (checked
        after the first batch, before the bank grows).
      ValueError: `size` < 1, or no images.
    """
    if size < 1:
      raise ValueError(f"the memory bank needs size >= 1, got {size}")
    rows, counts, have = [], None, 0
    for batch in batches:
      images, keep = batch, None
      if isinstance(batch, dict):
        images, keep = batch["image"], np.asarray(batch["mask"]) > 0
      z, codes = latents_and_codes(model, variables, images)
      z, codes = np.asarray(z), [np.asarray(c) for c in codes]
      if keep is not None:
        z, codes = z[keep], [c[keep] for c in codes]
      if max_bytes is not None and size * z.shape[1] * 4 > max_bytes:
        fits = max(max_bytes // (z.shape[1] * 4), 1)
        raise BankTooLargeError(
          f"a bank of {size} latents of {z.shape[1]} numbers takes "
          f"{_size(size * z.shape[1] * 4)}, over the {_size(max_bytes)} allowed; use at most "
          f"{fits} images"
        )
      take = size - have
      rows.append(z[:take])
      got = [np.bincount(c[:take].ravel(), minlength=num_codes) for c in codes]
      counts = got if counts is None else [a + b for a, b in zip(counts, got, strict=True)]
      have += len(rows[-1])
      if have >= size:
        break
    if not have:
      raise ValueError("no images to build the memory bank from")
    return cls(np.concatenate(rows), k, counts)
