"""config.train.rng_impl: the generator of the training randomness (dropout, flips, restarts)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vqjax import config_checks, configs, errors
from vqjax.training import trainer


def _config(impl: str, seed: int = 3) -> ml_collections.ConfigDict:
  c = configs.base_config()
  c.seed = seed
  c.train.rng_impl = impl
  return c


@pytest.mark.parametrize("impl", ["threefry", "rbg", "unsafe_rbg"])
def test_train_key_drives_dropout_as_configured(impl):
  key = trainer.train_key(_config(impl))
  assert str(jax.random.key_impl(key)) == trainer.RNG_IMPLS[impl]

  @jax.jit
  def mask(key, step):
    x = jnp.ones((1000, 1000))
    drop = nn.Dropout(0.1, deterministic=False)
    return drop.apply({}, x, rngs={"dropout": jax.random.fold_in(key, step)}) != 0

  # A resumed run derives its key afresh from the config (another process, another call):
  # the same step must redraw the same mask from it.
  resumed = trainer.train_key(_config(impl))
  m1, m1_resumed, m2 = (np.asarray(mask(k, s)) for k, s in ((key, 1), (resumed, 1), (key, 2)))
  # Keep rate 0.9 over 1e6 draws (std 3e-4); another step draws a different mask.
  assert abs(m1.mean() - 0.9) < 0.005
  assert np.array_equal(m1, m1_resumed)
  assert (m1 != m2).mean() > 0.1
  other_seed = trainer.train_key(_config(impl, seed=4))
  assert not np.array_equal(jax.random.key_data(key), jax.random.key_data(other_seed))


def test_unknown_rng_impl_is_one_clear_error():
  with pytest.raises(errors.UserError, match="rng_impl"):
    config_checks.validate(_config("philox"))
