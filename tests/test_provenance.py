"""Runs that do not belong together are refused (training/identity.py, sampling/hierarchy.py):
a run's id, the stage-1 identity a prior records from its codes, and the chain check of
sampling, with --allow_mismatch the only way past."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from train_helpers import on_codes

from vqjax import configs, convert, errors, extract_codes
from vqjax.models import registry
from vqjax.sampling import hierarchy
from vqjax.training import identity, tasks, trainer


def _prior(run_id: str, step: int):
  c = configs.base_config()
  c.task = "prior"
  c.prior.update(stage1_run_id=run_id, stage1_step=step)
  return c


def test_a_run_id_is_written_once_and_kept(tmp_path):
  first = identity.ensure_run_id(str(tmp_path / "run"))
  assert len(first) == 32 and identity.ensure_run_id(str(tmp_path / "run")) == first
  assert identity.read_run_id(str(tmp_path / "run")) == first
  assert identity.read_run_id(str(tmp_path / "none")) is None
  # A damaged record is an error, never read as "no id" and replaced by a new one.
  (tmp_path / "bad").mkdir()
  for damaged in ("[1]", '{"run_id": ', '{"created": "2026"}', '{"run_id": ""}', ""):
    (tmp_path / "bad" / identity.RUN_FILE).write_text(damaged)
    for call in (identity.read_run_id, identity.ensure_run_id):
      with pytest.raises(errors.UserError, match=r"run.json is damaged .*--allow_mismatch"):
        call(str(tmp_path / "bad"))
    assert (tmp_path / "bad" / identity.RUN_FILE).read_text() == damaged


def test_the_chain_check_names_what_does_not_belong(tmp_path):
  stage1 = str(tmp_path / "stage1")
  run_id = identity.ensure_run_id(stage1)
  other = identity.ensure_run_id(str(tmp_path / "other"))
  good = [("top", _prior(run_id, 5)), ("bottom", _prior(run_id, 5))]
  assert hierarchy.chain_problem(stage1, 5, good) == ""
  # Priors that record nothing (older, or trained on synthetic codes) are not checked.
  assert hierarchy.chain_problem(stage1, 5, [("top", _prior("", -1))]) == ""
  problem = hierarchy.chain_problem(str(tmp_path / "other"), 5, good)
  assert problem == (
    f"top was trained on codes of the stage-1 run {run_id[:8]} (step 5), but "
    f"{tmp_path / 'other'} is run {other[:8]}"
  )
  mixed = [("top", _prior(run_id, 5)), ("bottom", _prior(other, 5))]
  assert "trained on codes of different stage-1 runs" in hierarchy.chain_problem(stage1, 5, mixed)
  stale = [("top", _prior(run_id, 5)), ("bottom", _prior(run_id, 3))]
  assert "different stage-1 runs" in hierarchy.chain_problem(stage1, 5, stale)
  gone = hierarchy.chain_problem(stage1, 9, [("top", _prior(run_id, 5))])
  assert "at step 5, which is no longer on disk (its weights were read at step 9)" in gone


def test_a_new_conversion_is_a_new_run(tmp_path):
  config = configs.load_experiment("fashion_mnist:smoke")
  model = registry.build_model(config)
  variables = jax.jit(model.init)(
    {"params": jax.random.key(0), "vq": jax.random.key(1)}, jnp.zeros((1, 32, 32, 1))
  )
  convert.save_converted(str(tmp_path / "m"), config, dict(variables))
  first = identity.read_run_id(str(tmp_path / "m"))
  convert.save_converted(str(tmp_path / "m"), config, dict(variables), force=True)
  assert first and identity.read_run_id(str(tmp_path / "m")) not in (None, first)


@pytest.mark.slow
def test_sampling_refuses_a_stage1_run_the_priors_were_not_trained_on(tmp_path):
  """A trained stage-1 run, its codes and two priors on them sample; another stage-1 run with
  the same shapes (`--stage1 OTHER`) and a bottom prior trained on another run's codes are one
  line each, and --allow_mismatch samples anyway. The priors read the stage-1 run at the step
  the codes came from."""
  runs = {}
  for name, seed in (("stage1", 0), ("other", 1)):
    config = configs.load_experiment("fashion_mnist:smoke")
    config.seed = seed
    config.log.update(tensorboard=False, eval_every_steps=0, image_every_steps=0)
    trainer.train_and_evaluate(config, str(tmp_path / name))
    runs[name] = str(tmp_path / name)
  priors = {}
  for stage1 in ("stage1", "other"):
    codes_dir = str(tmp_path / f"codes_{stage1}")
    extract_codes.extract(runs[stage1], codes_dir, batch_size=8)
    with open(os.path.join(codes_dir, "metadata.json")) as f:
      recorded = json.load(f)["stage1"]
    assert recorded["run_id"] == identity.read_run_id(runs[stage1])
    for name in ("fashion_mnist_prior_top", "fashion_mnist_prior_bottom"):
      config = on_codes(configs.load_experiment(f"{name}:smoke"), codes_dir)
      config.log.update(tensorboard=False, eval_every_steps=0, image_every_steps=0)
      out = str(tmp_path / f"{name}_{stage1}")
      trainer.train_and_evaluate(config, out, make_task=tasks.make_task)
      priors[name, stage1] = out

  def sample(*args):
    cmd = [sys.executable, "-m", "vqjax.sample", "--num", "2", "--out", str(tmp_path / "s")]
    return subprocess.run(cmd + list(args), capture_output=True, text=True)

  top, bottom = (
    priors["fashion_mnist_prior_top", "stage1"],
    priors["fashion_mnist_prior_bottom", "stage1"],
  )
  assert sample("--workdir", top, "--workdir", bottom).returncode == 0
  wrong = sample("--workdir", top, "--workdir", bottom, "--stage1", runs["other"])
  assert wrong.returncode != 0
  last = wrong.stderr.strip().splitlines()[-1]
  assert "was trained on codes of the stage-1 run" in last and "--allow_mismatch" in last
  mixed = sample("--workdir", top, "--workdir", priors["fashion_mnist_prior_bottom", "other"])
  assert mixed.returncode != 0 and "different stage-1 runs" in mixed.stderr
  forced = sample(
    "--workdir", top, "--workdir", bottom, "--stage1", runs["other"], "--allow_mismatch"
  )
  assert forced.returncode == 0, forced.stderr[-2000:]
  with pytest.raises(errors.UserError, match="--allow_mismatch"):
    hierarchy.Generator.from_runs(runs["other"], [top, bottom])
