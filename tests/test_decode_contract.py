"""Both priors follow one decode-mode contract (vqjax/models/prior.py): cached sampling equals
full-recompute sampling and an independent recomputation of every draw, the label is read by the
first decode call only, the logits dtype rule is the same, both modes use the same parameters,
and the sampler is picked by the declared `decode_mode`, not by a call signature."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqjax.models import prior
from vqjax.models.pixelcnn import GatedPixelCNN
from vqjax.models.pixelsnail import PixelSNAIL
from vqjax.sampling import cached, naive, sampler_for

H, W, K, CLASSES = 4, 5, 6, 3


def _pixelcnn(**kw):
  sizes = dict(num_codes=K, channels=8, num_layers=2, kernel_size=3, num_classes=CLASSES)
  return GatedPixelCNN(**{**sizes, **kw})


def _snail(**kw):
  sizes = dict(
    shape=(H, W),
    num_codes=K,
    channels=8,
    kernel_size=3,
    num_blocks=2,
    num_res_blocks=1,
    res_channels=8,
    num_heads=2,
    dropout=0.0,
    num_classes=CLASSES,
  )
  return PixelSNAIL(**{**sizes, **kw})


PRIORS = {
  "pixelcnn": _pixelcnn,
  "pixelcnn_conditioned": lambda **kw: _pixelcnn(cond_channels=4, **kw),
  "pixelsnail": _snail,
  "pixelsnail_conditioned": lambda **kw: _snail(num_cond_res_blocks=1, cond_res_channels=4, **kw),
}


def _setup(name, **kw):
  model = PRIORS[name](**kw)
  rng = np.random.default_rng(0)
  codes = jnp.asarray(rng.integers(0, K, (2, H, W)), jnp.int32)
  condition = None
  if "conditioned" in name:
    condition = (jnp.asarray(rng.integers(0, K, (2, 2, 1)), jnp.int32),)
    if name.startswith("pixelsnail"):  # PixelSNAIL's condition maps divide its shape
      condition = (jnp.asarray(rng.integers(0, K, (2, 2, 5)), jnp.int32),)
  label = jnp.asarray([1, 2], jnp.int32)
  variables = jax.jit(lambda key: model.init(key, codes, condition=condition, label=label))(
    jax.random.key(1)
  )
  # Larger weights than the initialisers': logits far from uniform, so a wrong label or a
  # wrong parameter shows.
  variables = jax.tree.map(lambda a: a * 2.0 if a.dtype == jnp.float32 else a, variables)
  return model, variables, codes, condition, label


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_cached_sampling_equals_naive_and_an_independent_recomputation(name):
  model, variables, _, condition, label = _setup(name)
  key = jax.random.key(7)
  fast = cached.sample(model, variables, 2, (H, W), key, condition=condition, label=label)
  slow = naive.sample(model, variables, 2, (H, W), key, condition=condition, label=label)
  np.testing.assert_array_equal(np.asarray(fast), np.asarray(slow))
  # Independently: one full forward of the sampled maps gives, at every position, the logits
  # the draw saw (they depend only on earlier codes); the draw of example e at position p is
  # categorical(fold_in(fold_in(key, p), e)) of them (naive.py's documented key).
  logits = np.asarray(model.apply(variables, fast, condition=condition, label=label))
  for p in range(H * W):
    i, j = divmod(p, W)
    for e in range(2):
      k = jax.random.fold_in(jax.random.fold_in(key, p), e)
      assert int(jax.random.categorical(k, logits[e, i, j])) == int(fast[e, i, j]), (p, e)
  # The label matters: another label gives other maps from the same key.
  other = cached.sample(model, variables, 2, (H, W), key, condition=condition, label=label[::-1])
  assert np.any(np.asarray(other) != np.asarray(fast))


def _decode_logits(model, variables, codes, condition, first_label, later_label):
  """Decode-mode logits [B, H, W, K] of `codes`, the first call given `first_label` and every
  later call `later_label` (and the map holding the true codes before each position)."""

  @jax.jit
  def step(cache, p, label):
    out, state = model.apply(
      {**variables, **cache},
      jnp.where(jnp.arange(H * W).reshape(H, W) < p, codes, 0),
      condition=condition,
      label=label,
      decode_position=p,
      mutable=["cache"],
    )
    return out, state

  cache, rows = {}, []
  for p in range(H * W):
    out, cache = step(cache, jnp.int32(p), first_label if p == 0 else later_label)
    rows.append(np.asarray(out))
  return np.stack(rows, axis=1).reshape(codes.shape[0], H, W, K)


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_the_label_is_read_by_the_first_decode_call_only(name):
  model, variables, codes, condition, label = _setup(name)
  full = np.asarray(model.apply(variables, codes, condition=condition, label=label))
  decoded = _decode_logits(model, variables, codes, condition, label, (label + 1) % CLASSES)
  np.testing.assert_allclose(decoded, full, rtol=1e-5, atol=1e-5)
  other = np.asarray(model.apply(variables, codes, condition=condition, label=(label + 1) % 3))
  assert np.abs(other - full).max() > 1e-3  # a label read later would have shown


@pytest.mark.parametrize("name", ["pixelcnn", "pixelsnail"])
def test_the_logits_dtype_rule_is_the_same_in_both_modes(name):
  assert prior.logits_dtype(jnp.bfloat16) == jnp.float32
  assert prior.logits_dtype(jnp.float16) == jnp.float32
  assert prior.logits_dtype(jnp.float32) == jnp.float32
  assert prior.logits_dtype(jnp.float64) == jnp.float64
  model, variables, codes, condition, label = _setup(name, dtype=jnp.bfloat16)
  full = model.apply(variables, codes, condition=condition, label=label)
  one, _ = model.apply(
    variables, codes, condition=condition, label=label, decode_position=0, mutable=["cache"]
  )
  assert full.dtype == one.dtype == prior.logits_dtype(jnp.bfloat16)
  assert full.shape == (2, H, W, K) and one.shape == (2, K)


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_decode_mode_uses_exactly_the_full_modes_parameters(name):
  kw = dict(remat=True) if name.startswith("pixelsnail") else {}
  model, _, codes, condition, label = _setup(name, **kw)
  shapes = lambda **mode: jax.tree.map(
    lambda a: a.shape,
    jax.eval_shape(
      lambda: model.init(jax.random.key(0), codes, condition=condition, label=label, **mode)
    )["params"],
  )
  assert shapes(decode_position=0) == shapes()


class _SignatureOnly(nn.Module):
  """Takes `decode_position` but declares no decode mode: the naive sampler's."""

  @nn.compact
  def __call__(self, codes, condition=None, label=None, train=False, *, decode_position=None):
    bias = self.param("bias", nn.initializers.zeros, (codes.shape[1], codes.shape[2], K))
    return jnp.broadcast_to(bias, (*codes.shape, K))


class _Declared(_SignatureOnly):
  decode_mode = True


def test_the_sampler_is_chosen_by_the_declared_decode_mode():
  assert prior.has_decode_mode(_pixelcnn()) and prior.has_decode_mode(_snail())
  assert sampler_for(_pixelcnn()) is cached and sampler_for(_snail()) is cached
  assert sampler_for(_SignatureOnly()) is naive
  assert sampler_for(_Declared()) is cached
