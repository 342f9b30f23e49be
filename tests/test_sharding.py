"""Tests of vqjax/training/sharding.py: mesh sizes, the FSDP rule, and that a step computes
the same loss, gradients and EMA codebook statistics on 1 device, 8 data-parallel devices and
8 FSDP devices (the statistics are global because the arrays are)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vqjax import configs
from vqjax.training import sharding, tasks


def _mesh_cfg(data, fsdp, min_size=2**14):
  return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "fsdp_min_size": min_size})


def test_mesh_shape_resolves_minus_one_and_rejects_bad_sizes():
  assert sharding.mesh_shape(_mesh_cfg(-1, 2), 8) == (4, 2)
  assert sharding.mesh_shape(_mesh_cfg(2, -1), 8) == (2, 4)
  assert sharding.mesh_shape(_mesh_cfg(8, 1), 8) == (8, 1)
  with pytest.raises(ValueError, match="does not divide"):
    sharding.mesh_shape(_mesh_cfg(-1, 3), 8)
  with pytest.raises(ValueError, match="only one"):
    sharding.mesh_shape(_mesh_cfg(-1, -1), 8)
  with pytest.raises(ValueError, match="does not match"):
    sharding.mesh_shape(_mesh_cfg(2, 2), 8)


def test_fsdp_rule():
  # Largest divisible dimension is split; small or indivisible parameters replicate.
  assert sharding.fsdp_spec((3, 3, 64, 128), 8, 1024) == P(None, None, None, "fsdp")
  assert sharding.fsdp_spec((512, 64), 8, 1024) == P("fsdp", None)
  assert sharding.fsdp_spec((3, 3, 5, 24), 8, 16) == P(None, None, None, "fsdp")
  assert sharding.fsdp_spec((7, 9, 11), 8, 1) == P()
  assert sharding.fsdp_spec((512, 64), 8, 10**6) == P()
  assert sharding.fsdp_spec((512, 64), 1, 1) == P()
  assert sharding.fsdp_spec((), 8, 0) == P()


def test_batch_split_over_all_devices():
  mesh = sharding.make_mesh(_mesh_cfg(2, 4))
  x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  g = sharding.global_batch({"image": x}, mesh)["image"]
  assert g.shape == (8, 3)
  assert len({s.device for s in g.addressable_shards}) == 8
  assert all(s.data.shape == (1, 3) for s in g.addressable_shards)
  np.testing.assert_array_equal(np.asarray(g), x)
  with pytest.raises(ValueError, match="not divisible"):
    sharding.check_batch_size(12, mesh)


def _small_config():
  c = configs.base_config()
  c.data.image_size, c.data.channels = 16, 1
  c.model.channels, c.model.res_channels, c.model.num_res_blocks = 16, 8, 1
  c.model.first_stride = 2
  c.vq.num_codes, c.vq.code_dim = 16, 8
  return c


@pytest.fixture(scope="module")
def reference():
  """Loss, gradients and new EMA state of one batch, computed on a single device."""
  config = _small_config()
  task = tasks.AutoencoderTask(config)
  rng = np.random.default_rng(0)
  image = rng.uniform(-1, 1, (8, 16, 16, 1)).astype(np.float32)
  # rbg: compiles much faster than threefry for a flax init (see trainer.py).
  state = jax.jit(task.init)(jax.random.key(0, impl="rbg"), {"image": jnp.asarray(image[:1])})
  state = jax.device_get(state)

  def loss_grads(params, model_state, image, key):
    (loss, (aux, new_ms)), grads = jax.value_and_grad(task._loss, has_aux=True)(
      params, model_state, image, key
    )
    return loss, grads, new_ms, aux["level0/counts"]

  one = sharding.make_mesh(_mesh_cfg(1, 1), jax.devices()[:1])
  out = _run(loss_grads, state, image, one, 2**14)
  return task, loss_grads, state, image, jax.device_get(out)


def _run(fn, state, image, mesh, min_size):
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  sh = sharding.state_shardings(abstract, mesh, min_size)
  state = jax.device_put(state, sh)
  batch = sharding.global_batch({"image": image}, mesh)["image"]
  repl = sharding.replicated(mesh)
  jitted = jax.jit(
    fn,
    in_shardings=(sh.params, sh.model_state, sharding.batch_sharding(mesh), repl),
    out_shardings=(repl, sh.params, sh.model_state, repl),
  )
  key = jax.device_put(jax.random.key(3), repl)
  return jitted(state.params, state.model_state, batch, key), sh


@pytest.mark.slow
@pytest.mark.parametrize("data,fsdp", [(8, 1), (1, 8)])
def test_same_loss_grads_and_ema_on_1_and_8_devices(reference, data, fsdp):
  task, fn, state, image, (ref, _) = reference
  mesh = sharding.make_mesh(_mesh_cfg(data, fsdp))
  # A low threshold so that FSDP really splits parameters in this small model.
  out, sh = _run(fn, state, image, mesh, min_size=64)
  if fsdp > 1:
    specs = [s.spec for s in jax.tree.leaves(sh.params)]
    assert any("fsdp" in tuple(s) for s in specs), "no parameter was sharded"
  loss, grads, model_state, counts = jax.device_get(out)
  np.testing.assert_allclose(loss, ref[0], rtol=1e-5)
  np.testing.assert_array_equal(counts, ref[3])
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref[1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree.leaves(model_state), jax.tree.leaves(ref[2]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The EMA statistics moved: they saw the global batch, not a per-device slice.
  assert any(
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(model_state), jax.tree.leaves(state.model_state), strict=True)
  )


def test_create_sharded_state_places_leaves():
  mesh = sharding.make_mesh(_mesh_cfg(2, 4))

  def init(key):
    return {
      "big": jax.random.normal(key, (64, 32)),
      "small": jnp.zeros((3,)),
      "step": jnp.zeros((), jnp.int32),
    }

  state, sh = sharding.create_sharded_state(init, mesh, 256, jax.random.key(0))
  assert state["big"].sharding.spec == P("fsdp", None)
  assert state["small"].sharding.spec == P()
  assert state["step"].sharding.is_fully_replicated
  assert state["big"].addressable_shards[0].data.shape == (16, 32)
