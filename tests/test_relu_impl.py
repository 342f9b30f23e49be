"""layers.relu's forms ("jax": the mask from the input, "output": from the output, "stored": the
activation behind a fusion barrier, "auto") against NumPy, and a VQ-VAE-2 built with each: the
same function, parameters and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqjax.models import layers
from vqjax.models.hierarchy import VQVAE2


@pytest.mark.parametrize("impl", ["jax", "output", "stored", "auto"])
def test_relu_value_and_derivative_match_numpy(impl):
  x = np.array([-2.0, -1e-30, 0.0, 1e-30, 0.5, 3.0], np.float32)
  g = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], np.float32)
  y, vjp = jax.vjp(lambda v: layers.relu(v, impl), jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(y), np.maximum(x, 0))
  # Derivative 1 where x > 0, else 0 (also at x = 0, as jax.nn.relu).
  np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(g))[0]), np.where(x > 0, g, 0))
  # Second use of the same function under jit and in bfloat16.
  xb = jnp.asarray(x, jnp.bfloat16)
  grad = jax.jit(jax.grad(lambda v: jnp.sum(layers.relu(v, impl).astype(jnp.float32) * 2)))
  np.testing.assert_array_equal(np.asarray(grad(xb), np.float32), np.where(x > 0, 2.0, 0.0))
  # Python numbers, as jax.nn.relu takes them; the derivative at a scalar too.
  assert float(layers.relu(-1.5, impl)) == 0.0 and float(layers.relu(2.0, impl)) == 2.0
  assert float(jax.grad(lambda v: layers.relu(v, impl))(2.0)) == 1.0


def test_relu_rejects_an_unknown_form():
  with pytest.raises(ValueError, match="unknown relu impl"):
    layers.relu(jnp.ones(3), "fast")


def test_auto_picks_stored_on_the_cpu():
  if jax.default_backend() != "cpu":
    pytest.skip("checks the pick on the CPU")
  assert layers.resolve_relu("auto") == "stored"
  assert layers.resolve_relu("output") == "output"


def test_stored_puts_the_activation_behind_a_conditional_only_when_differentiated():
  x = jnp.linspace(-1.0, 1.0, 12).reshape(2, 6)
  fwd_jaxpr = str(jax.make_jaxpr(lambda v: jax.vjp(lambda u: layers.relu(u, "stored"), v)[0])(x))
  assert "cond" in fwd_jaxpr
  plain = str(jax.make_jaxpr(lambda v: layers.relu(v, "stored"))(x))
  assert "cond" not in plain
  # Forward mode too (a JVP rule), with the derivative of jax.nn.relu.
  t = jnp.arange(12.0).reshape(2, 6)
  y, dy = jax.jvp(lambda u: layers.relu(u, "stored"), (x,), (t,))
  np.testing.assert_array_equal(np.asarray(y), np.maximum(np.asarray(x), 0))
  np.testing.assert_array_equal(np.asarray(dy), np.where(np.asarray(x) > 0, np.asarray(t), 0))
  # A zero-size input has no element to branch on: plain max, empty gradient.
  empty = jnp.zeros((0, 3))
  y, vjp = jax.vjp(lambda v: layers.relu(v, "stored"), empty)
  assert y.shape == (0, 3) and vjp(y)[0].shape == (0, 3)


@pytest.mark.slow
def test_vqvae2_is_the_same_function_with_either_form():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 1)), jnp.float32)
  kw = dict(
    out_channels=1,
    channels=16,
    res_channels=8,
    num_res_blocks=1,
    quantizer=dict(num_codes=16, code_dim=8, codebook_init="normal"),
  )
  impls = ("jax", "output", "stored")
  models = {impl: VQVAE2(relu_impl=impl, **kw) for impl in impls}
  variables = jax.jit(models["jax"].init)(jax.random.key(0), x)
  for impl in impls[1:]:
    jax.tree.map(
      np.testing.assert_array_equal, variables, jax.jit(models[impl].init)(jax.random.key(0), x)
    )

  def loss(params, impl):
    _, aux = models[impl].apply({**variables, "params": params}, x)
    return aux["loss"]

  grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  value, grads = grad_fn(variables["params"], "jax")
  leaves = jax.tree.leaves(grads)
  assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0
  for impl in impls[1:]:
    value_i, grads_i = grad_fn(variables["params"], impl)
    np.testing.assert_allclose(float(value_i), float(value), rtol=1e-6)
    for g, g_i in zip(leaves, jax.tree.leaves(grads_i), strict=True):
      np.testing.assert_allclose(np.asarray(g_i), np.asarray(g), rtol=1e-5, atol=1e-7)
