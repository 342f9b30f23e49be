"""Argument types shared by the benchmark scripts (no side effects on import: sampling.py uses
them without train_step.py's allocator setting)."""

import argparse


def at_least(minimum: int):
  """An argparse `type`: an integer >= `minimum`, else argparse's own usage error."""

  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < minimum:
      raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
    return value

  return parse
