"""Tests of vqjax/training/tasks.py: the autoencoder task's eval sums against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqjax import configs, errors
from vqjax.training import tasks


def _smoke_config():
  return configs.load_experiment("fashion_mnist:smoke")


def test_eval_sums_mask_padding_and_match_numpy():
  config = _smoke_config()
  task = tasks.make_task(config)
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.uniform(-1, 1, (4, 32, 32, 1)).astype(np.float32))
  mask = jnp.asarray([1.0, 1.0, 1.0, 0.0])  # the last example is padding
  state = jax.jit(task.init)(jax.random.key(0, impl="rbg"), {"image": image[:1]})
  sums = jax.jit(task.eval_step)(state, {"image": image, "mask": mask}, None)

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
  assert len(codes) == 2
  for name, c in zip(("top", "bottom"), codes, strict=True):
    hist = np.bincount(np.asarray(c)[real].ravel(), minlength=k)
    np.testing.assert_array_equal(np.asarray(sums[f"{name}/counts"]), hist)
    p = hist[hist > 0] / hist.sum()
    np.testing.assert_allclose(summary[f"{name}/usage"], (hist > 0).mean(), rtol=1e-6)
    np.testing.assert_allclose(
      summary[f"{name}/perplexity"], np.exp(-(p * np.log(p)).sum()), rtol=1e-4
    )


def test_level_names_say_which_is_top():
  assert tasks.level_names(1) == ("codes",)
  assert tasks.level_names(2) == ("top", "bottom")
  assert tasks.level_names(3) == ("top", "middle", "bottom")
  assert tasks.level_names(5)[4] == "level4"


def test_train_metrics_name_levels_and_batch_statistics():
  config = _smoke_config()
  task = tasks.make_task(config)
  image = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (4, 32, 32, 1)), jnp.float32)
  state = jax.jit(task.init)(jax.random.key(0, impl="rbg"), {"image": image[:1]})
  _, metrics = jax.jit(task.train_step)(state, {"image": image}, jax.random.key(1), None)
  assert {"top/batch_usage", "bottom/batch_usage", "top/batch_perplexity"} <= set(metrics)
  assert not any(k.startswith("level") or k.endswith("/usage") for k in metrics)


def test_unknown_task_is_a_user_error():
  config = _smoke_config()
  config.task = "autoencodr"
  with pytest.raises(errors.UserError, match="autoencoder"):
    tasks.make_task(config)
