"""vqjax on `gs://` paths, through a real GCS protocol: the session's local emulator
(`gcs_emulator` in conftest.py) and the three environment variables it gives the programs.

The programs run as subprocesses, as on a pod. What they wrote is read back here straight from
the emulator's JSON API (urllib), not through vqjax's path layer, and after each of them nothing
named `gs:` may exist locally (an `os.path.abspath("gs://b/run")` would make `<cwd>/gs:/b/run`).
"""

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
from train_helpers import cli

from vqjax import configs
from vqjax.data import pipeline, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "experiments", "fashion_mnist.py") + ":smoke"
FMNIST = "/usr/share/datasets/fashion-mnist"
needs_fmnist = pytest.mark.skipif(
  not sources.fashion_mnist_files_exist(FMNIST), reason="Fashion-MNIST idx files not installed"
)
# As tests/test_train.py runs the trainer: every step logged, a constant rate (so a run of fewer
# steps has the same losses), no evaluation or images between.
RUN = (
  "--config.optim.schedule=constant",
  "--config.log.every_steps=1",
  "--config.log.eval_every_steps=0",
  "--config.log.image_every_steps=0",
  "--config.log.tensorboard=False",
)
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))

pytestmark = [pytest.mark.slow, needs_fmnist]


# --- the bucket, read independently -----------------------------------------------------------


def _get(emulator, name: str) -> bytes | None:
  """The object `name` of the emulator's bucket (None when there is none), over its JSON API."""
  quoted = urllib.parse.quote(name, safe="")
  url = f"{emulator.url}/storage/v1/b/{emulator.bucket}/o/{quoted}?alt=media"
  try:
    with _NO_PROXY.open(url, timeout=60) as r:
      return r.read()
  except urllib.error.HTTPError as e:
    if e.code == 404:
      return None
    raise


def _names(emulator, prefix: str) -> list[str]:
  """The names of the bucket's objects below `prefix/`."""
  query = urllib.parse.urlencode({"prefix": prefix.rstrip("/") + "/"})
  url = f"{emulator.url}/storage/v1/b/{emulator.bucket}/o?{query}"
  with _NO_PROXY.open(url, timeout=60) as r:
    return sorted(item["name"] for item in json.load(r).get("items", []))


def _records(emulator, name: str) -> list[dict]:
  data = _get(emulator, name)
  return [json.loads(line) for line in (data or b"").decode().splitlines() if line.strip()]


def _losses(records: list[dict]) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in records if r.get("split") == "train"}


def _steps(emulator, run: str) -> list[int]:
  """The checkpoint steps saved in `run/checkpoints/` of the bucket."""
  found = {n[len(run) :].split("/")[2] for n in _names(emulator, f"{run}/checkpoints")}
  return sorted(int(s) for s in found if s.isdigit())


def _no_local_gs(*places) -> None:
  """Nothing named `gs:` in the repository, the temp directory or below `places`."""
  for top in (ROOT, tempfile.gettempdir()):
    assert not os.path.exists(os.path.join(top, "gs:")), top
  for top in places:
    for where, dirs, files in os.walk(top):
      assert "gs:" not in dirs + files, where


# --- the programs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """One local compilation cache for the module's runs, and a vqjax cache for local copies."""
  return tmp_path_factory.mktemp("gcs_cache")


def _env(emulator, cache, num_devices: int = 8) -> dict:
  env = dict(os.environ)
  env.update(
    emulator.env,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
    PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
    VQJAX_CACHE=str(cache / "vqjax"),
  )
  return env


def _train(workdir: str, *flags: str, cache, config: str = SMOKE) -> list[str]:
  return cli(
    workdir, *RUN, f"--config.log.compilation_cache={cache / 'jax'}", *flags, config=config
  )


def _run(args: list[str], env: dict, cwd, timeout: int = 600) -> subprocess.CompletedProcess:
  out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def _wait_for_records(emulator, name: str, count: int, procs: list, seconds: float = 300) -> None:
  deadline = time.time() + seconds
  while len(_records(emulator, name)) < count:
    assert all(p.poll() is None for p in procs), "a run ended before it was signalled"
    assert time.time() < deadline, f"fewer than {count} records in {name}"
    time.sleep(0.2)


def test_a_run_in_a_bucket_stops_on_sigterm_and_resumes_exactly(gcs_emulator, cache, tmp_path):
  env, total = _env(gcs_emulator, cache), 30
  _run(_train(str(tmp_path / "ref"), f"--config.train.steps={total}", cache=cache), env, tmp_path)
  with open(tmp_path / "ref" / "metrics.jsonl") as f:
    expected = _losses([json.loads(line) for line in f])
  assert sorted(expected) == list(range(1, total + 1))

  run = "sigterm"
  url = f"gs://{gcs_emulator.bucket}/{run}"
  # The compilation cache in the bucket too (JAX's own cache reads and writes it).
  args = _train(url, "--config.train.steps=100000", "--config.ckpt.every_steps=100000", cache=cache)
  args.append(f"--config.log.compilation_cache=gs://{gcs_emulator.bucket}/jax_cache")
  proc = subprocess.Popen(
    args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  try:
    _wait_for_records(gcs_emulator, f"{run}/metrics.jsonl", 2, [proc])
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
  finally:
    proc.kill()
  assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
  assert "stopped at step" in err and "the same command resumes" in err
  saved = _steps(gcs_emulator, run)
  assert len(saved) == 1 and saved[0] < total, saved
  assert _names(gcs_emulator, "jax_cache"), "no compiled program in the bucket's cache"

  _run(_train(url, f"--config.train.steps={total}", cache=cache), env, tmp_path)
  got = _losses(_records(gcs_emulator, f"{run}/metrics.jsonl"))
  assert sorted(got) == list(range(1, total + 1))  # the steps after the save logged once
  assert [got[s] for s in sorted(got)] == [expected[s] for s in sorted(got)]
  assert json.loads(_get(gcs_emulator, f"{run}/checkpoints/health.json"))["good"]
  assert json.loads(_get(gcs_emulator, f"{run}/config.json"))["train"]["steps"] == total
  _no_local_gs(tmp_path, cache)


def _prior_config(path, level: str, codes: str) -> str:
  """A config file: the smoke prior of `level` reading the code dataset `codes` (as the
  pipeline's `prior_config` switches it)."""
  path.write_text(
    "from vqjax import configs, pipeline\n\n\ndef get_config(arg=None):\n"
    f"  c = configs.load_experiment('fashion_mnist_prior_{level}:smoke')\n"
    f"  return pipeline.prior_config(c, {codes!r}, 32)\n"
  )
  return str(path)


def test_every_stage_reads_and_writes_the_bucket(gcs_emulator, cache, tmp_path):
  env, b = _env(gcs_emulator, cache), f"gs://{gcs_emulator.bucket}"
  data_flags = ("--config.ckpt.every_steps=2", "--config.train.steps=4")

  _run(_train(f"{b}/stage1", *data_flags, cache=cache), env, tmp_path)
  assert _steps(gcs_emulator, "stage1") == [2, 4]

  # load_run of the run in the bucket gives the weights of a local copy of it.
  local = tmp_path / "stage1_copy"
  for name in _names(gcs_emulator, "stage1"):
    target = local / name[len("stage1/") :]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(_get(gcs_emulator, name))
  compare = (
    "import sys, jax, numpy as np, vqjax\n"
    "a = vqjax.load_run(sys.argv[1])[2]\n"
    "b = vqjax.load_run(sys.argv[2])[2]\n"
    "assert jax.tree.structure(a) == jax.tree.structure(b)\n"
    "for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):\n"
    "  np.testing.assert_array_equal(np.asarray(x), np.asarray(y))\n"
    "print(len(jax.tree.leaves(a)))\n"
  )
  out = _run([sys.executable, "-c", compare, f"{b}/stage1", str(local)], env, tmp_path)
  assert int(out.stdout.split()[-1]) > 0

  # Codes extracted into the bucket, two priors trained on them, samples, evaluations.
  _run(
    [sys.executable, "-m", "vqjax.extract_codes", f"--workdir={b}/stage1", f"--out={b}/codes"],
    env,
    tmp_path,
  )
  meta = json.loads(_get(gcs_emulator, "codes/metadata.json"))
  assert meta["stage1"]["workdir"] == f"{b}/stage1"
  for level in ("top", "bottom"):
    config = _prior_config(tmp_path / f"prior_{level}.py", level, f"{b}/codes")
    _run(_train(f"{b}/prior_{level}", cache=cache, config=config), env, tmp_path)
  sample = [sys.executable, "-m", "vqjax.sample", f"--workdir={b}/prior_top"]
  sample += [f"--workdir={b}/prior_bottom", f"--out={b}/samples", "--num=4"]
  _run(sample, env, tmp_path)
  settings = json.loads(_get(gcs_emulator, "samples/settings.json"))
  assert settings["num"] == 4 and settings["stage1"] == f"{b}/stage1"
  with np.load(io.BytesIO(_get(gcs_emulator, "samples/images.npz"))) as z:
    assert z["image"].shape[0] == 4 and z["image"].dtype == np.uint8
  evaluate = [sys.executable, "-m", "vqjax.evaluate", "--max_batches=1"]
  _run([*evaluate, f"--workdir={b}/stage1", "--plots"], env, tmp_path)
  assert "mse" in json.dumps(json.loads(_get(gcs_emulator, "stage1/eval.json")))
  assert _get(gcs_emulator, "stage1/plots/reconstructions.png")[:8] == b"\x89PNG\r\n\x1a\n"
  _run([*evaluate, f"--samples={b}/samples"], env, tmp_path)
  assert json.loads(_get(gcs_emulator, "samples/eval.json"))
  _no_local_gs(tmp_path, cache)


def test_data_in_the_bucket_trains(gcs_emulator, cache, tmp_path):
  """Training data in the bucket: shards written by `vqjax.prepare` into it, and a tfds dataset
  prepared as ArrayRecord (written here, copied into the bucket) read by the grain reader from
  `--config.data.data_dir=gs://...`. Each host reads local copies of the ArrayRecord files."""
  from test_data_tfds import VqjaxTinyTestDs

  env, b = _env(gcs_emulator, cache), f"gs://{gcs_emulator.bucket}"
  _run(
    [sys.executable, "-m", "vqjax.prepare", f"--config={SMOKE}", f"--out={b}/prepared"],
    env,
    tmp_path,
  )
  assert json.loads(_get(gcs_emulator, "prepared/metadata.json"))["complete"]
  prepared = ("--config.data.name=prepared", f"--config.data.prepared_dir={b}/prepared")
  _run(_train(f"{b}/prepared_run", *prepared, "--config.train.steps=2", cache=cache), env, tmp_path)
  assert _steps(gcs_emulator, "prepared_run") == [2]

  local = tmp_path / "tfds"
  VqjaxTinyTestDs(data_dir=str(local), file_format="array_record").download_and_prepare()
  copy = (
    "import os, sys\nfrom etils import epath\n"
    "for where, _, files in os.walk(sys.argv[1]):\n"
    "  for f in files:\n"
    "    rel = os.path.relpath(os.path.join(where, f), sys.argv[1])\n"
    "    epath.Path(where, f).copy(epath.Path(sys.argv[2], rel), overwrite=True)\n"
  )
  _run([sys.executable, "-c", copy, str(local), f"{b}/tfds"], env, tmp_path)
  tfds_flags = (
    "--config.data.name=vqjax_tiny_test_ds",
    "--config.data.reader=grain",
    f"--config.data.data_dir={b}/tfds",
    "--config.data.train_split=train",
    "--config.data.eval_split=test",
    "--config.train.steps=2",
  )
  _run(_train(f"{b}/tfds_run", *tfds_flags, cache=cache), env, tmp_path)
  assert _steps(gcs_emulator, "tfds_run") == [2]
  assert all(
    np.isfinite(v) for v in _losses(_records(gcs_emulator, "tfds_run/metrics.jsonl")).values()
  )
  _no_local_gs(tmp_path, cache)


def test_the_smoke_pipeline_runs_in_a_bucket(gcs_emulator, cache, tmp_path):
  env, b = _env(gcs_emulator, cache), f"gs://{gcs_emulator.bucket}"
  config = os.path.join(ROOT, "experiments", "pipelines", "fashion_mnist.py") + ":smoke"
  args = [sys.executable, "-m", "vqjax.pipeline", f"--config={config}", f"--workdir={b}/pipe"]
  _run(args, env, tmp_path, timeout=1200)
  report = json.loads(_get(gcs_emulator, "pipe/report.json"))
  assert {"stage1", "prior_top", "prior_bottom", "evaluation"} <= set(report)
  for name in ("stage1", "prior_top", "prior_bottom", "classifier"):
    assert _steps(gcs_emulator, f"pipe/{name}"), name
  assert _get(gcs_emulator, "pipe/samples/images.npz")
  _no_local_gs(tmp_path, cache)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_hosts_stop_together_on_one_sigterm(gcs_emulator, cache, tmp_path):
  """Two processes (a pod's hosts, 2 CPU devices each) train one run into the bucket; a SIGTERM
  to one (a preemption notice) stops both at the same step, which both save, and both exit
  unfinished. The data position is in the checkpoint, exactly, for two hosts or one; the same
  command on one process (another mesh) finishes the run, with the losses of an uninterrupted
  one-process run."""
  port, run = _free_port(), "two_hosts"
  env = _env(gcs_emulator, cache)
  env.update(XLA_FLAGS="", JAX_NUM_CPU_DEVICES="2")
  procs = []
  for i in range(2):
    args = _train(
      f"gs://{gcs_emulator.bucket}/{run}",
      "--config.train.steps=100000",
      "--config.ckpt.every_steps=100000",
      f"--config.distributed.coordinator_address=127.0.0.1:{port}",
      "--config.distributed.num_processes=2",
      f"--config.distributed.process_id={i}",
      cache=cache,
    )
    procs.append(
      subprocess.Popen(
        args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
      )
    )
  try:
    _wait_for_records(gcs_emulator, f"{run}/metrics.jsonl", 2, procs)
    procs[1].send_signal(signal.SIGTERM)  # the secondary host: the primary learns it
    errs = [p.communicate(timeout=300)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, err in zip(procs, errs, strict=True):
    assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
  (saved,) = _steps(gcs_emulator, run)
  for err in errs:  # every host through JAX's preemption sync point
    assert f"stopped at step {saved}" in err and "preemption notice" in err, err[-2000:]
  records = _records(gcs_emulator, f"{run}/metrics.jsonl")
  assert [r["step"] for r in records] == list(range(1, saved + 1))

  # The data position: one global batch count, the same on both hosts. Resumed from it, each
  # host and a single process read what fresh iterators, advanced `saved` steps, read next.
  data = json.loads(_get(gcs_emulator, f"{run}/checkpoints/{saved}/data/metadata"))
  assert data["process_count"] == 2 and data["states"][0] == data["states"][1]
  assert data["states"][0]["grain"] == {"next_index": saved}
  config = configs.load_experiment("fashion_mnist:smoke")
  nexts = {}
  for i, count in ((0, 2), (1, 2), (0, 1)):
    resumed = pipeline.make_train_iterator(config.data, config.seed, i, count)
    resumed.set_state(data["states"][0])
    fresh = pipeline.make_train_iterator(config.data, config.seed, i, count)
    for _ in range(saved):
      next(fresh)
    nexts[i, count] = next(resumed)["image"]
    np.testing.assert_array_equal(nexts[i, count], next(fresh)["image"])
    resumed.close()
    fresh.close()
  np.testing.assert_array_equal(np.concatenate([nexts[0, 2], nexts[1, 2]]), nexts[0, 1])

  # The same command on one host (another mesh: 8 devices in one process) finishes the run, and
  # every step's loss is an uninterrupted one-process run's, to float32 rounding (the meshes
  # sum in other orders).
  total = saved + 2
  args = _train(f"gs://{gcs_emulator.bucket}/{run}", f"--config.train.steps={total}", cache=cache)
  _run(args, _env(gcs_emulator, cache), tmp_path)
  got = _losses(_records(gcs_emulator, f"{run}/metrics.jsonl"))
  assert sorted(got) == list(range(1, total + 1))
  ref = tmp_path / "uninterrupted"
  _run(
    _train(str(ref), f"--config.train.steps={total}", cache=cache),
    _env(gcs_emulator, cache),
    tmp_path,
  )
  with open(ref / "metrics.jsonl") as f:
    want = _losses([json.loads(line) for line in f])
  assert sorted(want) == sorted(got)
  np.testing.assert_allclose(
    [got[s] for s in sorted(got)], [want[s] for s in sorted(got)], rtol=1e-5
  )
  _no_local_gs(tmp_path, cache)


def _bash_blocks(path: str) -> list[str]:
  with open(path) as f:
    return re.findall(r"```bash\n(.*?)```", f.read(), re.S)


def test_the_pod_page_runs_as_written(gcs_emulator, cache, tmp_path):
  """docs/tpu_pods.md: its emulator session (prepare into the bucket, train from there, resume
  with the same command, load the run) and its data_wait check, run as the page writes them."""
  env = _env(gcs_emulator, cache)
  blocks = _bash_blocks(os.path.join(ROOT, "docs", "tpu_pods.md"))
  session = [b for b in blocks if "python -m vqjax.prepare --config experiments/fashion" in b]
  check = [b for b in blocks if "data_wait" in b]
  assert len(session) == 1 and len(check) == 1
  assert gcs_emulator.bucket == "vqjax-test"  # the page's bucket
  out = subprocess.run(
    ["bash", "-e", "-c", session[0]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split()[-1] == "autoencoder"
  records = _records(gcs_emulator, "pod/run/metrics.jsonl")
  assert sorted(_losses(records)) == list(range(1, 9))  # resumed at 4, each step once
  assert _steps(gcs_emulator, "pod/run")[-1] == 8
  out = subprocess.run(
    ["bash", "-e", "-c", check[0]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [line.split() for line in out.stdout.splitlines()]
  assert [int(r[0]) for r in rows] == [r["step"] for r in records]
  waits = [float(r[1]) for r in rows if r[1] not in ("None", "nan")]
  assert waits and all(0.0 <= w <= 1.0 for w in waits)
  _no_local_gs(tmp_path, cache)
