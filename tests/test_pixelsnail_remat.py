"""PixelSNAIL with `remat=True` (config.model.remat): the same parameters, outputs and gradients
as without. (Its memory saving is for accelerators: XLA:CPU's memory analysis shows none for
any jax.checkpoint program here, a plain checkpointed MLP included, so it is not tested here.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqjax import config_checks, configs, errors
from vqjax.models.pixelsnail import PixelSNAIL


def _model(remat: bool, **kw) -> PixelSNAIL:
  sizes = dict(
    shape=(8, 8),
    num_codes=16,
    channels=16,
    kernel_size=3,
    num_blocks=2,
    num_res_blocks=1,
    res_channels=16,
    num_heads=2,
    dropout=0.1,
    num_cond_res_blocks=1,
    cond_res_channels=8,
  )
  sizes.update(kw)
  return PixelSNAIL(remat=remat, **sizes)


def _data(batch=3, side=8):
  rng = np.random.default_rng(0)
  codes = jnp.asarray(rng.integers(0, 16, (batch, side, side)), jnp.int32)
  top = jnp.asarray(rng.integers(0, 16, (batch, side // 2, side // 2)), jnp.int32)
  return codes, (top,)


def _loss_fn(model, codes, cond):
  def loss(params):
    logits = model.apply(
      {"params": params}, codes, cond, train=True, rngs={"dropout": jax.random.key(7)}
    )
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, codes[..., None], axis=-1))

  return loss


@pytest.mark.slow
def test_remat_keeps_parameters_outputs_and_gradients():
  codes, cond = _data()
  plain, remat = _model(False), _model(True)
  params = jax.jit(plain.init)(jax.random.key(0), codes, cond)["params"]
  shapes_r = jax.eval_shape(remat.init, jax.random.key(0), codes, cond)["params"]
  # The same parameter tree, names and shapes: checkpoints load either way.
  assert jax.tree.structure(params) == jax.tree.structure(shapes_r)
  assert all(jax.tree.leaves(jax.tree.map(lambda p, r: p.shape == r.shape, params, shapes_r)))
  loss, grads = jax.jit(jax.value_and_grad(_loss_fn(plain, codes, cond)))(params)
  loss_r, grads_r = jax.jit(jax.value_and_grad(_loss_fn(remat, codes, cond)))(params)
  # Dropout draws the same masks when the blocks are recomputed.
  np.testing.assert_allclose(float(loss_r), float(loss), rtol=1e-6)
  flat, flat_r = jax.tree.leaves(grads), jax.tree.leaves(grads_r)
  assert sum(float(jnp.abs(g).sum()) for g in flat) > 0
  for g, g_r in zip(flat, flat_r, strict=True):
    np.testing.assert_allclose(np.asarray(g_r), np.asarray(g), rtol=2e-5, atol=1e-7)


def test_config_field():
  config = configs.base_config()
  config.model.remat = True  # the stage-1 default model ignores it: rejected, not ignored
  with pytest.raises(errors.UserError, match="model.remat"):
    config_checks.validate(config)
  config.model.name = "pixelsnail"
  config_checks.validate(config)
