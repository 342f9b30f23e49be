"""The quantizer's bfloat16 matmuls (vq.matmul_impl="bf16") against float64 NumPy.

These tests run on whatever backend JAX has: on the CPU here, and on a GPU with
`JAX_PLATFORMS=cuda python -m pytest tests/test_vq_matmul.py` (the Pallas test then compiles
the Triton kernel instead of interpreting it).
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqjax import config_checks, configs, errors
from vqjax.models import quantizer as q
from vqjax.models import vq_kernel
from vqjax.models.impl import Impl


def _bf16_values(rng, shape, scale=1.0):
  """float32 values that bfloat16 holds exactly (a bfloat16 model's encoder outputs)."""
  x = (scale * rng.normal(size=shape)).astype(np.float32)
  return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))


def _np_sqdist(x, codebook):
  diff = np.asarray(x, np.float64)[:, None, :] - np.asarray(codebook, np.float64)[None]
  return (diff**2).sum(-1)


def _assert_nearest(got, x, codebook):
  """got is the float64 argmin on every row with a clear winner (almost all rows), and within
  float32 rounding of the nearest distance on the rest."""
  d = _np_sqdist(x, codebook)
  got = np.asarray(got)
  best = d.min(axis=1)
  np.testing.assert_array_less(d[np.arange(len(got)), got], best * (1 + 1e-5) + 1e-6)
  second = np.sort(d, axis=1)[:, 1]
  clear = second - best > 1e-4 * np.maximum(best, 1.0)
  assert clear.mean() > 0.95
  np.testing.assert_array_equal(got[clear], d.argmin(axis=1)[clear])


def test_split_bf16_parts_sum_to_the_float32_value_exactly():
  rng = np.random.default_rng(0)
  # Magnitudes over 60 decades, both signs, and values with all 24 significant bits set.
  a = (rng.normal(size=4096) * 10.0 ** rng.uniform(-30, 30, size=4096)).astype(np.float32)
  a[:3] = [1 + 2**-23, -(2**24 - 1), 0.0]
  parts = jax.jit(q.split_bf16)(jnp.asarray(a))
  assert all(p.dtype == jnp.bfloat16 for p in parts)
  total = sum(np.asarray(p.astype(jnp.float32), np.float64) for p in parts)
  np.testing.assert_array_equal(total, a.astype(np.float64))
  # Not a vacuous split: the lower parts carry bits for most values.
  assert np.mean(np.asarray(parts[1]) != 0) > 0.9 and np.mean(np.asarray(parts[2]) != 0) > 0.5


@pytest.mark.slow
def test_split_bf16_survives_xla_optimisations():
  # XLA may fold a float32 -> bfloat16 -> float32 round trip away when optimising; the split
  # must stay exact in a fully optimised program (the tests' conftest turns most passes off).
  code = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from vqjax.models import quantizer as q
    a = np.random.default_rng(1).normal(size=1000).astype(np.float32) * np.float32(3.7)
    f = jax.jit(lambda a: sum(p.astype(jnp.float32).astype(jnp.float64) for p in q.split_bf16(a)))
    got = np.asarray(f(jnp.asarray(a)))
    print("EXACT" if np.array_equal(got, a.astype(np.float64)) else "INEXACT")
    """
  )
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="0", JAX_ENABLE_X64="1")
  out = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().endswith("EXACT") and "INEXACT" not in out.stdout


@pytest.mark.parametrize("n,k,d", [(300, 512, 64), (77, 33, 7)])
def test_bf16_distances_match_float64(n, k, d):
  rng = np.random.default_rng(n + k)
  x = _bf16_values(rng, (n, d))
  codebook = rng.normal(size=(k, d)).astype(np.float32)  # full float32 codewords
  got = np.asarray(q.squared_distances_bf16(jnp.asarray(x, jnp.bfloat16), jnp.asarray(codebook)))
  want = _np_sqdist(x, codebook)
  # float32 rounding of the norm expansion: errors of a few eps (1.2e-7) * (|x|^2 + |e|^2),
  # as the float32 HIGHEST path's.
  scale = (x.astype(np.float64) ** 2).sum(1)[:, None] + (codebook.astype(np.float64) ** 2).sum(1)
  assert np.max(np.abs(got - want) / scale) < 1e-6
  ref = np.asarray(q.squared_distances(jnp.asarray(x), jnp.asarray(codebook)))
  assert np.max(np.abs(got - want) / scale) < 2 * np.max(np.abs(ref - want) / scale) + 2e-7
  # A bfloat16-only codebook would be off by ~1e-3 relative: the split parts matter.
  coarse = np.asarray(jnp.asarray(codebook, jnp.bfloat16).astype(jnp.float32))
  assert np.max(np.abs(_np_sqdist(x, coarse) - want) / scale) > 1e-4
  _assert_nearest(
    q.nearest_code_bf16(jnp.asarray(x, jnp.bfloat16), jnp.asarray(codebook)), x, codebook
  )


def test_bf16_cluster_sums_match_float64():
  rng = np.random.default_rng(3)
  n, k, d = 1000, 40, 16
  x = _bf16_values(rng, (n, d), scale=5.0)
  idx = rng.integers(0, k, size=n).astype(np.int32)
  idx[idx == 7] = 8  # one empty code
  counts, sums = q.cluster_sums(
    jnp.asarray(x, jnp.bfloat16), jnp.asarray(idx), k, impl="onehot", matmul_impl="bf16"
  )
  assert counts.dtype == jnp.float32 and sums.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(counts), np.bincount(idx, minlength=k))
  want = np.zeros((k, d))
  np.add.at(want, idx, x.astype(np.float64))
  np.testing.assert_allclose(np.asarray(sums), want, rtol=0, atol=1e-5 * np.abs(x).sum() / k)
  assert np.all(np.asarray(sums)[7] == 0)
  # The scatter path sums a bfloat16 x in float32 too (not in bfloat16).
  _, scattered = q.cluster_sums(jnp.asarray(x, jnp.bfloat16), jnp.asarray(idx), k, "scatter")
  np.testing.assert_allclose(np.asarray(scattered), want, rtol=0, atol=1e-5 * np.abs(x).sum() / k)


def test_bf16_needs_bfloat16_inputs():
  x32 = jnp.ones((4, 8), jnp.float32)
  with pytest.raises(ValueError, match="bfloat16"):
    q.squared_distances_bf16(x32, jnp.ones((3, 8)))
  with pytest.raises(ValueError, match="bfloat16"):
    q.cluster_sums(x32, jnp.zeros(4, jnp.int32), 3, "onehot", "bf16")


@pytest.mark.parametrize("distance_impl", ["xla", "pallas"])
def test_quantizer_bf16_matmuls_equal_the_float32_ones(distance_impl):
  """A bfloat16 quantizer training step: same codes, losses and EMA state either way."""
  rng = np.random.default_rng(4)
  z = jnp.asarray(_bf16_values(rng, (2, 8, 8, 16)), jnp.bfloat16)
  outs = {}
  for impl in ("float32", "bf16"):
    vq = q.VectorQuantizer(
      num_codes=32,
      code_dim=16,
      restart_after=2,
      # vq_stats "onehot": as on accelerators (the CPU's "auto" is scatter)
      impl=Impl(vq_distance=distance_impl, vq_matmul=impl, vq_stats="onehot"),
      dtype=jnp.bfloat16,
    )
    rngs = {"params": jax.random.key(0), "vq": jax.random.key(1)}
    variables = vq.init(rngs, z, train=False)
    state = variables["vq_state"]
    for step in range(3):
      (zq, aux), mutated = vq.apply(
        {"vq_state": state},
        z,
        train=True,
        rngs={"vq": jax.random.key(10 + step)},
        mutable=["vq_state"],
      )
      state = mutated["vq_state"]
    outs[impl] = (zq, aux, state)
  (zq32, aux32, s32), (zq16, aux16, s16) = outs["float32"], outs["bf16"]
  np.testing.assert_array_equal(np.asarray(aux16["indices"]), np.asarray(aux32["indices"]))
  np.testing.assert_array_equal(np.asarray(zq16), np.asarray(zq32))
  np.testing.assert_allclose(float(aux16["commitment"]), float(aux32["commitment"]), rtol=1e-6)
  for key in ("ema_count", "ema_sum", "codebook"):
    np.testing.assert_allclose(np.asarray(s16[key]), np.asarray(s32[key]), rtol=1e-5, atol=1e-6)


def test_pallas_kernel_bf16_mode_matches_float64():
  rng = np.random.default_rng(5)
  x = _bf16_values(rng, (200, 64))
  codebook = rng.normal(size=(300, 64)).astype(np.float32)
  interpret = jax.default_backend() == "cpu"
  got = vq_kernel.nearest_code_pallas(
    jnp.asarray(x, jnp.bfloat16), jnp.asarray(codebook), bf16=True, interpret=interpret
  )
  _assert_nearest(got, x, codebook)
  with pytest.raises(ValueError, match="bfloat16"):
    vq_kernel.nearest_code_pallas(jnp.asarray(x), jnp.asarray(codebook), bf16=True)


def test_config_rejects_bf16_matmuls_for_a_float32_model():
  config = configs.base_config()
  config.vq.matmul_impl = "bf16"
  with pytest.raises(errors.UserError, match="model.dtype='bfloat16'"):
    config_checks.validate(config)
  config.model.dtype = "bfloat16"
  config_checks.validate(config)
  config.vq.matmul_impl = "tf32"
  with pytest.raises(errors.UserError, match="vq.matmul_impl"):
    config_checks.validate(config)
