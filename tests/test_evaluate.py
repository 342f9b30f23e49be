"""Tests of vqjax/evaluate.py on a stage-1 run: its reconstruction and codebook numbers and the
histograms behind its plots against a direct NumPy computation on the same eval images, the
plots' files, and bad command-line input as one-line errors. (Sample quality and the trade-offs
need priors and a classifier run: tests/test_sample_cli.py.)"""

import json
import math
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vqjax import configs, convert, errors, evaluate
from vqjax.data import pipeline, sources
from vqjax.evaluation import plots
from vqjax.models import registry

FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
  """A randomly initialised smoke VQ-VAE-2 saved as a model directory, its eval images, and
  their reconstructions and codes straight from `model.apply`."""
  if not sources.fashion_mnist_files_exist(FMNIST):
    pytest.skip("Fashion-MNIST idx files not installed")
  config = configs.load_experiment("fashion_mnist:smoke")
  config.data.update(eval_split="test[:12]", eval_batch_size=8)
  model = registry.build_model(config)
  variables = jax.jit(model.init)(
    {"params": jax.random.key(0, impl="rbg"), "vq": jax.random.key(1)}, jnp.zeros((1, 32, 32, 1))
  )
  path = str(tmp_path_factory.mktemp("stage1") / "m")
  convert.save_converted(path, config, dict(variables))
  batches = list(pipeline.make_eval_iterator(config.data))
  x = np.concatenate([b["image"][b["mask"] > 0] for b in batches])
  direct = jax.jit(
    lambda v, x: (model.apply(v, x)[0], model.apply(v, x, method="encode_to_indices"))
  )
  recon, codes = jax.tree.map(np.asarray, direct(variables, x))
  return path, config, dict(variables), x, recon, codes


def test_stage1_numbers_match_numpy(stage1):
  path, config, _, x, recon, codes = stage1
  result = evaluate.evaluate(path)
  assert len(x) == 12 and result["examples"] == 12
  mse = float(np.mean((np.asarray(recon, np.float64) - x) ** 2))
  assert math.isclose(result["mse"], mse, rel_tol=1e-5)
  assert math.isclose(result["psnr"], 10 * math.log10(4 / mse), rel_tol=1e-5)
  for name, c in zip(("top", "bottom"), codes, strict=True):
    used = len(np.unique(np.asarray(c)))
    assert math.isclose(result[f"{name}/usage"], used / config.vq.num_codes, rel_tol=1e-6)


def test_stage1_plots_grid_and_usage_histograms(stage1, tmp_path, monkeypatch):
  path, config, _, x, recon, codes = stage1
  drawn = {}
  original = plots.usage_histograms

  def spy(png, counts, perplexity=None):
    drawn.update(counts=counts, perplexity=perplexity)
    return original(png, counts, perplexity)

  monkeypatch.setattr(plots, "usage_histograms", spy)
  paths = evaluate.stage1_plots(path, str(tmp_path / "plots"))
  assert set(paths) == {"reconstructions", "code_usage"}
  with Image.open(paths["code_usage"]) as im:
    assert im.format == "PNG" and im.size == (800, 300)  # one 400 x 300 panel per level
  # The histograms behind the plot: np.bincount of the codes of the 12 eval images, and the
  # perplexity exp(entropy) of each.
  assert list(drawn["counts"]) == ["top", "bottom"]
  for name, c in zip(("top", "bottom"), codes, strict=True):
    expected = np.bincount(np.asarray(c).reshape(-1), minlength=config.vq.num_codes)
    np.testing.assert_array_equal(drawn["counts"][name], expected)
    p = expected[expected > 0] / expected.sum()
    assert drawn["perplexity"][name] == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-5)
  # 8 inputs (config.log.num_images) over their reconstructions: 32 px cells, 2 px gaps, and a
  # label margin on the left.
  grid = np.asarray(Image.open(paths["reconstructions"]))
  assert grid.shape[0] == 2 * 34 + 2
  left = grid.shape[1] - (8 * 34 + 2)
  assert left > 0
  first = np.round((x[0, ..., 0] + 1) * 127.5).astype(np.uint8)
  np.testing.assert_array_equal(grid[2:34, left + 2 : left + 34], first)
  first_recon = np.round((np.clip(recon[0, ..., 0], -1, 1) + 1) * 127.5)
  cell = grid[36:68, left + 2 : left + 34].astype(np.int64)
  assert np.abs(cell - first_recon).max() <= 1


def _flags(**kw):
  """The flag values `evaluate._run` reads, with the command line's defaults."""
  values = dict(
    workdir=[], out="", max_batches=0, plots=False, out_dir="", samples="", classifier="",
    features="", thresholds="", temperatures="", num=256, stage1="", seed=0, max_real=10000,
    allow_mismatch=False,
  )  # fmt: skip
  return types.SimpleNamespace(**{**values, **kw})


def _one_line(**kw) -> str:
  """The message the CLI exits with for these flags (it must be one line)."""
  with pytest.raises(SystemExit) as e, errors.one_line("vqjax.evaluate"):
    evaluate._run(_flags(**kw))
  message = str(e.value)
  assert "\n" not in message and message.startswith("vqjax.evaluate: UserError: ")
  return message


def test_bad_command_lines_are_one_line_errors(stage1, tmp_path):
  path = stage1[0]
  samples = tmp_path / "samples"
  samples.mkdir()
  bad_threshold = _one_line(samples=str(samples), classifier="c", thresholds="0.5,1")
  assert "threshold 1 is not in (0, 1)" in bad_threshold
  assert "'x' is not a number" in _one_line(samples=str(samples), classifier="c", thresholds="x")
  assert "no images.npz in" in _one_line(samples=str(samples), features="c")
  assert "--thresholds needs --classifier" in _one_line(samples=str(samples), thresholds="0.5")
  assert "--thresholds needs --samples" in _one_line(workdir=[path], thresholds="0.5")
  assert "must be > 0" in _one_line(workdir=[path], classifier="c", temperatures="1,-0.5")
  assert "--temperatures needs the priors" in _one_line(temperatures="1")
  assert "give one --workdir" in _one_line(workdir=[path, path])
  assert "give --workdir RUN" in _one_line()
  # A stage-1 run is no classifier: caught when the samples are judged.
  np.savez(samples / "images.npz", image=np.zeros((5, 32, 32, 1), np.uint8))
  (samples / "settings.json").write_text(json.dumps({"stage1": path}))
  assert "is not a classifier run" in _one_line(samples=str(samples), features=path)


def test_mode_mismatches_are_named_before_any_evaluation(tmp_path, monkeypatch):
  """--plots on a run that is no autoencoder, and --thresholds on samples already filtered by
  rejection, fail before the (long) evaluation runs, not after it."""
  monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluated"))
  monkeypatch.setattr(evaluate, "evaluate_samples", lambda *a, **k: pytest.fail("evaluated"))
  prior = tmp_path / "prior"
  prior.mkdir()
  (prior / "config.json").write_text(json.dumps({"task": "prior"}))
  assert _one_line(workdir=[str(prior)], plots=True) == (
    f"vqjax.evaluate: UserError: --workdir (with --plots): {prior} is not a stage-1 "
    "autoencoder run (its task is 'prior')"
  )
  filtered = tmp_path / "filtered"
  filtered.mkdir()
  (filtered / "settings.json").write_text(json.dumps({"classifier": "c", "threshold": 0.9}))
  assert "already filtered by rejection sampling (threshold 0.9)" in _one_line(
    samples=str(filtered), classifier="c", thresholds="0.5"
  )


@pytest.mark.slow
def test_the_command_line_defines_what_run_reads(tmp_path):
  """The real flags (a fresh process: flags are global) have the names and defaults of
  `_flags`, and a bad value through them is one line on stderr."""
  code = (
    "import json; from absl import flags; from vqjax import evaluate; evaluate.define_flags(); "
    "flags.FLAGS(['x']); "
    "print(json.dumps({f.name: f.default for f in flags.FLAGS.get_flags_for_module("
    "'vqjax.evaluate')}))"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
  assert out.returncode == 0, out.stderr[-2000:]
  defined = json.loads(out.stdout)
  assert defined.pop("verbose") is False
  assert defined == vars(_flags())
  for args, message in [
    (["--samples", str(tmp_path), "--classifier", "c", "--thresholds", "0.5,2"], "not in (0, 1)"),
    (["--workdir", "a", "--classifier", "c", "--temperatures", "0.7,hot"], "'hot' is not a"),
  ]:
    out = subprocess.run(
      [sys.executable, "-m", "vqjax.evaluate", *args], capture_output=True, text=True, env=env
    )
    assert out.returncode != 0 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("vqjax.evaluate: UserError: ") and message in line


@pytest.mark.slow
def test_a_damaged_newest_step_is_skipped_and_the_step_read_recorded(tmp_path):
  """Flip 200 bytes of the newest step's largest array file (its size kept): the evaluation
  reads the previous step, says so in eval.json's "step", and its MSE is that step's (the
  flipped weights used to evaluate with exit 0 at 7x the MSE)."""
  from vqjax.training import trainer

  if not sources.fashion_mnist_files_exist(FMNIST):
    pytest.skip("Fashion-MNIST idx files not installed")
  config = configs.load_experiment("fashion_mnist:smoke")
  config.data.update(eval_split="test[:12]", eval_batch_size=8)
  config.train.steps = 2
  config.ckpt.update(every_steps=1, keep=3)
  config.log.update(tensorboard=False, eval_every_steps=0, image_every_steps=0)
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir)
  assert evaluate.evaluate(workdir)["step"] == 2
  step2 = tmp_path / "run" / "checkpoints" / "2" / "state"
  files = [os.path.join(r, f) for r, _, fs in os.walk(step2) for f in fs]
  victim = max(files, key=os.path.getsize)
  data = bytearray(open(victim, "rb").read())
  middle = len(data) // 2
  data[middle : middle + 200] = bytes(b ^ 0xFF for b in data[middle : middle + 200])
  with open(victim, "wb") as f:
    f.write(data)
  result = evaluate.evaluate(workdir)
  assert result["step"] == 1
  from vqjax import runs

  assert runs.load_run_with_step(workdir)[3] == 1
