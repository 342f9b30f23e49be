"""Random-access image sources: Fashion-MNIST from local idx files, tfds datasets, image folders.

Every source has `__len__` and `__getitem__(i) -> {"image": uint8 [H, W, C], "label": int}`, so
`pipeline.py` can shuffle, shard and resume by index whatever the reader (with grain for
"grain", with plain index arithmetic for the others).
`make_source(data_config, split)` picks the source from `config.data`:

  * "local": Fashion-MNIST from Debian's `dataset-fashion-mnist` idx .gz files. The first run
    writes an uncompressed .npz cache (under `data_dir`, or ~/.cache/vqjax) that later runs load
    in a fraction of a second; tfds cannot write its own format here without TensorFlow.
  * "grain": a tfds dataset prepared as ArrayRecord, read through `tfds.data_source`; it is the
    source of a grain `MapDataset` for training and is read directly in batches for eval.
  * "folder": every PNG/JPEG below `config.data.folder`, labelled by parent directory.

The "tfdata" reader (TFRecord through `tfds.load`) is streaming, not random access; it lives in
`pipeline.py` and only `require_tensorflow` is here.
"""

import gzip
import os
import re
import zlib
from typing import Any

import numpy as np
from PIL import Image

_FASHION_FILES = {
  "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# idx type codes (third magic byte) -> numpy dtype, big-endian as the format stores them.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CACHE_VERSION = 1


def read_idx(path: str) -> np.ndarray:
  """Reads an idx file (optionally gzipped), the format of the original (Fashion-)MNIST files.

  Args:
    path: path of the idx file; a name ending in ".gz" is decompressed.

  Returns:
    The array with the shape and dtype given by the file header (native byte order).

  Raises:
    ValueError: the file is truncated, not gzip, or its header is not a valid idx header.
  """
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        data = f.read()
    else:
      with open(path, "rb") as f:
        data = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise ValueError(f"Cannot read idx file {path}: {e}") from None
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise ValueError(f"Not an idx file (bad magic number {data[:4].hex()!r}): {path}")
  ndim = data[3]
  header = 4 + 4 * ndim
  if ndim == 0 or len(data) < header:
    raise ValueError(f"Truncated idx header ({ndim} dimensions): {path}")
  shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
  dtype = np.dtype(_IDX_DTYPES[data[2]])
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(data) - header != expected:
    raise ValueError(
      f"idx file has {len(data) - header} data bytes, header {shape} needs {expected}: {path}"
    )
  return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def parse_split(split: str) -> tuple[str, str]:
  """Splits "train[:90%]" into ("train", ":90%"); a plain "train" gives ("train", "")."""
  m = re.fullmatch(r"\s*([\w-]+)\s*(?:\[([^\]]*)\])?\s*", split)
  if not m:
    raise ValueError(f"Bad split {split!r}: expected 'name' or 'name[start:stop]'")
  return m.group(1), m.group(2) or ""


def _slice_range(spec: str, n: int, split: str) -> range:
  """Resolves a tfds-like slice ("1000:", ":90%", "-500:") over n examples."""
  if not spec:
    return range(n)
  parts = spec.split(":")
  if len(parts) != 2:
    raise ValueError(f"Bad split slice in {split!r}: expected [start:stop]")

  def bound(s: str, default: int) -> int:
    s = s.strip()
    if not s:
      return default
    try:
      return round(n * float(s[:-1]) / 100) if s.endswith("%") else int(s)
    except ValueError:
      raise ValueError(f"Bad split bound {s!r} in {split!r}") from None

  return range(n)[slice(bound(parts[0], 0), bound(parts[1], n))]


class ArraySource:
  """In-memory uint8 images and int labels; the pipeline reads its arrays directly."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if images.ndim == 3:  # idx images have no channel axis
      images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
      raise ValueError(f"ArraySource needs uint8 [N,H,W,C] and N labels, got {images.shape}")
    self.images = images
    self.labels = np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return {"image": self.images[i], "label": int(self.labels[i])}


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
    An ArraySource of uint8 [N, 28, 28, 1] images and their labels.
  """
  base, spec = parse_split(split)
  if base not in _FASHION_FILES:
    raise ValueError(f"Fashion-MNIST has splits 'train' and 'test', not {base!r}")
  image_path, label_path = (os.path.join(local_dir, f) for f in _FASHION_FILES[base])
  for path in (image_path, label_path):
    if not os.path.isfile(path):
      raise ValueError(
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
      raise ValueError(f"Mismatched idx files {image_path} {images.shape}, {label_path}")
    if cache:
      _write_cache(cache, images=images, labels=labels, key=key)
  rows = _slice_range(spec, len(images), split)
  return ArraySource(images[rows.start : rows.stop : rows.step], labels[rows.start : rows.stop])


def _write_cache(path: str, **arrays: np.ndarray) -> None:
  """Writes an .npz atomically, so concurrent processes never read half a file."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
  except OSError:
    pass  # a read-only cache dir only costs re-parsing on the next run


def convert_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """Converts uint8 [..., H, W, C] with C in {1, 3, 4} to `channels` (1 or 3) channels."""
  c = image.shape[-1]
  if c == 4:  # alpha is dropped: the models see opaque images
    image, c = image[..., :3], 3
  if c == channels:
    return image
  if c == 1 and channels == 3:
    return np.repeat(image, 3, axis=-1)
  if c == 3 and channels == 1:
    # ITU-R 601 luma, as PIL's convert("L").
    y = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)[..., None]
  raise ValueError(f"Cannot convert {c} image channels to {channels}")


class FolderSource:
  """Every PNG/JPEG found recursively below a folder, sorted by path.

  The label is the index of the file's immediate parent directory name among the sorted parent
  names, so "cats/1.png, dogs/2.png" gives 0 and 1, and a flat folder gives 0 everywhere.
  """

  def __init__(self, folder: str, channels: int):
    if not folder or not os.path.isdir(folder):
      raise ValueError(f"Image folder {folder!r} not found: set --config.data.folder")
    paths = []
    for root, dirs, files in os.walk(folder, followlinks=True):
      dirs.sort()
      paths += [os.path.join(root, f) for f in files if f.lower().endswith(_IMAGE_EXTENSIONS)]
    if not paths:
      raise ValueError(f"No .png/.jpg/.jpeg images found below {folder}")
    self.paths = sorted(paths, key=lambda p: os.path.relpath(p, folder))
    parents = [os.path.basename(os.path.dirname(os.path.relpath(p, folder))) for p in self.paths]
    self.class_names = sorted(set(parents))
    index = {name: i for i, name in enumerate(self.class_names)}
    self.labels = np.array([index[p] for p in parents], np.int32)
    self.channels = channels

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> dict[str, Any]:
    path = self.paths[i]
    try:
      with Image.open(path) as im:
        image = np.asarray(im.convert("L" if self.channels == 1 else "RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      raise ValueError(f"Cannot decode image {path}: {e}") from None
    if image.ndim == 2:
      image = image[..., None]
    return {"image": image, "label": int(self.labels[i])}


def folder_source(folder: str, split: str, channels: int) -> FolderSource:
  """A FolderSource over `folder/<split>` when that directory exists, else over all of `folder`."""
  base, spec = parse_split(split)
  sub = os.path.join(folder, base) if folder else ""
  source = FolderSource(sub if sub and os.path.isdir(sub) else folder, channels)
  rows = _slice_range(spec, len(source), split)
  source.paths = [source.paths[i] for i in rows]
  source.labels = source.labels[rows.start : rows.stop : rows.step]
  return source


class TfdsSource:
  """A tfds ArrayRecord dataset read through `tfds.data_source` (no TensorFlow needed).

  Record i is the i-th record of the prepared files: tfds shuffles examples when it writes them,
  so it is not the i-th example the builder generated.
  """

  def __init__(self, name: str, split: str, data_dir: str, download: bool):
    import tensorflow_datasets as tfds  # deferred: tfds takes a second to import

    check_tfds_prepared(name, data_dir, download, "grain")
    try:
      self._ds = tfds.data_source(name, split=split, data_dir=data_dir or None, download=download)
    except NotImplementedError as e:  # prepared as TFRecord: data_source cannot read it
      raise ValueError(f"tfds {name!r} is not ArrayRecord; use reader='tfdata' ({e})") from None

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return _tfds_record(self._ds[i])

  def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
    # One ArrayRecord call for the batch is much faster than one per index; the source is safe
    # to read from the pipeline's decoding threads (checked with 8 threads against serial reads).
    return [_tfds_record(r) for r in self._ds.__getitems__(list(indices))]


def _tfds_record(record: dict[str, Any]) -> dict[str, Any]:
  """Maps a tfds record to the source schema; datasets without "label" get label 0."""
  image = np.asarray(record["image"])
  if image.ndim == 2:
    image = image[..., None]
  return {"image": image, "label": int(record.get("label", 0))}


def check_tfds_prepared(name: str, data_dir: str, download: bool, reader: str) -> None:
  """Fails fast, with one line, when a tfds dataset is not prepared and may not be downloaded.

  Without this check an offline `tfds.load` retries for minutes, and the tfds errors are pages
  long (a catalogue listing) rather than one actionable line.
  """
  import tensorflow_datasets as tfds

  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(
      f"Unknown tfds dataset {name!r}: not in the tfds catalogue nor prepared in "
      f"{data_dir or 'the tfds default data_dir'}"
    ) from None
  if builder.is_prepared() or download:
    return
  hint = ""
  if name == "fashion_mnist":
    hint = "; or `apt-get install dataset-fashion-mnist` and use reader='local'"
  raise ValueError(
    f"tfds dataset {name!r} is not prepared in {os.path.dirname(builder.data_dir)} and "
    f"config.data.download=False (reader={reader!r}): set --config.data.download=True or "
    f"--config.data.data_dir{hint}"
  )


def require_tensorflow() -> Any:
  """Imports TensorFlow for the "tfdata" reader, or fails with how to get it."""
  try:
    import tensorflow as tf
  except ImportError:
    raise ValueError(
      "reader='tfdata' needs TensorFlow: `pip install tensorflow-cpu`, or use reader='grain' "
      "with an ArrayRecord dataset"
    ) from None
  return tf


def resolve_reader(data_config: Any) -> str:
  """The reader for `config.data`: "local", "folder", "grain" or "tfdata" ("auto" resolved)."""
  name, reader = data_config.name, data_config.reader
  if reader not in ("auto", "local", "grain", "tfdata"):
    raise ValueError(f"config.data.reader must be auto|local|grain|tfdata, not {reader!r}")
  if name == "folder":
    return "folder"
  if reader == "local" and name != "fashion_mnist":
    raise ValueError(f"reader='local' reads only fashion_mnist, not {name!r}")
  if reader == "auto":
    local = name == "fashion_mnist" and fashion_mnist_files_exist(data_config.local_dir)
    return "local" if local else "grain"
  return reader


def make_source(data_config: Any, split: str) -> Any:
  """Builds the random-access source of one split.

  Args:
    data_config: `config.data`.
    split: split name, optionally sliced ("train[:1000]", "test[50%:]").

  Returns:
    A source with `__len__` and `__getitem__` (ArraySource, FolderSource or TfdsSource).
  """
  reader = resolve_reader(data_config)
  if reader == "local":
    cache_dir = default_cache_dir(data_config.data_dir)
    return load_fashion_mnist(data_config.local_dir, split, cache_dir)
  if reader == "folder":
    return folder_source(data_config.folder, split, data_config.channels)
  if reader == "grain":
    return TfdsSource(data_config.name, split, data_config.data_dir, data_config.download)
  raise ValueError("reader='tfdata' streams TFRecords: it has no random-access source")
