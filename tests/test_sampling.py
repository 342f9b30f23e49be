"""Tests of vqjax/sampling: the cached decode of both priors (PixelSNAIL, Gated PixelCNN)
matches the full forward, both samplers draw the same codes, draws follow the (filtered) logits
and do not depend on the batch layout or the number of devices."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from vqjax.models.pixelcnn import GatedPixelCNN
from vqjax.models.pixelsnail import PixelSNAIL
from vqjax.sampling import cached, filter_logits, hierarchy, naive

H = W = 6
K = 8


def _snail(**kw) -> PixelSNAIL:
  args = dict(
    shape=(H, W),
    num_codes=K,
    channels=16,
    kernel_size=3,
    num_blocks=2,
    num_res_blocks=1,
    res_channels=16,
    num_heads=2,
  )
  return PixelSNAIL(**{**args, **kw})


def _pixelcnn(**kw) -> GatedPixelCNN:
  return GatedPixelCNN(**{**dict(num_codes=K, channels=8, num_layers=2, kernel_size=3), **kw})


def _inputs(model, batch: int, seed: int = 0, shape: tuple[int, int] = (H, W)):
  rng = np.random.default_rng(seed)
  height, width = shape
  codes = jnp.asarray(rng.integers(0, K, (batch, height, width)), jnp.int32)
  condition = label = None
  if getattr(model, "cond_res_channels", 0) or getattr(model, "cond_channels", 0):
    condition = (jnp.asarray(rng.integers(0, K, (batch, height // 2, width // 2)), jnp.int32),)
  if model.num_classes:
    label = jnp.asarray(rng.integers(0, model.num_classes, (batch,)), jnp.int32)
  return codes, condition, label


def _init(model, codes, condition=None, label=None, seed: int = 1):
  """Random variables of the model's shapes, drawn with NumPy (no slow init compile)."""
  abstract = jax.eval_shape(
    lambda: model.init(jax.random.key(0), codes, condition=condition, label=label)
  )
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = jax.tree_util.keystr(path[-1:])
    if "weight_g" in name:
      return jnp.asarray(rng.uniform(0.5, 1.0, x.shape), x.dtype)
    scale = 1.0 / np.sqrt(np.prod(x.shape[:-1])) if "kernel" in name else 0.5
    return jnp.asarray(rng.standard_normal(x.shape) * scale, x.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


CASES = {
  "snail_attention": lambda: _snail(),
  "snail_no_attention_conditioned": lambda: _snail(
    attention=False, num_cond_res_blocks=1, cond_res_channels=8
  ),
  "snail_attention_label_out_blocks": lambda: _snail(
    kernel_size=5, num_classes=3, num_out_res_blocks=1
  ),
  "pixelcnn_k3": lambda: _pixelcnn(),
  "pixelcnn_label_k5": lambda: _pixelcnn(kernel_size=5, num_layers=3, num_classes=3),
  "pixelcnn_condition_k3": lambda: _pixelcnn(num_layers=3, cond_channels=8),
  "pixelcnn_condition_label_k5": lambda: _pixelcnn(kernel_size=5, cond_channels=8, num_classes=3),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_logits_equal_full_forward(case):
  model = CASES[case]()
  codes, condition, label = _inputs(model, 2)
  variables = _init(model, codes, condition, label)
  full = model.apply(variables, codes, condition=condition, label=label)
  incremental = cached.logits_at_every_position(model, variables, codes, condition, label)
  assert incremental.shape == (2, H, W, K) and incremental.dtype == jnp.float32
  np.testing.assert_allclose(incremental, full, rtol=1e-5, atol=1e-5)


def test_pixelcnn_cached_logits_on_a_map_that_is_not_square():
  # 7 rows (more than twice the ring of k//2 + 1 = 3 vertical rows kept per layer) of 3
  # columns (fewer than the k = 5 window is wide).
  model = _pixelcnn(kernel_size=5, num_layers=3, num_classes=3)
  codes, condition, label = _inputs(model, 2, seed=4, shape=(7, 3))
  variables = _init(model, codes, condition, label)
  full = model.apply(variables, codes, label=label)
  incremental = cached.logits_at_every_position(model, variables, codes, label=label)
  np.testing.assert_allclose(incremental, full, rtol=1e-5, atol=1e-5)


@functools.cache
def _conditioned():
  model = _snail(num_cond_res_blocks=1, cond_res_channels=8, num_classes=3)
  codes, condition, label = _inputs(model, 4)
  return model, _init(model, codes, condition, label), condition, label


@functools.cache
def _conditioned_pixelcnn():
  model = _pixelcnn(kernel_size=5, num_layers=3, cond_channels=8, num_classes=3)
  codes, condition, label = _inputs(model, 4, seed=2)
  return model, _init(model, codes, condition, label, seed=3), condition, label


def test_naive_and_cached_draw_the_same_samples():
  model, variables, condition, label = _conditioned()
  kw = dict(condition=condition, label=label, temperature=0.9, top_p=0.95)
  rng = jax.random.key(7)
  slow = naive.sample(model, variables, 4, (H, W), rng, **kw)
  fast = cached.sample(model, variables, 4, (H, W), rng, **kw)
  assert fast.shape == (4, H, W) and fast.dtype == jnp.int32
  np.testing.assert_array_equal(fast, slow)
  # Different keys and different labels give different maps.
  assert np.any(cached.sample(model, variables, 4, (H, W), jax.random.key(8), **kw) != fast)
  assert len({np.asarray(m).tobytes() for m in fast}) == 4


@pytest.mark.parametrize(
  "settings",
  [dict(), dict(temperature=0.8, top_k=5, top_p=0.9)],
  ids=["temperature_1", "top_k_top_p"],
)
def test_naive_and_cached_draw_the_same_samples_from_a_pixelcnn(settings):
  model, variables, condition, label = _conditioned_pixelcnn()
  kw = dict(condition=condition, label=label, **settings)
  rng = jax.random.key(11)
  slow = naive.sample(model, variables, 4, (H, W), rng, **kw)
  fast = cached.sample(model, variables, 4, (H, W), rng, **kw)
  assert fast.shape == (4, H, W) and fast.dtype == jnp.int32
  np.testing.assert_array_equal(fast, slow)
  # The maps are draws, not constants: every example differs and uses several codes.
  assert len({np.asarray(m).tobytes() for m in fast}) == 4
  assert all(len(np.unique(np.asarray(m))) > 2 for m in fast)


@pytest.mark.slow
def test_samples_follow_the_logits():
  model, variables, condition, label = _conditioned()
  kw = dict(condition=condition, label=label)
  # A large output bias on code 5 makes it overwhelmingly likely everywhere.
  params = jax.tree.map(lambda x: x, variables["params"])
  bias = params["out_1"]["bias"]
  params["out_1"]["bias"] = bias.at[5].add(1e3)
  biased = cached.sample(model, {"params": params}, 4, (H, W), jax.random.key(0), **kw)
  np.testing.assert_array_equal(biased, 5)
  # Greedy decoding (top_k=1, or temperature 0): every code is the argmax of the model's
  # logits given the codes before it, which the full forward on the result checks.
  greedy = cached.sample(model, variables, 4, (H, W), jax.random.key(1), top_k=1, **kw)
  logits = model.apply(variables, greedy, condition=condition, label=label)
  np.testing.assert_array_equal(greedy, jnp.argmax(logits, -1))
  cold = cached.sample(model, variables, 4, (H, W), jax.random.key(2), temperature=0, **kw)
  np.testing.assert_array_equal(cold, greedy)


def test_filter_logits():
  logits = jnp.log(jnp.asarray([[0.5, 0.1, 0.3, 0.1]]))
  kept = lambda f: np.isfinite(np.asarray(f))[0].tolist()
  assert kept(filter_logits(logits)) == [True] * 4
  assert kept(filter_logits(logits, top_k=2)) == [True, False, True, False]
  assert kept(filter_logits(logits, top_p=0.5)) == [True, False, False, False]
  assert kept(filter_logits(logits, top_p=0.7)) == [True, False, True, False]
  assert kept(filter_logits(logits, top_p=0.85)) == [True, True, True, True]
  np.testing.assert_allclose(filter_logits(logits, temperature=0.5), 2 * logits, rtol=1e-6)


def test_samples_do_not_depend_on_the_batch_layout():
  model, variables, condition, label = _conditioned()
  rng = jax.random.key(3)
  whole = cached.sample(model, variables, 4, (H, W), rng, condition=condition, label=label)
  halves = [
    cached.sample(
      model,
      variables,
      2,
      (H, W),
      rng,
      condition=tuple(c[s : s + 2] for c in condition),
      label=label[s : s + 2],
      example_offset=s,
    )
    for s in (0, 2)
  ]
  np.testing.assert_array_equal(np.concatenate(halves), whole)


@pytest.mark.slow
@pytest.mark.parametrize("prior", ["pixelsnail", "pixelcnn"])
def test_samples_do_not_depend_on_the_number_of_devices(prior):
  if prior == "pixelsnail":
    model = _snail(num_blocks=1, num_classes=3)
  else:
    model = _pixelcnn(kernel_size=5, num_layers=3, cond_channels=8, num_classes=3)
  codes, condition, label = _inputs(model, 8, seed=5)
  variables = _init(model, codes, condition, label)
  rng = jax.random.key(3)
  one = jax.devices()[0]
  on_one = cached.sample(
    model,
    jax.device_put(variables, one),
    8,
    (H, W),
    rng,
    condition=jax.device_put(condition, one),
    label=jax.device_put(label, one),
  )
  assert on_one.sharding.device_set == {one}
  # The same batch sharded over a mesh of all 8 simulated devices (data axis) draws the same.
  assert len(jax.devices()) == 8
  auto = (jax.sharding.AxisType.Auto,)
  mesh = jax.make_mesh((8,), ("data",), axis_types=auto)
  batch = NamedSharding(mesh, PartitionSpec("data"))
  sharded = jax.jit(
    lambda v, c, lab: cached.sample(model, v, 8, (H, W), rng, condition=c, label=lab),
    out_shardings=batch,
  )(variables, jax.device_put(condition, batch), jax.device_put(label, batch))
  assert len(sharded.sharding.device_set) == 8
  assert len({np.asarray(m).tobytes() for m in sharded}) == 8
  np.testing.assert_array_equal(sharded, on_one)


class _NoDecodeMode(nn.Module):
  """A prior without a decode mode: logits from a per-position bias only."""

  @nn.compact
  def __call__(self, codes, condition=None, label=None, train=False):
    bias = self.param("bias", nn.initializers.zeros, (codes.shape[1], codes.shape[2], K))
    return jnp.broadcast_to(bias, (*codes.shape, K))


def test_sampler_for_picks_cached_for_both_priors_and_naive_without_a_decode_mode():
  assert hierarchy.sampler_for(_snail()) is cached
  assert hierarchy.sampler_for(_pixelcnn()) is cached
  other = _NoDecodeMode()
  assert hierarchy.sampler_for(other) is naive
  with pytest.raises(ValueError, match="no decode mode"):
    cached.sample(other, {}, 2, (H, W), jax.random.key(0))
  with pytest.raises(ValueError, match="no decode mode"):
    cached.logits_at_every_position(other, {}, jnp.zeros((2, H, W), jnp.int32))


def test_cached_greedy_pixelcnn_sample_is_the_argmax_of_the_full_forward():
  model = _pixelcnn(num_classes=3)
  codes, condition, label = _inputs(model, 2)
  variables = _init(model, codes, condition, label)
  greedy = cached.sample(model, variables, 2, (H, W), jax.random.key(0), label=label, top_k=1)
  logits = model.apply(variables, greedy, label=label)
  np.testing.assert_array_equal(greedy, jnp.argmax(logits, -1))
  assert len(np.unique(np.asarray(greedy))) > 1


def _short_multi_level():
  """An 8x8 PixelSNAIL conditioned on two maps (2x2 and 4x4) and a label, on a 6-row map."""
  model = _snail(shape=(8, 8), num_cond_res_blocks=1, cond_res_channels=8, num_classes=3)
  rng = np.random.default_rng(5)
  codes = jnp.asarray(rng.integers(0, K, (2, 6, 8)), jnp.int32)
  condition = tuple(jnp.asarray(rng.integers(0, K, (2, 8 // f, 8 // f)), jnp.int32) for f in (4, 2))
  label = jnp.asarray([0, 2], jnp.int32)
  return model, codes, condition, label, _init(model, codes, condition, label, seed=6)


@pytest.mark.slow
def test_coarse_conditioning_equals_full_resolution_on_short_multi_level_maps():
  """The blocks project the conditioning features at the finest condition map's resolution and
  upsample after (PixelSNAIL._conditioning); decoding caches them upsampled to full resolution
  first. Two maps (a quarter and a half of the 8x8 map), a label, and a map 6 rows high (not a
  multiple of the scale of the coarsest map): both paths give the same logits."""
  model, codes, condition, label, variables = _short_multi_level()
  full = model.apply(variables, codes, condition=condition, label=label)
  incremental = cached.logits_at_every_position(model, variables, codes, condition, label)
  assert full.shape == (2, 6, 8, K)
  np.testing.assert_allclose(incremental, full, rtol=1e-5, atol=1e-5)


def test_coarse_conditioning_projects_the_upsampled_features():
  """Against a hand computation in NumPy: each conditioning ResNet's output repeated to the full
  map (x4, x2), cropped to 6 rows, summed with the label's embedding, then projected by a block's
  weight-normalised 1 x 1 "condition" conv; the model projects at half resolution and repeats."""
  model, codes, condition, label, variables = _short_multi_level()
  _, state = model.apply(
    variables, codes, condition=condition, label=label, capture_intermediates=True
  )
  got = state["intermediates"]
  up = lambda a, f: np.repeat(np.repeat(np.asarray(a, np.float64), f, 1), f, 2)[:, :6]
  feats = up(got["cond_resnet"]["__call__"][0], 4) + up(got["cond_resnet_1"]["__call__"][0], 2)
  feats += np.asarray(variables["params"]["label_embed"]["embedding"], np.float64)[
    np.asarray(label)
  ][:, None, None]
  p = variables["params"]["blocks_1"]["resblocks_0"]["condition"]
  v = np.asarray(p["weight_v"], np.float64)[0, 0]
  w = np.asarray(p["weight_g"], np.float64) * v / np.sqrt((v * v).sum(0))
  want = feats @ w
  proj = got["blocks_1"]["resblocks_0"]["condition"]["__call__"][0]
  assert proj.shape[1:3] == (3, 4)  # projected at half resolution: 3 = ceil(6 / 2) rows
  np.testing.assert_allclose(up(proj, 2), want, rtol=1e-4, atol=1e-5)
