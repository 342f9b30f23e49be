"""Split names with tfds-like slices ("train", "train[:1000]", "test[50%:]"), shared by every
source of vqjax/data/."""

import re

from vqjax.errors import UserError


def parse_split(split: str) -> tuple[str, str]:
  """Splits "train[:90%]" into ("train", ":90%"); a plain "train" gives ("train", "")."""
  m = re.fullmatch(r"\s*([\w-]+)\s*(?:\[([^\]]*)\])?\s*", split)
  if not m:
    raise UserError(f"Bad split {split!r}: expected 'name' or 'name[start:stop]'")
  return m.group(1), m.group(2) or ""


def slice_range(spec: str, n: int, split: str) -> range:
  """Resolves a tfds-like slice ("1000:", ":90%", "-500:") over n examples."""
  if not spec:
    return range(n)
  parts = spec.split(":")
  if len(parts) != 2:
    raise UserError(f"Bad split slice in {split!r}: expected [start:stop]")

  def bound(s: str, default: int) -> int:
    s = s.strip()
    if not s:
      return default
    try:
      return round(n * float(s[:-1]) / 100) if s.endswith("%") else int(s)
    except ValueError:
      raise UserError(f"Bad split bound {s!r} in {split!r}") from None

  return range(n)[slice(bound(parts[0], 0), bound(parts[1], n))]
