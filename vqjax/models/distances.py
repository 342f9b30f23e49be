"""Nearest-codeword search in float32 numerics: squared distances, the row argmin, and the
bfloat16 matmuls with exact float32 products (`split_bf16`).

The reference ("xla") search of the quantizer (`quantizer.py`); the fused Pallas kernel
(`vq_kernel.py`) gives the same indices and falls back to these functions.
"""

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def squared_distances(x: jax.Array, codebook: jax.Array) -> jax.Array:
  """Pairwise ||x_n - e_k||^2 in float32, [N, D] x [K, D] -> [N, K]."""
  x = x.astype(jnp.float32)
  codebook = codebook.astype(jnp.float32)
  cross = jnp.einsum("nd,kd->nk", x, codebook, precision=HIGHEST)
  return jnp.sum(x * x, axis=1, keepdims=True) - 2.0 * cross + jnp.sum(codebook * codebook, axis=1)


def argmin_rows(d: jax.Array, blocked: bool | None = None) -> jax.Array:
  """Index of each row's smallest entry, [N, K] -> int32 [N]: jnp.argmin's result (the first
  index on ties, the first NaN where there is one), except, blocked, in a row holding both -inf
  and NaN in different blocks (then the first of them; squared distances are never -inf).

  `blocked` (default: on the CPU) takes the minimum of each block of 32 columns (a plain
  reduction XLA:CPU vectorises), the argmin over the N x K/32 block minima, then the argmin
  within the block that won. XLA:CPU's argmin is a serial pair reduction: 12.5-13.2 ms for
  the search over 8192 x 512 distances on 2 cores, 4.1-4.8 ms blocked (benchmarks/RESULTS.md). The
  first block holding the row's minimum holds its first minimal index, so ties resolve the same.
  """
  if blocked is None:
    blocked = jax.default_backend() == "cpu"
  n, k = d.shape
  width = next((b for b in (32, 16, 8) if k % b == 0 and k > b), 0)
  if not blocked or not width:
    return jnp.argmin(d, axis=1).astype(jnp.int32)
  groups = d.reshape(n, k // width, width)
  # A block holding a NaN ranks first (-inf), so the first NaN wins as in jnp.argmin: a plain
  # min reduction may skip NaNs (XLA:CPU's does). Only a row holding both -inf and NaN can
  # differ from jnp.argmin.
  lowest = jnp.where(jnp.isnan(groups).any(axis=2), -jnp.inf, jnp.min(groups, axis=2))
  block = jnp.argmin(lowest, axis=1)
  within = jnp.take_along_axis(groups, block[:, None, None], axis=1)[:, 0]
  return (block * width + jnp.argmin(within, axis=1)).astype(jnp.int32)


def nearest_code(x: jax.Array, codebook: jax.Array) -> jax.Array:
  """Index of the nearest codeword for each row of x ([N, D] -> int32 [N])."""
  return argmin_rows(squared_distances(x, codebook))


# --- bfloat16 matmuls with float32 products -----------------------------------------------------
# In a bfloat16 model the quantizer's input z is bfloat16, so each of its two matmuls has one
# operand that bfloat16 holds exactly: z itself in z . e (the distances) and the one-hot in
# onehot^T . z (the EMA sums). A float32 codebook is split into three bfloat16 parts whose sum
# is the codeword exactly. A bfloat16 x bfloat16 product is exact in float32, so bfloat16
# tensor-core matmuls with float32 accumulation give the float32 (HIGHEST) results up to
# summation order, at the bfloat16 rate instead of float32's (which has no tensor cores on GPUs).


def split_bf16(a: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Three bfloat16 arrays (hi, mid, lo) whose float32 sum is float32 `a` exactly.

  Each part takes the next 8 significant bits (bfloat16's precision, round to nearest) of
  what is left: 8 + 8 + 8 covers float32's 24. Exact for values in bfloat16's normal range
  (|a| above about 1e-36, where the lowest part would be subnormal). `lax.reduce_precision`,
  not a float32 -> bfloat16 -> float32 round trip, does the rounding: XLA may fold such a round
  trip away (xla_allow_excess_precision), which would silently leave mid = lo = 0.
  """
  a = a.astype(jnp.float32)
  hi = jax.lax.reduce_precision(a, exponent_bits=8, mantissa_bits=7)
  rest = a - hi
  mid = jax.lax.reduce_precision(rest, exponent_bits=8, mantissa_bits=7)
  lo = rest - mid
  return hi.astype(jnp.bfloat16), mid.astype(jnp.bfloat16), lo.astype(jnp.bfloat16)


def require_bf16(x: jax.Array) -> None:
  if x.dtype != jnp.bfloat16:
    raise ValueError(
      f"matmul_impl='bf16' needs bfloat16 inputs (a bfloat16 model), got {x.dtype}: only then "
      "are its products exact"
    )


def squared_distances_bf16(x: jax.Array, codebook: jax.Array) -> jax.Array:
  """`squared_distances` for bfloat16 x [N, D] in one bfloat16 matmul: x . (hi + mid + lo).

  The three codebook parts are laid side by side along the contracted axis ([K, 3D]) and x is
  repeated to match ([N, 3D]), so one matmul with float32 accumulation sums all 3D exact
  products. The norms are float32, as in `squared_distances`.
  """
  require_bf16(x)
  codebook = codebook.astype(jnp.float32)
  parts = jnp.concatenate(split_bf16(codebook), axis=1)
  cross = jnp.einsum(
    "nd,kd->nk", jnp.concatenate([x, x, x], axis=1), parts, preferred_element_type=jnp.float32
  )
  x32 = x.astype(jnp.float32)
  return jnp.sum(x32 * x32, axis=1, keepdims=True) - 2.0 * cross + jnp.sum(codebook**2, axis=1)


def nearest_code_bf16(x: jax.Array, codebook: jax.Array) -> jax.Array:
  """`nearest_code` for bfloat16 x through `squared_distances_bf16`."""
  return argmin_rows(squared_distances_bf16(x, codebook))
