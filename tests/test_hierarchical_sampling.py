"""Tests of vqjax/sampling/hierarchy.py: ancestral sampling over levels (top prior, then the
bottom prior conditioned on the sampled top codes, then the stage-1 decoder) and the checks
that runs belong together."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqjax import configs, errors
from vqjax.models import registry
from vqjax.sampling import cached, hierarchy, naive
from vqjax.training import tasks


def _init(task):
  batch = jax.tree.map(jnp.asarray, task.dummy_batch())
  state = jax.jit(task.init)(jax.random.key(0, impl="rbg"), batch)
  return {"params": state.params, **state.model_state}


@pytest.fixture(scope="module")
def runs():
  stage1_config = configs.load_experiment("fashion_mnist:smoke")
  model = registry.build_model(stage1_config)
  variables = jax.jit(model.init)(
    {"params": jax.random.key(1, impl="rbg"), "vq": jax.random.key(2)}, jnp.zeros((1, 32, 32, 1))
  )
  priors = []
  for name in ("fashion_mnist_prior_top", "fashion_mnist_prior_bottom"):
    config = configs.load_experiment(f"{name}:smoke")
    config.prior.class_conditional = False  # the top experiment is class-conditional
    task = tasks.make_task(config)
    priors.append((config, task.model, _init(task)))
  return (stage1_config, model, dict(variables)), priors


@pytest.mark.slow
def test_levels_are_sampled_top_down_and_decoded(runs):
  stage1, priors = runs
  gen = hierarchy.Generator(stage1, priors)
  rng = jax.random.key(7)
  images, maps = gen.generate(3, rng, temperature=1.0)
  assert images.shape == (3, 32, 32, 1) and [m.shape for m in maps] == [(3, 4, 4), (3, 8, 8)]
  assert float(jnp.min(images)) >= -1 and float(jnp.max(images)) <= 1
  # The same draws by hand: the top prior alone, then the bottom prior given those top codes.
  (_, top_model, top_vars), (_, bottom_model, bottom_vars) = priors
  top = naive.sample(top_model, top_vars, 3, (4, 4), jax.random.fold_in(rng, 0))
  np.testing.assert_array_equal(np.asarray(maps[0]), np.asarray(top))
  bottom = cached.sample(
    bottom_model, bottom_vars, 3, (8, 8), jax.random.fold_in(rng, 1), condition=(top,)
  )
  np.testing.assert_array_equal(np.asarray(maps[1]), np.asarray(bottom))
  _, ae, ae_vars = stage1
  want = ae.apply(ae_vars, (top, bottom), method="decode_from_indices")
  np.testing.assert_allclose(np.asarray(images), np.clip(np.asarray(want), -1, 1), atol=1e-6)
  again, _ = gen.generate(3, rng)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(images))


def test_runs_that_do_not_belong_together_are_refused(runs):
  stage1, priors = runs
  with pytest.raises(errors.UserError, match="one prior per level"):
    hierarchy.Generator(stage1, priors[:1])
  other = priors[1][0].copy_and_resolve_references()
  other.vq.num_codes = 64
  with pytest.raises(errors.UserError, match="models 64 codes"):
    hierarchy.Generator(stage1, [priors[0], (other, priors[1][1], priors[1][2])])
  other = priors[1][0].copy_and_resolve_references()
  other.prior.code_shapes = [[4, 4], [32, 32]]
  with pytest.raises(errors.UserError, match="different stage-1 runs"):
    hierarchy.Generator(stage1, [priors[0], (other, priors[1][1], priors[1][2])])


def test_labels_for():
  assert hierarchy.labels_for(5, None, 0) is None
  np.testing.assert_array_equal(hierarchy.labels_for(5, None, 3), [0, 1, 2, 0, 1])
  np.testing.assert_array_equal(hierarchy.labels_for(2, 4, 10), [4, 4])
  with pytest.raises(errors.UserError, match="not in"):
    hierarchy.labels_for(2, 10, 10)
