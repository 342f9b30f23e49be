"""Random-access sources of examples: local Fashion-MNIST, image folders, tfds, in-memory arrays.

A source has `__len__` and `__getitem__(i) -> {feature name: numpy value}`; it may add
`__getitems__(indices)` (one batched read) and `name_of(i)` (how errors name example i).
Feature names are free; `pipeline.py` treats the one named "image" (uint8 [H, W, C]) as an
image and passes every other feature (a "label", integer code maps, ...) through untouched.

`SOURCES` maps `config.data.name` to a factory `(data_config, split) -> source` for the data
vqjax reads itself; names not in it come from the tfds catalogue. `resolve_reader` turns
`config.data.reader` ("auto" included) into the concrete reader:

  * "local": a `SOURCES` entry; for "fashion_mnist", Debian's `dataset-fashion-mnist` idx .gz
    files, parsed once into an .npz cache (under `data_dir`, or ~/.cache/vqjax).
  * "folder": every PNG/JPEG below `config.data.folder`, labelled by parent directory; files
    PIL cannot read are found before training and skipped (`folder.py`).
  * "grain": a tfds dataset prepared as ArrayRecord, read through `tfds.data_source`.
  * "tfdata": TFRecord through `tfds.load` (needs TensorFlow); streaming, not random access.
The tfds readers of both kinds live in `tfds_data.py`.
"""

import gzip
import os
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from vqjax.data import codes, folder, prepared, tfds_data
from vqjax.data.splits import parse_split, slice_range
from vqjax.errors import UserError

_FASHION_FILES = {
  "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# idx type codes (third magic byte) -> numpy dtype, big-endian as the format stores them.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CACHE_VERSION = 1
READERS = ("auto", "local", "folder", "grain", "tfdata")


def read_idx(path: str) -> np.ndarray:
  """Reads an idx file (optionally gzipped), the format of the original (Fashion-)MNIST files.

  Args:
    path: path of the idx file; a name ending in ".gz" is decompressed.

  Returns:
    The array with the shape and dtype given by the file header (native byte order).

  Raises:
    UserError: the file is truncated, not gzip, or its header is not a valid idx header.
  """
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        data = f.read()
    else:
      with open(path, "rb") as f:
        data = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise UserError(f"Cannot read idx file {path}: {e}") from None
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise UserError(f"Not an idx file (bad magic number {data[:4].hex()!r}): {path}")
  ndim = data[3]
  header = 4 + 4 * ndim
  if ndim == 0 or len(data) < header:
    raise UserError(f"Truncated idx header ({ndim} dimensions): {path}")
  shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
  dtype = np.dtype(_IDX_DTYPES[data[2]])
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(data) - header != expected:
    raise UserError(
      f"idx file has {len(data) - header} data bytes, header {shape} needs {expected}: {path}"
    )
  return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


class ArraySource:
  """Examples held in memory as arrays of equal length, one per feature.

  The pipeline reads a batch with one fancy-index per feature (`read_batch`), not example by
  example.

  Attributes:
    features: {name: array [N, ...]}; "image", when present, is uint8 [N, H, W, C].
  """

  def __init__(self, features: dict[str, np.ndarray]):
    """Wraps `features`.

    Args:
      features: {name: array [N, ...]}, all with the same N; "image" uint8 [N, H, W, C] or
        [N, H, W] (given a channel axis).

    Raises:
      UserError: the arrays differ in length, or "image" is not uint8 [N, H, W(, C)].
    """
    features = {k: np.asarray(v) for k, v in features.items()}
    if not features:
      raise UserError("ArraySource needs at least one feature")
    image = features.get("image")
    if image is not None:
      if image.ndim == 3:  # idx images have no channel axis
        image = features["image"] = image[..., None]
      if image.ndim != 4 or image.dtype != np.uint8:
        raise UserError(
          f"ArraySource 'image' must be uint8 [N, H, W, C], got {image.dtype} {image.shape}"
        )
    lengths = {k: len(v) for k, v in features.items()}
    if len(set(lengths.values())) != 1:
      raise UserError(f"ArraySource features differ in length: {lengths}")
    self.features = features
    self._n = next(iter(lengths.values()))

  @classmethod
  def from_images(cls, images: np.ndarray, labels: np.ndarray) -> "ArraySource":
    """An ArraySource of {"image": uint8 images, "label": int32 labels}."""
    return cls({"image": images, "label": np.asarray(labels, np.int32)})

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {k: v[i] for k, v in self.features.items()}

  def read_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The examples at `indices`, stacked: {name: array [len(indices), ...]}."""
    return {k: v[indices] for k, v in self.features.items()}

  def slice(self, rows: range) -> "ArraySource":
    """The examples in `rows` (a range with step 1), as views."""
    return ArraySource({k: v[rows.start : rows.stop] for k, v in self.features.items()})


def default_cache_dir(data_dir: str) -> str:
  """Where local data is cached: `data_dir` when set, else ~/.cache/vqjax."""
  return data_dir or os.path.join(os.path.expanduser("~"), ".cache", "vqjax")


def fashion_mnist_files_exist(local_dir: str) -> bool:
  """True when all four Fashion-MNIST idx .gz files are in `local_dir`."""
  return bool(local_dir) and all(
    os.path.isfile(os.path.join(local_dir, f)) for pair in _FASHION_FILES.values() for f in pair
  )


def load_fashion_mnist(local_dir: str, split: str, cache_dir: str) -> ArraySource:
  """Loads a Fashion-MNIST split from idx .gz files, through a cache written on first use.

  Args:
    local_dir: directory holding Debian's idx .gz files.
    split: "train" or "test", optionally sliced ("train[:1000]").
    cache_dir: directory for the prepared .npz; "" disables caching.

  Returns:
    An ArraySource of {"image": uint8 [N, 28, 28, 1], "label": int32 [N]}.
  """
  base, spec = parse_split(split)
  if base not in _FASHION_FILES:
    raise UserError(f"Fashion-MNIST has splits 'train' and 'test', not {base!r}")
  image_path, label_path = (os.path.join(local_dir, f) for f in _FASHION_FILES[base])
  for path in (image_path, label_path):
    if not os.path.isfile(path):
      raise UserError(
        f"Fashion-MNIST file {path} not found: `apt-get install dataset-fashion-mnist` or set "
        "--config.data.local_dir to a directory with the idx .gz files"
      )
  # The source sizes key the cache, so swapping the idx files invalidates it.
  key = np.array([_CACHE_VERSION, os.path.getsize(image_path), os.path.getsize(label_path)])
  cache = os.path.join(cache_dir, "fashion_mnist_local", f"{base}.npz") if cache_dir else ""
  images = labels = None
  if cache and os.path.isfile(cache):
    try:
      with np.load(cache) as z:
        if np.array_equal(z["key"], key):
          images, labels = z["images"], z["labels"]
    except (OSError, ValueError, KeyError, zlib.error):
      pass  # a damaged cache is rebuilt below
  if images is None:
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
      raise UserError(f"Mismatched idx files {image_path} {images.shape}, {label_path}")
    if cache:
      _write_npz(cache, images=images, labels=labels, key=key)
  rows = slice_range(spec, len(images), split)
  return ArraySource.from_images(images, labels).slice(rows)


def _write_npz(path: str, **arrays: np.ndarray) -> None:
  """Writes an .npz atomically, so concurrent processes never read half a file."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
  except OSError:
    pass  # a read-only cache dir only costs re-parsing on the next run


def _fashion_mnist(data_config: Any, split: str) -> ArraySource:
  return load_fashion_mnist(data_config.local_dir, split, default_cache_dir(data_config.data_dir))


def _folder(data_config: Any, split: str) -> Any:
  # Checking is file I/O: more threads than cores pay off on network disks.
  threads = max(16, data_config.num_workers)
  source = folder.folder_source(
    data_config.folder,
    split,
    data_config.channels,
    default_cache_dir(data_config.data_dir),
    threads,
  )
  if data_config.resize == "resize_crop":  # the only mode that resizes: JPEGs decode small
    source.min_size = data_config.image_size
  return source


# config.data.name -> factory(data_config, split) -> source, for the data vqjax reads itself
# (reader "local", or "folder" for "folder"); other names are looked up in the tfds catalogue.
def _synthetic_codes(data_config: Any, split: str) -> Any:
  return codes.synthetic_source(data_config, split)


def _codes(data_config: Any, split: str) -> Any:
  return codes.CodesSource(data_config.codes_dir, split)


def _prepared(data_config: Any, split: str) -> Any:
  return prepared.prepared_source(data_config, split)


SOURCES: dict[str, Callable[[Any, str], Any]] = {
  "synthetic_codes": _synthetic_codes,
  "fashion_mnist": _fashion_mnist,
  "folder": _folder,
  "codes": _codes,  # code maps written by `python -m vqjax.extract_codes` (data/codes.py)
  "prepared": _prepared,  # images decoded and fitted once by `python -m vqjax.prepare`
}


def resolve_reader(data_config: Any) -> str:
  """The concrete reader of `config.data`: "local", "folder", "grain" or "tfdata".

  "auto", "local" or "folder" read name="folder" with "folder". Otherwise "auto" picks "local"
  for the other `SOURCES` names and "grain" (tfds ArrayRecord) for the rest; "fashion_mnist",
  also in the tfds catalogue, is "local" when its idx files are in `local_dir`, else "grain".
  So "auto" can resolve differently on another machine; the iterator state records the concrete
  reader.

  Raises:
    UserError: an unknown reader, or one that cannot read `config.data.name`.
  """
  name, reader = data_config.name, data_config.reader
  if reader not in READERS:
    raise UserError(f"config.data.reader must be {'|'.join(READERS)}, not {reader!r}")
  if name == "folder" or reader == "folder":
    # "local" is accepted too: a folder is data vqjax reads itself, like the other SOURCES.
    if name != "folder" or reader not in ("auto", "local", "folder"):
      raise UserError(
        f"reader 'folder' reads only name='folder' (got name={name!r}, "
        f"reader={reader!r}): set --config.data.reader=folder with "
        "--config.data.name=folder"
      )
    return "folder"
  if reader == "local" and name not in SOURCES:
    raise UserError(
      f"reader='local' reads {sorted(set(SOURCES) - {'folder'})}, not {name!r}; "
      "set --config.data.reader=grain or tfdata for a tfds dataset"
    )
  if reader == "auto":
    if name == "fashion_mnist":
      return "local" if fashion_mnist_files_exist(data_config.local_dir) else "grain"
    return "local" if name in SOURCES else "grain"
  return reader


class SubsetSource:
  """The examples `rows` of another source, in that order (what `exclude_labels` keeps).

  Attributes:
    source: the source the examples come from.
    rows: int64 [N], their indices in `source`.
  """

  def __init__(self, source: Any, rows: np.ndarray):
    self.source, self.rows = source, np.asarray(rows, np.int64)

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return self.source[int(self.rows[i])]

  def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
    rows = [int(self.rows[i]) for i in indices]
    if hasattr(self.source, "__getitems__"):
      return self.source.__getitems__(rows)
    return [self.source[r] for r in rows]

  def name_of(self, i: int) -> str:
    """How errors name example i: as the underlying source names it."""
    row = int(self.rows[i])
    return self.source.name_of(row) if hasattr(self.source, "name_of") else f"example {row}"


def source_labels(source: Any, what: str = "this source") -> np.ndarray:
  """The "label" of every example of a source, without decoding images where it can.

  In-memory sources and image folders hold their labels; other sources (tfds, code datasets)
  are read example by example, once, in chunks.

  Args:
    source: a source of this module.
    what: how errors name the source.

  Returns:
    int64 [len(source)].

  Raises:
    UserError: the source has no "label" feature.
  """
  if isinstance(source, ArraySource):
    labels = source.features.get("label")
  elif isinstance(source, folder.FolderSource):  # labels known from the paths: no decoding
    labels = source.labels
  else:
    labels, chunk = [], 1024
    for start in range(0, len(source), chunk):
      idx = list(range(start, min(start + chunk, len(source))))
      items = (
        source.__getitems__(idx)
        if hasattr(source, "__getitems__")
        else map(source.__getitem__, idx)
      )
      for item in items:
        if "label" not in item:
          raise UserError(f"{what} has no 'label' feature (it has {sorted(item)})")
        labels.append(int(np.asarray(item["label"]).reshape(-1)[0]))
    labels = np.asarray(labels, np.int64)
  if labels is None:
    features = sorted(source.features)
    raise UserError(f"{what} has no 'label' feature (it has {features})")
  return np.asarray(labels).astype(np.int64).reshape(len(source))


def exclude_labels(source: Any, labels: Any, what: str = "this source") -> Any:
  """The examples of `source` whose "label" is not one of `labels`, in their order.

  Args:
    source: a source of this module.
    labels: the integer labels to drop; empty = `source` unchanged.
    what: how errors name the source (e.g. "fashion_mnist split 'train'").

  Returns:
    An ArraySource for an in-memory source, else a `SubsetSource`.

  Raises:
    UserError: a label is not an integer, the source has no labels, or nothing is left.
  """
  labels = tuple(labels or ())
  if not labels:
    return source
  if not all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in labels):
    raise UserError(f"config.data.exclude_labels must be integers, got {labels!r}")
  keep = np.flatnonzero(~np.isin(source_labels(source, what), np.asarray(labels, np.int64)))
  if len(keep) == 0:
    raise UserError(
      f"config.data.exclude_labels={list(labels)} leaves none of the {len(source)} examples of "
      f"{what}"
    )
  if isinstance(source, ArraySource):
    return ArraySource({k: v[keep] for k, v in source.features.items()})
  return SubsetSource(source, keep)


def make_source(data_config: Any, split: str) -> Any:
  """Builds the random-access source of one split.

  Examples whose "label" is in `config.data.exclude_labels` are left out (a stage-1 model
  trained on "normal" classes only, for anomaly detection: `python -m vqjax.anomaly`).

  Args:
    data_config: `config.data`.
    split: split name, optionally sliced ("train[:1000]", "test[50%:]"); the slice is taken
      before the label filter.

  Returns:
    A source with `__len__` and `__getitem__` (from `SOURCES`, a TfdsSource, or a subset of
    either).
  """
  reader = resolve_reader(data_config)
  if reader in ("local", "folder"):
    source = SOURCES[data_config.name](data_config, split)
  elif reader == "grain":
    source = tfds_data.TfdsSource(
      data_config.name, split, data_config.data_dir, data_config.download, SOURCES
    )
  else:
    raise UserError("reader='tfdata' streams TFRecords: it has no random-access source")
  excluded = getattr(data_config, "exclude_labels", None) or ()
  return exclude_labels(source, excluded, f"{data_config.name} split {split!r}")
