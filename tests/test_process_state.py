"""Importing vqjax leaves the process as it was: the environment, `jax.config`, the hooks of
`sys` and the loggers' filters. Only the command-line programs make process-wide settings
(vqjax/_cli.py); library calls that need one (quiet Orbax logs, dropping the leftovers of a
damaged checkpoint's reads) undo it when they return."""

import json
import logging
import os
import subprocess
import sys

from vqjax import _cli
from vqjax.training import logs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every vqjax module is imported after the libraries it builds on, so that what those do on
# import (JAX sets TF_CPP_MIN_LOG_LEVEL; Orbax's first absl log line gives the root logger a
# handler) is in the baseline and what vqjax does is not.
_IMPORT_CHECK = """
import importlib, json, logging, os, pkgutil, signal, sys, warnings

import absl.logging, flax, jax, ml_collections, optax, orbax.checkpoint


def state():
  loggers = ("", "absl", "jax", "jax._src.xla_bridge", "orbax")
  return {
    "environ": dict(os.environ),
    "jax.config": {k: repr(v) for k, v in jax.config.values.items()},
    "sys.unraisablehook": repr(sys.unraisablehook),
    "sys.excepthook": repr(sys.excepthook),
    "logger filters": {n: [repr(f) for f in logging.getLogger(n).filters] for n in loggers},
    "root handlers": [repr(h) for h in logging.getLogger().handlers],
    "handler filters": [
      [repr(f) for f in h.filters]
      for h in logging.getLogger().handlers + [absl.logging.get_absl_handler()]
    ],
    "signals": {s.name: repr(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM)},
    "warnings": [repr(w) for w in warnings.filters],
  }


before = state()
import vqjax  # noqa: E402

package_alone = dict(os.environ) == before["environ"] and "vqjax.runs" not in sys.modules
names = []
for package in ("models", "data", "training", "runs", "sampling", "evaluation", "convert"):
  module = importlib.import_module("vqjax." + package)
  names.append(module.__name__)
  for info in pkgutil.walk_packages(getattr(module, "__path__", []), module.__name__ + "."):
    if not info.name.endswith("__main__"):
      importlib.import_module(info.name)
      names.append(info.name)
after = state()
print(json.dumps(dict(names=names, package_alone=package_alone, before=before, after=after)))
"""


def test_importing_vqjax_and_its_library_modules_changes_nothing_in_the_process():
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "VQJAX_XLA_CPU_DEFAULTS")}
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  out = subprocess.run(
    [sys.executable, "-c", _IMPORT_CHECK], env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.splitlines()[-1])
  assert result["package_alone"]  # `import vqjax` alone imports nothing else
  for must in (
    "vqjax.runs",
    "vqjax.models.vqvae",
    "vqjax.training.trainer",
    "vqjax.sampling.cached",
  ):
    assert must in result["names"]
  assert "vqjax.evaluation.reports" in result["names"]
  before, after = result["before"], result["after"]
  assert set(before) == set(after)
  for what in before:
    if what == "jax.config":
      changed = {
        k: (v, after[what].get(k)) for k, v in before[what].items() if after[what].get(k) != v
      }
      assert not changed, changed
    else:
      assert after[what] == before[what], what


def _process_state():
  return (
    sys.unraisablehook,
    {n: list(logging.getLogger(n).filters) for n in ("", "absl", "jax._src.xla_bridge")},
  )


def test_library_scopes_restore_what_they_change():
  before = _process_state()
  with logs.quiet_library_logs(), logs.failed_read_leftovers_dropped():
    assert _process_state() != before
    with logs.quiet_library_logs(), logs.failed_read_leftovers_dropped():  # nested: no stacking
      inner = _process_state()
    assert _process_state() == inner
  assert _process_state() == before


def test_orbax_notes_are_dropped_inside_quiet_library_logs_and_kept_outside(caplog):
  orbax_file = os.path.join("site-packages", "orbax", "checkpoint", "x.py")

  def log(msg, level=logging.WARNING):
    logger = logging.getLogger("absl")
    logger.handle(logger.makeRecord("absl", level, "/venv/lib/" + orbax_file, 1, msg, (), None))

  with caplog.at_level(logging.INFO, logger="absl"):
    with logs.quiet_library_logs():
      log("Given directory is read only")
      log("Saving item", logging.INFO)
      log("a real problem")
    log("Given directory is read only")
  assert [r.getMessage() for r in caplog.records] == [
    "a real problem",
    "Given directory is read only",
  ]


def _unraisable(exc, obj=None):
  import types

  return types.SimpleNamespace(
    exc_type=type(exc), exc_value=exc, exc_traceback=None, err_msg=None, object=obj
  )


def test_failed_read_leftovers_are_dropped_inside_and_nothing_else(monkeypatch):
  """Orbax's other pending reads of a step that failed to read fail later, when their event
  loop is gone (thousands of lines for one damage already reported): within the scope exactly
  those unraisable exceptions are dropped; any other is still shown, and afterwards all are."""
  shown = []
  monkeypatch.setattr(sys, "unraisablehook", shown.append)
  leftovers = [
    _unraisable(RuntimeError("Event loop is closed")),
    _unraisable(ValueError("x"), "<coroutine _read_array_index_and_device_put>"),
  ]
  other = _unraisable(RuntimeError("something else"))
  with logs.failed_read_leftovers_dropped():
    for u in [*leftovers, other]:
      sys.unraisablehook(u)
  assert shown == [other]
  sys.unraisablehook(leftovers[0])
  assert shown == [other, leftovers[0]]


def test_cli_setup_keeps_its_settings_for_the_program(monkeypatch):
  """`setup` makes the library scopes' settings for the program's whole run (undone here, for
  the tests after this one)."""
  before = _process_state()
  monkeypatch.setenv("VQJAX_XLA_CPU_DEFAULTS", "1")  # XLA_FLAGS is read once per process
  monkeypatch.setattr(_cli, "_undo", [])
  try:
    _cli.setup()
    during = _process_state()
    _cli.setup()  # again: nothing more
    assert _process_state() == during
    hook, filters = during
    assert getattr(hook, "vqjax_leftovers", False)
    assert any(isinstance(f, logs._DropLibraryInfo) for f in filters["absl"])
  finally:
    _cli._undo_setup()
  assert _process_state() == before


def test_cli_setup_hides_the_tpu_probe_note_where_no_tpu_library_is_installed(monkeypatch, caplog):
  monkeypatch.setattr(_cli, "_undo", [])
  monkeypatch.setenv("VQJAX_XLA_CPU_DEFAULTS", "1")
  monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
  monkeypatch.setattr(_cli.util, "find_spec", lambda name: None)
  probe = logging.getLogger("jax._src.xla_bridge")
  try:
    _cli.setup()
    with caplog.at_level(logging.INFO, logger=probe.name):
      probe.info("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so")
      probe.info("Unable to initialize backend 'cuda': no GPU")
  finally:
    _cli._undo_setup()
  assert [r.getMessage() for r in caplog.records] == ["Unable to initialize backend 'cuda': no GPU"]
