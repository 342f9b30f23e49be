"""Code datasets: the code maps a trained stage-1 model gives every example, for stage 2.

`python -m vqjax.extract_codes` writes a directory

  metadata.json                       format, levels (name, shape), num_codes, image shape,
                                      whether labels exist, the stage-1 run it came from, and
                                      per split the example count and shard count
  {split}-{k:05d}-of-{n:05d}.array_record
                                      shard k of a split: one record per example, in example
                                      order, each the arrays {"codes0", "codes1", ..., "label"}
                                      (codes0 the coarsest level, uint16; `encode_example`)

and `CodesSource` reads one split back as a random-access source (`sources.SOURCES["codes"]`),
so the usual grain pipeline shuffles, shards per host and resumes it like any other dataset.
`SyntheticCodesSource` (`name="synthetic_codes"`) gives random maps of given shapes instead,
for smoke runs and benchmarks without a stage-1 model.

The shard and metadata helpers (`shard_name`, `encode_example`, `read_dataset_metadata`,
`write_metadata`, `write_shard`, `open_split`) are shared with the prepared image datasets of
`data/prepared.py`, which use the same layout.

Every shard has a record beside it, `<shard>.check.json` ({"size", "crc32", "records"}),
written just before the shard is renamed into place (`finish_shard`). A shard cut short (an
interrupted copy, `truncate`) used to pass as complete, and training died in a 55-line Riegeli
traceback that never named it: re-running extraction or `vqjax.prepare` now verifies each
finished shard against its record and rewrites a damaged one (`shard_problem`), and readers
check each shard's size when they open a split and name a damaged shard in one line. Shards
written by an older vqjax have no record: they are read as they are, and rewritten by a re-run.

A dataset may live in a bucket (`gs://...`): the ArrayRecord writer and reader open local files
only, so a shard is written to a local temporary file and then copied into the bucket, and read
from a local copy in vqjax's cache (`paths.local_copy`).
"""

import io
import json
import os
import tempfile
from collections.abc import Iterable
from typing import Any

import numpy as np
from absl import logging
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath

from vqjax import checksums, errors, paths
from vqjax.data.splits import parse_split, slice_range

# /2: records as `encode_example` writes them. /1 (before 2026-12): each record an .npz, still
# read (`load_record` tells them apart).
FORMAT = "vqjax-codes/2"
READABLE_FORMATS = ("vqjax-codes/1", FORMAT)
METADATA = "metadata.json"
# One record per chunk, so a random read decodes one example, not a group of them.
WRITER_OPTIONS = "group_size:1"
_HINT = (
  "run `python -m vqjax.extract_codes --workdir STAGE1_RUN --out DIR` and set "
  "--config.data.codes_dir=DIR"
)


def shard_name(split: str, index: int, count: int) -> str:
  """File name of shard `index` of `count` of a split."""
  return f"{split}-{index:05d}-of-{count:05d}.array_record"


# A record: RECORD_MAGIC, the header's length in bytes (4, little-endian), the header (JSON: a
# list of [name, dtype, shape], in order), then each array's bytes in C order, one after another.
# It replaced an .npz per record (a zip directory for three small arrays): a code example of
# 80 uint16 took 92 us to write and 244 us to read that way, and 914 bytes (2-core CPU).
RECORD_MAGIC = b"\x93VQJ"
_NPZ_MAGIC = b"PK\x03\x04"  # a record of format /1
_LENGTH_BYTES = 4


def encode_example(example: dict[str, np.ndarray]) -> bytes:
  """One example's arrays -> the bytes of one record (numeric arrays, little-endian)."""
  header, parts = [], []
  for name, value in example.items():
    a = np.asarray(value)
    if a.dtype.hasobject:
      raise ValueError(f"example array {name!r} holds Python objects ({a.dtype}): not storable")
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    header.append([name, a.dtype.str, list(a.shape)])
    parts.append(a.tobytes(order="C"))
  head = json.dumps(header, separators=(",", ":")).encode()
  return b"".join([RECORD_MAGIC, len(head).to_bytes(_LENGTH_BYTES, "little"), head, *parts])


def _record_arrays(record: bytes) -> dict[str, np.ndarray]:
  """A record's arrays, of either format: read-only views into `record` for `encode_example`'s
  layout, arrays of their own for an .npz of format /1."""
  if record[: len(_NPZ_MAGIC)] == _NPZ_MAGIC:
    with np.load(io.BytesIO(record)) as z:
      return {k: z[k] for k in z.files}
  if record[: len(RECORD_MAGIC)] != RECORD_MAGIC:
    raise ValueError(f"not a vqjax record (starts {bytes(record[:4])!r})")
  start = len(RECORD_MAGIC) + _LENGTH_BYTES
  offset = start + int.from_bytes(record[len(RECORD_MAGIC) : start], "little")
  if offset > len(record):
    raise ValueError(f"a record of {len(record)} bytes cut inside its {offset}-byte header")
  fields = []  # (name, dtype, shape, element count)
  for name, dtype, shape in json.loads(record[start:offset]):
    fields.append((name, np.dtype(dtype), shape, int(np.prod(shape, dtype=np.int64))))
  end = offset + sum(n * dtype.itemsize for _, dtype, _, n in fields)
  if end != len(record):
    raise ValueError(f"a record of {len(record)} bytes whose header accounts for {end}")
  arrays = {}
  for name, dtype, shape, n in fields:
    arrays[name] = np.frombuffer(record, dtype, n, offset).reshape(shape)
    offset += n * dtype.itemsize
  return arrays


def load_record(record: bytes) -> dict[str, np.ndarray]:
  """The arrays of one record (either format), writable, with the dtypes they were written
  with."""
  return {k: v if v.flags.writeable else v.copy() for k, v in _record_arrays(record).items()}


def decode_example(record: bytes) -> dict[str, np.ndarray]:
  """The inverse of `encode_example`: code maps as int32, the label as an int32 scalar."""
  return {k: v.astype(np.int32) for k, v in _record_arrays(record).items()}


def read_dataset_metadata(directory: str, formats: tuple[str, ...], what: str, hint: str) -> dict:
  """The metadata.json of a sharded record dataset, checked to be of one of `formats`.

  Args:
    directory: the dataset directory.
    formats: the "format" entries this version reads (e.g. `READABLE_FORMATS`), the newest
      last.
    what: how errors name the dataset ("code dataset").
    hint: what to do when there is none (one clause).

  Returns:
    The parsed metadata.

  Raises:
    errors.UserError: one line when the file is missing, unreadable or of another format.
  """
  path = os.path.join(os.path.expanduser(directory), METADATA)
  if not directory or not epath.Path(path).is_file():
    raise errors.UserError(f"no {what} at {directory!r} ({METADATA} not found): {hint}")
  try:
    with epath.Path(path).open() as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise errors.UserError(f"cannot read {path}: {e}") from None
  if not isinstance(meta, dict) or meta.get("format") not in formats:
    found = meta.get("format") if isinstance(meta, dict) else None
    raise errors.UserError(
      f"{path} is not a vqjax {what} this version reads (format {found!r}, expected "
      f"{' or '.join(map(repr, formats))})"
    )
  return meta


def read_metadata(codes_dir: str) -> dict:
  """The metadata of a code dataset, with a one-line error when there is none."""
  return read_dataset_metadata(codes_dir, READABLE_FORMATS, "code dataset", _HINT)


def write_metadata(codes_dir: str, meta: dict) -> None:
  """Writes metadata.json atomically."""
  paths.write_text(os.path.join(codes_dir, METADATA), json.dumps(meta, indent=2, sort_keys=True))


CHECK_SUFFIX = ".check.json"


def finish_shard(tmp: str, path: str, records: int) -> None:
  """Records the size, CRC-32 and record count of a written shard `tmp` beside `path`, then
  renames it to `path`: a shard under its final name always has its record. `tmp` is a local
  file; a `path` in a bucket gets a copy of it (one upload), and `tmp` is removed."""
  check = {"size": os.path.getsize(tmp), "crc32": checksums.crc32(tmp), "records": int(records)}
  paths.write_text(path + CHECK_SUFFIX, json.dumps(check))
  if paths.is_remote(path):
    epath.Path(tmp).copy(path, overwrite=True)
    os.remove(tmp)
  else:
    os.replace(tmp, path)


def _read_check(path: str) -> dict | None:
  try:
    with epath.Path(path + CHECK_SUFFIX).open() as f:
      check = json.load(f)
  except (OSError, ValueError):
    return None
  ok = isinstance(check, dict) and all(isinstance(check.get(k), int) for k in ("size", "crc32"))
  return check if ok else None


def shard_problem(path: str, full: bool = True) -> str:
  """Why the shard at `path` cannot be trusted, or "" when it matches its record.

  Args:
    path: the shard's final path.
    full: also compare the CRC-32 of its bytes (reads the whole file); else the size only.
  """
  if not epath.Path(path).is_file():
    return "missing"
  check = _read_check(path)
  if check is None:
    return "it has no check record (written by an older vqjax, or the record is damaged)"
  size = paths.getsize(path)
  if size != check["size"]:
    return f"it has {size} bytes, {check['size']} when written (cut short or overwritten)"
  if full and checksums.crc32(path) != check["crc32"]:
    return "its bytes changed since it was written (checksum)"
  return ""


def reusable_shard(path: str) -> bool:
  """Whether a re-run may keep the shard at `path` (it exists and matches its record); a shard
  that exists but does not is named in a warning, and will be rewritten."""
  if not epath.Path(path).exists():
    return False
  problem = shard_problem(path)
  if problem:
    logging.warning("rewriting %s: %s", path, problem)
  return not problem


def temporary_path(path: str, tag: str = "") -> str:
  """Where a shard is written before `finish_shard` puts it at `path`: beside it
  (`<path>.tmp<tag>`), or for a `path` in a bucket a new local temporary file (the ArrayRecord
  writer opens local files only)."""
  if not paths.is_remote(path):
    return f"{path}.tmp{tag}"
  fd, tmp = tempfile.mkstemp(suffix=".array_record.tmp")
  os.close(fd)
  return tmp


def write_shard(path: str, records: Iterable[bytes], options: str = WRITER_OPTIONS) -> int:
  """Writes one ArrayRecord shard under a temporary name and renames it when complete.

  A writer killed half-way leaves only the temporary file, which the next run overwrites, so a
  shard that exists under its final name is always whole.

  Args:
    path: the shard's final path.
    records: the records, in order.
    options: ArrayRecord writer options.

  Returns:
    The number of records written.
  """
  tmp = temporary_path(path)  # one writer per shard: a re-run overwrites a killed one's leftover
  writer = ArrayRecordWriter(tmp, options)
  count = 0
  try:
    for record in records:
      writer.write(record)
      count += 1
  finally:
    writer.close()
  finish_shard(tmp, path, count)
  return count


def open_split(directory: str, meta: dict, split: str, what: str, hint: str) -> tuple[Any, range]:
  """The records of one split of a sharded dataset and the rows a sliced split selects.

  Args:
    directory: the dataset directory.
    meta: its metadata ("splits": {name: {"num_examples", "num_shards"}}).
    split: a split name with an optional slice ("train", "test[:1000]").
    what: how errors name the dataset.
    hint: how to finish an incomplete dataset (one clause).

  Returns:
    (a grain `ArrayRecordDataSource` over the split's shards, the selected record indices).

  Raises:
    errors.UserError: an unknown split, a missing shard (named), or a record count that
      differs from the metadata's.
  """
  import grain  # deferred: grain takes a second to import, and only record datasets need it

  base, spec = parse_split(split)
  if base not in meta["splits"]:
    raise errors.UserError(f"{what} {directory} has splits {sorted(meta['splits'])}, not {base!r}")
  info = meta["splits"][base]
  shards = [
    os.path.join(directory, shard_name(base, k, info["num_shards"]))
    for k in range(info["num_shards"])
  ]
  missing = [p for p in shards if not epath.Path(p).is_file()]
  if missing:
    raise errors.UserError(
      f"{what} {directory} is incomplete: {len(missing)} shard(s) of {base!r} missing "
      f"(e.g. {missing[0]}); {hint}"
    )
  for path in shards:  # a stat each: a shard cut short is named here, not by Riegeli later
    problem = shard_problem(path, full=False) if _read_check(path) is not None else ""
    if problem:
      raise errors.UserError(f"{what} {directory}: the shard {path} is damaged: {problem}; {hint}")
  # ArrayRecord reads local files: a shard in a bucket is read from a local copy.
  records = grain.sources.ArrayRecordDataSource([paths.local_copy(p) for p in shards])
  if len(records) != info["num_examples"]:
    raise errors.UserError(
      f"{what} {directory} split {base!r} holds {len(records)} records, its metadata says "
      f"{info['num_examples']}"
    )
  return records, slice_range(spec, len(records), split)


class CodesSource:
  """One split of a code dataset as a random-access source of {"codes{i}", "label"} examples.

  Args:
    codes_dir: the directory `extract_codes` wrote.
    split: a split name with an optional slice ("train", "test[:1000]").
  """

  def __init__(self, codes_dir: str, split: str):
    self.metadata = read_metadata(codes_dir)
    self._records, self._rows = open_split(
      codes_dir, self.metadata, split, "code dataset", "re-run extract_codes to finish it"
    )

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return decode_example(self._records[self._rows[int(i)]])

  def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
    rows = [self._rows[int(i)] for i in indices]
    return [decode_example(r) for r in self._records.__getitems__(rows)]


class SyntheticCodesSource:
  """Uniformly random code maps of every level and a label, a pure function of the index.

  Args:
    shapes: code-map shapes, coarsest first.
    num_codes: codes per level.
    num_examples: the split's size.
    seed: distinguishes splits.
  """

  def __init__(self, shapes: list, num_codes: int, num_examples: int, seed: int):
    if not shapes or num_codes <= 0:
      raise errors.UserError(
        "name='synthetic_codes' needs config.data.synthetic_shapes (e.g. [[8, 8], [16, 16]]) "
        "and config.data.synthetic_num_codes > 0"
      )
    self.shapes, self.num_codes, self.n, self.seed = shapes, num_codes, num_examples, seed

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int) -> dict[str, Any]:
    rng = np.random.default_rng((self.seed, int(i)))
    example = {
      f"codes{level}": rng.integers(0, self.num_codes, shape).astype(np.int32)
      for level, shape in enumerate(self.shapes)
    }
    example["label"] = np.int32(rng.integers(0, 10))
    return example


def synthetic_source(data_config: Any, split: str) -> SyntheticCodesSource:
  """The `name="synthetic_codes"` source of one split, from `config.data.synthetic_*`."""
  base, spec = parse_split(split)
  c = data_config
  source = SyntheticCodesSource(
    [list(s) for s in (c.synthetic_shapes or [])],
    c.synthetic_num_codes,
    c.synthetic_examples,
    seed=sum(map(ord, base)),
  )
  source.n = len(slice_range(spec, source.n, split))
  return source


def level_counts(codes_dir: str, split: str, level: int, num_codes: int) -> np.ndarray:
  """How often each code occurs in one level's maps of a split of a code dataset.

  Args:
    codes_dir: the directory `extract_codes` wrote.
    split: a split name with an optional slice.
    level: the level (0 = top).
    num_codes: the codebook size K.

  Returns:
    int64 [K] counts.
  """
  source = CodesSource(codes_dir, split)
  counts = np.zeros(num_codes, np.int64)
  for start in range(0, len(source), 1024):
    for example in source.__getitems__(list(range(start, min(start + 1024, len(source))))):
      counts += np.bincount(example[f"codes{level}"].ravel(), minlength=num_codes)[:num_codes]
  return counts
