"""The one-command pipeline (`python -m vqjax.pipeline`) end to end in its `:smoke` setting:
every stage's output, the report's numbers against what the stage outputs say, and a second run
that trains and draws nothing again."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import vqjax
from vqjax import config_checks, configs, pipeline, sample

SMOKE = os.path.join(os.path.dirname(pipeline.DEFAULT_CONFIG), "fashion_mnist.py")


def _load(variant: str = "smoke"):
  """The pipeline config file, loaded as the CLI's --config does."""
  spec = importlib.util.spec_from_file_location("pipeline_config", SMOKE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def _snapshot(workdir: str) -> dict[str, float]:
  """mtime of every checkpoint step and sample file: what a re-run must leave alone."""
  out = {}
  for name in ("stage1", "prior_top", "prior_bottom", "classifier"):
    ckpt = os.path.join(workdir, name, "checkpoints")
    for step in os.listdir(ckpt):
      out[f"{name}/{step}"] = os.path.getmtime(os.path.join(ckpt, step))
  for name in ("samples", "samples_rejection", "samples_eval"):
    path = os.path.join(workdir, name, "images.npz")
    out[path] = os.path.getmtime(path)
  for name in ("threshold_tradeoff.png", "temperature_tradeoff.png", "reconstructions.png"):
    path = os.path.join(workdir, "plots", name)
    out[path] = os.path.getmtime(path)
  return out


@pytest.fixture(scope="module")
def done(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pipeline") / "q")
  config = _load()
  for name in ("stage1", "prior_top", "prior_bottom", "classifier", "features"):
    config[name].log.tensorboard = False
  report = pipeline.Pipeline(config, workdir).run()
  return config, workdir, report


@pytest.mark.slow
def test_pipeline_runs_every_stage(done):
  config, workdir, report = done
  for name in ("stage1", "prior_top", "prior_bottom", "classifier"):
    assert report[name]["step"] == config[name].train.steps == 1
  # The priors were trained on the codes extracted here, with the stage-1 codebook.
  with open(os.path.join(workdir, "codes", "metadata.json")) as f:
    meta = json.load(f)
  # Runs of one pipeline workdir record each other relative to themselves: it can move.
  assert meta["stage1"]["workdir"] == "../stage1"
  assert meta["num_codes"] == config.stage1.vq.num_codes
  for name in ("prior_top", "prior_bottom"):
    with open(os.path.join(workdir, name, "config.json")) as f:
      saved = json.load(f)
    assert saved["data"]["codes_dir"] == "../codes"
    assert saved["prior"]["stage1"] == "../stage1"
  # Grids of the configured size, the rejection grid full too, of confident samples only.
  grid = Image.open(os.path.join(workdir, "samples", "samples.png"))
  assert grid.size[0] > 32 * 2
  images = np.load(os.path.join(workdir, "samples", "images.npz"))["image"]
  assert images.shape == (config.sample.num, 32, 32, 1) and images.dtype == np.uint8
  rejection = report["samples_rejection"]["rejection"]
  assert rejection["kept"] == config.sample.num <= rejection["accepted"]
  assert rejection["acceptance_rate"] == rejection["accepted"] / rejection["generated"]
  assert rejection["generated"] == rejection["batches"] * config.sample.num
  with np.load(os.path.join(workdir, "samples_rejection", "images.npz")) as saved:
    assert saved["image"].shape == (config.sample.num, 32, 32, 1)
    assert np.all(saved["score"] >= config.sample.threshold)
  # Sample quality of the unfiltered set; a higher threshold never keeps more samples.
  ev = report["evaluation"]
  assert ev["samples"]["num_samples"] == config.evaluate.num_samples
  assert np.isfinite(ev["samples"]["frechet_distance"]) and ev["samples"]["frechet_distance"] > 0
  rates = [row["acceptance_rate"] for row in ev["thresholds"]]
  thresholds = sorted({*config.evaluate.thresholds, config.sample.threshold})
  assert [row["threshold"] for row in ev["thresholds"]] == thresholds
  assert all(1.0 >= a >= b >= 0.0 for a, b in zip(rates, rates[1:]))
  # As many samples kept by rejection as unfiltered ones, judged by the evaluation network
  # (trained inside the workdir here), beside held-out real and blurred images of that count.
  assert ev["samples_rejection"]["num_samples"] == config.evaluate.num_samples
  features = os.path.join(workdir, "features")
  assert report["features"]["run"] == features and report["features"]["step"] == 1
  for name in ("samples", "samples_rejection"):
    assert ev[name]["features_run"] == features and ev[name]["features_step"] == 1
    for ref in ("real_images", "blurred_images"):
      assert np.isfinite(ev[name][f"{ref}/frechet_distance"])
    assert ev[name]["reference_count"] == config.evaluate.num_samples
  # The unigram baseline of each prior's level, from the extracted codes.
  for name in ("prior_top", "prior_bottom"):
    assert 0 < report[name]["unigram_bits_per_code"] <= report[name]["uniform_bits_per_code"] + 1
  assert [row["temperature"] for row in ev["temperatures"]] == list(config.evaluate.temperatures)
  for path in ev["plots"].values():
    with Image.open(path) as im:
      assert im.size[0] > 50 and im.size[1] > 50
  with open(os.path.join(workdir, "report.json")) as f:
    saved = json.load(f)["evaluation"]["samples"]
  assert saved.pop("class_shares") == ev["samples"]["class_shares"]
  numbers = {k: v for k, v in ev["samples"].items() if k != "class_shares"}
  assert saved == pytest.approx(numbers, nan_ok=True)
  table = open(os.path.join(workdir, "report.md")).read()
  assert "frechet_distance" in table and "| total |" in table
  assert "held-out real images" in table and "blurred" in table and "unigram" in table


@pytest.mark.slow
def test_a_second_run_trains_draws_and_evaluates_nothing_again(done):
  """A finished pipeline run again only reprints its report: no checkpoint, sample set or plot
  is rewritten, and the time table keeps the times of the run that did the work."""
  config, workdir, first = done
  before = _snapshot(workdir)
  report = pipeline.Pipeline(config, workdir).run()
  assert _snapshot(workdir) == before
  assert report["stage1"]["step"] == 1
  assert report["stages"] == first["stages"] and report["seconds"] == first["seconds"]
  assert (
    report["evaluation"]["samples"]["num_samples"] == first["evaluation"]["samples"]["num_samples"]
  )


@pytest.mark.slow
def test_a_copied_pipeline_workdir_works_without_the_original(done, tmp_path):
  """A pipeline workdir copied elsewhere (the original out of reach) loads its priors with the
  copy's codes and stage-1 run, re-runs without training or drawing anything again, and samples
  from its own runs."""
  config, workdir, _ = done
  copy = str(tmp_path / "moved")
  shutil.copytree(workdir, copy)
  hidden = workdir + ".hidden"
  os.rename(workdir, hidden)
  try:
    loaded = vqjax.load_run(os.path.join(copy, "prior_bottom"))[0]
    assert loaded.data.codes_dir == os.path.join(copy, "codes")
    assert loaded.prior.stage1 == os.path.join(copy, "stage1")
    before = _snapshot(copy)
    pipeline.Pipeline(config, copy).run()
    assert _snapshot(copy) == before
    out = os.path.join(copy, "samples_again")
    priors = [os.path.join(copy, "prior_top"), os.path.join(copy, "prior_bottom")]
    sample.run(priors, out, num=2)  # the stage-1 run named by the priors' own records
    with open(os.path.join(out, "settings.json")) as f:
      settings = json.load(f)
    assert settings["stage1"] == "../stage1"
    assert settings["priors"] == ["../prior_top", "../prior_bottom"]
  finally:
    os.rename(hidden, workdir)
  assert not os.path.exists(hidden)


@pytest.mark.slow
def test_a_prior_trained_on_redraws_the_samples_from_it(done):
  """Samples are stale once a run they came from trains on: a rerun with one more top-prior
  step redraws every sample set from the new checkpoint (settings.json records the steps)."""
  config, workdir, _ = done
  config = config.copy_and_resolve_references()  # the fixture's stays as it was
  config.prior_top.train.steps += 1
  before = _snapshot(workdir)
  pipeline.Pipeline(config, workdir).run()
  after = _snapshot(workdir)
  for name in ("samples", "samples_rejection", "samples_eval"):
    path = os.path.join(workdir, name, "images.npz")
    assert after[path] != before[path], name
    with open(os.path.join(workdir, name, "settings.json")) as f:
      assert json.load(f)["steps"]["priors"] == [2, 1]
  assert after["stage1/1"] == before["stage1/1"]  # nothing upstream trained again


def test_prior_config_points_at_the_pipeline_codes(tmp_path):
  prior = configs.load_experiment("fashion_mnist_prior_bottom:smoke")  # synthetic codes
  c = pipeline.prior_config(prior, str(tmp_path / "codes"), 128)
  assert c.data.name == "codes" and c.data.codes_dir == str(tmp_path / "codes")
  assert c.vq.num_codes == 128 and prior.vq.num_codes == 32  # a copy; the original is kept
  config_checks.validate(c)  # the synthetic-code fields are back at their defaults


@pytest.mark.slow
def test_cli_bad_input_is_one_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for args, want in (
    ([], "--workdir is required"),
    (
      [f"--config={SMOKE}:smoke", f"--workdir={tmp_path}", "--config.sample.nmu=3"],
      "nmu",
    ),
  ):
    proc = subprocess.run(
      [sys.executable, "-m", "vqjax.pipeline", *args],
      capture_output=True,
      text=True,
      env=env,
      timeout=120,
    )
    assert proc.returncode != 0
    assert want in proc.stderr, proc.stderr


def test_a_stage_stopped_by_a_signal_stops_the_pipeline_unfinished(tmp_path, monkeypatch, capsys):
  """A training stage that a SIGTERM stopped is not done: no later stage runs on its
  half-trained model, and the CLI exits 128 + 15 with one line saying how to resume."""
  import signal

  from vqjax import errors, extract_codes
  from vqjax.training import trainer

  calls = []
  monkeypatch.setattr(
    trainer,
    "train_and_evaluate",
    lambda config, workdir, **kwargs: (
      calls.append(workdir) or {"step": 22.0, "stopped": signal.SIGTERM}
    ),
  )
  monkeypatch.setattr(extract_codes, "extract", lambda *a, **k: pytest.fail("codes extracted"))
  pipe = pipeline.Pipeline(_load(), str(tmp_path / "p"))
  with pytest.raises(SystemExit) as e, errors.one_line("vqjax.pipeline"):
    pipe.run()
  assert e.value.code == 128 + signal.SIGTERM
  assert calls == [str(tmp_path / "p" / "stage1")]
  err = capsys.readouterr().err.strip()
  steps = _load().stage1.train.steps
  assert err == (
    f"vqjax.pipeline: stage stage1 stopped at step 22 of {steps} (SIGTERM), checkpoint saved; "
    "run the same command to resume"
  )


def test_a_stage_found_complete_keeps_the_time_recorded_when_it_ran(tmp_path):
  """The time table is of the runs that did each stage's work: a stage that finds its output
  complete keeps the recorded time, one that works gets its new time, and report.json is
  written after every stage."""
  workdir = tmp_path / "p"
  workdir.mkdir()
  (workdir / "report.json").write_text(json.dumps({"stages": {"old": 42.0, "redone": 42.0}}))
  pipe = pipeline.Pipeline(_load(), str(workdir))

  def complete():
    pipe._complete = True

  pipe._stage("old", complete)
  pipe._stage("redone", lambda: None)
  pipe._stage("new", complete)  # complete, but no time was recorded: the one measured now
  stages = pipe.report["stages"]
  assert stages["old"] == 42.0 and stages["redone"] < 42.0 and stages["new"] < 42.0
  assert json.loads((workdir / "report.json").read_text())["stages"] == stages
