"""Tests of vqjax/training/tasks.py and vqjax/training/evaluators.py: the autoencoder's
evaluators against NumPy, its train step on uint8 images (scaled and flipped on the device)
against NumPy-prepared ones."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqjax import configs, errors
from vqjax.training import evaluators, tasks


def _smoke_config():
  return configs.load_experiment("fashion_mnist:smoke")


@pytest.mark.slow
def test_the_autoencoders_evaluators_mask_padding_and_match_numpy():
  config = _smoke_config()
  task = tasks.make_task(config)
  assert evaluators.names_for(config, task.evals) == ("reconstruction", "codebook")
  rng = np.random.default_rng(0)
  image = rng.uniform(-1, 1, (6, 32, 32, 1)).astype(np.float32)
  state = jax.jit(task.init)(jax.random.key(0, impl="rbg"), {"image": jnp.asarray(image[:1])})
  # Two batches; the second's last two rows are padding holding junk.
  padded = np.concatenate([image[4:], np.full((2, 32, 32, 1), 9.0, np.float32)])
  batches = [
    {"image": image[:4], "mask": np.ones(4, np.float32)},
    {"image": padded, "mask": np.array([1, 1, 0, 0], np.float32)},
  ]
  suite = evaluators.Suite(evaluators.build(task.evals, config, task.model))
  variables = {"params": state.params, **state.model_state}
  summary = suite.run(variables, batches)

  recon, _ = task.model.apply(variables, image)
  codes = task.model.apply(variables, image, method="encode_to_indices")
  err = ((np.asarray(recon, np.float64) - image.astype(np.float64)) ** 2).mean((1, 2, 3))
  assert summary["examples"] == 6
  np.testing.assert_allclose(summary["mse"], err.mean(), rtol=1e-5)
  np.testing.assert_allclose(summary["psnr"], 10 * np.log10(4 / err.mean()), rtol=1e-5)
  k = config.vq.num_codes
  assert len(codes) == 2
  for name, c in zip(("top", "bottom"), codes, strict=True):
    hist = np.bincount(np.asarray(c).ravel(), minlength=k)
    p = hist[hist > 0] / hist.sum()
    np.testing.assert_allclose(summary[f"{name}/usage"], (hist > 0).mean(), rtol=1e-6)
    np.testing.assert_allclose(
      summary[f"{name}/perplexity"], np.exp(-(p * np.log(p)).sum()), rtol=1e-4
    )
    np.testing.assert_allclose(summary[f"{name}/top_share"], p.max(), rtol=1e-5)


def test_level_names_say_which_is_top():
  assert tasks.level_names(1) == ("codes",)
  assert tasks.level_names(2) == ("top", "bottom")
  assert tasks.level_names(3) == ("top", "middle", "bottom")
  assert tasks.level_names(5)[4] == "level4"


@pytest.mark.slow
def test_train_metrics_name_levels_and_batch_statistics():
  config = _smoke_config()
  task = tasks.make_task(config)
  image = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (4, 32, 32, 1)), jnp.float32)
  state = jax.jit(task.init)(jax.random.key(0, impl="rbg"), {"image": image[:1]})
  _, metrics = jax.jit(task.train_step)(state, {"image": image}, jax.random.key(1), None)
  assert {"top/batch_usage", "bottom/batch_usage", "top/batch_perplexity"} <= set(metrics)
  assert not any(k.startswith("level") or k.endswith("/usage") for k in metrics)


class _TinyAutoencoder(nn.Module):
  """One 3x3 conv (not mirror-symmetric, so flips change the loss) and, like a data-initialised
  codebook, a state variable set from the first batch: the autoencoder contract, quick to
  compile."""

  @nn.compact
  def __call__(self, image, train=False):
    first_mean = self.variable("vq_state", "first_mean", lambda: jnp.mean(image))
    recon = nn.Conv(image.shape[-1], (3, 3))(image) + first_mean.value
    return recon, {"loss": jnp.mean(jnp.square(recon - image)), "mse": jnp.mean(recon)}


def test_train_step_scales_and_flips_uint8_images_on_the_device():
  """A uint8 batch (what the trainer feeds) trains exactly like the same images scaled and
  flipped in NumPy and fed as float32 with flips off; init scales its batch too."""
  config = _smoke_config()
  config.data.random_flip = True
  task = tasks.AutoencoderTask(config, model=_TinyAutoencoder())
  images = np.random.default_rng(2).integers(0, 256, (8, 32, 32, 1), dtype=np.uint8)
  rng = jax.random.key(5)
  flip = np.asarray(jax.random.bernoulli(jax.random.fold_in(rng, 0x666C6970), 0.5, (8,)))
  assert 0 < flip.sum() < 8
  x = images.astype(np.float32) / np.float32(127.5) - np.float32(1)
  x[flip] = x[flip][:, :, ::-1]
  init_rng = jax.random.key(0, impl="rbg")
  state = jax.jit(task.init)(init_rng, {"image": images[:1]})
  first_mean = np.asarray(state.model_state["vq_state"]["first_mean"])
  np.testing.assert_allclose(first_mean, np.mean(images[0] / 127.5 - 1), atol=1e-6)
  new, metrics = jax.jit(task.train_step)(state, {"image": images}, rng, None)
  config.data.random_flip = False
  plain = tasks.AutoencoderTask(config, model=_TinyAutoencoder())
  ref_new, ref_metrics = jax.jit(plain.train_step)(state, {"image": x}, rng, None)
  assert float(metrics["loss"]) == float(ref_metrics["loss"])
  jax.tree.map(np.testing.assert_array_equal, new.params, ref_new.params)
  # Unflipped, the same images give another loss: the comparison above can see the flips.
  _, unflipped = jax.jit(plain.train_step)(state, {"image": images}, rng, None)
  assert float(unflipped["loss"]) != float(metrics["loss"])


def test_unknown_task_is_a_user_error():
  config = _smoke_config()
  config.task = "autoencodr"
  with pytest.raises(errors.UserError, match="autoencoder"):
    tasks.make_task(config)


def test_train_metrics_name_as_many_levels_as_the_model_reports():
  """No model name decides the level count: a three-level model's metrics are top / middle /
  bottom, whatever model gave them."""
  metrics = {"level0/usage": 1, "level1/usage": 2, "level2/perplexity": 3, "loss": 4}
  assert tasks._rename_levels(metrics) == {
    "top/usage": 1,
    "middle/usage": 2,
    "bottom/perplexity": 3,
    "loss": 4,
  }
  assert tasks._rename_levels({"level0/usage": 1}) == {"codes/usage": 1}
