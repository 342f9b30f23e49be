"""Tests of vqjax/plugins.py: a quantizer defined here, in the test file, registered by name or
named by its import path, trains through an experiment config (`fashion_mnist:smoke` with
`vq.kind` set to it) and loads back; its output is checked against NumPy; an unknown kind or a
bad import path is one line naming the field."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vqjax
from vqjax import config_checks, configs, errors
from vqjax.data import sources
from vqjax.models import registry
from vqjax.models.quantizer import code_histogram, usage_metrics
from vqjax.training import tasks, trainer

FMNIST = "/usr/share/datasets/fashion-mnist"


def _codebook(seed: int, num_codes: int, code_dim: int) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(num_codes, code_dim)).astype(np.float32)


class ToyQuantizer(nn.Module):
  """Nearest codeword of a fixed random codebook (drawn from `seed`, never trained), with the
  straight-through gradient and a commitment loss: the smallest module that honours the
  quantizer contract of vqjax/plugins.py."""

  num_codes: int = 16
  code_dim: int = 8
  seed: int = 0
  beta: float = 0.25
  dtype: object = jnp.float32
  param_dtype: object = jnp.float32

  @staticmethod
  def from_config(vq) -> dict:
    options = dict(vq.options)
    unknown = sorted(set(options) - {"seed", "beta"})
    if unknown:
      raise errors.UserError(f"config.vq.options has {unknown}: the toy quantizer reads seed, beta")
    seed = options.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
      raise errors.UserError(f"config.vq.options.seed={seed!r} must be an integer")
    return dict(
      num_codes=vq.num_codes,
      code_dim=vq.code_dim,
      seed=seed,
      beta=float(options.get("beta", 0.25)),
    )

  def _table(self) -> jax.Array:
    return jnp.asarray(_codebook(self.seed, self.num_codes, self.code_dim))

  def lookup(self, indices: jax.Array) -> jax.Array:
    return jnp.take(self._table(), indices, axis=0).astype(self.dtype)

  def __call__(self, z: jax.Array, train: bool):
    z = z.astype(jnp.float32)
    table = self._table()
    dist = (
      jnp.sum(z * z, axis=-1, keepdims=True)
      - 2 * jnp.einsum("...d,kd->...k", z, table, precision=jax.lax.Precision.HIGHEST)
      + jnp.sum(table * table, axis=-1)
    )
    indices = jnp.argmin(dist, axis=-1).astype(jnp.int32)
    q = table[indices]
    commitment = jnp.mean(jnp.square(z - jax.lax.stop_gradient(q)))
    counts = code_histogram(indices, self.num_codes).astype(jnp.int32)
    aux = {
      "indices": indices,
      "latent_loss": self.beta * commitment,
      "commitment": commitment,
      "counts": counts,
      **usage_metrics(counts),
    }
    return (z + jax.lax.stop_gradient(q - z)).astype(self.dtype), aux


NOT_A_PLUGIN = object()
registry.register_quantizer("toy_nearest", ToyQuantizer)


def _smoke(kind: str = "toy_nearest", **options):
  config = configs.load_experiment("fashion_mnist:smoke")
  config.vq.kind = kind
  config.vq.options = options
  return config


def test_the_toy_quantizer_is_nearest_code_of_its_numpy_codebook():
  q = ToyQuantizer(num_codes=16, code_dim=8, seed=5)
  z = np.random.default_rng(1).normal(size=(2, 3, 4, 8)).astype(np.float32)
  (zq, aux), _ = q.init_with_output(jax.random.key(0), jnp.asarray(z), train=True)
  table = _codebook(5, 16, 8).astype(np.float64)
  dist = np.sum((z.astype(np.float64)[..., None, :] - table) ** 2, axis=-1)
  want = np.argmin(dist, axis=-1)
  np.testing.assert_array_equal(np.asarray(aux["indices"]), want)
  np.testing.assert_allclose(np.asarray(zq), table[want], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(aux["counts"]), np.bincount(want.ravel(), minlength=16))
  np.testing.assert_allclose(float(aux["commitment"]), np.mean((z - table[want]) ** 2), rtol=1e-5)


def test_a_plugin_quantizer_builds_into_the_autoencoder_by_name_and_by_import_path():
  for kind in ("toy_nearest", f"{__name__}:ToyQuantizer"):
    config = _smoke(kind, seed=3)
    config_checks.validate(config)
    model = registry.build_model(config)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 1)), jnp.float32)
    variables = model.init({"params": jax.random.key(0), "vq": jax.random.key(1)}, x)
    codes = model.apply(variables, x, method="encode_to_indices")
    assert [c.shape for c in codes] == [(2, 4, 4), (2, 8, 8)]
    (_, aux), _ = model.apply(variables, x, train=True, mutable=["vq_state"])
    assert {"loss", "mse", "latent_loss", "level0/perplexity", "level1/counts"} <= set(aux)
    # Each level's code vectors are rows of the seed-3 NumPy codebook.
    rows = model.apply(variables, codes[0], method=lambda m, c: m.quantizers[0].lookup(c))
    np.testing.assert_array_equal(np.asarray(rows), _codebook(3, 32, 8)[np.asarray(codes[0])])


@pytest.mark.slow
@pytest.mark.skipif(
  not sources.fashion_mnist_files_exist(FMNIST), reason="Fashion-MNIST idx files not installed"
)
def test_a_plugin_quantizer_trains_one_step_and_loads_back(tmp_path):
  config = _smoke(seed=3)
  workdir = str(tmp_path / "run")
  result = trainer.train_and_evaluate(config, workdir)
  assert result["step"] == 1
  loaded_config, model, variables = vqjax.load_run(workdir)
  assert loaded_config.vq.kind == "toy_nearest" and loaded_config.vq.options.seed == 3
  assert isinstance(model.apply(variables, method=lambda m: m.quantizers[0]), ToyQuantizer)
  x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (2, 32, 32, 1)), jnp.float32)
  codes = model.apply(variables, x, method="encode_to_indices")
  rows = model.apply(variables, codes[1], method=lambda m, c: m.quantizers[1].lookup(c))
  np.testing.assert_array_equal(np.asarray(rows), _codebook(3, 32, 8)[np.asarray(codes[1])])
  assert os.path.isfile(os.path.join(workdir, "config.json"))


@pytest.mark.parametrize(
  "kind, message",
  [
    ("fsq", r"config\.vq\.kind='fsq' is not one of vq, gumbel, .*import path"),
    ("no_such_package.quant:Q", r"config\.vq\.kind='no_such_package.quant:Q': cannot import"),
    (f"{__name__}:Missing", rf"config\.vq\.kind='{__name__}:Missing': module .* has no 'Missing'"),
    (f"{__name__}:NOT_A_PLUGIN", r"has no from_config"),
  ],
)
def test_an_unknown_kind_or_bad_import_path_is_one_line(kind, message):
  config = _smoke(kind)
  with pytest.raises(errors.UserError, match=message) as e:
    config_checks.validate(config)
  assert "\n" not in str(e.value)


def test_a_plugin_checks_its_own_options_and_the_built_in_fields_are_ignored():
  with pytest.raises(errors.UserError, match=r"config\.vq\.options has \['sed'\]"):
    config_checks.validate(_smoke(sed=3))
  config = _smoke(seed=3)
  config.vq.beta = 0.5  # the built-in quantizer's field: nothing reads it for a plugin
  with pytest.raises(errors.UserError, match=r"config\.vq\.beta=0\.5 is ignored by vq\.kind="):
    config_checks.validate(config)
  config = configs.load_experiment("fashion_mnist:smoke")
  config.vq.options = {"seed": 3}  # a built-in quantizer reads no options
  with pytest.raises(errors.UserError, match=r"config\.vq\.options=.* is ignored by vq\.kind='vq'"):
    config_checks.validate(config)


def test_a_model_name_may_be_an_import_path_too():
  config = configs.load_experiment("fashion_mnist:smoke")
  config.model.name = "no_such_package.models:Net"
  with pytest.raises(errors.UserError, match=r"config\.model\.name=.*cannot import"):
    config_checks.validate(config)
  with pytest.raises(errors.UserError, match="cannot register a model as 'vqvae2'"):
    registry.register_model("vqvae2", ToyQuantizer)


# --- a prior ------------------------------------------------------------------------------------


class ToyPrior(nn.Module):
  """Logits of each code from the code before it in raster order (a start token first): an
  autoregressive model over codes in one embedding and one dense layer."""

  num_codes: int = 16
  features: int = 8
  dtype: object = jnp.float32
  param_dtype: object = jnp.float32

  @staticmethod
  def from_config(config) -> dict:
    options = dict(config.model.options)
    if set(options) - {"features"}:
      raise errors.UserError(
        f"config.model.options has {sorted(options)}: the toy prior reads features"
      )
    return dict(num_codes=config.vq.num_codes, features=int(options.get("features", 8)))

  @nn.compact
  def __call__(self, codes, condition=None, label=None, train=False):
    del condition, label, train
    b, h, w = codes.shape
    flat = codes.reshape(b, h * w)
    previous = jnp.concatenate([jnp.full((b, 1), self.num_codes, flat.dtype), flat[:, :-1]], 1)
    e = nn.Embed(self.num_codes + 1, self.features, param_dtype=self.param_dtype)(previous)
    logits = nn.Dense(self.num_codes, dtype=self.dtype, param_dtype=self.param_dtype)(e)
    return logits.reshape(b, h, w, self.num_codes)


registry.register_model("toy_prior", ToyPrior)


def _prior_smoke(**options):
  config = configs.load_experiment("fashion_mnist_prior_top:smoke")
  defaults = configs.base_config().model
  for field in config.model:  # the built-in priors' fields: a plugin reads model.options
    if field not in ("dtype", "param_dtype"):
      config.model[field] = defaults[field]
  config.model.name = "toy_prior"
  config.model.options = options
  return config


def test_the_toy_prior_is_causal_and_matches_numpy():
  model = ToyPrior(num_codes=5, features=3)
  codes = np.random.default_rng(0).integers(0, 5, (2, 3, 4)).astype(np.int32)
  logits, variables = model.init_with_output(jax.random.key(0), jnp.asarray(codes))
  p = jax.tree.map(np.asarray, variables["params"])
  flat = codes.reshape(2, 12)
  previous = np.concatenate([np.full((2, 1), 5), flat[:, :-1]], 1)
  want = p["Embed_0"]["embedding"][previous] @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
  np.testing.assert_allclose(np.asarray(logits), want.reshape(2, 3, 4, 5), rtol=1e-5, atol=1e-6)
  changed = codes.copy()
  changed[:, 1, 2] = (changed[:, 1, 2] + 1) % 5  # raster position 6
  other = np.asarray(model.apply(variables, jnp.asarray(changed))).reshape(2, 12, 5)
  np.testing.assert_array_equal(other[:, :7], np.asarray(logits).reshape(2, 12, 5)[:, :7])


@pytest.mark.slow
def test_a_plugin_prior_trains_one_step_and_loads_back(tmp_path):
  config = _prior_smoke(features=4)
  config_checks.validate(config)
  workdir = str(tmp_path / "prior")
  assert trainer.train_and_evaluate(config, workdir)["step"] == 1
  loaded_config, model, variables = vqjax.load_run(workdir)
  assert loaded_config.model.name == "toy_prior" and loaded_config.model.options.features == 4
  assert isinstance(model, ToyPrior) and model.features == 4
  assert variables["params"]["Embed_0"]["embedding"].shape == (33, 4)


def test_a_plugin_prior_may_model_a_level_below_the_top():
  """The conditioning fields are the built-in priors' own: a plugin prior of level 1 (the toy
  one ignores its condition) is a prior task like any other, its evaluator the same."""
  config = _prior_smoke(features=4)
  config.prior.level = 1
  config_checks.validate(config)
  task = tasks.PriorTask(config)
  assert task.shape == tuple(config.data.synthetic_shapes[1]) and task.evals == ("prior",)
  builtin = configs.load_experiment("fashion_mnist_prior_top:smoke")
  builtin.prior.level = 1  # a built-in prior still needs its conditioning channels
  with pytest.raises(errors.UserError, match="cond_"):
    tasks.PriorTask(builtin)
