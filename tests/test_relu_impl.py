"""layers.relu's two derivative forms ("jax": from the input, "output": from the output) against
NumPy, and a VQ-VAE-2 built with each: the same function, parameters and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqjax.models import layers
from vqjax.models.hierarchy import VQVAE2


@pytest.mark.parametrize("impl", ["jax", "output"])
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


def test_relu_rejects_an_unknown_form():
  with pytest.raises(ValueError, match="unknown relu impl"):
    layers.relu(jnp.ones(3), "fast")


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
  models = {impl: VQVAE2(relu_impl=impl, **kw) for impl in ("jax", "output")}
  variables = jax.jit(models["jax"].init)(jax.random.key(0), x)
  variables_out = jax.jit(models["output"].init)(jax.random.key(0), x)
  jax.tree.map(np.testing.assert_array_equal, variables, variables_out)

  def loss(params, impl):
    _, aux = models[impl].apply({**variables, "params": params}, x)
    return aux["loss"]

  grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  value, grads = grad_fn(variables["params"], "jax")
  value_out, grads_out = grad_fn(variables["params"], "output")
  np.testing.assert_allclose(float(value_out), float(value), rtol=1e-6)
  leaves, leaves_out = jax.tree.leaves(grads), jax.tree.leaves(grads_out)
  assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0
  for g, g_out in zip(leaves, leaves_out, strict=True):
    np.testing.assert_allclose(np.asarray(g_out), np.asarray(g), rtol=1e-5, atol=1e-7)
