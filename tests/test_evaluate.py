"""Tests of vqjax/evaluate.py: a stage-1 run's reconstruction and codebook numbers against a
direct NumPy computation on the same eval batch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqjax import configs, convert, evaluate
from vqjax.data import pipeline, sources
from vqjax.models import registry

FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not sources.fashion_mnist_files_exist(FMNIST), reason="needs Fashion-MNIST")
def test_stage1_numbers_match_numpy(tmp_path):
  config = configs.load_experiment("fashion_mnist:smoke")
  config.data.update(eval_split="test[:12]", eval_batch_size=8)
  model = registry.build_model(config)
  variables = jax.jit(model.init)(
    {"params": jax.random.key(0, impl="rbg"), "vq": jax.random.key(1)}, jnp.zeros((1, 32, 32, 1))
  )
  convert.save_converted(str(tmp_path / "m"), config, dict(variables))
  result = evaluate.evaluate(str(tmp_path / "m"))
  batches = list(pipeline.make_eval_iterator(config.data))
  x = np.concatenate([b["image"][b["mask"] > 0] for b in batches])
  assert len(x) == 12 and result["examples"] == 12
  recon, _ = model.apply(variables, jnp.asarray(x))
  mse = float(np.mean((np.asarray(recon, np.float64) - x) ** 2))
  assert math.isclose(result["mse"], mse, rel_tol=1e-5)
  assert math.isclose(result["psnr"], 10 * math.log10(4 / mse), rel_tol=1e-5)
  codes = model.apply(variables, jnp.asarray(x), method="encode_to_indices")
  for name, c in zip(("top", "bottom"), codes, strict=True):
    used = len(np.unique(np.asarray(c)))
    assert math.isclose(result[f"{name}/usage"], used / config.vq.num_codes, rel_tol=1e-6)
