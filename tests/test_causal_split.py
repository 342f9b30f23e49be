"""The forms of PixelSNAIL's convolutions (`Impl.causal_conv`, from
config.model.causal_conv_impl, and `Impl.onehot`, models/impl.py): the reference's masked k x k
causal convolution computed as two convolutions that skip the masked taps ("split") or as one
matrix product over the taps that can contribute ("patches"), and the convolutions of one-hot
code maps (the stems, the conditioning ResNet's first) as look-ups of the codes ("lookup").
Checked against a float64 NumPy convolution with the mask applied, against one convolution, and
as the whole model against the reference forms (same parameters, outputs and gradients)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_pixelsnail_remat import _model as remat_model

from vqjax import config_checks, configs, errors
from vqjax.models import impl
from vqjax.models.impl import Impl
from vqjax.models.pixelsnail import PixelSNAIL
from vqjax.models.pixelsnail_layers import WNConv, causal_conv


def _numpy_causal_conv(x, w):
  """Output (i, j) = sum over taps (a, b) kept by the mask of x[i-kh+1+a, j-kw//2+b] w[a, b]
  (zeros outside the map); the mask drops row kh-1's taps b >= kw // 2."""
  kh, kw = w.shape[:2]
  b, h, wd, _ = x.shape
  out = np.zeros((b, h, wd, w.shape[-1]))
  for a in range(kh):
    for c in range(kw):
      if a == kh - 1 and c >= kw // 2:
        continue
      for i in range(h):
        for j in range(wd):
          r, s = i - kh + 1 + a, j - kw // 2 + c
          if 0 <= r < h and 0 <= s < wd:
            out[:, i, j] += x[:, r, s] @ w[a, c]
  return out


@pytest.mark.parametrize("k", [3, 5])
def test_split_equals_numpy_masked_convolution(k):
  rng = np.random.default_rng(k)
  x = rng.normal(size=(2, 6, 7, 4))
  conv = causal_conv(5, (k, k), "causal", impl="split")
  params = conv.init(jax.random.key(0), jnp.asarray(x, jnp.float32))["params"]
  # Random g and bias too, so the check covers the whole layer, not just the convolution.
  params = dict(params, weight_g=jnp.asarray(rng.uniform(0.5, 2.0, 5), jnp.float32))
  params["bias"] = jnp.asarray(rng.normal(size=5), jnp.float32)
  y = np.asarray(conv.apply({"params": params}, jnp.asarray(x, jnp.float32)), np.float64)
  v = np.asarray(params["weight_v"], np.float64).copy()
  v[-1, k // 2 :] = 0.0  # the mask, applied before the norm as the reference does
  w = np.asarray(params["weight_g"], np.float64) * v / np.sqrt((v * v).sum(axis=(0, 1, 2)))
  want = _numpy_causal_conv(x, w) + np.asarray(params["bias"], np.float64)
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
  # The masked form gives the same, and pixel (i, j) of the output never sees (i, j) itself.
  masked = causal_conv(5, (k, k), "causal", impl="masked")
  y_masked = np.asarray(masked.apply({"params": params}, jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(y, y_masked, rtol=1e-4, atol=1e-4)
  x2 = x.copy()
  x2[:, 3, 4] += 10.0
  y2 = np.asarray(conv.apply({"params": params}, jnp.asarray(x2, jnp.float32)))
  changed = np.abs(y2 - y).max(axis=(0, 3)) > 1e-3
  assert not changed[:3].any() and not changed[3, :5].any()  # raster order up to (3, 4)
  assert changed[3, 5] and changed[4, 4]  # the next pixel and the one below do see it


def _model(impl: str) -> PixelSNAIL:
  # The remat test's small conditioned model, with 5x5 causal convolutions.
  return remat_model(False, kernel_size=5, impl=Impl(causal_conv=impl))


@pytest.mark.slow
@pytest.mark.parametrize("impl,side", [("split", 8), ("patches", 8), ("patches", 4)])
def test_split_model_same_parameters_outputs_and_gradients(impl, side):
  # side 4: the 5 x 5 kernels are larger than the map (the form "auto" picks on the CPU).
  rng = np.random.default_rng(0)
  codes = jnp.asarray(rng.integers(0, 16, (3, side, side)), jnp.int32)
  cond = (jnp.asarray(rng.integers(0, 16, (3, side // 2, side // 2)), jnp.int32),)
  masked = remat_model(False, kernel_size=5, shape=(side, side))
  split = remat_model(False, kernel_size=5, impl=Impl(causal_conv=impl), shape=(side, side))
  params = jax.jit(masked.init)(jax.random.key(0), codes, cond)["params"]
  shapes = jax.eval_shape(split.init, jax.random.key(0), codes, cond)["params"]
  assert jax.tree.structure(params) == jax.tree.structure(shapes)

  def loss(model):
    def f(p):
      logits = model.apply(
        {"params": p}, codes, cond, train=True, rngs={"dropout": jax.random.key(3)}
      )
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), codes[..., None], -1))

    return jax.jit(jax.value_and_grad(f))

  (l_m, g_m), (l_s, g_s) = loss(masked)(params), loss(split)(params)
  np.testing.assert_allclose(float(l_s), float(l_m), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_m), jax.tree.leaves(g_s), strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-3, atol=2e-5)
  # The masked taps get no gradient in either form (they are zero in every weight).
  v_grad = np.asarray(g_s["blocks_0"]["resblocks_0"]["conv1"]["weight_v"])
  assert np.all(v_grad[-1, 2:] == 0.0) and np.abs(v_grad[-1, :2]).max() > 0


@pytest.mark.parametrize("side,k", [(6, 3), (4, 5), (2, 5), (1, 3)])
def test_patches_equals_numpy_masked_convolution(side, k):
  # Maps smaller than the kernel too: whole rows of taps read only padding and are skipped.
  rng = np.random.default_rng(side * k)
  x = rng.normal(size=(2, side, side + 1, 4))
  conv = causal_conv(5, (k, k), "causal", impl="patches")
  params = conv.init(jax.random.key(0), jnp.asarray(x, jnp.float32))["params"]
  params = dict(params, weight_g=jnp.asarray(rng.uniform(0.5, 2.0, 5), jnp.float32))
  y = np.asarray(conv.apply({"params": params}, jnp.asarray(x, jnp.float32)), np.float64)
  v = np.asarray(params["weight_v"], np.float64).copy()
  v[-1, k // 2 :] = 0.0
  w = np.asarray(params["weight_g"], np.float64) * v / np.sqrt((v * v).sum(axis=(0, 1, 2)))
  np.testing.assert_allclose(y, _numpy_causal_conv(x, w), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
  "kernel,padding",
  [((2, 5), ((1, 0), (2, 2))), ((3, 2), ((2, 0), (1, 0))), ((3, 3), ((1, 1),) * 2)],
)
@pytest.mark.slow
def test_patches_any_padding_equals_the_convolution(kernel, padding):
  # Unmasked kernels and other paddings (the stems' "down" and "downright", a centred one),
  # on a 2 x 3 map that some kernels exceed: the same values and gradients as one convolution.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2, 3, 4)), jnp.float32)
  conv = WNConv(6, kernel, padding=padding, impl="masked")
  patches = WNConv(6, kernel, padding=padding, impl="patches")
  params = conv.init(jax.random.key(1), x)
  for a, b in zip(
    jax.jacrev(conv.apply, argnums=(0, 1))(params, x),
    jax.jacrev(patches.apply, argnums=(0, 1))(params, x),
    strict=True,
  ):
    for ga, gb in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      np.testing.assert_allclose(np.asarray(gb), np.asarray(ga), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(patches.apply(params, x), conv.apply(params, x), atol=1e-6)


@pytest.mark.parametrize("padding", ["down", "downright", "causal"])
def test_lookup_of_codes_equals_the_convolution_of_their_one_hot_map(padding):
  # Codes outside [0, K) have all-zero one-hot rows: they add nothing in either form.
  k, kernel = 7, (3, 5)
  codes = np.random.default_rng(0).integers(0, k, (2, 4, 3))
  codes[0, 1, 1], codes[1, 2, 0] = k, -1
  codes = jnp.asarray(codes, jnp.int32)
  conv = causal_conv(6, kernel, padding)
  lookup = causal_conv(6, kernel, padding, one_hot=k)
  one_hot = jax.nn.one_hot(codes, k)
  params = conv.init(jax.random.key(0), one_hot)
  assert jax.tree.map(jnp.shape, lookup.init(jax.random.key(0), codes)) == jax.tree.map(
    jnp.shape, params
  )
  params = jax.tree.map(lambda p: p + 0.3, params)  # nonzero bias
  want, pull_want = jax.vjp(lambda p: conv.apply(p, one_hot), params)
  got, pull_got = jax.vjp(lambda p: lookup.apply(p, codes), params)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=want.shape), jnp.float32)
  for a, b in zip(
    jax.tree.leaves(pull_want(cotangent)), jax.tree.leaves(pull_got(cotangent)), strict=True
  ):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="int codes"):
    lookup.apply(params, one_hot)


@pytest.mark.slow
def test_lookup_model_same_outputs_and_gradients():
  # Conditioned: the stems and the conditioning ResNet's first convolution look codes up.
  rng = np.random.default_rng(2)
  codes = jnp.asarray(rng.integers(0, 16, (3, 8, 8)), jnp.int32)
  cond = (jnp.asarray(rng.integers(0, 16, (3, 4, 4)), jnp.int32),)
  conv, lookup = remat_model(False), remat_model(False, impl=Impl(onehot="lookup"))
  params = jax.jit(conv.init)(jax.random.key(0), codes, cond)["params"]

  def loss(model):
    def f(p):
      logits = model.apply(
        {"params": p}, codes, cond, train=True, rngs={"dropout": jax.random.key(3)}
      )
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), codes[..., None], -1))

    return jax.jit(jax.value_and_grad(f))

  (l_c, g_c), (l_l, g_l) = loss(conv)(params), loss(lookup)(params)
  np.testing.assert_allclose(float(l_l), float(l_c), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_c), jax.tree.leaves(g_l), strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-3, atol=2e-5)
  with pytest.raises(ValueError, match="unknown onehot form"):
    Impl(onehot="gather")


def test_split_rejects_other_paddings_and_unknown_forms():
  x = jnp.zeros((1, 4, 4, 2))
  with pytest.raises(ValueError, match="causal"):
    WNConv(3, (3, 3), padding=((1, 1), (1, 1)), impl="split").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="unknown conv impl"):
    causal_conv(3, (3, 3), "causal", impl="fused").init(jax.random.key(0), x)
  c = configs.prior_config("", level=0, model="pixelsnail")
  c.model.causal_conv_impl = "fast"
  with pytest.raises(errors.UserError, match="causal_conv_impl"):
    config_checks.validate(c)


def test_a_built_prior_gets_the_resolved_form_for_its_map():
  # The "patches" rule itself: tests/test_impl.py; here, that the registry applies it to the
  # level's code-map shape.
  from vqjax.models import registry

  c = configs.prior_config("", level=0, model="pixelsnail")
  assert c.model.causal_conv_impl == "auto"
  c.prior.code_shapes = [[4, 4]]
  model = registry.build_model(c)
  cpu = jax.default_backend() == "cpu"
  assert model.impl.causal_conv == ("patches" if cpu else impl.resolve().causal_conv)
  c.model.causal_conv_impl = "masked"
  assert registry.build_model(c).impl.causal_conv == "masked"


@pytest.mark.slow
def test_split_model_on_an_8_device_mesh_matches_one_device():
  """The GPU default ("split") under the trainer's sharding: batch over the data axis, kernels
  over fsdp. Loss and gradients as on one device (the 8 simulated CPU devices of conftest)."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from vqjax.training import sharding

  assert jax.device_count() == 8
  rng = np.random.default_rng(1)
  codes = jnp.asarray(rng.integers(0, 16, (8, 8, 8)), jnp.int32)
  cond = (jnp.asarray(rng.integers(0, 16, (8, 4, 4)), jnp.int32),)
  model = _model("split")
  params = jax.jit(model.init)(jax.random.key(0), codes, cond)["params"]

  def f(p, codes, cond):
    logits = model.apply({"params": p}, codes, cond, train=False)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), codes[..., None], -1))

  step = jax.jit(jax.value_and_grad(f))
  loss_1, grads_1 = step(params, codes, cond)
  for data, fsdp in ((8, 1), (2, 4)):
    mesh = sharding.make_mesh(
      ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "fsdp_min_size": 64})
    )
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    specs = [sharding.fsdp_spec(a.shape, fsdp, 64) for a in jax.tree.leaves(params)]
    assert (fsdp > 1) == any(tuple(s) for s in specs)  # fsdp=4 shards some kernels
    placed = [
      jax.device_put(a, NamedSharding(mesh, s))
      for a, s in zip(jax.tree.leaves(params), specs, strict=True)
    ]
    sharded = jax.tree.unflatten(jax.tree.structure(params), placed)
    loss_n, grads_n = step(sharded, jax.device_put(codes, batch), (jax.device_put(cond[0], batch),))
    np.testing.assert_allclose(float(loss_n), float(loss_1), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_1), jax.tree.leaves(grads_n), strict=True):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
