"""The start-up of vqjax's command-line programs: the process-wide settings a library must not make.

`import vqjax` (or any library module) leaves the process as it found it: the environment,
`jax.config`, `sys.unraisablehook` and the loggers' filters. A program owns its process, so
each `python -m vqjax.X` calls `setup()` first in its `main`, before JAX creates its backends
(the benchmark scripts do the same). It

  * picks XLA:CPU's convolution kernels (`set_cpu_xla_flag`),
  * for the training programs, keeps XLA:CPU's large buffers mapped (`tune_cpu_malloc`),
  * keeps the log readable: Orbax's INFO lines and its notes on what vqjax does on purpose are
    dropped (`logs.drop_library_noise`; library calls do it only for their own duration, with
    `logs.quiet_library_logs`), and so is JAX's "Unable to initialize backend 'tpu'" where no
    TPU library is installed,
  * drops the leftovers of a damaged checkpoint's failed reads (`logs.drop_failed_read_leftovers`;
    library calls: `logs.failed_read_leftovers_dropped`).

`run(main)` is absl's `app.run` whose `--help` prints the usage and exits 0 (absl's exits 1).
"""

import functools
import logging
import os
import sys
from collections.abc import Callable
from importlib import metadata, util

# XLA:CPU (jaxlib 0.10) sends convolutions to YNNPACK by default; its kernel and input gradients
# of the autoencoders' convolutions are 1.5-2x slower than XLA's Eigen ones (measured on 2 cores:
# the Fashion-MNIST train step at the PyTorch reference's sizes, 205 -> 320 img/s with the
# adjoint transposed convolutions; benchmarks/RESULTS.md). YNNPACK keeps the matmuls and reductions.
# XLA reads XLA_FLAGS when JAX creates its CPU backend, so `setup` sets it before that; a user's
# own setting of the flag in XLA_FLAGS wins, and VQJAX_XLA_CPU_DEFAULTS=1 leaves XLA's defaults.
# Only jaxlib 0.10 (measured) and 0.11 (the flag exists there: other projects turn YNNPACK
# fusions off in 0.11.2 over wrong results) are touched: an XLA flag a build does not know
# aborts the process.
CPU_XLA_FLAG = "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce"

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
# training programs, whose runs are long, set it (`setup(tune_malloc=True)`) and the others not.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's <malloc.h>

HELP_ARGS = ("-h", "-?", "--help", "-help", "--helpshort", "--helpfull")

# What undoes each of `setup`'s hook and log filters (a program never calls them).
_undo: list[Callable[[], None]] = []


def set_cpu_xla_flag() -> bool:
  """Adds CPU_XLA_FLAG to XLA_FLAGS (see above); returns whether it did."""
  try:
    version = tuple(int(p) for p in metadata.version("jaxlib").split(".")[:2])
  except (metadata.PackageNotFoundError, ValueError):
    return False
  flags = os.environ.get("XLA_FLAGS", "")
  if os.environ.get("VQJAX_XLA_CPU_DEFAULTS") == "1" or not (0, 10) <= version <= (0, 11):
    return False
  if "xla_cpu_experimental_ynn_fusion_type" in flags:
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {CPU_XLA_FLAG}".strip()
  return True


def _cpu_only() -> bool:
  """Whether JAX's backend will be the CPU: JAX_PLATFORMS starts with cpu, or no accelerator
  plugin nor TPU library is installed."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return util.find_spec("jax_plugins") is None and util.find_spec("libtpu") is None


def _backends_started() -> bool:
  """Whether JAX has created its backends (False where JAX is not imported yet)."""
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
  if os.environ.get("VQJAX_MALLOC_DEFAULTS") == "1" or not sys.platform.startswith("linux"):
    return False
  if not _cpu_only():
    return False
  if _backends_started():
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


class _NoTpuProbeNote(logging.Filter):
  """Drops JAX's note that its TPU probe failed (INFO, shown by every program, since absl logs
  INFO): without JAX_PLATFORMS JAX tries a TPU first, and where no TPU library is installed
  that failure says nothing. Installed only there, so a TPU machine still shows why."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Unable to initialize backend 'tpu'")


def setup(tune_malloc: bool = False) -> None:
  """The process-wide settings of a vqjax program (see above), for its whole run; call it first
  in `main`, before JAX creates its backends. Calling it again changes nothing more.

  Args:
    tune_malloc: also `tune_cpu_malloc` (the training programs: long runs of large steps).
  """
  set_cpu_xla_flag()
  if tune_malloc:
    tune_cpu_malloc()
  if _undo:
    return
  from vqjax.training import logs

  _undo.append(logs.drop_library_noise())
  _undo.append(logs.drop_failed_read_leftovers())
  # gcsfs and fsspec (files in a bucket, through etils.epath) log every file opened at INFO.
  for name in ("gcsfs", "fsspec"):
    fs_logger = logging.getLogger(name)
    _undo.append(functools.partial(fs_logger.setLevel, fs_logger.level))
    fs_logger.setLevel(logging.WARNING)
  if util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
    note, probe_logger = _NoTpuProbeNote(), logging.getLogger("jax._src.xla_bridge")
    probe_logger.addFilter(note)
    _undo.append(lambda: probe_logger.removeFilter(note))


def _undo_setup() -> None:
  """Undoes `setup`'s hook and log filters (for tests: a program keeps them to its end)."""
  while _undo:
    _undo.pop()()


def _print_usage(full: bool) -> None:
  from absl import app

  app.usage(shorthelp=not full, writeto_stdout=True)
  if not full:
    print("Try --helpfull for absl's own flags too.")


def run(
  main: Callable[[list[str]], None],
  flags_parser: Callable[[list[str]], list[str]] | None = None,
  usage: Callable[[], str] | None = None,
) -> None:
  """absl's `app.run(main)`, where `--help` (-h, -?, --helpshort, --helpfull) prints the usage on
  stdout and exits 0 before any other flag is parsed.

  Args:
    main: the program's main(argv).
    flags_parser: absl's flags_parser (default: absl's own parsing).
    usage: the text `--help` prints (default: the main module's docstring and its flags).
  """
  from absl import app

  def parse(argv: list[str]) -> list[str]:
    args = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
    if any(a in HELP_ARGS for a in args):
      if usage is not None:
        print(usage())
      else:
        _print_usage(full="--helpfull" in args)
      sys.exit(0)
    return (flags_parser or app.parse_flags_with_usage)(argv)

  def checked(argv: list[str]) -> None:
    # absl prints the whole usage before a UsageError's message; one line says it better.
    try:
      main(argv)
    except app.UsageError as e:
      spec = getattr(sys.modules.get("__main__"), "__spec__", None)  # set by `python -m`
      prog = spec.name if spec else os.path.basename(argv[0] if argv else "vqjax")
      raise SystemExit(f"{prog}: {e} (--help lists the flags)") from None

  app.run(checked, flags_parser=parse)
