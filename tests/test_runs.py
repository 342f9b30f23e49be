"""Tests of vqjax/runs.py: `load_run` on a converted model directory and its errors (the trainer
workdir case runs in tests/test_train.py, where a real run exists)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import process_state

import vqjax
from vqjax import configs, convert, errors
from vqjax.models import registry


def _tiny_config():
  c = configs.load_experiment("fashion_mnist:smoke")
  return c


def test_load_run_reads_a_converted_directory(tmp_path):
  config = _tiny_config()
  model = registry.build_model(config)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 1)), jnp.float32)
  variables = jax.jit(model.init)(
    {"params": jax.random.key(3, impl="rbg"), "vq": jax.random.key(4)}, x
  )
  # Perturb the EMA state so a loader that re-initialised it would be caught.
  # (Jitted, here and below: applied op by op, each shape's ops would compile on their own.)
  perturb = jax.jit(lambda v: jax.tree.map(lambda a: a + 0.5 if a.dtype == jnp.float32 else a, v))
  variables = perturb(dict(variables))
  convert.save_converted(str(tmp_path / "conv"), config, variables)
  before = process_state()
  loaded_config, loaded_model, loaded = vqjax.load_run(str(tmp_path / "conv"))
  assert process_state() == before  # no hook or log filter left behind
  assert loaded_config.vq.num_codes == config.vq.num_codes
  flat_a = jax.tree_util.tree_flatten_with_path(variables)[0]
  flat_b = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
  assert len(flat_a) == len(flat_b)
  for path, a in flat_a:
    np.testing.assert_array_equal(np.asarray(a), np.asarray(flat_b[path]))
  recon_a, _ = jax.jit(model.apply)(variables, x)
  recon_b, _ = jax.jit(loaded_model.apply)(loaded, x)
  np.testing.assert_array_equal(np.asarray(recon_a), np.asarray(recon_b))
  with pytest.raises(errors.UserError, match="converted model"):
    vqjax.load_run(str(tmp_path / "conv"), step=3)


def test_load_run_errors_name_the_problem(tmp_path):
  with pytest.raises(errors.UserError, match="not a directory"):
    vqjax.load_run(str(tmp_path / "missing"))
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(errors.UserError, match="no checkpoint in"):
    vqjax.load_run(str(tmp_path))


@pytest.mark.parametrize(
  "damage, message",
  [
    ("syntax", r"config.json is damaged: not valid JSON \(line 1"),
    ("list", "must hold a JSON object of config groups, not a list"),
    ("float", r"field data.image_size=1000000000.0 has the wrong type: it must be int"),
    ("size", r"config.json: config.data.image_size=1000000000 cannot be right"),
    ("levels", r"config.json: config.model.levels=1000000 cannot be right"),
    ("unknown", "has a field 'model.wings'"),
  ],
)
def test_a_damaged_converted_config_is_one_line_naming_the_file(tmp_path, damage, message):
  """Each used to be a 39-line traceback, an AttributeError, NumPy's "array is too big", or
  (levels=10**6) a load_run still running after 120 s."""
  import json
  import time

  config = _tiny_config()
  model = registry.build_model(config)
  x = jnp.zeros((1, 32, 32, 1), jnp.float32)
  variables = jax.jit(model.init)({"params": jax.random.key(0), "vq": jax.random.key(1)}, x)
  convert.save_converted(str(tmp_path / "conv"), config, dict(variables))
  path = tmp_path / "conv" / "config.json"
  values = json.loads(path.read_text())
  if damage == "syntax":
    path.write_text(path.read_text()[:-40])
  elif damage == "list":
    path.write_text(json.dumps([values]))
  else:
    group, field, value = {
      "float": ("data", "image_size", 1e9),
      "size": ("data", "image_size", 10**9),
      "levels": ("model", "levels", 10**6),
      "unknown": ("model", "wings", 2),
    }[damage]
    values[group][field] = value
    path.write_text(json.dumps(values))
  start = time.monotonic()
  with pytest.raises(errors.UserError, match=message) as e:
    vqjax.load_run(str(tmp_path / "conv"))
  assert "\n" not in str(e.value) and str(path) in str(e.value)
  assert time.monotonic() - start < 30
