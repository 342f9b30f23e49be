"""benchmarks/anomaly.py end to end: one class of each protocol at the smoke size (a few steps of
every stage on the real Fashion-MNIST idx files), its JSON line checked against the labels
read straight from the idx file; and its argument mistakes."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vqjax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist"
SCORES = (
  "recon_max",
  "recon_mean",
  "knn",
  "knn_pixels",
  "nll_level0",
  "nll_level1",
  "nll",
  "nll_ratio",
  "restoration_max",
  "rotation",
  "rotation_nll",
)


def _idx_images(name: str, n: int) -> np.ndarray:
  """The first n images of an idx file as float64 [n, 784] (header: 16 bytes)."""
  with gzip.open(os.path.join(FMNIST, name)) as f:
    return np.frombuffer(f.read()[16 : 16 + n * 784], np.uint8).reshape(n, 784).astype(float)


def _bench(*args, timeout=900):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, "benchmarks", "anomaly.py"), *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def test_argument_mistakes_are_usage_errors(tmp_path):
  for bad in ("--classes=10", "--classes=bag", "--classes=,"):
    out = _bench("--protocol=one-class", bad, f"--workdir={tmp_path}", timeout=60)
    assert out.returncode == 2 and "--classes must be" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
  out = _bench("--protocol=one-class", "--seed=-1", f"--workdir={tmp_path}", timeout=60)
  assert out.returncode == 2 and "--seed must be >= 0" in out.stderr, out.stderr
  out = _bench("--protocol=two-class", timeout=60)
  assert out.returncode == 2 and "invalid choice" in out.stderr


def _load_benchmark():
  """benchmarks/anomaly.py as a module (it is a script, not part of the package)."""
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    "anomaly_benchmark", os.path.join(ROOT, "benchmarks", "anomaly.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_a_workdir_that_is_a_file_is_a_one_line_error(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("not a directory")
  out = _bench("--protocol=one-class", "--classes=8", "--size=smoke", f"--workdir={afile}")
  assert out.returncode == 1, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  (last,) = out.stderr.strip().splitlines()[-1:]
  assert last.startswith("benchmarks/anomaly.py: ") and str(afile) in last, out.stderr


def test_a_model_stopped_by_a_signal_stops_the_benchmark(tmp_path, monkeypatch, capsys):
  """The trainer saves and returns on SIGINT; the benchmark must not go on to the next model
  (or score with this one half-trained): it exits 130 and writes no line."""
  import argparse
  import signal

  from vqjax import errors
  from vqjax.training import trainer

  bench = _load_benchmark()
  calls = []
  monkeypatch.setattr(trainer, "setup_compilation_cache", lambda path: None)
  monkeypatch.setattr(
    trainer,
    "train_and_evaluate",
    lambda config, workdir, **kwargs: (
      calls.append(workdir) or {"step": 1.0, "stopped": signal.SIGINT}
    ),
  )
  args = argparse.Namespace(
    protocol="one-class", size="smoke", seed=0, workdir=str(tmp_path), out=""
  )
  with pytest.raises(SystemExit) as e, errors.one_line("benchmarks/anomaly.py"):
    bench._run(args, [8])
  assert e.value.code == 128 + signal.SIGINT
  assert len(calls) == 1 and calls[0].endswith("stage1"), calls
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("benchmarks/anomaly.py: ") and "run the same command to go on" in err
  assert not os.path.exists(tmp_path / "one-class_smoke.jsonl")


def test_a_class_run_again_replaces_its_line(tmp_path):
  bench = _load_benchmark()
  path = str(tmp_path / "lines.jsonl")
  line = lambda k, auc, seed=0: {
    "protocol": "one-class",
    "size": "smoke",
    "seed": seed,
    "class": k,
    "auc": {"knn": auc},
  }
  for each in (line(8, 0.1), line(2, 0.2), line(8, 0.3), line(8, 0.4, seed=1)):
    bench.write_line(path, each)
  with open(path) as f:
    got = [json.loads(s) for s in f]
  assert got == [line(2, 0.2), line(8, 0.3), line(8, 0.4, seed=1)]
  assert os.listdir(tmp_path) == ["lines.jsonl"]  # no temporary file left


def _smoke_bag_run(protocol: str, tmp_path):
  """Runs `protocol` for class 8 (bags) at the smoke size into tmp_path; returns (the process,
  its JSON line, the labels of the 64 test images the smoke size scores, from the idx file)."""
  if not sources.fashion_mnist_files_exist(FMNIST):
    pytest.skip("Fashion-MNIST idx files not installed (apt install dataset-fashion-mnist)")
  out = _bench(
    f"--protocol={protocol}", "--classes=8", "--size=smoke", f"--workdir={tmp_path}", timeout=1500
  )
  assert out.returncode == 0, out.stderr[-3000:]
  with open(tmp_path / f"{protocol}_smoke.jsonl") as f:
    (line,) = [json.loads(s) for s in f]
  with gzip.open(os.path.join(FMNIST, "t10k-labels-idx1-ubyte.gz")) as f:
    labels = np.frombuffer(f.read()[8:], np.uint8)[:64]
  return out, line, labels


@pytest.mark.slow
def test_one_class_smoke_run_writes_a_line_per_class(tmp_path):
  # Bags (8) are the normal class.
  out, line, labels = _smoke_bag_run("one-class", tmp_path)
  # knn_pixels from the idx files alone: the first 32 bags of train[:512] are the bank, the
  # score the mean distance to the 5 nearest (padding and the [-1, 1] scale change no rank).
  with gzip.open(os.path.join(FMNIST, "train-labels-idx1-ubyte.gz")) as f:
    train_labels = np.frombuffer(f.read()[8:], np.uint8)[:512]
  bank = _idx_images("train-images-idx3-ubyte.gz", 512)[train_labels == 8][:32]
  test = _idx_images("t10k-images-idx3-ubyte.gz", 64)
  dist = np.sqrt(((test[:, None] - bank[None]) ** 2).sum(-1))
  knn = np.sort(dist, axis=1)[:, :5].mean(axis=1)
  a, n = knn[labels != 8][:, None], knn[labels == 8][None, :]
  assert np.isclose(line["auc"]["knn_pixels"], np.mean((a > n) + 0.5 * (a == n)))
  # The per-image scores kept beside the run give the line's AUCs again, and knn_pixels is the
  # distance computed above on the [-1, 1] scale (255 grey levels span 2; padding adds nothing).
  saved = np.load(tmp_path / "one-class_smoke" / "class8" / "scores.npz")
  np.testing.assert_array_equal(saved["labels"], labels)
  np.testing.assert_allclose(saved["test_knn_pixels"], knn * 2 / 255, rtol=1e-4)
  for name in ("nll", "rotation", "combined", "combined_rotation"):
    s = saved[f"test_{name}"]
    a, n = s[labels != 8][:, None], s[labels == 8][None, :]
    assert np.isclose(line["auc"][name], np.mean((a > n) + 0.5 * (a == n))), name
  for name in ("knn", "nll_ratio", "rotation"):
    assert len(saved[f"ref_{name}"]) == 16, name
  # The combinations: mean z-scores, each score standardised on the 16 normal training images.
  z = {
    k: (saved[f"test_{k}"] - saved[f"ref_{k}"].mean()) / saved[f"ref_{k}"].std()
    for k in ("knn", "nll_ratio", "rotation")
  }
  np.testing.assert_allclose(saved["test_combined"], (z["knn"] + z["nll_ratio"]) / 2, rtol=1e-6)
  np.testing.assert_allclose(
    saved["test_combined_rotation"], (z["knn"] + z["nll_ratio"] + z["rotation"]) / 3, rtol=1e-6
  )
  assert line["num_normal"] == int(np.sum(labels == 8)) > 0
  assert line["num_anomalous"] == int(np.sum(labels != 8))
  assert (line["protocol"], line["class"], line["name"], line["seed"]) == ("one-class", 8, "bag", 0)
  assert set(line["auc"]) == set(SCORES) | {"combined", "combined_rotation"}
  for name, auc in line["auc"].items():
    assert 0.0 <= auc <= 1.0, name
  assert set(line["seconds"]) == {"stage1", "codes", "priors", "rotation_priors", "score"}
  # The progress line and the table's mean row.
  assert "[1/1] one-class class 8 (bag):" in out.stdout
  assert f"| 8 bag | {line['auc']['recon_max']:.3f} |" in out.stdout
  assert "| mean of 1 |" in out.stdout
  # Run again: every model is found complete and reused, the scores come out the same, and the
  # class's line is replaced, not written twice.
  again = _bench(
    "--protocol=one-class", "--classes=8", "--size=smoke", f"--workdir={tmp_path}", timeout=600
  )
  assert again.returncode == 0, again.stderr[-3000:]
  with open(tmp_path / "one-class_smoke.jsonl") as f:
    (second,) = [json.loads(s) for s in f]
  assert second["auc"] == line["auc"]


@pytest.mark.slow
def test_leave_one_out_smoke_run_adds_the_classifier_scores(tmp_path):
  out, line, labels = _smoke_bag_run("leave-one-out", tmp_path)
  is_anomaly = labels == 8  # bags held out, the nine other classes normal
  assert set(line["auc"]) == set(SCORES) | {
    "combined",
    "combined_rotation",
    "classifier",
    "combined_classifier",
    "mahalanobis",
    "combined_mahalanobis",
  }
  assert set(line["seconds"]) == {
    "stage1",
    "codes",
    "priors",
    "rotation_priors",
    "classifier",
    "score",
  }
  saved = np.load(tmp_path / "leave-one-out_smoke" / "class8" / "scores.npz")
  np.testing.assert_array_equal(saved["labels"], labels)
  for name in ("classifier", "combined_classifier", "mahalanobis", "combined_mahalanobis"):
    s = saved[f"test_{name}"]
    a, n = s[is_anomaly][:, None], s[~is_anomaly][None, :]
    assert np.isclose(line["auc"][name], np.mean((a > n) + 0.5 * (a == n))), name
  # One minus a maximum softmax probability over nine classes lies in [0, 8/9].
  assert np.all((saved["test_classifier"] >= 0) & (saved["test_classifier"] <= 8 / 9 + 1e-9))
  assert len(saved["ref_classifier"]) == 16
  names = ("knn", "nll_ratio", "rotation", "classifier")
  z = [(saved[f"test_{k}"] - saved[f"ref_{k}"].mean()) / saved[f"ref_{k}"].std() for k in names]
  np.testing.assert_allclose(saved["test_combined_classifier"], np.mean(z, axis=0), rtol=1e-6)
  names += ("mahalanobis",)
  z = [(saved[f"test_{k}"] - saved[f"ref_{k}"].mean()) / saved[f"ref_{k}"].std() for k in names]
  np.testing.assert_allclose(saved["test_combined_mahalanobis"], np.mean(z, axis=0), rtol=1e-6)
  # The classifier never saw the bags, nor the first 64 training rows, among which are the 16
  # normal images that standardise its score (the first nine-class images of train[:512]).
  with open(tmp_path / "leave-one-out_smoke" / "class8" / "classifier" / "config.json") as f:
    data = json.load(f)["data"]
  assert (data["exclude_labels"], data["train_split"]) == ([8], "train[64:512]")
  with gzip.open(os.path.join(FMNIST, "train-labels-idx1-ubyte.gz")) as f:
    train_labels = np.frombuffer(f.read()[8:], np.uint8)[:512]
  assert np.flatnonzero(train_labels != 8)[15] < 64
  assert f"combined_classifier={line['auc']['combined_classifier']:.3f}" in out.stdout
  # mahalanobis in NumPy from the classifier's features: of the idx images, padded to 32x32 with
  # black and scaled to [-1, 1]; the Gaussians from its non-bag training images train[64:512].
  from vqjax import runs

  _, model, variables = runs.load_run(
    str(tmp_path / "leave-one-out_smoke" / "class8" / "classifier")
  )
  to_input = lambda x: np.pad(
    x.reshape(-1, 28, 28, 1) / 127.5 - 1, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=-1
  )
  feats = lambda x: np.asarray(
    model.apply(variables, to_input(x).astype(np.float32), method="features"), np.float64
  )
  with gzip.open(os.path.join(FMNIST, "train-labels-idx1-ubyte.gz")) as f:
    fit_labels = np.frombuffer(f.read()[8:], np.uint8)[64:512]
  fit = feats(_idx_images("train-images-idx3-ubyte.gz", 512)[64:][fit_labels != 8])
  fit_labels = fit_labels[fit_labels != 8]
  normal = [0, 1, 2, 3, 4, 5, 6, 7, 9]
  means = {k: fit[fit_labels == k].mean(0) for k in normal}
  dev = np.concatenate([fit[fit_labels == k] - means[k] for k in normal])
  precision = np.linalg.pinv(dev.T @ dev / len(dev))
  test = feats(_idx_images("t10k-images-idx3-ubyte.gz", 64))
  expected = [min((f - m) @ precision @ (f - m) for m in means.values()) for f in test]
  np.testing.assert_allclose(saved["test_mahalanobis"], expected, rtol=1e-3)
