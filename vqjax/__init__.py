"""vqjax: VQ-VAE and VQ-VAE-2 with autoregressive priors in JAX/Flax.

`vqjax.load_run(workdir)` loads a trained model (a trainer workdir or a converted PyTorch
checkpoint) as (config, model, variables).
"""

import os as _os

__version__ = "0.1.0"

# XLA:CPU (jaxlib 0.10) sends convolutions to YNNPACK by default; its kernel and input gradients
# of the autoencoders' convolutions are 1.5-2x slower than XLA's Eigen ones (measured on 2 cores:
# the Fashion-MNIST train step at the PyTorch reference's sizes, 205 -> 320 img/s with the
# adjoint transposed convolutions; benchmarks/RESULTS.md). YNNPACK keeps the matmuls and reductions.
# Read once, when JAX creates its CPU backend (so only if vqjax is imported before that); a
# user's own setting of the flag in XLA_FLAGS wins, and VQJAX_XLA_CPU_DEFAULTS=1 leaves XLA's
# defaults. Only jaxlib 0.10 (measured) and 0.11 (the flag exists there: other projects turn
# YNNPACK fusions off in 0.11.2 over wrong results) are touched: an XLA flag a build does not
# know aborts the process.
CPU_XLA_FLAG = "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce"


def _set_cpu_xla_flag() -> None:
  from importlib import metadata

  try:
    version = tuple(int(p) for p in metadata.version("jaxlib").split(".")[:2])
  except (metadata.PackageNotFoundError, ValueError):
    return
  flags = _os.environ.get("XLA_FLAGS", "")
  if _os.environ.get("VQJAX_XLA_CPU_DEFAULTS") == "1" or not (0, 10) <= version <= (0, 11):
    return
  if "xla_cpu_experimental_ynn_fusion_type" not in flags:
    _os.environ["XLA_FLAGS"] = f"{flags} {CPU_XLA_FLAG}".strip()


_set_cpu_xla_flag()


# XLA:CPU mallocs each call's temporary buffer (147 MB in the Fashion-MNIST step at the PyTorch
# reference's sizes) and its outputs. glibc maps allocations this large afresh with mmap (above
# its mmap threshold, at most 32 MiB, and always above 64 MiB in a worker thread's arena) and
# unmaps them on free, so every step faulted in 37,000 fresh pages: 70-80 ms of system time in a
# 300-330 ms step on 2 cores. `tune_cpu_malloc` turns mmap off and trims only above 2 GiB, and
# makes JAX's CPU dispatch synchronous: each call then runs on the calling (main) thread, whose
# arena is the one that can grow in place, so the pages stay mapped. Measured (benchmarks/
# RESULTS.md): that step 298 -> 265 ms; a tiny step (smoke sizes, batch 8) 2.5 -> 3.1 ms, which
# loses the overlap of dispatch and compute. The first version kept one arena for every thread
# instead: 278 ms, but the tiny step took 5.2 ms (the threads contend for its lock) and each
# compilation about 2 s more. Resident memory grows by the freed buffers the heap keeps. So the
# training CLIs, whose runs are long, set it and a plain `import vqjax` does not.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's <malloc.h>


def _cpu_only() -> bool:
  from importlib import util

  platforms = _os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return util.find_spec("jax_plugins") is None and util.find_spec("libtpu") is None


def _backends_started() -> bool:
  """Whether JAX has created its backends (False where JAX is not imported yet)."""
  import sys

  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge

    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # another JAX: assume not, as before
    return False


def tune_cpu_malloc() -> bool:
  """Sets glibc's allocator and JAX's CPU dispatch as above where the backend will be the CPU
  (JAX_PLATFORMS starts with cpu, or no accelerator plugin is installed); VQJAX_MALLOC_DEFAULTS=1
  leaves both at their defaults. Call it before JAX creates its CPU backend: JAX reads the
  dispatch option only then, so afterwards it changes nothing (and says so in the log). Calls
  of a computation spread over several CPU devices stay asynchronous either way.

  Returns:
    True if glibc took the settings and dispatch was made synchronous.
  """
  import sys

  if _os.environ.get("VQJAX_MALLOC_DEFAULTS") == "1" or not sys.platform.startswith("linux"):
    return False
  if not _cpu_only():
    return False
  if _backends_started():
    import logging

    logging.getLogger(__name__).warning(
      "tune_cpu_malloc: JAX's backends already exist; allocator and dispatch left as they are"
    )
    return False
  import ctypes

  try:
    libc = ctypes.CDLL(None)
    mallopt, _ = libc.mallopt, libc.gnu_get_libc_version  # glibc only (not musl)
  except (OSError, AttributeError):
    return False
  settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
  if not all([mallopt(param, value) == 1 for param, value in settings]):
    return False
  import jax

  try:
    jax.config.update("jax_cpu_enable_async_dispatch", False)
  except AttributeError:  # a JAX without the option: its dispatch is synchronous anyway
    pass
  return True


def __getattr__(name):
  # Lazy, so `import vqjax` (e.g. for the version) does not import JAX.
  if name == "load_run":
    from vqjax.runs import load_run

    return load_run
  raise AttributeError(f"module 'vqjax' has no attribute {name!r}")
