"""End to end: `vqjax.sample` over prior runs trained by the trainer and a stage-1 model on
disk: files written, the same seed gives the same samples, and the codes decode to the PNG and
to images.npz; with a classifier run (one trainer step), the rejection scores, and the sample
quality statistics and trade-offs of vqjax/evaluate.py against the classifier's own outputs
and NumPy."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import vqjax
from vqjax import configs, convert, errors, evaluate, sample
from vqjax.data import pipeline
from vqjax.evaluation import frechet
from vqjax.models import registry
from vqjax.sampling import hierarchy
from vqjax.training import logs, trainer

pytestmark = pytest.mark.slow  # end to end: trains priors and a classifier, runs the CLI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    config = configs.load_experiment(f"{name}:smoke")  # synthetic 4x4 / 8x8 codes, K=32
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
  assert saved["codes0"].shape == (5, 4, 4) and saved["codes1"].shape == (5, 8, 8)
  np.testing.assert_array_equal(saved["label"], [2] * 5)  # the top prior is class-conditional
  # The checkpoint steps sampled from (none for the converted stage-1 model): what makes samples
  # stale when a prior trains on.
  trained = [
    configs.load_experiment(f"{n}:smoke").train.steps
    for n in ("fashion_mnist_prior_top", "fashion_mnist_prior_bottom")
  ]
  assert settings["steps"] == {"stage1": None, "priors": trained}
  assert settings["requested"] == 5 and settings["min_acceptance"] is None
  # The grid shows the decoded codes: 3 x 3 cells of 32 px, the last 4 blank.
  images = model.apply(
    variables,
    (jnp.asarray(saved["codes0"]), jnp.asarray(saved["codes1"])),
    method="decode_from_indices",
  )
  grid = np.asarray(Image.open(os.path.join(out, "samples.png")))
  expected = logs.to_uint8(np.clip(np.asarray(images), -1, 1))
  np.testing.assert_array_equal(grid[2:34, 2:34], expected[0, ..., 0])
  saved_images = np.load(os.path.join(out, "images.npz"))
  np.testing.assert_array_equal(saved_images["image"], expected)
  np.testing.assert_array_equal(saved_images["label"], [2] * 5)
  assert "score" not in saved_images
  again = str(tmp_path / "again")
  sample.run(priors, again, num=5, seed=3, stage1=stage1, label=2)
  np.testing.assert_array_equal(
    np.load(os.path.join(again, "codes.npz"))["codes1"], saved["codes1"]
  )


def test_sample_cli_errors(runs, tmp_path, monkeypatch):
  stage1, priors, _, _ = runs
  # Settings no sampler can use, all named in one line before any run is read.
  monkeypatch.setattr("vqjax.runs.load_run_with_step", lambda *a, **k: pytest.fail("loaded"))
  with pytest.raises(errors.UserError) as e:
    sample.run(
      priors,
      str(tmp_path / "x"),
      num=0,
      stage1=stage1,
      temperature=-1.0,
      top_k=-2,
      top_p=0.0,
      classifier=stage1,
      threshold=1.5,
      min_acceptance=0.0,
    )
  assert str(e.value) == (
    "--num 0: at least 1; --temperature -1.0: above 0; --top_k -2: 0 (off) or more; "
    "--top_p 0.0: in (0, 1]; --threshold 1.5: in (0, 1]; --min_acceptance 0.0: in (0, 1]"
  )
  # A minimum acceptance rate is a share of the samples generated: in (0, 1], NaN refused.
  for bad in (-0.1, 1.5, float("nan"), float("inf")):
    with pytest.raises(errors.UserError) as e:
      sample.run(
        priors, str(tmp_path / "x"), num=2, stage1=stage1, classifier=stage1, min_acceptance=bad
      )
    assert str(e.value) == f"--min_acceptance {bad}: in (0, 1]"
  monkeypatch.undo()
  with pytest.raises(errors.UserError, match="one prior per level"):
    sample.run(priors[:1], str(tmp_path / "x"), num=2, stage1=stage1)
  with pytest.raises(errors.UserError, match="not trained on extracted codes"):
    sample.run(priors, str(tmp_path / "x"), num=2)  # synthetic codes name no stage-1 run


# --- With a classifier run: rejection scores, sample quality, trade-offs -------------------


@pytest.fixture(scope="module")
def judge(runs, tmp_path_factory):
  """A classifier run after one trainer step, a direct (features, probabilities) function of
  it, and the real eval set of the stage-1 run with its direct features."""
  path = str(tmp_path_factory.mktemp("clf") / "run")
  config = configs.load_experiment("classifier_fashion_mnist:smoke")
  config.log.update(tensorboard=False, eval_every_steps=0)
  trainer.train_and_evaluate(config, path)
  _, clf, clf_vars = vqjax.load_run(path)
  direct = jax.jit(lambda x: (clf.apply(clf_vars, x, method="features"), clf.apply(clf_vars, x)))

  def features_and_probs(x):
    """float64 features and softmax probabilities of float images in [-1, 1]."""
    f, logits = direct(jnp.asarray(x, jnp.float32))
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return np.asarray(f, np.float64), p / p.sum(axis=1, keepdims=True)

  stage1_config = configs.load_experiment("fashion_mnist:smoke")  # eval split test[:16]
  batches = list(pipeline.make_eval_iterator(stage1_config.data))
  real = np.concatenate([b["image"][b["mask"] > 0] for b in batches])
  real_labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
  return path, features_and_probs, features_and_probs(real)[0], real_labels


def _in_manifold(reference: np.ndarray, queries: np.ndarray, k: int = 3) -> np.ndarray:
  """Whether each query lies within some reference sample's distance to its k-th neighbour
  (float64 full distance matrices: the definition of Kynkaanniemi et al., read directly)."""
  radii = np.sort(np.linalg.norm(reference[:, None] - reference[None], axis=-1), axis=1)[:, k]
  d = np.linalg.norm(queries[:, None] - reference[None], axis=-1)
  return (d <= radii[None]).any(axis=1)


def _to_float(images: np.ndarray) -> np.ndarray:
  return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _random_samples(directory, stage1: str, shape=(10, 32, 32, 1), labelled=True) -> tuple:
  """A samples directory of random uint8 images (and labels) naming `stage1`."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, shape, dtype=np.uint8)
  labels = rng.integers(0, 10, shape[0]).astype(np.int32)
  directory.mkdir()
  np.savez(directory / "images.npz", image=images, **({"label": labels} if labelled else {}))
  (directory / "settings.json").write_text(json.dumps({"stage1": stage1, "classifier": None}))
  return str(directory), images, labels


def test_rejection_sampling_fills_the_grid_and_keeps_the_scores(runs, judge, tmp_path):
  stage1, priors, model, variables = runs
  clf, features_and_probs, _, _ = judge
  out = str(tmp_path / "r")
  # The classifier after one step gives every class (labels 0-4 here) more than 0.05.
  settings = sample.run(
    priors, out, num=5, seed=1, stage1=stage1, classifier=clf, threshold=0.05, min_acceptance=0.5
  )
  saved = np.load(os.path.join(out, "images.npz"))
  codes = np.load(os.path.join(out, "codes.npz"))
  rejection = settings["rejection"]
  assert len(saved["image"]) == settings["num"] == settings["requested"] == rejection["kept"] == 5
  np.testing.assert_array_equal(saved["label"], np.arange(5))  # each slot holds its class
  assert settings["min_acceptance"] == 0.5 and rejection["max_batches"] == 2  # 10 samples
  trained = configs.load_experiment("classifier_fashion_mnist:smoke").train.steps
  assert settings["steps"]["classifier"] == trained
  # Each kept score is the classifier's probability of the sample's label, computed here from
  # the sample's codes decoded again.
  images = model.apply(
    variables,
    (jnp.asarray(codes["codes0"]), jnp.asarray(codes["codes1"])),
    method="decode_from_indices",
  )
  probs = features_and_probs(np.clip(np.asarray(images), -1, 1))[1]
  expected = probs[np.arange(5), saved["label"]]
  np.testing.assert_allclose(saved["score"], expected, rtol=1e-4, atol=1e-6)
  assert np.all(saved["score"] >= 0.05)
  # One acceptance rate: the share of every generated sample (batches of 5) that passed.
  everything = saved["generated_score"]
  assert len(everything) == rejection["generated"] == 5 * rejection["batches"]
  assert rejection["accepted"] == np.sum(everything >= 0.05)
  assert rejection["acceptance_rate"] == pytest.approx(np.mean(everything >= 0.05))
  with open(os.path.join(out, "settings.json")) as f:
    assert json.load(f)["rejection"] == rejection


def test_a_spent_rejection_budget_is_one_line_and_writes_nothing(runs, judge, tmp_path):
  stage1, priors, _, _ = runs
  clf = judge[0]
  out = str(tmp_path / "r")
  # At threshold 0.1 the one-step classifier never accepts some labels: the budget of
  # ceil(5 / 0.5) = 10 samples (2 batches of 5) is spent with slots still empty.
  with pytest.raises(SystemExit) as caught, errors.one_line("vqjax.sample"):
    sample.run(
      priors, out, num=5, seed=1, stage1=stage1, classifier=clf, threshold=0.1, min_acceptance=0.5
    )
  message = str(caught.value.code)
  found = re.fullmatch(
    r"vqjax\.sample: RejectionBudgetError: rejection sampling kept (\d) of 5 wanted samples: "
    r"(\d+) of 10 generated passed threshold 0\.1 \(acceptance rate ([\d.]+)\), and the minimum "
    r"acceptance rate 0\.5 allows at most 10 generated \(2 batches of 5\); the empty slots want "
    r"label\(s\) ([\d, ]+); lower --threshold or --min_acceptance",
    message,
  )
  assert found, message
  kept, passed, rate, missing = int(found[1]), int(found[2]), float(found[3]), found[4]
  assert kept < 5 and passed >= kept and rate == pytest.approx(passed / 10)
  assert len(missing.split(", ")) == 5 - kept  # one label named per empty slot
  assert not os.path.exists(out)  # no partial grid


def _inception_score(probs: np.ndarray, splits: int) -> float:
  n = len(probs) // splits
  scores = []
  for i in range(splits):
    p = probs[i * n : (i + 1) * n]
    kl = np.sum(p * (np.log(p) - np.log(p.mean(axis=0, keepdims=True))), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores))


def test_evaluate_samples_matches_a_direct_computation(runs, judge, tmp_path):
  stage1 = runs[0]
  clf, features_and_probs, real_f, real_labels = judge
  directory, images, labels = _random_samples(tmp_path / "s", stage1, shape=(20, 32, 32, 1))
  # Precision / recall, IS and CAS on 20 samples (the default asks for 100).
  result = evaluate.evaluate_samples(directory, clf, min_samples=4)
  gen_f, gen_p = features_and_probs(_to_float(images))
  assert result["num_samples"] == 20 and result["num_real"] == 16
  # The judge is named, and held-out real and blurred images of the same count stand beside.
  assert result["features_run"] == os.path.abspath(clf) and result["features_step"] is not None
  assert result["reference_count"] == 20
  assert result["fd_ratio_to_blurred"] == pytest.approx(
    result["frechet_distance"] / result["blurred_images/frechet_distance"]
  )
  # At the default minimum, 20 samples are too few for precision / recall: NaN and a note.
  default = evaluate.evaluate_samples(directory, clf)
  assert math.isnan(default["precision"]) and "100" in default["note"]
  assert default["frechet_distance"] == pytest.approx(result["frechet_distance"])
  fd = frechet.frechet_distance_from_features(real_f, gen_f)
  assert fd > 0 and math.isclose(result["frechet_distance"], fd, rel_tol=1e-4)
  assert result["precision"] == pytest.approx(np.mean(_in_manifold(real_f, gen_f)))
  assert result["recall"] == pytest.approx(np.mean(_in_manifold(gen_f, real_f)))
  # 10 splits of 2 samples each.
  assert result["inception_score"] == pytest.approx(_inception_score(gen_p, 10), rel=1e-4)
  assert result["inception_score"] > 1.0
  cas = frechet.classification_accuracy_score(gen_f, labels, real_f, real_labels, num_classes=10)
  assert result["classification_accuracy_score"] == pytest.approx(cas, abs=1e-9)
  # max_real caps the real set (the first images of the split).
  capped = evaluate.evaluate_samples(directory, clf, max_real=8, min_samples=4)
  assert capped["num_real"] == 8
  fd8 = frechet.frechet_distance_from_features(real_f[:8], gen_f)
  assert math.isclose(capped["frechet_distance"], fd8, rel_tol=1e-4)


def test_threshold_tradeoff_acceptance_and_kept_statistics(runs, judge, tmp_path):
  clf, features_and_probs, real_f, _ = judge
  directory, images, labels = _random_samples(tmp_path / "s", runs[0])
  gen_f, gen_p = features_and_probs(_to_float(images))
  scores = gen_p[np.arange(10), labels]
  s = np.sort(scores)
  # Midpoints between sorted scores keep 9, 3 and 1 samples (no score sits on a threshold).
  thresholds = [(s[0] + s[1]) / 2, (s[6] + s[7]) / 2, (s[8] + s[9]) / 2]
  png = str(tmp_path / "t.png")
  rows = evaluate.threshold_tradeoff(directory, clf, thresholds, png, features=clf, min_samples=4)
  assert [r["kept"] for r in rows] == [9, 3, 1]
  for row, t in zip(rows, thresholds, strict=True):
    assert row["acceptance_rate"] == pytest.approx(np.mean(scores >= t))
  keep = scores >= thresholds[0]
  fd = frechet.frechet_distance_from_features(real_f, gen_f[keep])
  assert math.isclose(rows[0]["frechet_distance"], fd, rel_tol=1e-4) and "note" not in rows[0]
  assert rows[0]["precision"] == pytest.approx(np.mean(_in_manifold(real_f, gen_f[keep])))
  # 3 kept: the Frechet distance only; 1 kept: nothing. The rows say why.
  fd3 = frechet.frechet_distance_from_features(real_f, gen_f[scores >= thresholds[1]])
  assert math.isclose(rows[1]["frechet_distance"], fd3, rel_tol=1e-4)
  assert math.isnan(rows[1]["precision"]) and "precision / recall" in rows[1]["note"]
  assert math.isnan(rows[2]["frechet_distance"]) and "no statistics" in rows[2]["note"]
  with Image.open(png) as im:
    assert im.format == "PNG" and im.size == (800, 300)  # two 400 x 300 panels
  # Unlabelled samples are scored by their top class.
  plain, _, _ = _random_samples(tmp_path / "u", runs[0], labelled=False)
  top = gen_p.max(axis=1)
  t = float(np.median(top))
  (row,) = evaluate.threshold_tradeoff(plain, clf, [t], str(tmp_path / "u.png"), features=clf)
  assert row["acceptance_rate"] == pytest.approx(np.mean(top >= t))


def test_temperature_tradeoff_draws_what_the_generator_draws(runs, judge, tmp_path):
  from vqjax.sampling import hierarchy
  from vqjax.training import logs as train_logs

  stage1, priors, _, _ = runs
  clf, features_and_probs, real_f, _ = judge
  png = str(tmp_path / "temp.png")
  rows = evaluate.temperature_tradeoff(
    priors, clf, [0.5, 1.0], 5, png, seed=2, stage1=stage1, min_samples=4
  )
  assert [r["temperature"] for r in rows] == [0.5, 1.0]
  assert all(r["num_samples"] == 5 for r in rows)
  # The samples at temperature 1 are those of Generator.generate with the same seed and the
  # cycled labels, as a PNG would hold them.
  gen = hierarchy.Generator.from_runs(stage1, priors)
  images, _ = gen.generate(5, jax.random.key(2), np.arange(5) % 10, temperature=1.0)
  gen_f, _ = features_and_probs(_to_float(train_logs.to_uint8(np.asarray(images))))
  fd = frechet.frechet_distance_from_features(real_f, gen_f)
  assert math.isclose(rows[1]["frechet_distance"], fd, rel_tol=1e-4)
  assert rows[1]["precision"] == pytest.approx(np.mean(_in_manifold(real_f, gen_f)))
  assert rows[0]["frechet_distance"] != rows[1]["frechet_distance"]
  with Image.open(png) as im:
    assert im.format == "PNG" and im.size == (800, 300)


def test_sample_quality_errors(runs, judge, tmp_path):
  stage1, priors, _, _ = runs
  clf = judge[0]
  small, _, _ = _random_samples(tmp_path / "small", stage1, shape=(6, 16, 16, 1))
  with pytest.raises(errors.UserError, match="takes 32x32x1 images, the samples in .* are 16x16x1"):
    evaluate.evaluate_samples(small, clf)
  few, _, _ = _random_samples(tmp_path / "few", stage1, shape=(3, 32, 32, 1))
  with pytest.raises(errors.UserError, match="holds 3 samples"):
    evaluate.evaluate_samples(few, clf)
  filtered, _, _ = _random_samples(tmp_path / "r", stage1)
  with open(os.path.join(filtered, "settings.json"), "w") as f:
    json.dump({"stage1": stage1, "classifier": clf, "threshold": 0.9}, f)
  with pytest.raises(errors.UserError, match="already filtered by rejection sampling"):
    evaluate.threshold_tradeoff(filtered, clf, [0.5], str(tmp_path / "x.png"), features=clf)
  with pytest.raises(errors.UserError, match="num must be > 3"):
    evaluate.temperature_tradeoff(priors, clf, [1.0], 3, str(tmp_path / "y.png"), stage1=stage1)


# --- Runs of the wrong kind -----------------------------------------------------------------


def test_sample_names_a_run_of_the_wrong_kind_before_loading_any(
  runs, judge, tmp_path, monkeypatch
):
  stage1, priors, _, _ = runs
  clf, out = judge[0], str(tmp_path / "x")

  def no_loading(*args, **kwargs):
    raise AssertionError("weights were loaded before the runs' kinds were checked")

  # The kinds come from the runs' configs: no weights are read, no sample is drawn.
  monkeypatch.setattr("vqjax.runs.load_run", no_loading)
  monkeypatch.setattr("vqjax.runs.load_run_with_step", no_loading)

  def error(stage1_run, classifier="", workdirs=None):
    with pytest.raises(errors.UserError) as caught:
      sample.run(workdirs or priors, out, num=2, stage1=stage1_run, classifier=classifier)
    return str(caught.value)

  not_clf = "--classifier: {} is not a classifier run (its task is {!r})"
  assert error(stage1, classifier=stage1) == not_clf.format(stage1, "autoencoder")
  assert error(stage1, classifier=priors[0]) == not_clf.format(priors[0], "prior")
  not_ae = "--stage1: {} is not a stage-1 autoencoder run (its task is {!r})"
  assert error(priors[0]) == not_ae.format(priors[0], "prior")
  assert error(clf) == not_ae.format(clf, "classifier")
  assert error(stage1, workdirs=[stage1, priors[1]]) == (
    f"--workdir: {stage1} is not a prior run (its task is 'autoencoder')"
  )
  assert not os.path.exists(out)


def test_generator_from_runs_names_a_stage1_run_of_the_wrong_kind(runs, judge, tmp_path):
  stage1, priors, _, _ = runs
  clf = judge[0]
  for wrong, task in ((clf, "classifier"), (priors[1], "prior")):
    with pytest.raises(errors.UserError) as caught:
      hierarchy.Generator.from_runs(wrong, priors)
    assert (
      str(caught.value)
      == f"stage1: {wrong} is not a stage-1 autoencoder run (its task is {task!r})"
    )
  with pytest.raises(errors.UserError, match=f"priors: {stage1} is not a prior run"):
    hierarchy.Generator.from_runs(stage1, [stage1, priors[1]])
  # A checkpoints/ directory without the run's config.json: the kind is that of the config the
  # checkpoint records, checked once loaded and still before any sample is drawn.
  bare = tmp_path / "bare" / "checkpoints"
  shutil.copytree(os.path.join(clf, "checkpoints"), bare)
  assert hierarchy.run_task(str(bare)) is None and hierarchy.run_task(clf) == "classifier"
  with pytest.raises(errors.UserError) as caught:
    hierarchy.Generator.from_runs(str(bare), priors)
  assert str(caught.value) == (
    f"stage1: {bare} is not a stage-1 autoencoder run (its task is 'classifier')"
  )
  # The same for the classifier of rejection sampling (a prior's checkpoints/ here).
  bare_prior = tmp_path / "prior" / "checkpoints"
  shutil.copytree(os.path.join(priors[0], "checkpoints"), bare_prior)
  out = str(tmp_path / "y")
  with pytest.raises(errors.UserError) as caught:
    sample.run(priors, out, num=2, stage1=stage1, classifier=str(bare_prior))
  assert str(caught.value) == (
    f"--classifier: {bare_prior} is not a classifier run (its task is 'prior')"
  )
  assert not os.path.exists(out)


def test_sample_cli_prints_one_line_for_a_run_of_the_wrong_kind(runs, tmp_path):
  stage1, priors, _, _ = runs
  env = dict(
    os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
  )
  args = [f"--workdir={p}" for p in priors] + [f"--stage1={stage1}", f"--classifier={priors[0]}"]
  result = subprocess.run(
    [sys.executable, "-m", "vqjax.sample", *args, "--num=2", f"--out={tmp_path / 'x'}"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
  assert result.stderr.strip() == (
    f"vqjax.sample: UserError: --classifier: {priors[0]} is not a classifier run "
    "(its task is 'prior')"
  )


def test_sample_cli_prints_one_line_for_a_bad_min_acceptance(tmp_path):
  env = dict(
    os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
  )
  # Refused before any run is read: the paths need not exist.
  args = ["--workdir=top", "--workdir=bottom", "--classifier=clf", "--min_acceptance=nan"]
  result = subprocess.run(
    [sys.executable, "-m", "vqjax.sample", *args, f"--out={tmp_path / 'x'}"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
  assert result.stderr.strip() == "vqjax.sample: UserError: --min_acceptance nan: in (0, 1]"
  assert not os.path.exists(tmp_path / "x")
