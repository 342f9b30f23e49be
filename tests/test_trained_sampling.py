"""A trained prior's samples look like its data, an untrained one's do not: the check a broken
sampler (one that ignores the codes already drawn, reads the wrong position or the wrong
logits) cannot pass, whatever the model's own likelihood says.

The data is a toy distribution known exactly: 4x4 maps over 8 codes, each map one code c
repeated, c uniform over {0, 1, 2, 3}. A sample is valid under it when all 16 codes are equal
and below 4; an untrained prior draws one with probability about 0.5 * 8^-15.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vqjax.models.pixelsnail import PixelSNAIL
from vqjax.sampling import cached, naive

SHAPE = (4, 4)


def _data(rng: np.random.Generator, n: int) -> np.ndarray:
  return np.broadcast_to(rng.integers(0, 4, (n, 1, 1)), (n, *SHAPE)).astype(np.int32)


def _valid(maps: np.ndarray) -> np.ndarray:
  """Whether each map is possible under the toy distribution."""
  flat = maps.reshape(len(maps), -1)
  return np.all(flat == flat[:, :1], axis=1) & (flat[:, 0] < 4)


def _train(model, variables, steps: int):
  opt = optax.adam(3e-3)
  state = opt.init(variables["params"])
  rng = np.random.default_rng(0)

  @jax.jit
  def step(params, state, codes):
    def loss_fn(p):
      logits = model.apply({"params": p}, codes)
      return optax.softmax_cross_entropy_with_integer_labels(logits, codes).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(params, updates), state, loss

  params = variables["params"]
  for _ in range(steps):
    params, state, loss = step(params, state, jnp.asarray(_data(rng, 64)))
  return {"params": params}, float(loss)


@pytest.mark.slow
def test_samples_of_a_trained_prior_follow_the_data_and_an_untrained_ones_do_not():
  model = PixelSNAIL(
    shape=SHAPE,
    num_codes=8,
    channels=32,
    kernel_size=3,
    num_blocks=1,
    num_res_blocks=1,
    res_channels=32,
    attention=True,
    num_heads=2,
    dropout=0.0,
  )
  untrained = model.init(jax.random.key(0), jnp.zeros((1, *SHAPE), jnp.int32))
  trained, loss = _train(model, untrained, steps=300)
  # The toy data's entropy is log(4) nats per map, 0.087 per code: training got near it.
  assert loss < 0.2, loss
  key = jax.random.key(1)
  before = np.asarray(cached.sample(model, untrained, 256, SHAPE, key))
  after = np.asarray(cached.sample(model, trained, 256, SHAPE, key))
  assert _valid(before).mean() < 0.05
  assert _valid(after).mean() > 0.9
  # Diverse too: every one of the four codes starts some valid samples.
  firsts = after[_valid(after), 0, 0]
  assert all(np.mean(firsts == c) > 0.1 for c in range(4)), np.bincount(firsts)
  # The full-recompute reference sampler draws the same maps with the same key.
  reference = np.asarray(naive.sample(model, trained, 16, SHAPE, key))
  assert np.array_equal(reference, after[:16])
