"""Prepared image datasets: a dataset decoded and fitted once, then read with no decoding.

`python -m vqjax.prepare` reads every example of a config's splits exactly as the data layer
does (`pipeline.load_batch` over `sources.make_source`: decoded, channel-converted and fitted
to `image_size` by `resize`, still uint8, not flipped) and writes a directory

  metadata.json                       format, image_size, channels, resize, the features'
                                      dtypes and shapes, the source config it was read with,
                                      per split the split it came from ("train[:64]"), the
                                      example count and the shard names, and whether it is
                                      complete
  {split}-{k:05d}-of-{n:05d}.array_record
                                      shard k of a split: one record per example, in example
                                      order, each the arrays {"image": uint8 [S, S, C],
                                      "label", ...} (the record of the code datasets,
                                      `codes.encode_example`)

`PreparedSource` (`--config.data.name=prepared --config.data.prepared_dir=DIR`) reads one split
back as a random-access source whose images already have the configured size, so the pipeline
only scales and flips them: the decode and resize cost is paid once instead of every epoch.
"""

from typing import Any

import numpy as np

from vqjax import errors
from vqjax.data import codes
from vqjax.data.splits import parse_split

# /2: records as `codes.encode_example` writes them; /1's .npz records are still read.
FORMAT = "vqjax-prepared/2"
READABLE_FORMATS = ("vqjax-prepared/1", FORMAT)
WHAT = "prepared dataset"
HINT = (
  "run `python -m vqjax.prepare --config EXPERIMENT --out DIR` and set "
  "--config.data.prepared_dir=DIR"
)
# The config fields that decide the stored pixels; a reader asking for others needs a new prepare.
FIT_FIELDS = ("image_size", "channels", "resize")


def read_metadata(prepared_dir: str, complete: bool = True) -> dict:
  """The metadata of a prepared dataset.

  Args:
    prepared_dir: the directory `python -m vqjax.prepare` wrote.
    complete: require that every shard was written (False while preparing).

  Returns:
    The parsed metadata.json.

  Raises:
    errors.UserError: one line when there is none, it is of another format, or (with
      `complete`) the preparation has not finished.
  """
  meta = codes.read_dataset_metadata(prepared_dir, READABLE_FORMATS, WHAT, HINT)
  if complete and not meta.get("complete"):
    raise errors.UserError(
      f"{WHAT} {prepared_dir} is incomplete (its preparation did not finish); run the same "
      "`python -m vqjax.prepare` command again to finish it"
    )
  return meta


def check_fit(meta: dict, data_config: Any, prepared_dir: str) -> None:
  """Raises a one-line UserError when the images were fitted otherwise than `data_config` asks.

  Args:
    meta: the dataset's metadata.
    data_config: `config.data` of the run reading it.
    prepared_dir: how the error names the dataset.
  """
  differ = [f for f in FIT_FIELDS if meta.get(f) != data_config[f]]
  if differ:
    made = ", ".join(f"{f}={meta.get(f)!r}" for f in differ)
    asked = " ".join(f"--config.data.{f}={data_config[f]}" for f in differ)
    raise errors.UserError(
      f"{WHAT} {prepared_dir} was made with {made}, the config asks {asked}: prepare it again "
      "with this config (another --out) or set the config to match"
    )


class PreparedSource:
  """One split of a prepared dataset as a random-access source of {"image", "label", ...}.

  Args:
    prepared_dir: the directory `python -m vqjax.prepare` wrote.
    split: a split name with an optional slice. A split prepared whole can be sliced here
      ("train[:1000]"); a split prepared from a slice must be asked for by that same slice.
    data_config: `config.data` of the reader; when given, its image_size, channels and resize
      must be those the dataset was made with.

  Attributes:
    metadata: the dataset's metadata.json.
  """

  def __init__(self, prepared_dir: str, split: str, data_config: Any = None):
    self.metadata = meta = read_metadata(prepared_dir)
    if data_config is not None:
      check_fit(meta, data_config, prepared_dir)
    base, _ = parse_split(split)
    made_from = meta["splits"].get(base, {}).get("split", base)
    if "".join(split.split()) == "".join(made_from.split()):
      split = base  # what was prepared is exactly what is asked: every record
    elif made_from != base:
      raise errors.UserError(
        f"{WHAT} {prepared_dir} holds {made_from!r}, not {split!r}: prepare --splits {split} "
        f"(another --out) or set the split to {made_from!r}"
      )
    self._records, self._rows = codes.open_split(
      prepared_dir, meta, split, WHAT, "run the same `python -m vqjax.prepare` again to finish it"
    )
    self._dir, self._base = prepared_dir, base

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return codes.load_record(self._records[self._rows[int(i)]])

  def read_batch(self, indices: Any) -> dict[str, np.ndarray]:
    """The examples at `indices`, stacked: {name: array [len(indices), ...]} (one read)."""
    rows = [self._rows[int(i)] for i in np.asarray(indices).reshape(-1)]
    examples = [codes.load_record(r) for r in self._records.__getitems__(rows)] if rows else []
    if not examples:
      features = self.metadata["features"]
      return {k: np.zeros((0, *f["shape"]), np.dtype(f["dtype"])) for k, f in features.items()}
    return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}

  def name_of(self, i: int) -> str:
    """How errors name example i: the dataset, split and record."""
    return f"{self._dir} {self._base} record {self._rows[int(i)]}"


def prepared_source(data_config: Any, split: str) -> PreparedSource:
  """The `name="prepared"` source of one split (a `sources.SOURCES` factory)."""
  return PreparedSource(data_config.prepared_dir, split, data_config)
