"""Test setup: 8 simulated CPU devices, set before JAX starts, so sharding tests run anywhere."""

import importlib.util
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests run tiny models for a step or two, so XLA's optimisation passes cost far more than they
# save (about half the suite's time is compilation). Subprocesses inherit the setting; set the
# variable to 0 to test the optimised programs.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# `import vqjax` changes nothing in the process; the programs (`python -m vqjax.X`, which many
# tests run as subprocesses) make their settings at start-up (vqjax/_cli.py). Two of those are
# turned off for the subprocesses: XLA's default CPU kernels, not the faster-at-scale ones the
# programs pick, compile the tests' tiny programs 10-25% sooner (tests/test_layers.py checks
# the stride-2 forms under the programs' choice in a subprocess); and glibc's allocator left as
# it is, since the training programs' setting (vqjax.tune_cpu_malloc) makes steps faster and
# compilations slower, and the tests compile far more than they step (tests/test_cpu_malloc.py
# checks the setting in subprocesses).
os.environ.setdefault("VQJAX_XLA_CPU_DEFAULTS", "1")
os.environ.setdefault("VQJAX_MALLOC_DEFAULTS", "1")
# One persistent compilation cache for the session, new and empty each time (so every program
# is still compiled once per run): the trainer runs of the same config in several tests, their
# resumes and the CLI subprocesses (which inherit the variables) compile each program once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile

  _cache = tempfile.mkdtemp(prefix="vqjax_test_jax_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402

# The settings above hold for every test: a test (or fixture) that changes one must not leave
# it changed for the tests after it. A fixture that "restores" jax_disable_most_optimizations
# to False would otherwise compile the rest of the session with every XLA pass (3-8x slower).
_SESSION_CONFIG = ("jax_disable_most_optimizations",)


@pytest.fixture
def damaged_checkpoint_reads():
  """For a test that reads a damaged checkpoint on purpose. Orbax's other pending reads of the
  damaged step fail after their event loop has closed, some only after vqjax's call has
  returned: "Exception ignored ... RuntimeError: Event loop is closed", from Orbax and
  TensorStore, not vqjax. The programs drop them for their whole run (vqjax/_cli.py); this
  drops them for the test and a moment after it, so that they are not reported against the
  tests that follow."""
  import gc
  import time

  from vqjax.training import logs

  with logs.failed_read_leftovers_dropped():
    yield
    time.sleep(0.3)
    gc.collect()


@pytest.fixture(autouse=True)
def _restore_jax_settings():
  saved = {name: jax.config.values[name] for name in _SESSION_CONFIG}
  yield
  for name, value in saved.items():
    if jax.config.values[name] != value:
      jax.config.update(name, value)


class GcsEmulator:
  """A local GCS emulator with one bucket: `env` holds the three variables a process needs to
  read and write `gs://{bucket}/...` through it (docs/tpu_pods.md)."""

  def __init__(self, port: int, bucket: str):
    self.bucket = bucket
    self.url = f"http://localhost:{port}"
    self.env = {
      "STORAGE_EMULATOR_HOST": self.url,  # gcsfs, through etils.epath
      "TENSORSTORE_GCS_HTTP_URL": self.url,  # TensorStore, through Orbax
      "EPATH_USE_TF": "false",  # epath would use TensorFlow's client, which ignores the emulator
    }


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
  """`gcp-storage-emulator` (pure Python, from the test extra; started by tests/gcs_emulator.py,
  which fills one gap of it) on a free local port with one in-memory bucket, for the session.
  Nothing leaves the machine: the tests' processes reach the bucket only through
  `GcsEmulator.env`. Skipped, with the reason, where the emulator is not installed."""
  import socket
  import subprocess
  import sys
  import time

  if importlib.util.find_spec("gcp_storage_emulator") is None:
    pytest.skip("gcp-storage-emulator is not installed (pip install -e '.[test]')")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  bucket = "vqjax-test"
  log = tmp_path_factory.mktemp("gcs_emulator") / "emulator.log"
  with open(log, "w") as out:
    proc = subprocess.Popen(
      [sys.executable, os.path.join(os.path.dirname(__file__), "gcs_emulator.py")]
      + ["start", "--port", str(port)]
      + ["--default-bucket", bucket, "--in-memory"],
      stdout=out,
      stderr=subprocess.STDOUT,
    )
  try:
    deadline = time.time() + 60
    while True:
      with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
          break
      assert proc.poll() is None, f"the GCS emulator exited: {log.read_text()[-2000:]}"
      assert time.time() < deadline, "the GCS emulator did not start in 60 s"
      time.sleep(0.1)
    yield GcsEmulator(port, bucket)
  finally:
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
  """One persistent compilation cache per test module for every run of the Fashion-MNIST smoke
  model: the in-process run, the CLI runs and their resumes compile each program once."""
  return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def numpy_smoke_vqvae2():
  """(config, model, variables): the quickstart's smoke VQ-VAE-2 with NumPy-drawn weights, the
  stage-1 model of the prior-score tests (its codes are what they are; only their use is
  tested)."""
  from test_anomaly import _numpy_variables

  from vqjax import configs
  from vqjax.models import registry

  config = configs.load_experiment("fashion_mnist:smoke")
  model = registry.build_model(config)
  return config, model, _numpy_variables(model, (1, 32, 32, 1))
