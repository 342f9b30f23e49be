"""benchmarks/anomaly_ensemble.py on score files written here: AUCs against pairwise counts."""

import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, "benchmarks", "anomaly_ensemble.py"), *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )


def _pairwise_auc(scores, is_anomaly):
  a, n = scores[is_anomaly][:, None], scores[~is_anomaly][None, :]
  return np.mean((a > n) + 0.5 * (a == n))


def _write(folder, labels, **scores):
  os.makedirs(folder)
  np.savez(os.path.join(folder, "scores.npz"), labels=labels, **scores)


def test_mean_over_seeds_matches_pairwise_counts(tmp_path):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 300)
  # Rounded so that ties occur, within a seed and in the mean.
  s0 = np.round(rng.normal(size=300) + (labels != 3), 1)
  s1 = np.round(rng.normal(size=300) + 0.5 * (labels != 3), 1)
  _write(tmp_path / "one-class_long" / "class3", labels, test_combined=s0, test_knn=s1)
  _write(tmp_path / "one-class_long_seed2" / "class3", labels, test_combined=s1, test_knn=s0)
  out = _run(
    "--protocol=one-class", "--size=long", "--seeds=0,2", "--classes=3", f"--workdir={tmp_path}"
  )
  assert out.returncode == 0, out.stderr
  anomaly = labels != 3
  want = [_pairwise_auc(s, anomaly) for s in (s0, s1, (s0 + s1) / 2)]
  assert want[2] > max(want[:2])  # the data were drawn so that averaging helps
  row = "| 3 dress | " + " | ".join(f"{w:.3f}" for w in want) + " |"
  assert row in out.stdout, out.stdout
  assert "| mean of 1 | " + " | ".join(f"**{w:.3f}**" for w in want) + " |" in out.stdout


def test_missing_runs_and_bad_arguments_are_one_line(tmp_path):
  labels = np.arange(20) % 10
  _write(tmp_path / "leave-one-out" / "class1", labels, test_combined=np.arange(20.0))
  out = _run("--protocol=leave-one-out", "--seeds=0,1", "--classes=1", f"--workdir={tmp_path}")
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert "--seed 1 --classes 1" in out.stderr and len(out.stderr.strip().splitlines()) == 1
  _write(tmp_path / "leave-one-out_seed1" / "class1", labels[::-1], test_combined=np.zeros(20))
  out = _run("--protocol=leave-one-out", "--seeds=0,1", "--classes=1", f"--workdir={tmp_path}")
  assert out.returncode == 1 and "other test images" in out.stderr
  out = _run(
    "--protocol=leave-one-out",
    "--seeds=0,1",
    "--classes=1",
    "--score=knn",
    f"--workdir={tmp_path}",
  )
  assert out.returncode == 1 and "no score 'knn'; it has combined" in out.stderr
  with open(tmp_path / "leave-one-out_seed1" / "class1" / "scores.npz", "r+b") as f:
    f.truncate(100)  # a damaged file
  out = _run("--protocol=leave-one-out", "--seeds=0,1", "--classes=1", f"--workdir={tmp_path}")
  assert out.returncode == 1 and "is damaged" in out.stderr and "Traceback" not in out.stderr
  for bad in ("--seeds=0", "--seeds=1,1", "--seeds=a,b", "--seeds=-1,0"):
    out = _run("--protocol=one-class", bad, f"--workdir={tmp_path}")
    assert out.returncode == 2 and "--seeds must" in out.stderr, (bad, out.stderr)
