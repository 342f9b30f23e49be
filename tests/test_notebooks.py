"""Tests of notebooks/: each notebook executed top to bottom in a fresh IPython kernel (nbclient)
in its tiny setting (VQJAX_NOTEBOOK_TINY=1, CPU), and what its last cell reports (a RESULT dict,
one JSON line) checked against the files it wrote and the data it read; plus the form every
notebook must keep (outputs stripped, the tiny switch in the first code cell, guarded shell
lines).

The notebooks share one workdir and JAX compilation cache, as they would on one machine, and
run in two chains at once (XLA compiles on one core; compilation is most of a tiny run): the
quickstart then the sampling notebook, which reuses the quickstart's stage-1 run; the rosinality
import then the anomaly notebook. Measured on 2 CPU cores busy with other jobs (load 4-6):
95 s for the file, against 140 s for the notebooks one after another.
"""

import argparse
import concurrent.futures
import csv
import gzip
import importlib.util
import json
import math
import os
import re
import statistics
import threading

import numpy as np
import pytest
from PIL import Image

from vqjax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
NAMES = (
  "quickstart_colab_tpu",
  "sampling_and_rejection",
  "import_rosinality",
  "anomaly_maps",
)
FMNIST = "/usr/share/datasets/fashion-mnist"
# Environment variables a notebook reads besides the tiny switch and the workdir: a user's
# values must not change what the tests run.
USER_SETTINGS = (
  "VQJAX_ROSINALITY_VQVAE",
  "VQJAX_ROSINALITY_TOP",
  "VQJAX_ROSINALITY_BOTTOM",
  "VQJAX_ROSINALITY_IMAGE_SIZE",
  "VQJAX_IMAGES",
  "VQJAX_ANOMALY_STAGE1",
  "MPLBACKEND",
)


def _read(name: str):
  nbformat = pytest.importorskip("nbformat")
  return nbformat.read(os.path.join(NOTEBOOKS, name + ".ipynb"), as_version=4)


# --- the form of the notebooks ----------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stripped_and_has_the_tiny_switch(name):
  nbformat = pytest.importorskip("nbformat")
  nb = _read(name)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  for cell in code:
    assert cell.outputs == [] and cell.execution_count is None, f"{name}: outputs not stripped"
  assert 'os.environ.get("VQJAX_NOTEBOOK_TINY"' in code[0].source
  assert "VQJAX_NOTEBOOK_WORKDIR" in code[0].source
  assert "print(json.dumps(RESULT))" in code[-1].source
  # Shell lines only run in Colab, inside the install guard.
  for cell in code:
    for line in cell.source.splitlines():
      if line.lstrip().startswith(("!", "%")):
        assert line.startswith("  !"), line
        assert 'if "google.colab" in sys.modules' in cell.source, line
  readme = open(os.path.join(NOTEBOOKS, "README.md")).read()
  assert f"notebooks/{name}.ipynb" in readme


# --- execution --------------------------------------------------------------------------------

# Two chains run at once, each in its order (the sampling notebook reuses the quickstart's run).
CHAINS = (
  ("quickstart_colab_tpu", "sampling_and_rejection"),
  ("import_rosinality", "anomaly_maps"),
)
TEST_OF = {
  "quickstart_colab_tpu": "test_quickstart",
  "sampling_and_rejection": "test_sampling_and_rejection",
  "import_rosinality": "test_import_rosinality",
  "anomaly_maps": "test_anomaly_maps",
}
NEEDS = {
  "quickstart_colab_tpu": "fashion_mnist",
  "sampling_and_rejection": "fashion_mnist",
  "import_rosinality": "torch",
  "anomaly_maps": "fashion_mnist",
}


def _missing(name: str) -> str:
  """Why the notebook cannot run here ("" when it can)."""
  if importlib.util.find_spec("nbclient") is None or importlib.util.find_spec("ipykernel") is None:
    return "nbclient and ipykernel are not installed (pip install -e '.[test]')"
  if NEEDS[name] == "torch" and importlib.util.find_spec("torch") is None:
    return "PyTorch is not installed (pip install 'vqjax[torch]')"
  if NEEDS[name] == "fashion_mnist" and not sources.fashion_mnist_files_exist(FMNIST):
    return "Fashion-MNIST idx files not installed (apt install dataset-fashion-mnist)"
  return ""


def _kernel_env(base: str) -> dict:
  """The environment of every kernel: tiny setting, one shared workdir and compilation cache,
  a single CPU device (not the 8 simulated ones of conftest.py: the notebooks need no mesh)."""
  env = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
  env.update(
    XLA_FLAGS=flags.strip(),
    JAX_PLATFORMS="cpu",
    # One-step runs: compilation is most of the time, and the optimised code would not pay.
    JAX_DISABLE_MOST_OPTIMIZATIONS="1",
    JAX_COMPILATION_CACHE_DIR=os.path.join(base, "jax_cache"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    VQJAX_NOTEBOOK_TINY="1",
    VQJAX_NOTEBOOK_WORKDIR=os.path.join(base, "work"),
  )
  return env


def _execute(name: str, env: dict) -> dict:
  """Runs the notebook in a fresh kernel; returns the RESULT its last cell printed. A failing
  cell raises nbclient's CellExecutionError with the cell's traceback."""
  from jupyter_client.manager import KernelManager
  from nbclient import NotebookClient

  nb = _read(name)
  work = env["VQJAX_NOTEBOOK_WORKDIR"]
  os.makedirs(work, exist_ok=True)
  # Unix sockets rather than TCP ports on a shared machine: an absolute path (the kernel runs
  # in the workdir), one per notebook (two kernels start at once).
  socket = os.path.join(work, f"kernel{NAMES.index(name)}")
  km = KernelManager(kernel_name="python3", transport="ipc", ip=socket)
  client = NotebookClient(nb, km=km, timeout=300, resources={"metadata": {"path": work}})
  client.execute(env=env)
  out = "".join(
    o.get("text", "")
    for o in nb.cells[-1].outputs
    if o.output_type == "stream" and o.name == "stdout"
  )
  return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def executed(request, tmp_path_factory):
  """name -> Future of the notebook's RESULT, for the notebooks whose tests were selected and
  can run here; both chains start when the first test asks."""
  selected = {item.name for item in request.session.items}
  env = _kernel_env(str(tmp_path_factory.mktemp("notebooks")))
  futures = {
    name: concurrent.futures.Future()
    for chain in CHAINS
    for name in chain
    if TEST_OF[name] in selected and not _missing(name)
  }

  def run(chain):
    for name in chain:
      if name in futures:
        try:
          futures[name].set_result(_execute(name, env))
        except BaseException as e:  # reported by the notebook's own test
          futures[name].set_exception(e)

  threads = [threading.Thread(target=run, args=(chain,), daemon=True) for chain in CHAINS]
  for t in threads:
    t.start()
  yield futures
  for t in threads:
    t.join()


def _result(executed: dict, name: str) -> dict:
  why = _missing(name)
  if why:
    pytest.skip(why)
  return executed[name].result(timeout=900)


def _png_size(path: str) -> tuple[int, int]:
  with Image.open(path) as im:
    im.load()
    return im.size


@pytest.mark.slow
def test_quickstart(executed):
  r = _result(executed, "quickstart_colab_tpu")
  assert r["tiny"] is True and r["step"] == 1
  assert os.path.isdir(os.path.join(r["workdir"], "checkpoints", "1"))
  assert r["code_shapes"] == [[4, 4], [8, 8]]
  assert 0 <= r["code_range"][0] <= r["code_range"][1] < r["num_codes"] == 32
  for key in ("eval/mse", "eval/psnr", "eval/top/perplexity", "eval/bottom/perplexity"):
    assert math.isfinite(r["eval"][key]) and r["eval"][key] > 0, key
  # The smoke run's eval is one batch of the same 8 test images the notebook decodes from its
  # codes after load_run: the trainer's MSE of the forward pass is the notebook's.
  assert r["eval"]["eval/examples"] == r["num_images"] == 8
  assert r["recon_mse"] == pytest.approx(r["eval"]["eval/mse"], rel=1e-5)
  assert sorted(r["plots"]) == ["code_usage", "reconstructions"]
  for path in r["plots"].values():
    w, h = _png_size(path)
    assert w > 50 and h > 50, path


@pytest.mark.slow
def test_sampling_and_rejection(executed):
  r = _result(executed, "sampling_and_rejection")
  num = r["num"]
  assert num == 8
  # Class-conditional top prior: one label per sample, cycling through the ten classes.
  assert r["labels"] == list(range(num))
  assert r["image_shape"] == [num, 32, 32, 1]
  assert -1.0 <= r["image_range"][0] <= r["image_range"][1] <= 1.0
  assert r["code_shapes"] == [[num, 4, 4], [num, 8, 8]]
  assert r["same_seed_same_images"] is True
  rej = r["rejection"]
  # The smoke pipeline's min_acceptance 0.5: ceil(8 / 0.5) = 16 samples, 2 batches of 8 at most.
  assert rej["max_batches"] == 2 and 1 <= rej["batches"] <= 2
  assert rej["generated"] == rej["num_scores"] == rej["batches"] * num
  assert rej["accepted"] == rej["scores_passed"]
  assert rej["acceptance_rate"] == pytest.approx(rej["accepted"] / rej["generated"])
  # The grid is always full.
  assert rej["kept"] == num <= rej["accepted"]
  assert rej["kept_shape"] == [num, 32, 32, 1]
  # The unfiltered samples the trade-offs were computed on.
  with np.load(os.path.join(r["workdir"], "samples_eval", "images.npz")) as saved:
    images = saved["image"]
  assert images.shape == (16, 32, 32, 1) and images.dtype == np.uint8
  assert r["quality"]["num_samples"] == 16
  assert math.isfinite(r["quality"]["frechet_distance"]) and r["quality"]["frechet_distance"] > 0
  rows = r["thresholds"]
  assert [row["threshold"] for row in rows] == [0.1, 0.5]
  for row in rows:
    assert row["kept"] == round(row["acceptance_rate"] * len(images))
  assert all(
    1.0 >= a["acceptance_rate"] >= b["acceptance_rate"] >= 0 for a, b in zip(rows, rows[1:])
  )
  assert [row["temperature"] for row in r["temperatures"]] == [0.8, 1.0]
  for row in r["temperatures"]:
    assert row["num_samples"] == 8 and math.isfinite(row["frechet_distance"])
  assert [os.path.basename(p) for p in r["plots"]] == [
    "temperature_tradeoff.png",
    "threshold_tradeoff.png",
  ]
  for path in r["plots"]:
    assert min(_png_size(path)) > 50


@pytest.mark.slow
def test_import_rosinality(executed):
  r = _result(executed, "import_rosinality")
  import torch

  size, num = r["image_size"], r["input_shape"][0]
  # The notebook's files are in rosinality's format: a bare VQVAE state_dict and PixelSNAIL
  # training checkpoints ({"model", "args"}) whose coordinate buffer gives the map size.
  vqvae = torch.load(r["checkpoints"]["vqvae"], weights_only=True)
  code_dim, num_codes = vqvae["quantize_t.embed"].shape
  assert (r["code_dim"], r["num_codes"]) == (code_dim, num_codes)
  with torch.serialization.safe_globals([argparse.Namespace]):
    top = torch.load(r["checkpoints"]["top"], weights_only=True)
    bottom = torch.load(r["checkpoints"]["bottom"], weights_only=True)
  assert tuple(top["model"]["background"].shape[-2:]) == (size // 8, size // 8)
  assert tuple(bottom["model"]["background"].shape[-2:]) == (size // 4, size // 4)
  assert any(k.startswith("cond_resnet.") for k in bottom["model"])
  with open(os.path.join(r["converted"]["vqvae"], "config.json")) as f:
    assert json.load(f)["data"]["image_size"] == size
  assert r["prior_levels"] == [0, 1]
  assert r["input_shape"] == r["recon_shape"] == [num, size, size, 3]
  assert r["code_shapes"] == [[num, size // 8, size // 8], [num, size // 4, size // 4]]
  assert r["recon_finite"] is True
  assert r["sample_shape"] == [num, size, size, 3]
  assert r["sample_code_shapes"] == r["code_shapes"]
  assert 0 <= r["sample_code_range"][0] <= r["sample_code_range"][1] < num_codes
  assert -1.0 <= r["sample_range"][0] <= r["sample_range"][1] <= 1.0
  assert r["same_seed_same_images"] is True


@pytest.mark.slow
def test_anomaly_maps(executed):
  r = _result(executed, "anomaly_maps")
  assert r["anomaly_labels"] == [8] and r["eval_split"] == "test[:64]"
  # The split read straight from the idx file: its bags are the anomalies, half of the other
  # images choose the threshold.
  with gzip.open(os.path.join(FMNIST, "t10k-labels-idx1-ubyte.gz")) as f:
    labels = np.frombuffer(f.read()[8:], np.uint8)[:64]
  bags = int(np.sum(labels == 8))
  assert bags > 0 and r["num_anomalous"] == bags
  assert r["num_heldout"] == math.ceil((64 - bags) / 2)
  assert r["num_heldout"] + r["num_normal"] == 64 - bags
  for key in ("auc", "auc_max", "auc_mean", "tpr", "fpr", "heldout_fpr"):
    assert 0.0 <= r[key] <= 1.0, key
  # Every score of a stage-1 run with a prior per level; restoration's leads.
  assert len(r["priors"]) == 2 and r["score"] == "restoration_max"
  names = ("recon_max", "recon_mean", "knn", "nll_level0", "nll_level1", "nll", "nll_ratio")
  names += ("restoration_max", "combined")
  assert list(r["scores"]) == list(names)
  # combined: the mean z-score of knn and nll_ratio, each scaled by its mean and population
  # spread over the held-out normal images, recomputed here from the written per-image scores.
  with open(r["csv"]) as f:
    rows = list(csv.DictReader(f))
  held = [r_ for r_ in rows if r_["role"] == "heldout"]
  assert len(held) == r["num_heldout"]
  z = []
  for k in ("knn", "nll_ratio"):
    ref = [float(r_[k]) for r_ in held]
    mu, sd = statistics.fmean(ref), statistics.pstdev(ref)
    z.append([(float(r_[k]) - mu) / sd for r_ in rows])
  np.testing.assert_allclose(
    [float(r_["combined"]) for r_ in rows], np.mean(z, axis=0), rtol=1e-4, atol=1e-4
  )
  assert r["auc"] == r["scores"]["restoration_max"]["auc"] == r["auc_restoration_max"]
  assert 0.0 <= r["replaced_normal"] <= 1.0 and 0.0 <= r["replaced_anomalous"] <= 1.0
  with open(r["json"]) as f:
    saved = json.load(f)
  assert saved == {k: v for k, v in r.items() if k not in ("tiny", "stage1")}
  w, h = _png_size(r["png"])
  assert w > 6 * 32 and h > 32
