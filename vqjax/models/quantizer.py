"""Vector quantization: nearest codeword, straight-through gradients, codebook learning.

The quantizer maps each encoder vector z to its nearest codeword e (squared Euclidean distance,
always computed in float32) and passes gradients straight through: z_q = z + sg[e - z].

Two ways to learn the codebook:
  * loss-trained (`ema=False`): latent loss = ||sg[z] - e||^2 + beta * ||z - sg[e]||^2. The
    first (codebook) term moves the codewords, the second (commitment) term, weighted by beta,
    keeps the encoder close to its codewords.
  * EMA (`ema=True`, VQ-VAE appendix): codewords are running means of the vectors assigned to
    them; the latent loss is only beta * commitment. Cluster sizes use Laplace smoothing;
    optional bias correction divides the running sums by 1 - decay^t.

The codebook can be initialised from the first training batch (k-means++ seeding, optionally
followed by Lloyd iterations) and codes unused for `restart_after` steps are re-seeded from
the current batch's encoder outputs. Both are deterministic given the "vq" rng stream.

Variables: the loss-trained codebook is the param "codebook"; everything else, including the
EMA codebook, lives in the "vq_state" collection and changes only when `train=True`.
Under jit with globally sharded arrays, every batch statistic here is global over all devices.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqjax.models import vq_kernel

# The search itself (distances.py), named here too: quantizer.nearest_code is the reference.
from vqjax.models.distances import (  # noqa: F401
  HIGHEST,
  argmin_rows,
  nearest_code,
  nearest_code_bf16,
  require_bf16,
  split_bf16,
  squared_distances,
  squared_distances_bf16,
)
from vqjax.models.impl import Impl

_KMEANS_MAX_POINTS = 16384  # k-means on a random subset: the cost stays flat at any batch size
_INITS = ("normal", "uniform", "kmeans++", "kmeans")


def _weights_like(indices: jax.Array, weights: jax.Array | None) -> jax.Array:
  """float32 weights of indices' shape; weights' axes line up with the leading axes of indices."""
  if weights is None:
    return jnp.ones(indices.shape, jnp.float32)
  weights = jnp.asarray(weights, jnp.float32)
  if weights.ndim > indices.ndim:
    raise ValueError(
      f"weights of shape {weights.shape} have more axes than indices {indices.shape}"
    )
  # Leading-axis alignment (not NumPy's trailing rule): a per-example mask [B] must weigh
  # every position of example b, whatever the code map's spatial shape.
  weights = weights.reshape(weights.shape + (1,) * (indices.ndim - weights.ndim))
  return jnp.broadcast_to(weights, indices.shape)


def code_histogram(
  indices: jax.Array,
  num_codes: int,
  weights: jax.Array | None = None,
  impl: str = "onehot",
) -> jax.Array:
  """(Weighted) histogram of code indices, the one count of codes used across vqjax.

  Args:
    indices: integer code indices, any shape (e.g. a code map [B, h, w]). Indices outside
      [0, num_codes) are not counted.
    num_codes: number of bins K.
    weights: None (every index counts 1) or an array whose axes line up with the LEADING
      axes of `indices`, each of size 1 or equal to the matching axis of `indices`; missing
      trailing axes are broadcast. So a per-example mask [B] weighs every position of example
      b by mask[b] for a code map [B, h, w]; weights of the full shape [B, h, w] are used as
      they are. Index j then adds weights[j] to its bin.
    impl: "onehot" (a one-hot matrix reduction, no atomic scatter; fast on accelerators) or
      "scatter" (segment sum, O(N) memory). Both give the same counts up to float32
      summation order (exactly the same for integer weights below 2**24).

  Returns:
    float32 [num_codes]: the summed weight of each code.
  """
  flat = indices.reshape(-1)
  if impl == "onehot":
    onehot = jax.nn.one_hot(flat, num_codes, dtype=jnp.float32)
    if weights is None:
      return jnp.sum(onehot, axis=0)
    w = _weights_like(indices, weights).reshape(-1)
    return jnp.einsum("n,nk->k", w, onehot, precision=HIGHEST)
  if impl == "scatter":
    w = _weights_like(indices, weights).reshape(-1)
    return jax.ops.segment_sum(w, flat, num_segments=num_codes)
  raise ValueError(f"unknown histogram impl {impl!r}; expected 'onehot' or 'scatter'")


def cluster_sums(
  x: jax.Array,
  indices: jax.Array,
  num_codes: int,
  impl: str = "scatter",
  matmul_impl: str = "float32",
) -> tuple[jax.Array, jax.Array]:
  """Per-code counts and sums of the vectors assigned to each code.

  Args:
    x: vectors [N, D].
    indices: int assignments [N].
    num_codes: number of codes K.
    impl: "scatter" (segment sums) or "onehot" (one [N, K] one-hot, shared by the counts and
      the sums; avoids atomic contention on accelerators when many vectors share a few codes).
    matmul_impl: for impl="onehot": "float32" (the sums as a float32 HIGHEST matmul) or "bf16"
      (x must be bfloat16: a bfloat16 one-hot, exact, times x with float32 accumulation).

  Returns:
    (counts float32 [K], sums float32 [K, D]); counts equal `code_histogram(indices, K)`.
  """
  if impl == "scatter":
    counts = code_histogram(indices, num_codes, impl="scatter")
    x = x.astype(jnp.float32)  # a bfloat16 x would be summed in bfloat16
    return counts, jax.ops.segment_sum(x, indices, num_segments=num_codes)
  if impl == "onehot":
    # The same reduction as code_histogram's, on a one-hot built once for both statistics.
    if matmul_impl == "bf16":
      require_bf16(x)
      onehot = jax.nn.one_hot(indices, num_codes, dtype=jnp.bfloat16)
      sums = jnp.einsum("nk,nd->kd", onehot, x, preferred_element_type=jnp.float32)
      return jnp.sum(onehot, axis=0, dtype=jnp.float32), sums
    onehot = jax.nn.one_hot(indices, num_codes, dtype=jnp.float32)
    x = x.astype(jnp.float32)
    return jnp.sum(onehot, axis=0), jnp.einsum("nk,nd->kd", onehot, x, precision=HIGHEST)
  raise ValueError(f"unknown cluster statistics impl {impl!r}; expected 'scatter' or 'onehot'")


def usage_metrics(counts: jax.Array) -> dict[str, jax.Array]:
  """Code usage statistics of a histogram (the one place they are computed).

  Args:
    counts: [K] code histogram (any numeric dtype, e.g. from `code_histogram`).

  Returns:
    {"perplexity": exp(entropy of counts / sum), "usage": fraction of codes with a nonzero
    count, "top_share": share of the most used code}, float32 scalars.
  """
  counts = counts.astype(jnp.float32)
  total = jnp.maximum(jnp.sum(counts), 1.0)
  p = counts / total
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return {
    "perplexity": jnp.exp(entropy),
    "usage": jnp.mean((counts > 0).astype(jnp.float32)),
    "top_share": jnp.max(counts) / total,
  }


def subsample(x: jax.Array, rng: jax.Array, max_points: int = _KMEANS_MAX_POINTS) -> jax.Array:
  """At most `max_points` rows of x drawn at random (with replacement when subsampling)."""
  if x.shape[0] <= max_points:
    return x
  return x[jax.random.randint(rng, (max_points,), 0, x.shape[0])]


def kmeans_plus_plus(x: jax.Array, k: int, rng: jax.Array) -> jax.Array:
  """k-means++ seeding: k rows of x, each drawn with probability ~ squared distance to the
  nearest already chosen one. x: [N, D] -> [k, D] float32."""
  x = x.astype(jnp.float32)
  rng, first_rng = jax.random.split(rng)
  first = x[jax.random.randint(first_rng, (), 0, x.shape[0])]
  centers = jnp.zeros((k, x.shape[1]), jnp.float32).at[0].set(first)
  d2 = squared_distances(x, first[None])[:, 0]

  def body(i, carry):
    centers, d2, rng = carry
    rng, pick_rng = jax.random.split(rng)
    # Points already chosen have d2 == 0 and so (almost) no chance to be drawn again.
    logits = jnp.log(jnp.maximum(d2, 0.0) + 1e-20)
    c = x[jax.random.categorical(pick_rng, logits)]
    d2 = jnp.minimum(d2, squared_distances(x, c[None])[:, 0])
    return centers.at[i].set(c), d2, rng

  centers, _, _ = jax.lax.fori_loop(1, k, body, (centers, d2, rng))
  return centers


def lloyd(x: jax.Array, centers: jax.Array, iters: int) -> jax.Array:
  """`iters` k-means (Lloyd) iterations from `centers`; empty clusters keep their center."""
  x = x.astype(jnp.float32)
  k = centers.shape[0]

  def body(_, centers):
    assign = nearest_code(x, centers)
    sums = jax.ops.segment_sum(x, assign, num_segments=k)
    counts = jax.ops.segment_sum(jnp.ones_like(assign, jnp.float32), assign, num_segments=k)
    return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centers)

  return jax.lax.fori_loop(0, iters, body, centers)


def ema_codebook(ema_sum, ema_count, weight, eps):
  """Codebook from EMA statistics with Laplace-smoothed cluster sizes.

  `weight` is the bias-correction divisor (1 - decay^t), or 1 without bias correction.
  """
  count = ema_count / weight
  n = jnp.sum(count)
  smoothed = (count + eps) / (n + count.shape[0] * eps) * n
  return (ema_sum / weight) / smoothed[:, None]


class VectorQuantizer(nn.Module):
  """Nearest-codeword quantizer with a loss-trained or EMA codebook.

  Attributes:
    num_codes: codebook size K.
    code_dim: codeword dimension D (the last axis of the input).
    beta: weight of the commitment term ||z - sg[e]||^2.
    ema: EMA codebook (True) or codebook learned by the codebook loss (False).
    decay: EMA decay.
    eps: Laplace smoothing of the EMA cluster sizes.
    bias_correction: divide EMA statistics by 1 - decay^t (they then start from zero, and
      codes unused in the first steps decay towards the zero vector until restarted; after a
      data init the statistics are unbiased and the correction stays 1).
    codebook_init: "normal" (N(0, 1), as the PyTorch reference), "uniform" (U(-1/K, 1/K)), or
      "kmeans++" / "kmeans" (from the first training batch; "kmeans" adds Lloyd iterations).
    kmeans_iters: Lloyd iterations for codebook_init="kmeans".
    restart_after: re-seed codes unused for this many training steps (0 = never).
    impl: the forms it computes in (models/impl.py), all giving the same values up to
      float32 summation order: `vq_stats` "scatter" or "onehot" per-code counts and sums;
      `vq_distance` "xla" (the [N, K] distances, then argmin; the reference) or "pallas"
      (models/vq_kernel.py: a fused kernel that never writes the distances; interpreted,
      slowly, on the CPU); `vq_matmul` "float32" (HIGHEST precision) or "bf16" (bfloat16
      inputs only: bfloat16 matmuls with float32 products and accumulation, see `split_bf16`).
    dtype: dtype of the quantized output (distances and statistics stay float32).
    param_dtype: dtype of the codebook parameter (loss-trained codebook).
  """

  num_codes: int = 512
  code_dim: int = 64
  beta: float = 0.25
  ema: bool = True
  decay: float = 0.99
  eps: float = 1e-5
  bias_correction: bool = False
  codebook_init: str = "kmeans++"
  kmeans_iters: int = 10
  restart_after: int = 0
  impl: Impl = Impl()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    if self.codebook_init not in _INITS:
      raise ValueError(f"unknown codebook init {self.codebook_init!r}; expected one of {_INITS}")
    k, d = self.num_codes, self.code_dim

    def initial_codebook(rng):
      if self.codebook_init == "uniform":
        return jax.random.uniform(rng, (k, d), jnp.float32, -1.0 / k, 1.0 / k)
      return jax.random.normal(rng, (k, d), jnp.float32)

    from_data = self.codebook_init in ("kmeans++", "kmeans")
    self.initialized = self.variable(
      "vq_state", "initialized", lambda: jnp.array(not from_data, jnp.bool_)
    )
    self.unused_steps = self.variable("vq_state", "unused_steps", jnp.zeros, (k,), jnp.int32)
    if self.ema:
      self.codebook_var = self.variable(
        "vq_state", "codebook", lambda: initial_codebook(self.make_rng("params"))
      )
      # The reference starts EMA sums at the codebook with zero counts; with bias correction
      # both start at zero and `ema_weight` (1 - decay^t) undoes the bias.
      start = 0.0 if self.bias_correction else 1.0
      self.ema_count = self.variable("vq_state", "ema_count", jnp.zeros, (k,), jnp.float32)
      self.ema_sum = self.variable("vq_state", "ema_sum", lambda: start * self.codebook_var.value)
      self.ema_weight = self.variable("vq_state", "ema_weight", lambda: jnp.array(start))
    else:
      self.codebook_param = self.param(
        "codebook", lambda rng: initial_codebook(rng).astype(self.param_dtype)
      )
      # Data init and restarts set codewords through this offset, so the parameter (and its
      # optimizer state) is never overwritten: codebook = param + offset.
      self.offset = self.variable("vq_state", "offset", jnp.zeros, (k, d), jnp.float32)

  @property
  def codebook(self) -> jax.Array:
    """The current codebook, float32 [K, D]."""
    if self.ema:
      return self.codebook_var.value
    return self.codebook_param.astype(jnp.float32) + self.offset.value

  def lookup(self, indices: jax.Array) -> jax.Array:
    """Codewords for integer indices of any shape -> [..., D] in `dtype`."""
    return jnp.take(self.codebook, indices, axis=0).astype(self.dtype)

  def _set_codes(self, new_codes, mask, count):
    """Overwrite the codewords where mask [K] is set (dead-code restarts)."""
    if self.ema:
      w = self.ema_weight.value
      self.ema_count.value = jnp.where(mask, count * w, self.ema_count.value)
      self.ema_sum.value = jnp.where(mask[:, None], new_codes * count * w, self.ema_sum.value)
      self.codebook_var.value = jnp.where(mask[:, None], new_codes, self.codebook_var.value)
    else:
      # The parameter keeps its gradient: only the offset, a constant, absorbs the change.
      param = jax.lax.stop_gradient(self.codebook_param.astype(jnp.float32))
      self.offset.value = jnp.where(mask[:, None], new_codes - param, self.offset.value)

  def _init_from_data(self, flat_z, rng):
    """Seeds every codeword from the batch on the first training step, a no-op afterwards."""
    k = self.num_codes
    # Give each seeded code the average share of the batch, so the first EMA steps move the
    # codewords at the usual rate.
    count = max(flat_z.shape[0] / k, 1.0)
    if self.ema:
      state = (
        self.ema_count.value,
        self.ema_sum.value,
        self.codebook_var.value,
        self.ema_weight.value,
      )
    else:
      state = (self.offset.value,)
    param = None if self.ema else jax.lax.stop_gradient(self.codebook_param.astype(jnp.float32))

    def seed(state):
      x = subsample(flat_z, jax.random.fold_in(rng, 0))
      centers = kmeans_plus_plus(x, k, jax.random.fold_in(rng, 1))
      if self.codebook_init == "kmeans":
        centers = lloyd(x, centers, self.kmeans_iters)
      if self.ema:
        # Seeded statistics carry no bias towards zero: with bias correction the weight
        # starts at 1 (it then stays 1), else the seeds would be scaled by 0 and lost.
        weight = jnp.ones_like(state[3])
        return (jnp.full_like(state[0], count), centers * count, centers, weight)
      # The parameter keeps its gradient: only the offset, a constant, absorbs the seeds.
      return (centers - param,)

    # A cond, not a select: after the first step neither the subsample nor k-means runs.
    state = jax.lax.cond(self.initialized.value, lambda s: s, seed, state)
    if self.ema:
      (self.ema_count.value, self.ema_sum.value, self.codebook_var.value, self.ema_weight.value) = (
        state
      )
    else:
      (self.offset.value,) = state
    self.initialized.value = jnp.array(True)

  def _ema_update(self, counts, sums):
    d = self.decay
    self.ema_count.value = d * self.ema_count.value + (1 - d) * counts
    self.ema_sum.value = d * self.ema_sum.value + (1 - d) * sums
    if self.bias_correction:
      self.ema_weight.value = d * self.ema_weight.value + (1 - d)
    # Without bias correction ema_weight stays 1: the sums are used as they are.
    self.codebook_var.value = ema_codebook(
      self.ema_sum.value, self.ema_count.value, self.ema_weight.value, self.eps
    )

  def _restart_dead_codes(self, flat_z, counts, rng):
    unused = jnp.where(counts > 0, 0, self.unused_steps.value + 1)
    dead = unused >= self.restart_after
    picks = flat_z[jax.random.randint(rng, (self.num_codes,), 0, flat_z.shape[0])]
    self._set_codes(picks, dead, 1.0)
    self.unused_steps.value = jnp.where(dead, 0, unused)

  def __call__(self, z: jax.Array, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Quantizes z [..., D].

    Args:
      z: encoder outputs, last axis = code_dim.
      train: update codebook statistics (EMA, data init, restarts) from this batch.

    Returns:
      (z_q, aux): z_q has z's shape and straight-through gradients; aux holds "indices",
      "latent_loss", "commitment", "codebook_loss", "counts" (int32 [K] histogram of
      the batch's codes) and the usage metrics.
    """
    if z.shape[-1] != self.code_dim:
      raise ValueError(f"quantizer expects last axis {self.code_dim}, got shape {z.shape}")
    z32 = z.astype(jnp.float32)
    flat = z32.reshape(-1, self.code_dim)
    flat_sg = jax.lax.stop_gradient(flat)
    rng = self.make_rng("vq") if train and self._needs_rng else None

    # Named scopes: a profile (config.log.profile_steps) shows each phase's device time.
    if train and self.codebook_init in ("kmeans++", "kmeans"):
      with jax.named_scope("vq_data_init"):
        self._init_from_data(flat_sg, jax.random.fold_in(rng, 0))

    codebook = self.codebook
    matmul = self.impl.vq_matmul
    # bf16 matmuls take z as it came (bfloat16, exact); the float32 path its float32 copy.
    search_x = jax.lax.stop_gradient(z.reshape(-1, self.code_dim)) if matmul == "bf16" else flat_sg
    distance_impl = self.impl.vq_distance
    with jax.named_scope("vq_distances_argmin"):
      if distance_impl == "xla":
        search = nearest_code_bf16 if matmul == "bf16" else nearest_code
        idx = search(search_x, codebook)
      else:
        idx = vq_kernel.nearest_code_impl(search_x, codebook, distance_impl, bf16=matmul == "bf16")
    e = jnp.take(codebook, idx, axis=0)
    commitment = jnp.mean(jnp.square(flat - jax.lax.stop_gradient(e)))
    codebook_loss = jnp.zeros((), jnp.float32) if self.ema else jnp.mean(jnp.square(flat_sg - e))
    latent_loss = codebook_loss + self.beta * commitment
    with jax.named_scope("vq_statistics"):
      if train and self.ema:
        # One pass over the assignments gives the EMA statistics and the histogram.
        counts, sums = cluster_sums(search_x, idx, self.num_codes, self.impl.vq_stats, matmul)
        self._ema_update(counts, sums)
      else:
        counts = code_histogram(idx, self.num_codes, impl=self.impl.vq_stats)
      counts = counts.astype(jnp.int32)  # exact: float32 holds integer counts below 2**24
    if train and self.restart_after > 0:
      with jax.named_scope("vq_restarts"):
        self._restart_dead_codes(flat_sg, counts, jax.random.fold_in(rng, 1))

    zq = flat + jax.lax.stop_gradient(e - flat)
    aux = {
      "indices": idx.reshape(z.shape[:-1]),
      "latent_loss": latent_loss,
      "commitment": commitment,
      "codebook_loss": codebook_loss,
      "counts": counts,
      **usage_metrics(counts),
    }
    return zq.reshape(z.shape).astype(self.dtype), aux

  @property
  def _needs_rng(self) -> bool:
    return self.codebook_init in ("kmeans++", "kmeans") or self.restart_after > 0
