"""Exceptions a user can act on from their message alone, and how the CLIs show them.

`python -m vqjax.train` (and the other CLIs) print these as one line and exit; every other
exception keeps its traceback, because it is a bug to report rather than an input to fix.
"""

import contextlib
import os
import sys
import traceback


@contextlib.contextmanager
def one_line(prog: str, verbose: bool = False):
  """Turns a UserError or an OSError raised inside into `SystemExit("prog: Type: message")`;
  with `verbose` the traceback is printed first. A run stopped by a signal (`Stopped`) exits
  128 + the signal, Ctrl-C `interrupted`. Other exceptions (bugs) pass unchanged."""
  try:
    yield
  except KeyboardInterrupt:
    interrupted(prog)
  except Stopped as e:
    print(f"{prog}: {e}", file=sys.stderr, flush=True)
    raise SystemExit(e.exit_code) from None
  except (UserError, OSError) as e:
    if verbose:
      traceback.print_exc()
    detail = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else e
    raise SystemExit(f"{prog}: {type(e).__name__}: {detail}") from None


def interrupted(prog: str) -> None:
  """Ends a CLI that Ctrl-C interrupted outside the trainer's own handling (during setup,
  compilation, extraction, or a second Ctrl-C during a save): one line, exit status 130.
  `os._exit`, because a normal exit can crash (SIGSEGV) while XLA is compiling on other threads;
  what is on disk is complete already (shards and checkpoints are written under temporary names
  and renamed when whole)."""
  sys.stdout.flush()
  print(f"{prog}: interrupted (Ctrl-C); run the same command to go on", file=sys.stderr, flush=True)
  os._exit(130)


class UserError(ValueError):
  """Bad input the user can fix: a config key, a missing dataset, a corrupt file, ..."""


class CheckpointError(UserError):
  """A checkpoint cannot be used: damaged, or written by another model or config."""


class CheckpointMismatchError(CheckpointError):
  """The checkpoint was written by a different model or config."""


class CheckpointSaveError(CheckpointError):
  """A checkpoint could not be written (e.g. no space left); the earlier ones are intact."""


class CheckpointDamagedError(CheckpointError):
  """A step directory is incomplete or unreadable (a missing or truncated file)."""


class RejectionBudgetError(UserError):
  """Rejection sampling spent its budget (a minimum acceptance rate) before every wanted sample
  passed the classifier; the message says how far it got and which setting to change. `info`
  holds the counts (`rejection_sample`'s info: acceptance_rate, generated, accepted, kept, ...)."""

  def __init__(self, message: str, info: dict | None = None):
    super().__init__(message)
    self.info = info or {}


class DivergenceError(UserError, FloatingPointError):
  """Training produced a non-finite or exploded loss; the message names the last good step."""


class Stopped(UserError):
  """A run stopped by a signal (or by another process's stop request) before its last step,
  with a checkpoint saved: not finished; the same command resumes it. `exit_code` is 128 + the
  signal's number (1 without one), the shell's convention, so a scheduler sees it unfinished."""

  def __init__(self, message: str, signum: int = 0):
    super().__init__(message)
    self.exit_code = 128 + signum if signum else 1
