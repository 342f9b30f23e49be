"""Tests of vqjax/training/evaluators.py: the registry read from config, a suite of evaluators
in one pass against NumPy, and one compilation per suite, even for a model whose fields hold a
dict (unhashable, so it could never be a static jit argument)."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from vqjax import configs, errors
from vqjax.training import evaluators


class _Scale(nn.Module):
  """recon = x * options["scale"]; codes = the sign of the first channel, at two strides."""

  options: dict

  def __call__(self, x, train=False):
    return x * self.options["scale"], {}

  def encode_to_indices(self, x):
    q = (x[..., 0] > 0).astype(jnp.int32)
    return q[:, ::2, ::2], q


def _batches(rng):
  images = rng.uniform(-1, 1, (5, 4, 4, 1)).astype(np.float32)
  junk = np.full((3, 4, 4, 1), 7.0, np.float32)  # padding rows: never counted
  return (
    images,
    [
      {"image": images[:3]},  # no mask: every row counts
      {"image": np.concatenate([images[3:], junk]), "mask": np.r_[1.0, 1.0, 0, 0, 0]},
    ],
  )


def test_a_suite_runs_its_evaluators_in_one_pass_and_compiles_once():
  images, batches = _batches(np.random.default_rng(0))
  model = _Scale({"scale": 0.5})
  traced = []

  class Counting(evaluators.ReconstructionEvaluator):
    def sums(self, variables, batch, frozen=None):
      traced.append(1)
      return super().sums(variables, batch, frozen)

  suite = evaluators.Suite([Counting(model), evaluators.CodebookEvaluator(model, num_codes=2)])
  for _ in range(2):
    out = suite.run({}, batches)
    err = ((images.astype(np.float64) * 0.5 - images) ** 2).mean((1, 2, 3))
    assert out["examples"] == 5
    np.testing.assert_allclose(out["mse"], err.mean(), rtol=1e-5)
    np.testing.assert_allclose(out["psnr"], 10 * np.log10(4 / err.mean()), rtol=1e-5)
    signs = images[..., 0] > 0
    for name, codes in (("top", signs[:, ::2, ::2]), ("bottom", signs)):
      share = codes.mean()
      assert out[f"{name}/usage"] == (1.0 if 0 < share < 1 else 0.5)
      assert out[f"{name}/top_share"] == pytest.approx(max(share, 1 - share), rel=1e-6)
  # Batches of two shapes (3 and 5 rows): one trace each, none on the second pass.
  assert len(traced) == 2


def test_config_evals_names_the_evaluators_else_the_tasks():
  config = configs.base_config()
  assert evaluators.names_for(config, ("prior",)) == ("prior",)
  config.evals = ("codebook",)
  assert evaluators.names_for(config, ("prior",)) == ("codebook",)
  (built,) = evaluators.build(config.evals, config, _Scale({"scale": 1.0}))
  assert isinstance(built, evaluators.CodebookEvaluator)
  assert built.num_codes == config.vq.num_codes
  assert built.max_batches == config.log.eval_batches


def test_an_unknown_evaluator_is_one_line_naming_the_registered_ones():
  with pytest.raises(errors.UserError, match=r"unknown evaluator\(s\) \['psnr'\].*reconstruction"):
    evaluators.build(("psnr",), configs.base_config(), None)
