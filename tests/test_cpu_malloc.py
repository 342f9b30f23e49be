"""`vqjax.tune_cpu_malloc` (called by the training CLIs' start-up) keeps XLA:CPU's large per-call
buffers mapped (vqjax/_cli.py): no mmap, trimming only above 2 GiB, and synchronous CPU dispatch, so
each call allocates on the main thread."""

import os
import subprocess
import sys

import pytest

# Page faults per call of a jitted op whose 128 MiB output is allocated and freed each call (the
# median of the last 16 of 40 calls: the heap holds a few freed buffers before it reuses one).
_FAULTS = """
import resource
import vqjax
tuned = vqjax.tune_cpu_malloc()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: x * 2.0 + 1.0)
x = jnp.ones((2**25,))
faults = []
for _ in range(40):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  y = f(x)
  y.block_until_ready()
  y.delete()  # freed now, not whenever the runtime gets to it
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The median of the last 16 calls, and whether calls ran on the calling thread.
print(tuned, sorted(faults[-16:])[8], jax.config.read("jax_cpu_enable_async_dispatch"))
"""


def _faults(**env_changes):
  env = {k: v for k, v in os.environ.items() if k != "VQJAX_MALLOC_DEFAULTS"}
  env.update(env_changes, JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0, out.stderr[-2000:]
  tuned, faults, asynchronous = out.stdout.split()
  assert (asynchronous == "False") == (tuned == "True")
  return tuned == "True", int(faults)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_cpu_backend_reuses_large_buffers_instead_of_faulting_them_in_each_call():
  pages = 2**27 // os.sysconf("SC_PAGE_SIZE")  # the output buffer's pages
  tuned, faults = _faults()
  assert tuned and faults < pages // 20, faults
  # glibc's defaults map a buffer this large afresh on each call: every page faults again.
  tuned, faults = _faults(VQJAX_MALLOC_DEFAULTS="1")
  assert not tuned and faults >= pages * 0.9, faults


def test_the_allocator_is_left_alone_where_an_accelerator_may_run(monkeypatch):
  import vqjax
  from vqjax import _cli

  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert not _cli._cpu_only()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert _cli._cpu_only()
  monkeypatch.setenv("VQJAX_MALLOC_DEFAULTS", "1")
  assert not vqjax.tune_cpu_malloc()


@pytest.mark.slow
def test_called_after_jax_started_it_changes_nothing_and_says_so():
  # JAX reads the dispatch option when it creates the CPU backend: too late to take effect.
  code = (
    "import jax, vqjax; jax.devices(); "
    "print(vqjax.tune_cpu_malloc(), jax.config.read('jax_cpu_enable_async_dispatch'))"
  )
  env = {k: v for k, v in os.environ.items() if k != "VQJAX_MALLOC_DEFAULTS"}
  out = subprocess.run(
    [sys.executable, "-c", code],
    env={**env, "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["False", "True"]
  assert "backends already exist" in out.stderr


def test_the_trainer_reads_ahead_itself_only_where_one_cpu_device_runs_synchronously():
  import jax

  from vqjax.training import feed

  saved = jax.config.read("jax_cpu_enable_async_dispatch")
  try:
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    # This process has 8 CPU devices (conftest): JAX dispatches their computations
    # asynchronously whatever the option says.
    assert jax.device_count() == 8 and not feed.synchronous_dispatch()
  finally:
    jax.config.update("jax_cpu_enable_async_dispatch", saved)
