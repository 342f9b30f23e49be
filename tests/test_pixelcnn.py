"""Tests of vqjax/models/pixelcnn.py: causality and the receptive field as properties (exact, in
float64), conditioning, a short fit below the unigram entropy, bfloat16 compute, and the shapes
and bfloat16 arithmetic of the decode mode (its float32 logits against the full forward are
tested with the samplers, tests/test_sampling.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vqjax.models.pixelcnn import GatedPixelCNN

K = 8  # codebook size of the tiny models


def _init(model, codes, condition=None, label=None, seed=0):
  """Variables of the model's own structure (traced with eval_shape), filled from NumPy.

  model.init would compile one random initializer per parameter, which costs seconds each on
  a CPU; these tests are about the function, not the initializer. Kernels get fan-in scaling,
  biases small nonzero values, so every term of every layer takes part.
  """
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  shapes = jax.eval_shape(
    lambda: model.init(rngs, codes, condition=condition, label=label, train=False)
  )
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    x = rng.normal(size=leaf.shape)
    if name == "kernel":
      x /= np.sqrt(np.prod(leaf.shape[:-1]))
    elif name == "bias":
      x *= 0.1
    return jnp.asarray(x, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


# One compiled program per model and shape: op-by-op dispatch is many times slower on CPU.
@functools.partial(jax.jit, static_argnums=0, static_argnames="train")
def _apply(model, variables, codes, condition=None, label=None, train=False, dropout_seed=0):
  return model.apply(
    variables,
    codes,
    condition=condition,
    label=label,
    train=train,
    rngs={"dropout": jax.random.key(dropout_seed)},
  )


def _random_codes(rng, shape, k=K):
  return jnp.asarray(rng.integers(0, k, size=shape), jnp.int32)


def _flat(logits):
  """[B, H, W, K] -> [B, H*W, K] in raster order, as float64 NumPy."""
  x = np.asarray(logits, np.float64)
  return x.reshape(x.shape[0], -1, x.shape[-1])


@pytest.mark.parametrize(
  "conditioned, dropout",
  [(False, 0.0), (True, 0.0), (True, 0.3)],
  ids=["plain", "label+condition", "label+condition+dropout"],
)
def test_changing_position_j_changes_nothing_up_to_j_and_something_after(conditioned, dropout):
  h = w = 8
  js = [0, 5, 7, 8, 27, 62, 63]
  with jax.enable_x64(True):
    model = GatedPixelCNN(
      num_codes=K,
      channels=16,
      num_layers=4,
      kernel_size=5,
      num_classes=5 if conditioned else 0,
      cond_channels=8 if conditioned else 0,
      dropout=dropout,
      dtype=jnp.float64,
      param_dtype=jnp.float64,
    )
    rng = np.random.default_rng(1)
    base = np.asarray(_random_codes(rng, (1, h, w)))
    # Row 0 is the original map, row n + 1 has position js[n] changed to another code.
    batch = np.repeat(base, len(js) + 1, axis=0).reshape(len(js) + 1, h * w)
    for n, j in enumerate(js):
      batch[n + 1, j] = (batch[n + 1, j] + rng.integers(1, K)) % K
    codes = jnp.asarray(batch.reshape(-1, h, w), jnp.int32)
    condition = label = None
    if conditioned:
      # Every sample shares the same coarse maps and label, so only the code change differs.
      condition = tuple(jnp.repeat(_random_codes(rng, (1, s, s)), len(js) + 1, 0) for s in (2, 4))
      label = jnp.full((len(js) + 1,), 3, jnp.int32)
    variables = _init(model, codes, condition, label)
    # Dropout masks differ across a batch, so each map runs alone with the same dropout key
    # (hence the same mask): causality must then hold in training mode too.
    out = []
    for b in range(codes.shape[0]):
      cond_b = None if condition is None else tuple(c[b : b + 1] for c in condition)
      label_b = None if label is None else label[b : b + 1]
      out.append(_apply(model, variables, codes[b : b + 1], cond_b, label_b, train=dropout > 0))
    assert out[0].dtype == jnp.float64  # float64 compute keeps float64 logits
    logits = _flat(jnp.concatenate(out))
  ref = logits[0]
  for n, j in enumerate(js):
    got = logits[n + 1]
    # Bit-identical up to and including j: the logits at j predict code j and may not see it.
    np.testing.assert_array_equal(got[: j + 1], ref[: j + 1], err_msg=f"j={j}")
    changed = np.abs(got - ref).max(-1) > 0
    if j + 1 < h * w:
      assert changed[j + 1], f"j={j}: next position unaffected"
    if j + w < h * w:
      assert changed[j + w], f"j={j}: position below unaffected"


def _input_gradient_map(model, variables, codes):
  """Returns pos -> |d <logits[pos], u> / d embedding(codes[q])| for every raster position q.

  codes holds each code at most once, so the gradient w.r.t. row codes[q] of the embedding
  table is the gradient w.r.t. the input embedding at position q.
  """
  u = jax.random.normal(jax.random.key(0), (model.num_codes,), jnp.float64)
  params = variables["params"]

  def f(table, pos):
    p = {**params, "embed": {"embedding": table}}
    logits = model.apply({"params": p}, codes, train=False)
    return logits.reshape(-1, model.num_codes)[pos] @ u

  grad = jax.jit(jax.grad(f))  # pos is traced: one compilation for every position
  order = np.asarray(codes).reshape(-1)
  table = params["embed"]["embedding"]
  return lambda pos: np.abs(np.asarray(grad(table, pos))).sum(-1)[order]


def test_no_blind_spot_every_earlier_position_reaches_the_prediction():
  h = w = 6
  with jax.enable_x64(True):
    model = GatedPixelCNN(
      num_codes=h * w,
      channels=16,
      num_layers=6,
      kernel_size=3,
      dtype=jnp.float64,
      param_dtype=jnp.float64,
    )
    codes = jnp.asarray(np.random.default_rng(0).permutation(h * w).reshape(1, h, w), jnp.int32)
    variables = _init(model, codes)
    # (3, 1): the classic blind spot is above and to the right, e.g. (2, 4), (1, 5).
    grad_at = _input_gradient_map(model, variables, codes)
    for pos in [h * w - 1, 3 * w + 1, w, 1, 0]:
      grad = grad_at(pos)
      assert np.all(grad[:pos] > 0), (pos, np.flatnonzero(grad[:pos] == 0))
      assert np.all(grad[pos:] == 0), (pos, np.flatnonzero(grad[pos:]))


def test_one_layer_receptive_field_is_exactly_the_shifted_windows():
  # One type-A layer with k = 3: the horizontal conv sees (i, j - 1); the vertical one sees
  # rows i - 1 .. i at columns j - 1 .. j + 1, which the down-shift moves to rows i - 2 .. i - 1.
  h = w = 6
  with jax.enable_x64(True):
    model = GatedPixelCNN(
      num_codes=h * w,
      channels=8,
      num_layers=1,
      kernel_size=3,
      dtype=jnp.float64,
      param_dtype=jnp.float64,
    )
    codes = jnp.asarray(np.random.default_rng(1).permutation(h * w).reshape(1, h, w), jnp.int32)
    variables = _init(model, codes)
    i, j = 3, 3
    grad = _input_gradient_map(model, variables, codes)(i * w + j).reshape(h, w)
  expect = np.zeros((h, w), bool)
  expect[i, j - 1] = True
  expect[i - 2 : i, j - 1 : j + 2] = True
  np.testing.assert_array_equal(grad > 0, expect)


def test_class_label_changes_every_logit_including_the_first():
  model = GatedPixelCNN(num_codes=K, channels=16, num_layers=3, kernel_size=3, num_classes=5)
  codes = _random_codes(np.random.default_rng(2), (1, 8, 8))
  variables = _init(model, codes, label=jnp.array([0], jnp.int32))
  a = _flat(_apply(model, variables, codes, label=jnp.array([1], jnp.int32)))
  b = _flat(_apply(model, variables, codes, label=jnp.array([4], jnp.int32)))
  assert np.all(np.abs(a - b).max(-1) > 1e-4)
  with pytest.raises(ValueError, match="label"):
    jax.eval_shape(lambda: model.apply(variables, codes))


def test_spatial_condition_changes_logits_and_a_coarse_cell_acts_locally():
  h = w = 8
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    model = GatedPixelCNN(
      num_codes=K,
      channels=16,
      num_layers=3,
      kernel_size=3,
      cond_channels=8,
      dtype=jnp.float64,
      param_dtype=jnp.float64,
    )
    codes = _random_codes(rng, (1, h, w))
    top = _random_codes(rng, (1, 4, 4))
    variables = _init(model, codes, condition=(top,))
    apply = lambda t: _flat(_apply(model, variables, codes, (t,)))[0]
    ref = apply(top)
    other = apply((top + 1) % K)
    r, c = 2, 1
    cell = apply(top.at[0, r, c].set((top[0, r, c] + 1) % K))
  assert np.all(np.abs(other - ref).max(-1) > 1e-6)
  changed = (np.abs(cell - ref).max(-1) > 0).reshape(h, w)
  # The 2x2 fine block under coarse cell (r, c) sees it directly.
  assert changed[2 * r : 2 * r + 2, 2 * c : 2 * c + 2].all()
  # The conditioning block's 3x3 conv reaches one coarse row up (fine rows 2r - 2 ..); the
  # causal stacks only carry that forward, so every fine row before 2r - 2 is bit-identical.
  assert not changed[: 2 * (r - 1)].any()


def test_condition_checks_raise_clear_errors():
  # Shapes only: the checks run while tracing, nothing needs to be computed.
  model = GatedPixelCNN(num_codes=K, channels=8, num_layers=2, kernel_size=3, cond_channels=4)
  codes = jnp.zeros((2, 8, 8), jnp.int32)
  top = jnp.zeros((2, 4, 4), jnp.int32)
  init = lambda m, cond: jax.eval_shape(lambda: m.init(jax.random.key(0), codes, condition=cond))
  variables = init(model, (top,))
  apply = lambda cond: jax.eval_shape(lambda v: model.apply(v, codes, condition=cond), variables)
  out = apply((top,))
  assert out.shape == (2, 8, 8, K) and out.dtype == jnp.float32
  with pytest.raises(ValueError, match="condition"):
    apply(None)
  with pytest.raises(ValueError, match="condition"):
    apply((jnp.zeros((2, 3, 3), jnp.int32),))
  with pytest.raises(ValueError, match="tuple"):
    apply(top)
  plain = GatedPixelCNN(num_codes=K, channels=8, num_layers=2, kernel_size=3)
  with pytest.raises(ValueError, match="cond_channels=0"):
    init(plain, (top,))
  with pytest.raises(ValueError, match="kernel_size"):
    init(GatedPixelCNN(num_codes=K, channels=8, num_layers=2, kernel_size=4), None)


def _vertical_copy_data(rng, n, h=8, w=8, keep=0.9):
  """Row 0 uniform; below, each code copies the one above with probability `keep`, else is
  uniform. Only the vertical path (through the down-shift) can predict it."""
  x = rng.integers(0, K, size=(n, h, w))
  for i in range(1, h):
    copy = rng.random((n, w)) < keep
    x[:, i] = np.where(copy, x[:, i - 1], x[:, i])
  return x


@pytest.mark.slow
def test_short_fit_beats_unigram_entropy():
  rng = np.random.default_rng(4)
  train = _vertical_copy_data(rng, 2048)
  test = jnp.asarray(_vertical_copy_data(rng, 256), jnp.int32)
  freq = np.bincount(train.reshape(-1), minlength=K) / train.size
  unigram = -(freq[freq > 0] * np.log(freq[freq > 0])).sum()
  # Bayes rate: row 0 is uniform; below, the copied code has mass keep + (1 - keep) / K.
  p_same = 0.9 + 0.1 / K
  below = -(p_same * np.log(p_same) + (K - 1) * (0.1 / K) * np.log(0.1 / K))
  bayes = (np.log(K) + 7 * below) / 8

  model = GatedPixelCNN(num_codes=K, channels=16, num_layers=3, kernel_size=3)
  params = _init(model, test[:1])["params"]
  opt = optax.adam(3e-3)
  opt_state = opt.init(params)

  def loss_fn(p, x):
    logits = model.apply({"params": p}, x, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, x).mean()

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, s, x):
    loss, g = jax.value_and_grad(loss_fn)(p, x)
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s, loss

  for _ in range(200):
    idx = rng.integers(0, len(train), size=32)
    params, opt_state, _ = step(params, opt_state, jnp.asarray(train[idx], jnp.int32))
  held_out = float(jax.jit(loss_fn)(params, test))
  print(f"held-out CE {held_out:.3f}, unigram {unigram:.3f}, Bayes {bayes:.3f}")
  # Untrained, the CE is about the unigram entropy (log K); the fit must get near the Bayes rate.
  assert held_out < min(0.5 * unigram, bayes + 0.25), (held_out, unigram, bayes)
  assert held_out > 0.9 * bayes  # sanity: nothing can beat the Bayes rate by much


def test_bfloat16_compute_keeps_float32_logits_close_to_float32_model():
  rng = np.random.default_rng(5)
  codes = _random_codes(rng, (2, 8, 8))
  top = _random_codes(rng, (2, 4, 4))
  label = jnp.array([0, 2], jnp.int32)
  kw = dict(num_codes=K, channels=16, num_layers=4, kernel_size=5, num_classes=3, cond_channels=8)
  f32 = GatedPixelCNN(**kw)
  bf16 = GatedPixelCNN(**kw, dtype=jnp.bfloat16)
  variables = _init(f32, codes, (top,), label)
  ref = _apply(f32, variables, codes, (top,), label)
  got = _apply(bf16, variables, codes, (top,), label)
  assert ref.dtype == jnp.float32 and got.dtype == jnp.float32
  err = np.abs(np.asarray(got) - np.asarray(ref)).max()
  print(f"bf16 max err {err:.4f}, max |logit| {np.abs(np.asarray(ref)).max():.3f}")
  assert err < 0.05 * np.abs(np.asarray(ref)).max(), err
  assert err > 0  # bfloat16 really ran
  # bfloat16 parameters too: logits still float32.
  bf16_params = GatedPixelCNN(**kw, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  v16 = _init(bf16_params, codes, (top,), label)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(v16["params"]))
  out = _apply(bf16_params, v16, codes, (top,), label)
  assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()


def test_dropout_only_in_training():
  model = GatedPixelCNN(num_codes=K, channels=16, num_layers=3, kernel_size=3, dropout=0.5)
  codes = _random_codes(np.random.default_rng(6), (1, 8, 8))
  variables = _init(model, codes)
  run = lambda train, seed: _apply(model, variables, codes, train=train, dropout_seed=seed)
  np.testing.assert_array_equal(run(False, 0), run(False, 1))
  assert np.abs(np.asarray(run(True, 0) - run(True, 1))).max() > 1e-4


def test_decode_mode_has_the_parameters_of_the_full_model_and_a_row_sized_cache():
  # Shapes only (eval_shape): decode mode may also initialise, with the same parameters.
  k, layers, c = 5, 3, 8
  model = GatedPixelCNN(
    num_codes=K, channels=c, num_layers=layers, kernel_size=k, num_classes=3, cond_channels=4
  )
  codes = jnp.zeros((2, 6, 7), jnp.int32)
  kw = dict(condition=(jnp.zeros((2, 3, 7), jnp.int32),), label=jnp.zeros((2,), jnp.int32))
  init = lambda **extra: jax.eval_shape(lambda: model.init(jax.random.key(0), codes, **kw, **extra))
  full, decode = init(), init(decode_position=0)
  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  assert shapes(decode["params"]) == shapes(full["params"])
  cache = shapes(decode["cache"])
  assert cache["cond_features"] == ((2, 6, 7, 4), jnp.float32)
  for n in range(layers):
    assert cache[f"from_v_{n}"] == ((2, 1, 7, 2 * c), jnp.float32)
  for n in range(1, layers):
    # A ring of the k//2 + 1 rows the vertical window reads, and the current row.
    assert cache[f"v_input_{n}"] == ((2, k // 2 + 1, 7, c), jnp.float32)
    assert cache[f"h_input_{n}"] == ((2, 1, 7, c), jnp.float32)
  assert cache["label"] == ((2,), jnp.int32)  # read by the first call (models/prior.py)
  assert len(cache) == 2 + layers + 2 * (layers - 1)
  out = jax.eval_shape(
    lambda v: model.apply(v, codes, **kw, decode_position=3, mutable=["cache"]), decode
  )[0]
  assert out.shape == (2, K) and out.dtype == jnp.float32
  with pytest.raises(ValueError, match="train must be False"):
    jax.eval_shape(
      lambda v: model.apply(v, codes, **kw, train=True, decode_position=3, mutable=["cache"]),
      decode,
    )


def test_bfloat16_decode_mode_matches_the_bfloat16_full_forward():
  from vqjax.sampling import cached

  rng = np.random.default_rng(7)
  codes = _random_codes(rng, (2, 4, 4))
  label = jnp.array([0, 2], jnp.int32)
  kw = dict(num_codes=K, channels=16, num_layers=2, kernel_size=3, num_classes=3)
  model = GatedPixelCNN(**kw, dtype=jnp.bfloat16)
  variables = _init(GatedPixelCNN(**kw), codes, label=label)
  full = np.asarray(_apply(model, variables, codes, label=label))
  decoded = cached.logits_at_every_position(model, variables, codes, label=label)
  assert decoded.dtype == jnp.float32
  # The same bfloat16 arithmetic on windows instead of whole maps: equal up to the rounding
  # of a few bfloat16 sums in another order.
  err = np.abs(np.asarray(decoded) - full).max()
  assert err < 0.02 * np.abs(full).max(), err
