"""Tests of vqjax/training/optim.py: schedules against hand-computed values, clipping."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from vqjax import configs
from vqjax.training import optim


def _optim(**kw):
  c = configs.base_config().optim
  for k, v in kw.items():
    c[k] = v
  return c


def test_warmup_then_cosine():
  s = optim.make_schedule(_optim(lr=1.0, warmup_steps=10, schedule="cosine"), total_steps=110)
  assert float(s(0)) == 0.0
  assert math.isclose(float(s(5)), 0.5, rel_tol=1e-6)
  assert math.isclose(float(s(10)), 1.0, rel_tol=1e-6)
  assert math.isclose(float(s(60)), 0.5 * (1 + math.cos(math.pi * 0.5)), abs_tol=1e-6)
  assert abs(float(s(110))) < 1e-6


def test_constant_and_errors():
  s = optim.make_schedule(_optim(lr=3e-4), total_steps=100)
  assert float(s(0)) == float(s(99)) == pytest.approx(3e-4)
  with pytest.raises(ValueError, match="schedule"):
    optim.make_schedule(_optim(schedule="linear"), 10)
  with pytest.raises(ValueError, match="optim.name"):
    optim.make_optimizer(_optim(name="sgd"), 10)
  with pytest.raises(ValueError, match="adamw"):
    optim.make_optimizer(_optim(weight_decay=0.1), 10)


def test_global_norm_clipping_matches_adam_on_clipped_gradients():
  # Adam is scale-invariant per step, so clipping shows only when two steps are clipped
  # differently: step 1 (norm 10) is scaled to norm 1, step 2 (norm 0.5) is left alone.
  tx, _ = optim.make_optimizer(_optim(lr=1.0, grad_clip=1.0), 10)
  params = {"w": jnp.zeros(4)}
  state = tx.init(params)
  g1, g2 = np.full(4, 5.0), np.full(4, 0.25)
  _, state = tx.update({"w": jnp.asarray(g1)}, state, params)
  updates, _ = tx.update({"w": jnp.asarray(g2)}, state, params)
  c1 = g1 / np.linalg.norm(g1)
  b1, b2, eps = 0.9, 0.999, 1e-8
  m = b1 * (1 - b1) * c1 + (1 - b1) * g2
  v = b2 * (1 - b2) * c1**2 + (1 - b2) * g2**2
  expected = -(m / (1 - b1**2)) / (np.sqrt(v / (1 - b2**2)) + eps)
  np.testing.assert_allclose(np.asarray(updates["w"]), expected, rtol=1e-4)  # float32 vs float64
  unclipped, _ = optim.make_optimizer(_optim(lr=1.0), 10)
  s2 = unclipped.init(params)
  _, s2 = unclipped.update({"w": jnp.asarray(g1)}, s2, params)
  other, _ = unclipped.update({"w": jnp.asarray(g2)}, s2, params)
  assert not np.allclose(np.asarray(other["w"]), expected, rtol=1e-3)
