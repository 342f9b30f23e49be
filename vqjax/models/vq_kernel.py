"""Fused nearest-codeword search: a Pallas kernel that never materialises the N x K distances.

The XLA path (`distances.nearest_code`) builds the full [N, K] float32 distance matrix in memory
and then takes its argmin. The kernel here streams the codebook through blocks instead: each
program takes `block_n` rows of x, walks over the codebook `block_k` codewords at a time, and
keeps a running (minimum, argmin) per row, so only the int32 indices [N] are written out.

Per block it scores ||e_k||^2 - 2 x.e_k. The ||x_n||^2 term of the squared distance is the same
for every codeword of row n, so it cannot change the argmin and is never computed. Ties resolve
to the lowest index, as `jnp.argmin`: within a block the lowest index attaining the block
minimum is taken, and a later block replaces the running best only when strictly smaller.

Because the kernel drops ||x||^2 and sums in a different order, its float32 scores differ from
the XLA path's by rounding; the two agree except where two codewords are tied to within float32
rounding, where either may be returned.

Backends: interpret mode on the CPU (`interpret=True`, how the tests run here), and Triton on
GPUs: the kernel asks for the Triton lowering explicitly (JAX's default for pallas_call on GPU
is now Mosaic GPU). On one NVIDIA H200 (jax 0.11.2) tests/test_vq_kernel.py and
tests/test_vq_matmul.py passed with the kernel compiled by Triton, in float32 and bf16 modes,
and the bf16 mode made the ImageNet-256 stage-1 step 2.3% faster than the XLA search
(benchmarks/RESULTS.md), so `vq.distance_impl="auto"` picks it on such GPUs. JAX 0.11 warns
that Pallas's Triton backend is deprecated and will be removed in favour of Mosaic GPU; "auto"
then falls back to the XLA search (`impl.resolve`), and a Mosaic GPU form
of this kernel is still to be written. On TPU it lowers
through Mosaic (tested on the CPU via jax.export) but has never been compiled by Mosaic or run
on a TPU, so layout rejections there are still possible.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from vqjax.models import distances

IMPLS = ("xla", "pallas")
_MIN_BLOCK = 16  # Triton's tl.dot needs every dot dimension >= 16


def _is_power_of_two(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _padded_code_dim(d: int, backend: str) -> int:
  """Code dimension after zero padding (zeros change neither dot products nor norms)."""
  if backend == "gpu":
    # Triton tensors (every load, store and dot operand) need power-of-two sizes.
    return max(_MIN_BLOCK, pl.next_power_of_2(d))
  return _round_up(max(d, 1), _MIN_BLOCK)


def _compiler_params(backend: str, interpret: bool):
  """Backend compiler parameters; None where the defaults are right (and in interpret mode)."""
  if interpret:
    return None
  # Each backend's Pallas module only for its own backend: Triton's is deprecated in JAX 0.11
  # and may be missing (impl.resolve checks it before choosing the kernel).
  if backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu

    # Row blocks are independent: "parallel" lets Mosaic split them across TensorCores.
    return pltpu.CompilerParams(dimension_semantics=("parallel",))
  if backend == "gpu":
    from jax.experimental.pallas import triton as pltriton

    # Explicit Triton params select the Triton lowering: since JAX 0.10, pallas_call on GPU
    # otherwise lowers to Mosaic GPU (jax_pallas_use_mosaic_gpu), which this kernel is not
    # written for. The defaults (4 warps, 3 stages) are kept; nothing was tuned on hardware.
    return pltriton.CompilerParams()
  return None


def _nearest_kernel(x_ref, *refs, block_k: int, num_k_blocks: int):
  """One block of rows: running (min score, argmin) over the codebook, block_k at a time.

  Refs: x [block_n, D], then the codebook as one float32 [K_pad, D] ref or as its three
  bfloat16 parts (`distances.split_bf16`, for a bfloat16 x) (whole), norms [1, K_pad] (whole,
  +inf on padded codewords), out indices [block_n, 1] int32. Per-row values stay 2-D
  ([block_n, 1]): keepdims row reductions spare Mosaic a 1-D relayout, and Triton accepts
  size-1 dimensions.
  """
  *cb_refs, norm_ref, idx_ref = refs
  x = x_ref[...]
  block_n = x.shape[0]

  def scan_block(kb, best_val, best_idx, start):
    if len(cb_refs) == 1:
      # x @ e^T with float32 accumulation. In JAX 0.10's lowerings HIGHEST becomes Triton's
      # input_precision=ieee (full float32, not TF32 tensor cores, which DEFAULT/HIGH select)
      # and Mosaic's #tpu.contract_precision<fp32> (instead of Mosaic's default, which may use
      # bf16 passes). The interpreter computes the dot in float32 either way.
      precision = jax.lax.Precision.HIGHEST
    else:
      # bfloat16 operands: every product is exact in float32 at any precision setting.
      precision = None
    cross = None
    for ref in cb_refs:
      part = jax.lax.dot_general(
        x,
        ref[pl.ds(start, block_k), :],
        (((1,), (1,)), ((), ())),
        precision=precision,
        preferred_element_type=jnp.float32,
      )
      cross = part if cross is None else cross + part
    # Padded codewords have norm +inf, so their score is +inf and they never win.
    scores = norm_ref[:, pl.ds(start, block_k)] - 2.0 * cross
    block_min = jnp.min(scores, axis=1, keepdims=True)
    cols = jax.lax.broadcasted_iota(jnp.int32, (block_n, block_k), 1) + kb * block_k
    # Lowest column attaining the block minimum (argmin's tie rule), with min + where rather
    # than an argmin primitive, which not every Pallas lowering has.
    sentinel = jnp.int32(num_k_blocks * block_k)
    block_arg = jnp.min(jnp.where(scores == block_min, cols, sentinel), axis=1, keepdims=True)
    # Strict <: an equal minimum in a later block keeps the earlier, lower index.
    better = block_min < best_val
    return jnp.where(better, block_min, best_val), jnp.where(better, block_arg, best_idx)

  best_val = jnp.full((block_n, 1), jnp.inf, jnp.float32)
  best_idx = jnp.zeros((block_n, 1), jnp.int32)
  if num_k_blocks == 1:
    # A static slice: no loop, and no dynamic lane offset for Mosaic to prove aligned.
    best_val, best_idx = scan_block(0, best_val, best_idx, 0)
  else:

    def body(kb, carry):
      start = pl.multiple_of(kb * block_k, block_k)
      return scan_block(kb, *carry, start)

    best_val, best_idx = jax.lax.fori_loop(0, num_k_blocks, body, (best_val, best_idx))
  del best_val
  idx_ref[...] = best_idx


def nearest_code_pallas(
  x: jax.Array,
  codebook: jax.Array,
  *,
  block_n: int = 128,
  block_k: int = 128,
  bf16: bool = False,
  interpret: bool = False,
) -> jax.Array:
  """Index of the nearest codeword for each row of x, without an [N, K] distance matrix.

  Same result as `distances.nearest_code` (float32 squared Euclidean distance, ties to the
  lowest index) up to float32 rounding of near-tied distances. Inputs are cast to float32.
  N, K and D need not be multiples of anything: rows are padded with zeros (their results are
  sliced off), padded codewords get norm +inf so they never win, and D is zero-padded to a
  multiple of 16 (on GPU to a power of two >= 16, as Triton requires). NaN inputs give
  unspecified indices (jnp.argmin would return the first NaN's).

  Blocks are clamped to the padded problem size (a 37-row input uses one 64-row block, not a
  128-row one). On TPU keep block_k a multiple of 128 when K > block_k, so the dynamic slices
  of the codebook norms start on a lane boundary; the whole codebook sits in VMEM there, so a
  very large K x D may need a larger vmem_limit_bytes.

  Runs interpreted on the CPU and compiled by Triton on GPUs (tested on an H200); for TPU it
  lowers to Mosaic MLIR but has not been compiled or run there.

  Args:
    x: [N, D] vectors.
    codebook: [K, D] codewords.
    block_n: rows of x per program, a power of two >= 16.
    block_k: codewords per inner step, a power of two >= 16.
    bf16: x is bfloat16 (a bfloat16 model's encoder output): the scores are bfloat16 dots of
      x with the codebook's three bfloat16 parts (`distances.split_bf16`), whose products are
      exact in float32, instead of float32 dots (no tensor cores for those on GPUs).
    interpret: run the kernel in the Pallas interpreter (needed on the CPU).

  Returns:
    int32 [N] indices into the codebook.
  """
  if x.ndim != 2 or codebook.ndim != 2 or x.shape[1] != codebook.shape[1]:
    raise ValueError(f"expected x [N, D] and codebook [K, D], got {x.shape} and {codebook.shape}")
  for name, block in (("block_n", block_n), ("block_k", block_k)):
    if not _is_power_of_two(block) or block < _MIN_BLOCK:
      raise ValueError(f"{name} must be a power of two >= {_MIN_BLOCK}, got {block}")
  if codebook.shape[0] == 0:
    raise ValueError("codebook is empty")
  if bf16 and x.dtype != jnp.bfloat16:
    raise ValueError(f"bf16=True needs bfloat16 x, got {x.dtype}")
  if x.shape[0] == 0:
    return jnp.zeros((0,), jnp.int32)
  return _nearest_code_pallas(
    x,
    codebook,
    block_n=block_n,
    block_k=block_k,
    bf16=bf16,
    interpret=interpret,
    backend=jax.default_backend(),
  )


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "bf16", "interpret", "backend"))
def _nearest_code_pallas(x, codebook, *, block_n, block_k, bf16, interpret, backend):
  """`nearest_code_pallas` for validated inputs, laid out for `backend` ("cpu", "gpu", "tpu").

  `backend` is an argument (not read inside) so a test can lower the GPU and TPU variants on
  a CPU-only machine.
  """
  n, d = x.shape
  k = codebook.shape[0]
  block_n = min(block_n, max(_MIN_BLOCK, pl.next_power_of_2(n)))
  block_k = min(block_k, max(_MIN_BLOCK, pl.next_power_of_2(k)))
  n_pad = _round_up(n, block_n)
  k_pad = _round_up(k, block_k)
  d_pad = _padded_code_dim(d, backend)

  x = jnp.pad(x.astype(jnp.bfloat16 if bf16 else jnp.float32), ((0, n_pad - n), (0, d_pad - d)))
  codebook = jnp.pad(codebook.astype(jnp.float32), ((0, k_pad - k), (0, d_pad - d)))
  # The norms are O(K D), negligible next to the O(N K D) search; computing them once here
  # keeps 1-D lane/sublane relayouts out of the kernel.
  norms = jnp.sum(codebook * codebook, axis=1)
  norms = jnp.where(jnp.arange(k_pad) < k, norms, jnp.inf)[None, :]

  num_k_blocks = k_pad // block_k
  kernel = functools.partial(_nearest_kernel, block_k=block_k, num_k_blocks=num_k_blocks)
  codebooks = distances.split_bf16(codebook) if bf16 else (codebook,)
  # The whole codebook (or its parts) and the norms, the same block for every program: on TPU
  # copied to VMEM once (the block index never changes); on GPU each program reads them from
  # global memory (L2-cached) block_k rows at a time.
  whole = pl.BlockSpec((k_pad, d_pad), lambda i: (0, 0))
  out = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((n_pad, 1), jnp.int32),
    grid=(n_pad // block_n,),
    in_specs=[
      pl.BlockSpec((block_n, d_pad), lambda i: (i, 0)),
      *[whole] * len(codebooks),
      pl.BlockSpec((1, k_pad), lambda i: (0, 0)),
    ],
    out_specs=pl.BlockSpec((block_n, 1), lambda i: (i, 0)),
    compiler_params=_compiler_params(backend, interpret),
    interpret=interpret,
    name="vq_nearest_code",
  )(x, *codebooks, norms)
  return out[:n, 0]


def nearest_code_impl(
  x: jax.Array, codebook: jax.Array, impl: str, bf16: bool = False
) -> jax.Array:
  """Nearest codeword indices by the chosen implementation.

  Args:
    x: [N, D] vectors.
    codebook: [K, D] codewords.
    impl: "xla" (`distances.nearest_code`, the reference: full [N, K] distances then argmin)
      or "pallas" (`nearest_code_pallas`; in interpret mode on the CPU, so CPU runs get a
      correct if slow result).
    bf16: x is bfloat16; the dots use bfloat16 operands with exact float32 products
      (`distances.nearest_code_bf16`, or the kernel's `bf16` mode).

  Returns:
    int32 [N] indices into the codebook.
  """
  if impl == "xla":
    return (distances.nearest_code_bf16 if bf16 else distances.nearest_code)(x, codebook)
  if impl == "pallas":
    interpret = jax.default_backend() == "cpu"
    return nearest_code_pallas(x, codebook, bf16=bf16, interpret=interpret)
  raise ValueError(f"unknown nearest-code impl {impl!r}; expected one of {IMPLS}")
