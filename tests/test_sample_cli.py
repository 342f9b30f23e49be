"""End to end: `vqjax.sample` over prior runs trained by the trainer and a stage-1 model on
disk: files written, the same seed gives the same samples, and the codes decode to the PNG."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vqjax import configs, convert, errors, sample
from vqjax.models import registry
from vqjax.training import logs, trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  stage1 = configs.load_experiment("fashion_mnist:smoke")
  model = registry.build_model(stage1)
  variables = jax.jit(model.init)(
    {"params": jax.random.key(0, impl="rbg"), "vq": jax.random.key(1)}, jnp.zeros((1, 32, 32, 1))
  )
  convert.save_converted(str(root / "stage1"), stage1, dict(variables))
  priors = []
  for name in ("fashion_mnist_prior_top", "fashion_mnist_prior_bottom"):
    config = configs.load_experiment(f"{name}:smoke")  # synthetic 8x8 / 16x16 codes, K=32
    config.log.update(tensorboard=False, eval_every_steps=0)
    trainer.train_and_evaluate(config, str(root / name))
    priors.append(str(root / name))
  return str(root / "stage1"), priors, model, dict(variables)


def test_sample_cli_writes_grid_codes_and_settings(runs, tmp_path):
  stage1, priors, model, variables = runs
  out = str(tmp_path / "s")
  settings = sample.run(priors, out, num=5, seed=3, stage1=stage1, label=2)
  with open(os.path.join(out, "settings.json")) as f:
    assert json.load(f)["seed"] == 3 == settings["seed"]
  saved = np.load(os.path.join(out, "codes.npz"))
  assert saved["codes0"].shape == (5, 8, 8) and saved["codes1"].shape == (5, 16, 16)
  np.testing.assert_array_equal(saved["label"], [2] * 5)  # the top prior is class-conditional
  # The grid shows the decoded codes: 3 x 3 cells of 32 px, the last 4 blank.
  images = model.apply(
    variables,
    (jnp.asarray(saved["codes0"]), jnp.asarray(saved["codes1"])),
    method="decode_from_indices",
  )
  grid = np.asarray(Image.open(os.path.join(out, "samples.png")))
  expected = logs.to_uint8(np.clip(np.asarray(images), -1, 1))
  np.testing.assert_array_equal(grid[2:34, 2:34], expected[0, ..., 0])
  again = str(tmp_path / "again")
  sample.run(priors, again, num=5, seed=3, stage1=stage1, label=2)
  np.testing.assert_array_equal(
    np.load(os.path.join(again, "codes.npz"))["codes1"], saved["codes1"]
  )


def test_sample_cli_errors(runs, tmp_path):
  stage1, priors, _, _ = runs
  with pytest.raises(errors.UserError, match="one prior per level"):
    sample.run(priors[:1], str(tmp_path / "x"), num=2, stage1=stage1)
  with pytest.raises(errors.UserError, match="not trained on extracted codes"):
    sample.run(priors, str(tmp_path / "x"), num=2)  # synthetic codes name no stage-1 run
