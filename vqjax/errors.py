"""Exceptions a user can act on from their message alone.

`python -m vqjax.train` (and the other CLIs) print these as one line and exit; every other
exception keeps its traceback, because it is a bug to report rather than an input to fix.
"""


class UserError(ValueError):
  """Bad input the user can fix: a config key, a missing dataset, a corrupt file, ..."""


class CheckpointError(UserError):
  """A checkpoint cannot be used: damaged, or written by another model or config."""


class DivergenceError(UserError, FloatingPointError):
  """Training produced a non-finite or exploded loss; the message names the last good step."""
