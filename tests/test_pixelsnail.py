"""Tests of vqjax/models/pixelsnail.py: causality, conditioning, learning, bf16, attention."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vqjax.models.pixelsnail import PixelSNAIL, strict_causal_attention

H = W = 8
K = 8


def _model(**kw) -> PixelSNAIL:
  args = dict(
    shape=(H, W),
    num_codes=K,
    channels=16,
    kernel_size=5,
    num_blocks=2,
    num_res_blocks=1,
    res_channels=16,
    attention=True,
    num_heads=2,
    dropout=0.1,
  )
  args.update(kw)
  return PixelSNAIL(**args)


def _inputs(model: PixelSNAIL, batch: int, seed: int = 0, levels: int = 1):
  rng = np.random.default_rng(seed)
  codes = rng.integers(0, K, (batch, H, W)).astype(np.int32)
  condition = None
  if model.cond_res_channels:
    sizes = [(H // 2, W // 2), (H // 4, W // 4)][:levels][::-1]  # coarsest first
    condition = tuple(jnp.asarray(rng.integers(0, K, (batch, *s)).astype(np.int32)) for s in sizes)
  label = jnp.asarray(rng.integers(0, 3, (batch,)).astype(np.int32)) if model.num_classes else None
  return jnp.asarray(codes), condition, label


def _init(model, codes, condition=None, label=None, seed: int = 1):
  """Random variables of the model's shapes, drawn with NumPy.

  Compiling `model.init` (its random initialisers) takes seconds on a CPU; the shapes alone
  are free. Random g and biases also make every part of the weight norm matter.
  """
  abstract = jax.eval_shape(
    lambda: model.init(jax.random.key(0), codes, condition=condition, label=label)
  )
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = jax.tree_util.keystr(path[-1:])
    if "weight_v" in name or "embedding" in name:
      return jnp.asarray(rng.standard_normal(x.shape), x.dtype)
    return jnp.asarray(rng.uniform(0.5, 1.0, x.shape) * (1 if "weight_g" in name else 0.2), x.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


@functools.cache
def _apply(model: PixelSNAIL, train: bool = False):
  # One compiled program per model rather than hundreds of eagerly dispatched ops.
  return jax.jit(
    lambda v, c, cond=None, lab=None, rngs=None: model.apply(
      v, c, condition=cond, label=lab, train=train, rngs=rngs
    )
  )


CAUSAL_CASES = {
  "attention": dict(),
  "no_attention_conditioned": dict(attention=False, num_cond_res_blocks=1, cond_res_channels=8),
  "attention_2_levels_class_out_blocks": dict(
    num_cond_res_blocks=1, cond_res_channels=8, num_classes=3, num_out_res_blocks=1
  ),
}


@pytest.mark.parametrize("case", sorted(CAUSAL_CASES))
def test_causality(case):
  model = _model(**CAUSAL_CASES[case])
  levels = 2 if case.startswith("attention_2_levels") else 1
  codes, condition, label = _inputs(model, 1, levels=levels)
  variables = _init(model, codes, condition, label)
  positions = [0, 1, 7, 8, 20, 36, 62]
  # One batch: element 0 is the base map, element 1 + n has position positions[n] changed.
  # Conditioning maps and labels are the same for every element (they are fully known).
  batch = [np.asarray(codes[0])]
  for j in positions:
    changed = np.asarray(codes[0]).copy().reshape(-1)
    changed[j] = (changed[j] + 1 + j % (K - 1)) % K
    batch.append(changed.reshape(H, W))
  n = len(batch)
  rep = lambda x: None if x is None else jnp.repeat(x, n, axis=0)
  cond = None if condition is None else tuple(rep(c) for c in condition)
  logits = _apply(model)(variables, jnp.asarray(np.stack(batch)), cond, rep(label))
  logits = np.asarray(logits).reshape(n, H * W, K)
  for i, j in enumerate(positions, start=1):
    np.testing.assert_array_equal(logits[i, :j], logits[0, :j], err_msg=f"position {j} leaked")
    assert np.any(logits[i, j + 1 :] != logits[0, j + 1 :]), f"position {j} influences nothing"
    # The logits at j itself predict code j: they must not see it either.
    np.testing.assert_array_equal(logits[i, j], logits[0, j])


def test_conditioning_changes_logits_and_is_required():
  model = _model(num_cond_res_blocks=1, cond_res_channels=8, num_classes=3)
  codes, condition, label = _inputs(model, 2)
  variables = _init(model, codes, condition, label)
  apply = _apply(model)
  base = apply(variables, codes, condition, label)
  assert base.shape == (2, H, W, K) and base.dtype == jnp.float32
  other_label = apply(variables, codes, condition, (label + 1) % 3)
  other_top = apply(variables, codes, ((condition[0] + 1) % K,), label)
  # Position 0 sees no codes at all: only the conditioning can move it.
  assert np.abs(np.asarray(other_label - base)[:, 0, 0]).max() > 1e-4
  assert np.abs(np.asarray(other_top - base)[:, 0, 0]).max() > 1e-4
  with pytest.raises(ValueError, match="label"):
    model.apply(variables, codes, condition=condition)
  with pytest.raises(ValueError, match="condition"):
    model.apply(variables, codes, label=label)
  with pytest.raises(ValueError, match="no condition"):
    jax.eval_shape(lambda: _model().init(jax.random.key(0), codes, condition=condition))


def test_multi_level_condition_has_one_resnet_per_map():
  model = _model(attention=False, num_cond_res_blocks=1, cond_res_channels=8)
  codes, condition, _ = _inputs(model, 2, levels=2)
  variables = _init(model, codes, condition)
  assert {"cond_resnet", "cond_resnet_1"} <= set(variables["params"])
  apply = _apply(model)
  base = apply(variables, codes, condition)
  moved = apply(variables, codes, (condition[0], (condition[1] + 1) % K))
  assert np.abs(np.asarray(moved - base)).max() > 1e-4


def test_strict_causal_attention_matches_numpy():
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((2, 10, 2, 4)).astype(np.float32) for _ in range(3))
  logits = np.einsum("btnd,bsnd->bnts", q.astype(np.float64), k) / 2.0
  allowed = np.tril(np.ones((10, 10), bool), k=-1)  # s < t only
  logits = np.where(allowed, logits, -np.inf)
  with np.errstate(invalid="ignore"):
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = np.nan_to_num(p / p.sum(-1, keepdims=True))  # row 0 sees nothing: zeros
  want = np.einsum("bnts,bsnd->btnd", p, v)
  got = strict_causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  # The explicit-probability path (used for attention dropout) is the same function.
  dropped = strict_causal_attention(
    jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), 1e-9, jax.random.key(0)
  )
  np.testing.assert_allclose(np.asarray(dropped), want, atol=1e-5)


@pytest.mark.slow
def test_learns_structured_codes():
  # Each map is a diagonal ramp with a random offset: code (i, j) = (i + j + offset) mod K.
  # Codes are uniform (unigram entropy log K) but each follows from the one before it.
  rng = np.random.default_rng(0)
  ii, jj = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
  offsets = rng.integers(0, K, (256, 1, 1))
  data = jnp.asarray(((ii + jj)[None] + offsets) % K, jnp.int32)
  model = _model(dropout=0.0, num_blocks=1)
  params = _init(model, data[:2])["params"]
  opt = optax.adam(3e-3)
  opt_state = opt.init(params)

  def loss_fn(p, x):
    logits = model.apply({"params": p}, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, x).mean()

  @jax.jit
  def step(p, s, x):
    loss, g = jax.value_and_grad(loss_fn)(p, x)
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s, loss

  for i in range(60):
    batch = data[(i * 32) % 256 :][:32]
    params, opt_state, loss = step(params, opt_state, batch)
  final = float(loss_fn(params, data[:64]))
  unigram = float(np.log(K))
  assert final < 0.6 * unigram, (final, unigram)


def test_dropout_train_mode_is_random_and_eval_is_not():
  model = _model(dropout=0.5)
  codes, _, _ = _inputs(model, 2)
  variables = _init(model, codes)
  apply = _apply(model, train=True)
  a = apply(variables, codes, rngs={"dropout": jax.random.key(0)})
  b = apply(variables, codes, rngs={"dropout": jax.random.key(1)})
  assert np.abs(np.asarray(a - b)).max() > 1e-4
  # Eval mode is the network without dropout (not some fixed mask), whatever key is passed:
  # the same weights in a model built with dropout 0 give the same logits.
  evaluated = _apply(model)(variables, codes, rngs={"dropout": jax.random.key(0)})
  without = _apply(_model(dropout=0.0))(variables, codes)
  np.testing.assert_allclose(np.asarray(evaluated), np.asarray(without), rtol=1e-5, atol=1e-5)


def test_bf16_compute_close_to_float32():
  model = _model(num_cond_res_blocks=1, cond_res_channels=8)
  codes, condition, _ = _inputs(model, 2)
  variables = _init(model, codes, condition)
  f32 = _apply(model)(variables, codes, condition)
  bf16 = _apply(model.clone(dtype=jnp.bfloat16))(variables, codes, condition)
  assert bf16.dtype == jnp.float32
  scale = float(jnp.abs(f32).max())
  assert float(jnp.abs(bf16 - f32).max()) < 0.05 * scale
  assert np.all(np.isfinite(np.asarray(bf16)))


def test_even_kernel_rejected():
  model = _model(kernel_size=4)
  with pytest.raises(ValueError, match="odd"):
    _init(model, jnp.zeros((1, H, W), jnp.int32))
