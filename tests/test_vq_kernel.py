"""Tests of vqjax/models/vq_kernel.py (interpret mode on the CPU) against NumPy float64 argmins."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqjax.models import quantizer
from vqjax.models import vq_kernel as vk
from vqjax.models.impl import Impl


def _np_sqdist(x, codebook):
  """float64 [N, K] squared distances, computed directly (not by the norm expansion)."""
  diff = np.asarray(x, np.float64)[:, None, :] - np.asarray(codebook, np.float64)[None]
  return (diff**2).sum(-1)


def _assert_nearest(got, x, codebook, rtol=1e-5):
  """got is the float64 argmin, except on rows whose best two codes are float32-level ties."""
  d = _np_sqdist(x, codebook)
  got = np.asarray(got)
  assert got.shape == (x.shape[0],) and got.dtype == np.int32
  assert np.all((got >= 0) & (got < codebook.shape[0]))
  best = d.min(axis=1)
  # Every row: the chosen code is nearest up to float32 rounding.
  np.testing.assert_array_less(d[np.arange(len(got)), got], best * (1 + rtol) + 1e-6)
  # Rows with a clear winner: exactly the float64 argmin; they must be almost all rows, so
  # this check is not vacuous.
  second = np.sort(d, axis=1)[:, 1] if d.shape[1] > 1 else np.full_like(best, np.inf)
  clear = second - best > 1e-4 * np.maximum(best, 1.0)
  assert clear.mean() > 0.95
  np.testing.assert_array_equal(got[clear], d.argmin(axis=1)[clear])


def _random(n, k, d, seed):
  rng = np.random.default_rng(seed)
  return (
    rng.normal(size=(n, d)).astype(np.float32),
    rng.normal(size=(k, d)).astype(np.float32),
  )


@pytest.mark.parametrize(
  "n,k,d,blocks",
  [
    (37, 70, 20, {"block_n": 16, "block_k": 16}),  # nothing divisible; 3 x 5 blocks
    (256, 512, 64, {"block_n": 128, "block_k": 128}),  # 2 row blocks x 4 codebook blocks
    (50, 33, 7, {"block_n": 32, "block_k": 16}),  # D < 16 padded, last codebook block 1/16 full
    (37, 70, 20, {}),  # default blocks, clamped to the problem
  ],
)
def test_matches_float64_argmin(n, k, d, blocks):
  x, codebook = _random(n, k, d, seed=n + k + d)
  got = vk.nearest_code_pallas(x, codebook, interpret=True, **blocks)
  _assert_nearest(got, x, codebook)


def test_exact_ties_resolve_to_lowest_index():
  # Small integers: every dot product and norm is exact in float32 whatever the summation
  # order, so tied distances are bitwise equal and the tie rule alone decides.
  rng = np.random.default_rng(1)
  k, d, block_k = 40, 5, 16
  codebook = rng.integers(-1, 2, size=(k, d)).astype(np.float32)
  # Duplicates inside one block (2, 3) and across blocks (5, 21, 37: blocks 0, 1 and the
  # padded last block).
  codebook[3] = codebook[2]
  codebook[21] = codebook[37] = codebook[5]
  x = np.concatenate(
    [
      codebook[[2, 3, 5, 21, 37]],  # distance 0 to each group of duplicates
      rng.integers(-2, 3, size=(59, d)).astype(np.float32),  # many ties between distinct codes
    ]
  )
  dist = _np_sqdist(x, codebook)
  expected = dist.argmin(axis=1)  # NumPy: first (lowest) index of the minimum
  tied = (dist == dist.min(axis=1, keepdims=True)).sum(axis=1) > 1
  assert tied.sum() >= 20  # the data really exercise the tie rule
  assert np.all(expected[:5] == [2, 2, 5, 5, 5])
  got = vk.nearest_code_pallas(x, codebook, block_n=16, block_k=block_k, interpret=True)
  np.testing.assert_array_equal(np.asarray(got), expected)


def test_agrees_with_xla_path():
  x, codebook = _random(100, 90, 24, seed=3)
  pallas = vk.nearest_code_pallas(x, codebook, block_n=32, block_k=32, interpret=True)
  xla = np.asarray(quantizer.nearest_code(x, codebook))
  # Both are checked against float64; on the clear rows they must then agree exactly.
  _assert_nearest(pallas, x, codebook)
  _assert_nearest(xla, x, codebook)
  d = _np_sqdist(x, codebook)
  rows = np.arange(len(xla))
  np.testing.assert_allclose(d[rows, np.asarray(pallas)], d[rows, xla], rtol=1e-5)
  assert np.mean(np.asarray(pallas) == xla) > 0.95


def test_dispatch_under_jit_on_cpu():
  x, codebook = _random(40, 50, 12, seed=4)
  fn = jax.jit(vk.nearest_code_impl, static_argnames="impl")
  pallas = np.asarray(fn(x, codebook, impl="pallas"))  # CPU: runs the kernel interpreted
  xla = np.asarray(fn(x, codebook, impl="xla"))
  _assert_nearest(pallas, x, codebook)
  np.testing.assert_array_equal(xla, np.asarray(quantizer.nearest_code(x, codebook)))
  np.testing.assert_array_equal(pallas, xla)


def test_padded_codewords_never_chosen():
  # Padding adds zero codewords (K=3 -> 16) and zero dimensions (D=7 -> 16). x sits near the
  # origin, far from the real codewords: an unmasked zero codeword would win every row.
  rng = np.random.default_rng(5)
  codebook = (100.0 + rng.normal(size=(3, 7))).astype(np.float32)
  x = rng.normal(size=(5, 7)).astype(np.float32)
  got = np.asarray(vk.nearest_code_pallas(x, codebook, block_n=16, block_k=16, interpret=True))
  assert got.shape == (5,)
  np.testing.assert_array_equal(got, _np_sqdist(x, codebook).argmin(axis=1))


def test_empty_input():
  codebook = np.ones((4, 3), np.float32)
  got = vk.nearest_code_pallas(np.zeros((0, 3), np.float32), codebook, interpret=True)
  assert got.shape == (0,) and got.dtype == jnp.int32


def test_bad_arguments():
  x, codebook = _random(8, 8, 4, seed=6)
  with pytest.raises(ValueError, match=r"unknown nearest-code impl 'triton'.*'xla', 'pallas'"):
    vk.nearest_code_impl(x, codebook, "triton")
  with pytest.raises(ValueError, match="block_k must be a power of two >= 16"):
    vk.nearest_code_pallas(x, codebook, block_k=24, interpret=True)
  with pytest.raises(ValueError, match="block_n must be a power of two >= 16"):
    vk.nearest_code_pallas(x, codebook, block_n=8, interpret=True)
  with pytest.raises(ValueError, match="expected x"):
    vk.nearest_code_pallas(x, codebook[:, :3], interpret=True)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize(
  "platform,backend,target",
  [("cuda", "gpu", "__gpu$xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")],
)
def test_lowers_for_gpu_and_tpu(platform, backend, target, bf16):
  # Lowering only (Pallas -> Triton IR / Mosaic MLIR inside a custom call), no device needed.
  # The device compilers (Triton -> PTX, Mosaic layout passes) never run here.
  fn = functools.partial(
    vk._nearest_code_pallas, block_n=64, block_k=128, bf16=bf16, interpret=False, backend=backend
  )
  args = [
    jax.ShapeDtypeStruct((300, 48), jnp.bfloat16 if bf16 else jnp.float32),
    jax.ShapeDtypeStruct((600, 48), jnp.float32),
  ]
  try:
    exported = jax.export.export(
      jax.jit(fn),
      platforms=(platform,),
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)],
    )(*args)
  except ImportError as e:  # a jaxlib built without this backend's Pallas bindings
    pytest.skip(f"no {platform} Pallas lowering in this jaxlib: {e}")
  assert target in exported.mlir_module()
  assert exported.out_avals[0].shape == (300,) and exported.out_avals[0].dtype == jnp.int32


@pytest.mark.slow
def test_quantizer_with_the_pallas_search_equals_the_xla_one():
  """`vq.distance_impl="pallas"` in a VectorQuantizer training call: the same indices, loss,
  EMA state and straight-through gradient as the XLA search (data without near ties)."""
  z = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
  outs = {}
  for impl in ("xla", "pallas"):
    vq = quantizer.VectorQuantizer(
      num_codes=24, code_dim=8, codebook_init="normal", impl=Impl(vq_distance=impl)
    )
    v = vq.init(jax.random.key(1), z, train=False)

    def loss(z, vq=vq, v=v):
      (zq, aux), state = vq.apply(
        v, z, train=True, rngs={"vq": jax.random.key(2)}, mutable=["vq_state"]
      )
      return jnp.sum(zq**2) + aux["latent_loss"], (aux["indices"], state)

    (value, (idx, state)), grad = jax.value_and_grad(loss, has_aux=True)(z)
    outs[impl] = (value, idx, state, grad)
  xla, pallas = outs["xla"], outs["pallas"]
  codebook = np.asarray(
    quantizer.VectorQuantizer(num_codes=24, code_dim=8, codebook_init="normal").init(
      jax.random.key(1), z, train=False
    )["vq_state"]["codebook"],
    np.float64,
  )
  flat = np.asarray(z, np.float64).reshape(-1, 8)
  expect = np.argmin(((flat[:, None] - codebook[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_array_equal(np.asarray(pallas[1]).ravel(), expect)
  np.testing.assert_array_equal(np.asarray(pallas[1]), np.asarray(xla[1]))
  np.testing.assert_allclose(float(pallas[0]), float(xla[0]), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(pallas[2:]), jax.tree.leaves(xla[2:]), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
