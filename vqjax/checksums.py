"""CRC-32 of files, for the damage checks of checkpoint steps (training/checkpoint_integrity.py)
and of code and prepared shards (data/codes.py). CRC-32 (zlib) detects damage, not tampering, and
reads at memory speed; zlib releases the GIL on large blocks, so several files are summed at
once in threads."""

import concurrent.futures
import os
import zlib

from etils import epath


def crc32(path: str) -> int:
  """The CRC-32 of a file's bytes."""
  crc = 0
  with epath.Path(path).open("rb") as f:
    while block := f.read(1 << 22):
      crc = zlib.crc32(block, crc)
  return crc


def crc32_all(paths: list[str]) -> list[int]:
  """`crc32` of each file, in order, several files at a time."""
  if len(paths) < 2:
    return [crc32(p) for p in paths]
  with concurrent.futures.ThreadPoolExecutor(min(8, len(paths), os.cpu_count() or 1)) as pool:
    return list(pool.map(crc32, paths))
