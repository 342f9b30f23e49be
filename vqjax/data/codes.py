"""Code datasets: the code maps a trained stage-1 model gives every example, for stage 2.

`python -m vqjax.extract_codes` writes a directory

  metadata.json                       format, levels (name, shape), num_codes, image shape,
                                      whether labels exist, the stage-1 run it came from, and
                                      per split the example count and shard count
  {split}-{k:05d}-of-{n:05d}.array_record
                                      shard k of a split: one record per example, in example
                                      order, each an .npz of {"codes0", "codes1", ..., "label"}
                                      (codes0 the coarsest level, uint16)

and `CodesSource` reads one split back as a random-access source (`sources.SOURCES["codes"]`),
so the usual grain pipeline shuffles, shards per host and resumes it like any other dataset.
`SyntheticCodesSource` (`name="synthetic_codes"`) gives random maps of given shapes instead,
for smoke runs and benchmarks without a stage-1 model.
"""

import io
import json
import os
from typing import Any

import numpy as np

from vqjax import errors

FORMAT = "vqjax-codes/1"
METADATA = "metadata.json"


def shard_name(split: str, index: int, count: int) -> str:
  """File name of shard `index` of `count` of a split."""
  return f"{split}-{index:05d}-of-{count:05d}.array_record"


def encode_example(example: dict[str, np.ndarray]) -> bytes:
  """One example's arrays -> the bytes of one record (an uncompressed .npz)."""
  buffer = io.BytesIO()
  np.savez(buffer, **example)
  return buffer.getvalue()


def decode_example(record: bytes) -> dict[str, np.ndarray]:
  """The inverse of `encode_example`: code maps as int32, the label as an int32 scalar."""
  with np.load(io.BytesIO(record)) as z:
    return {k: np.asarray(z[k], np.int32) for k in z.files}


def read_metadata(codes_dir: str) -> dict:
  """The metadata of a code dataset, with a one-line error when there is none."""
  path = os.path.join(os.path.expanduser(codes_dir), METADATA)
  if not codes_dir or not os.path.isfile(path):
    raise errors.UserError(
      f"no code dataset at {codes_dir!r} ({METADATA} not found): run `python -m "
      "vqjax.extract_codes --workdir STAGE1_RUN --out DIR` and set --config.data.codes_dir=DIR"
    )
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise errors.UserError(f"cannot read {path}: {e}") from None
  if meta.get("format") != FORMAT:
    raise errors.UserError(f"{path} is not a vqjax code dataset (format {meta.get('format')!r})")
  return meta


def write_metadata(codes_dir: str, meta: dict) -> None:
  """Writes metadata.json atomically."""
  path = os.path.join(codes_dir, METADATA)
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


class CodesSource:
  """One split of a code dataset as a random-access source of {"codes{i}", "label"} examples.

  Args:
    codes_dir: the directory `extract_codes` wrote.
    split: a split name with an optional slice ("train", "test[:1000]").
  """

  def __init__(self, codes_dir: str, split: str):
    import grain  # deferred: only code datasets need it here

    from vqjax.data import sources

    self.metadata = meta = read_metadata(codes_dir)
    base, spec = sources.parse_split(split)
    if base not in meta["splits"]:
      raise errors.UserError(
        f"code dataset {codes_dir} has splits {sorted(meta['splits'])}, not {base!r}"
      )
    info = meta["splits"][base]
    paths = [
      os.path.join(codes_dir, shard_name(base, k, info["num_shards"]))
      for k in range(info["num_shards"])
    ]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
      raise errors.UserError(
        f"code dataset {codes_dir} is incomplete: {len(missing)} shard(s) of {base!r} missing "
        f"(e.g. {missing[0]}); re-run extract_codes to finish it"
      )
    self._records = grain.sources.ArrayRecordDataSource(paths)
    if len(self._records) != info["num_examples"]:
      raise errors.UserError(
        f"code dataset {codes_dir} split {base!r} holds {len(self._records)} records, its "
        f"metadata says {info['num_examples']}"
      )
    self._rows = sources.slice_range(spec, len(self._records), split)

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
  from vqjax.data.sources import parse_split, slice_range

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
