"""Tests of vqjax/training/steps.py: the autoencoder task's eval sums against NumPy."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np

from vqjax.training import steps


def _smoke_config():
  path = os.path.join(os.path.dirname(__file__), "..", "experiments", "fashion_mnist.py")
  spec = importlib.util.spec_from_file_location("fm", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("smoke")


def test_eval_sums_mask_padding_and_match_numpy():
  config = _smoke_config()
  task = steps.make_task(config)
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.uniform(-1, 1, (4, 32, 32, 1)).astype(np.float32))
  mask = jnp.asarray([1.0, 1.0, 1.0, 0.0])  # the last example is padding
  state = jax.jit(task.init)(jax.random.key(0), {"image": image[:1]})
  sums = jax.jit(task.eval_step)(state, {"image": image, "mask": mask})

  variables = {"params": state.params, **state.model_state}
  recon, _ = task.model.apply(variables, image)
  codes = task.model.apply(variables, image, method="encode_to_indices")
  real = np.asarray(mask) > 0
  err = ((np.asarray(recon, np.float64) - np.asarray(image, np.float64)) ** 2).mean((1, 2, 3))
  np.testing.assert_allclose(float(sums["sq_err"]), err[real].sum(), rtol=1e-5)
  assert float(sums["count"]) == 3
  summary = task.eval_summary(jax.device_get(sums))
  np.testing.assert_allclose(summary["mse"], err[real].mean(), rtol=1e-5)
  np.testing.assert_allclose(summary["psnr"], 10 * np.log10(4 / err[real].mean()), rtol=1e-5)
  k = config.vq.num_codes
  for i, c in enumerate(codes):
    hist = np.bincount(np.asarray(c)[real].ravel(), minlength=k)
    np.testing.assert_array_equal(np.asarray(sums[f"level{i}/counts"]), hist)
    p = hist[hist > 0] / hist.sum()
    np.testing.assert_allclose(summary[f"level{i}/usage"], (hist > 0).mean(), rtol=1e-6)
    np.testing.assert_allclose(summary[f"level{i}/perplexity"], np.exp(-(p * np.log(p)).sum()),
                               rtol=1e-4)
