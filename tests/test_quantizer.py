"""Tests of vqjax/models/quantizer.py against NumPy float64 references and hand derivations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqjax.models import quantizer as qlib
from vqjax.models.impl import Impl
from vqjax.models.quantizer import VectorQuantizer


def _init(q, z, seed=0):
  return q.init({"params": jax.random.key(seed), "vq": jax.random.key(seed + 1)}, z, train=False)


def _np_nearest(z, codebook):
  d = ((z[:, None, :].astype(np.float64) - codebook[None].astype(np.float64)) ** 2).sum(-1)
  return d.argmin(1)


def test_nearest_code_matches_numpy_brute_force():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(300, 7)).astype(np.float32)
  codebook = rng.normal(size=(50, 7)).astype(np.float32)
  got = np.asarray(qlib.nearest_code(z, codebook))
  np.testing.assert_array_equal(got, _np_nearest(z, codebook))


@pytest.mark.parametrize("k", [512, 96, 24, 8, 100])
@pytest.mark.parametrize("blocked", [True, False])
def test_argmin_rows_is_numpys_argmin_with_ties_and_nans(k, blocked):
  rng = np.random.default_rng(k)
  # Small integers: many rows have their minimum several times, in different blocks.
  d = rng.integers(0, 6, size=(64, k)).astype(np.float32)
  d[3] = 7.0  # a constant row: index 0
  d[5, k - 1] = -1.0  # the minimum in the last column
  d[7, [k // 2, k - 1]] = np.nan  # NaNs: the first NaN, as NumPy
  got = np.asarray(qlib.argmin_rows(jnp.asarray(d), blocked=blocked))
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, d.argmin(1))
  assert got[3] == 0 and got[5] == k - 1 and got[7] == k // 2


def test_nearest_code_in_float32_for_bfloat16_inputs():
  q = VectorQuantizer(num_codes=64, code_dim=8, codebook_init="normal", dtype=jnp.bfloat16)
  z = jax.random.normal(jax.random.key(3), (4, 5, 8)).astype(jnp.bfloat16)
  v = _init(q, z)
  zq, aux = q.apply(v, z, train=False)
  assert zq.dtype == jnp.bfloat16
  codebook = np.asarray(v["vq_state"]["codebook"])
  expect = _np_nearest(np.asarray(z, np.float32).reshape(-1, 8), codebook)
  np.testing.assert_array_equal(np.asarray(aux["indices"]).reshape(-1), expect)


def test_straight_through_gradient_is_identity():
  q = VectorQuantizer(num_codes=16, code_dim=4, codebook_init="normal", ema=False)
  z = jax.random.normal(jax.random.key(0), (2, 3, 4))
  v = _init(q, z)
  w = jax.random.normal(jax.random.key(1), z.shape)
  g = jax.grad(lambda z: jnp.sum(q.apply(v, z, train=False)[0] * w))(z)
  np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6)


def test_loss_codebook_gradients_follow_the_formulas():
  """codebook loss ||sg[z] - e||^2 moves only e; beta * ||z - sg[e]||^2 moves only z."""
  beta = 0.7
  q = VectorQuantizer(num_codes=5, code_dim=3, beta=beta, codebook_init="normal", ema=False)
  z = jax.random.normal(jax.random.key(0), (4, 3))
  v = _init(q, z)
  params = v["params"]

  def latent(params, z, key):
    _, aux = q.apply({"params": params, "vq_state": v["vq_state"]}, z, train=False)
    return aux[key]

  e = np.asarray(params["codebook"], np.float64)
  zn = np.asarray(z, np.float64)
  idx = _np_nearest(zn, e)
  n_el = zn.size
  # d/de_k mean((z - e_idx)^2) = sum_{n: idx_n = k} 2 (e_k - z_n) / (N D)
  expect_e = np.zeros_like(e)
  for n, k in enumerate(idx):
    expect_e[k] += 2 * (e[k] - zn[n]) / n_el
  expect_z = beta * 2 * (zn - e[idx]) / n_el

  g_cb_e = jax.grad(latent)(params, z, "codebook_loss")["codebook"]
  g_cb_z = jax.grad(latent, argnums=1)(params, z, "codebook_loss")
  g_cm_e = jax.grad(latent)(params, z, "commitment")["codebook"]
  g_lat_z = jax.grad(latent, argnums=1)(params, z, "latent_loss")
  g_lat_e = jax.grad(latent)(params, z, "latent_loss")["codebook"]
  np.testing.assert_allclose(np.asarray(g_cb_e), expect_e, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(g_cb_z), 0.0)
  np.testing.assert_allclose(np.asarray(g_cm_e), 0.0)
  np.testing.assert_allclose(np.asarray(g_lat_z), expect_z, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(g_lat_e), expect_e, rtol=1e-5, atol=1e-7)


def _np_ema_reference(batches, codebook, decay, eps, bias_correction):
  """Float64 EMA codebook updates, written from the VQ-VAE appendix equations."""
  k = codebook.shape[0]
  codebook = codebook.astype(np.float64)
  if bias_correction:
    count, total, weight = np.zeros(k), np.zeros_like(codebook), 0.0
  else:
    count, total, weight = np.zeros(k), codebook.copy(), 1.0
  for z in batches:
    z = z.astype(np.float64)
    idx = _np_nearest(z, codebook)
    onehot = np.eye(k)[idx]
    count = decay * count + (1 - decay) * onehot.sum(0)
    total = decay * total + (1 - decay) * onehot.T @ z
    if bias_correction:
      weight = decay * weight + (1 - decay)
    c = count / weight
    n = c.sum()
    smoothed = (c + eps) / (n + k * eps) * n
    codebook = (total / weight) / smoothed[:, None]
  return codebook


@pytest.mark.parametrize(
  "bias_correction,stats_impl", [(False, "scatter"), (True, "scatter"), (False, "onehot")]
)
def test_ema_update_matches_numpy_over_several_steps(bias_correction, stats_impl):
  k, d, decay, eps = 8, 3, 0.9, 1e-5
  q = VectorQuantizer(
    num_codes=k,
    code_dim=d,
    decay=decay,
    eps=eps,
    codebook_init="normal",
    bias_correction=bias_correction,
    impl=Impl(vq_stats=stats_impl),
  )
  rng = np.random.default_rng(1)
  batches = [rng.normal(size=(64, d)).astype(np.float32) for _ in range(5)]
  v = _init(q, jnp.asarray(batches[0]))
  codebook0 = np.asarray(v["vq_state"]["codebook"])
  state = v["vq_state"]
  for z in batches:
    _, upd = q.apply({"vq_state": state}, jnp.asarray(z), train=True, mutable=["vq_state"])
    state = upd["vq_state"]
  expect = _np_ema_reference(batches, codebook0, decay, eps, bias_correction)
  np.testing.assert_allclose(np.asarray(state["codebook"]), expect, rtol=2e-4, atol=1e-5)


def test_eval_mode_changes_no_statistics():
  q = VectorQuantizer(num_codes=8, code_dim=3, restart_after=1)
  z = jax.random.normal(jax.random.key(0), (32, 3))
  v = _init(q, z)
  _, upd = q.apply(v, z, train=False, mutable=["vq_state"])
  for a, b in zip(jax.tree.leaves(v["vq_state"]), jax.tree.leaves(upd["vq_state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The same call with train=True does change them: the comparison above can fail.
  _, trained = q.apply(v, z, train=True, rngs={"vq": jax.random.key(1)}, mutable=["vq_state"])
  assert bool(trained["vq_state"]["initialized"]) and not bool(v["vq_state"]["initialized"])
  assert not np.array_equal(
    np.asarray(trained["vq_state"]["codebook"]), np.asarray(v["vq_state"]["codebook"])
  )


def _collapsing_data(n=512, d=4, clusters=32, seed=0):
  """Tight clusters far from the origin: an N(0, 1) codebook maps nearly all of them to the
  one or two codewords that happen to point their way."""
  rng = np.random.default_rng(seed)
  centers = 6.0 + rng.normal(size=(clusters, d))
  return (centers[rng.integers(0, clusters, n)] + 0.05 * rng.normal(size=(n, d))).astype(np.float32)


def _usage_after(q, z, steps, seed=0):
  v = _init(q, jnp.asarray(z), seed)
  state = v["vq_state"]
  params = v.get("params", {})
  for step in range(steps):
    (_, aux), upd = q.apply(
      {"params": params, "vq_state": state},
      jnp.asarray(z),
      train=True,
      rngs={"vq": jax.random.key(100 * seed + step)},
      mutable=["vq_state"],
    )
    state = upd["vq_state"]
  (_, aux) = q.apply({"params": params, "vq_state": state}, jnp.asarray(z), train=False)
  return float(aux["usage"]), state


def test_normal_init_collapses_on_data_built_to_collapse():
  z = _collapsing_data()
  usage, _ = _usage_after(VectorQuantizer(num_codes=32, code_dim=4, codebook_init="normal"), z, 3)
  assert usage <= 4 / 32


@pytest.mark.parametrize("init", ["kmeans++", "kmeans"])
def test_kmeans_init_uses_the_codebook(init):
  z = _collapsing_data()
  usage, state = _usage_after(VectorQuantizer(num_codes=32, code_dim=4, codebook_init=init), z, 1)
  assert usage >= 0.75
  assert bool(state["initialized"])


def test_kmeans_init_survives_bias_correction():
  """The seeded codewords are the EMA statistics' starting point even when bias correction
  starts them from zero: codes the first batch does not use keep their seeds."""
  z = _collapsing_data(n=40)
  q = VectorQuantizer(num_codes=64, code_dim=4, bias_correction=True)
  _, state = _usage_after(q, z, 1)
  norms = np.linalg.norm(np.asarray(state["codebook"]), axis=1)
  assert norms.min() > 1.0  # the data lie around 6 in every coordinate; zero vectors would fail
  np.testing.assert_allclose(float(state["ema_weight"]), 1.0)


def test_loss_codebook_gets_gradients_on_the_data_init_step():
  z = jnp.asarray(_collapsing_data())
  q = VectorQuantizer(num_codes=32, code_dim=4, ema=False)
  v = _init(q, z)

  def loss(params):
    (_, aux), _ = q.apply(
      {"params": params, "vq_state": v["vq_state"]},
      z,
      train=True,
      rngs={"vq": jax.random.key(0)},
      mutable=["vq_state"],
    )
    return aux["codebook_loss"]

  g = np.asarray(jax.grad(loss)(v["params"])["codebook"], np.float64)
  # The gradient is the codebook-loss formula at the seeded codebook (param + offset), so the
  # seeds reach the loss while the parameter keeps its gradient.
  _, upd = q.apply(v, z, train=True, rngs={"vq": jax.random.key(0)}, mutable=["vq_state"])
  e = np.asarray(v["params"]["codebook"], np.float64) + np.asarray(
    upd["vq_state"]["offset"], np.float64
  )
  zn = np.asarray(z, np.float64)
  idx = _np_nearest(zn, e)
  expect = np.zeros_like(e)
  np.add.at(expect, idx, 2 * (e[idx] - zn) / zn.size)
  assert np.abs(expect).sum() > 0
  np.testing.assert_allclose(g, expect, rtol=1e-4, atol=1e-8)


def test_kmeans_matches_numpy_lloyd_step():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 2)).astype(np.float32)
  centers = x[:5].copy()
  got = np.asarray(qlib.lloyd(jnp.asarray(x), jnp.asarray(centers), 1))
  idx = _np_nearest(x, centers)
  expect = np.stack([x[idx == k].mean(0) if (idx == k).any() else centers[k] for k in range(5)])
  np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)


def test_kmeans_plus_plus_picks_distinct_clusters():
  x = jnp.asarray(_collapsing_data(clusters=8))
  centers = np.asarray(qlib.kmeans_plus_plus(x, 8, jax.random.key(0)))
  # All 8 seeds are data points, and with well separated clusters they land in 8 clusters.
  idx = _np_nearest(np.asarray(x), centers)
  assert len(np.unique(idx)) == 8
  d = ((np.asarray(x)[None] - centers[:, None]) ** 2).sum(-1).min(1)
  np.testing.assert_allclose(d, 0.0, atol=1e-6)


@pytest.mark.parametrize("ema", [True, False])
def test_dead_code_restart_revives_unused_codes(ema):
  z = _collapsing_data()
  base = dict(num_codes=32, code_dim=4, codebook_init="normal", ema=ema)
  usage_without, _ = _usage_after(VectorQuantizer(**base), z, 6)
  usage_with, _ = _usage_after(VectorQuantizer(**base, restart_after=2), z, 6)
  assert usage_without <= 4 / 32
  assert usage_with >= 0.5


def test_init_and_restart_are_deterministic_given_the_rng():
  z = _collapsing_data()
  q = VectorQuantizer(num_codes=32, code_dim=4, restart_after=1)
  _, s1 = _usage_after(q, z, 3)
  _, s2 = _usage_after(q, z, 3)
  np.testing.assert_array_equal(np.asarray(s1["codebook"]), np.asarray(s2["codebook"]))
  _, s3 = _usage_after(q, z, 3, seed=5)
  assert not np.array_equal(np.asarray(s1["codebook"]), np.asarray(s3["codebook"]))


def test_usage_metrics_match_numpy():
  counts = np.array([5, 0, 3, 2, 0, 10])
  m = qlib.usage_metrics(jnp.asarray(counts))
  p = counts / counts.sum()
  nz = p[p > 0]
  np.testing.assert_allclose(float(m["perplexity"]), np.exp(-(nz * np.log(nz)).sum()), rtol=1e-5)
  np.testing.assert_allclose(float(m["usage"]), 4 / 6)
  np.testing.assert_allclose(float(m["top_share"]), 0.5)


def test_bad_arguments_are_clear_errors():
  z = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="codebook init"):
    _init(VectorQuantizer(num_codes=4, code_dim=3, codebook_init="zeros"), z)
  with pytest.raises(ValueError, match="last axis 5"):
    _init(VectorQuantizer(num_codes=4, code_dim=5, codebook_init="normal"), z)


@pytest.mark.parametrize("impl", ["onehot", "scatter"])
def test_code_histogram_matches_bincount(impl):
  rng = np.random.default_rng(0)
  k = 11
  idx = rng.integers(0, k, size=(4, 3, 5))
  mask = np.array([1.0, 0.0, 0.5, 1.0], np.float32)
  full = rng.uniform(size=idx.shape).astype(np.float32)
  got = qlib.code_histogram(jnp.asarray(idx), k, impl=impl)
  assert got.dtype == jnp.float32 and got.shape == (k,)
  np.testing.assert_array_equal(np.asarray(got), np.bincount(idx.ravel(), minlength=k))
  # A per-example mask [B] weighs every position of example b.
  per_pos = np.broadcast_to(mask[:, None, None], idx.shape)
  got = qlib.code_histogram(jnp.asarray(idx), k, weights=jnp.asarray(mask), impl=impl)
  np.testing.assert_allclose(
    np.asarray(got), np.bincount(idx.ravel(), per_pos.ravel(), minlength=k), rtol=1e-6
  )
  # [B, h] weights line up with the leading axes too; full-shape weights are used as given.
  rows = rng.uniform(size=(4, 3)).astype(np.float32)
  got = qlib.code_histogram(jnp.asarray(idx), k, weights=jnp.asarray(rows), impl=impl)
  expect = np.bincount(idx.ravel(), np.broadcast_to(rows[:, :, None], idx.shape).ravel(), k)
  np.testing.assert_allclose(np.asarray(got), expect, rtol=1e-6)
  got = qlib.code_histogram(jnp.asarray(idx), k, weights=jnp.asarray(full), impl=impl)
  np.testing.assert_allclose(
    np.asarray(got), np.bincount(idx.ravel(), full.ravel().astype(np.float64), k), rtol=1e-6
  )
  with pytest.raises(ValueError, match="more axes"):
    qlib.code_histogram(jnp.asarray(idx[0, 0]), k, weights=jnp.asarray(mask[:, None]), impl=impl)


def test_code_histogram_rejects_unknown_impl():
  with pytest.raises(ValueError, match="histogram impl"):
    qlib.code_histogram(jnp.zeros((3,), jnp.int32), 4, impl="bincount")


@pytest.mark.parametrize("impl", ["onehot", "scatter"])
def test_cluster_sums_match_numpy(impl):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(50, 3)).astype(np.float32)
  idx = rng.integers(0, 7, size=50)
  counts, sums = qlib.cluster_sums(jnp.asarray(x), jnp.asarray(idx), 7, impl)
  np.testing.assert_array_equal(np.asarray(counts), np.bincount(idx, minlength=7))
  expect = np.zeros((7, 3))
  np.add.at(expect, idx, x.astype(np.float64))
  np.testing.assert_allclose(np.asarray(sums), expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "train,ema,impl",
  [
    (False, True, "onehot"),
    (True, True, "onehot"),
    (True, True, "scatter"),
    (True, False, "scatter"),
  ],
)
def test_aux_counts_losses_and_metrics_match_numpy(train, ema, impl):
  k, d, beta = 16, 3, 0.3
  q = VectorQuantizer(
    num_codes=k, code_dim=d, beta=beta, ema=ema, codebook_init="normal", impl=Impl(vq_stats=impl)
  )
  z = jax.random.normal(jax.random.key(4), (2, 5, 7, d))
  v = _init(q, z)
  (zq, aux), _ = q.apply(v, z, train=train, mutable=["vq_state"])
  # Losses and codes use the codebook from before this step's update.
  book = np.asarray(v["vq_state"]["codebook"] if ema else v["params"]["codebook"], np.float64)
  zn = np.asarray(z, np.float64).reshape(-1, d)
  idx = _np_nearest(zn, book)
  np.testing.assert_array_equal(np.asarray(aux["indices"]), idx.reshape(2, 5, 7))
  np.testing.assert_allclose(np.asarray(zq).reshape(-1, d), book[idx], rtol=1e-6, atol=1e-6)
  counts = np.bincount(idx, minlength=k)
  assert aux["counts"].dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(aux["counts"]), counts)
  mse = np.mean((zn - book[idx]) ** 2)
  np.testing.assert_allclose(float(aux["commitment"]), mse, rtol=1e-5)
  np.testing.assert_allclose(float(aux["codebook_loss"]), 0.0 if ema else mse, rtol=1e-5)
  np.testing.assert_allclose(
    float(aux["latent_loss"]), (0.0 if ema else mse) + beta * mse, rtol=1e-5
  )
  p = counts[counts > 0] / counts.sum()
  np.testing.assert_allclose(float(aux["perplexity"]), np.exp(-(p * np.log(p)).sum()), rtol=1e-5)
  np.testing.assert_allclose(float(aux["usage"]), (counts > 0).mean())


def _np_ema_steps(batches, codebook, count, total, weight, decay, eps, bias_correction):
  """Float64 EMA steps from given statistics (the VQ-VAE appendix equations)."""
  k = codebook.shape[0]
  for z in batches:
    z = z.astype(np.float64)
    onehot = np.eye(k)[_np_nearest(z, codebook)]
    count = decay * count + (1 - decay) * onehot.sum(0)
    total = decay * total + (1 - decay) * onehot.T @ z
    if bias_correction:
      weight = decay * weight + (1 - decay)
    c = count / weight
    n = c.sum()
    codebook = (total / weight) / ((c + eps) / (n + k * eps) * n)[:, None]
  return codebook


@pytest.mark.parametrize(
  "init,bias_correction,stats_impl",
  [
    ("kmeans++", False, "onehot"),
    ("kmeans++", True, "scatter"),
    ("kmeans", False, "scatter"),
  ],
)
def test_data_init_then_ema_steps_match_numpy(init, bias_correction, stats_impl):
  """Seeding on step 1, then plain EMA steps (no re-seeding) against a float64 reference.

  The first batch holds exactly K distinct, well separated points, so k-means++ (and Lloyd
  from there) must seed one code on each of them: the seeds are known up to a permutation,
  and the reference follows the codes in the order the quantizer chose.
  """
  k, d, decay, eps, reps = 8, 3, 0.9, 1e-5, 4
  rng = np.random.default_rng(2)
  points = (10.0 * rng.normal(size=(k, d))).astype(np.float32)
  first = np.repeat(points, reps, axis=0)
  later = [
    (points[rng.integers(0, k, 40)] + 0.5 * rng.normal(size=(40, d))).astype(np.float32)
    for _ in range(4)
  ]
  q = VectorQuantizer(
    num_codes=k,
    code_dim=d,
    decay=decay,
    eps=eps,
    codebook_init=init,
    bias_correction=bias_correction,
    impl=Impl(vq_stats=stats_impl),
  )
  v = _init(q, jnp.asarray(first))
  state, books = v["vq_state"], []
  for step, z in enumerate([first] + later):
    _, upd = q.apply(
      {"vq_state": state},
      jnp.asarray(z),
      train=True,
      rngs={"vq": jax.random.key(7 + step)},
      mutable=["vq_state"],
    )
    state = upd["vq_state"]
    books.append(np.asarray(state["codebook"]))
  # Which seed each code got: the point nearest to its codeword after step 1.
  order = _np_nearest(books[0], points)
  assert sorted(order) == list(range(k))
  seeds = points[order].astype(np.float64)
  n0 = first.shape[0] / k
  for step in range(len(books)):
    batches = ([first] + later)[: step + 1]
    expect = _np_ema_steps(
      batches, seeds, np.full(k, n0), seeds * n0, 1.0, decay, eps, bias_correction
    )
    np.testing.assert_allclose(books[step], expect, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(state["ema_weight"]), 1.0, rtol=1e-6)
  assert bool(state["initialized"])
