"""Exceptions a user can act on from their message alone, and how the CLIs show them.

`python -m vqjax.train` (and the other CLIs) print these as one line and exit; every other
exception keeps its traceback, because it is a bug to report rather than an input to fix.
"""

import contextlib
import traceback


@contextlib.contextmanager
def one_line(prog: str, verbose: bool = False):
  """Turns a UserError or an OSError raised inside into `SystemExit("prog: Type: message")`;
  with `verbose` the traceback is printed first. Other exceptions (bugs) pass unchanged."""
  try:
    yield
  except (UserError, OSError) as e:
    if verbose:
      traceback.print_exc()
    detail = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else e
    raise SystemExit(f"{prog}: {type(e).__name__}: {detail}") from None


class UserError(ValueError):
  """Bad input the user can fix: a config key, a missing dataset, a corrupt file, ..."""


class CheckpointError(UserError):
  """A checkpoint cannot be used: damaged, or written by another model or config."""


class DivergenceError(UserError, FloatingPointError):
  """Training produced a non-finite or exploded loss; the message names the last good step."""
