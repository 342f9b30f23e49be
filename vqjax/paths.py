"""Paths: one type, `etils.epath.Path`, for a local folder and a bucket (`gs://`, `s3://`) alike.

Every file vqjax reads or writes goes through `etils.epath`, so `--workdir gs://bucket/run` is
a workdir in the bucket, never a local folder named `gs:`. `resolve` is the one place a path
given by a user becomes absolute: a local path is expanded (`~`) and made absolute exactly as
before; a URL is kept as it is.

Three things differ on a bucket, by nature of object stores:
  - `write_text` replaces a file atomically on a local disk (a temporary file renamed into
    place); on a bucket one upload is already all-or-nothing, so it writes the object directly.
  - Appending does not exist on a bucket (`metrics.jsonl` is rewritten whole instead;
    training/logs.py).
  - ArrayRecord files are read by a C++ reader that opens local files only: `local_copy`
    copies a file in a bucket to a local cache once (`VQJAX_CACHE`, default ~/.cache/vqjax)
    and it is read there (prepared and code shards, a tfds data_dir's ArrayRecord files); shards
    are written locally and then copied into the bucket. Each host copies what it reads.

Testing against a local GCS emulator (`gcp-storage-emulator`, as the tests do) needs three
environment variables: `STORAGE_EMULATOR_HOST=http://localhost:PORT` (gcsfs, which epath uses),
`TENSORSTORE_GCS_HTTP_URL=http://localhost:PORT` (TensorStore, which Orbax writes arrays with)
and `EPATH_USE_TF=false` (with TensorFlow installed, epath otherwise uses TensorFlow's GCS client,
which ignores the emulator).
"""

import contextlib
import hashlib
import os

from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
  """Whether `path` is a URL (`gs://bucket/...`, `s3://...`) rather than a local path."""
  return "://" in os.fspath(path)


def resolve(path: PathLike) -> epath.Path:
  """A user's path as an absolute `epath.Path`: a local one expanded (`~`) and made absolute
  (as `os.path.abspath` does), a URL kept as it is."""
  if is_remote(path):
    return epath.Path(os.fspath(path))
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def absolute(path: PathLike) -> str:
  """`resolve` as a string: what a run records of the paths it was given."""
  return os.fspath(resolve(path))


def write_text(path: PathLike, text: str) -> None:
  """Replaces a file's contents with `text`, never leaving a half-written file: locally through
  a temporary file renamed into place (removed again if the write fails, a full disk); on a
  bucket as one upload, which an object store makes all-or-nothing itself."""
  path = epath.Path(path)
  if is_remote(path):
    path.write_text(text)
    return
  tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
  try:
    tmp.write_text(text)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      tmp.unlink()
    raise


def getsize(path: PathLike) -> int:
  """A file's size in bytes (`os.path.getsize` for any path)."""
  return int(epath.Path(path).stat().length)


def files_under(root: PathLike) -> list[str]:
  """Every file below `root`, as paths relative to it ('/'-separated), sorted. On a bucket it
  lists level by level (epath's recursive glob is refused there, to bound the requests)."""
  root = epath.Path(root)
  out, pending = [], [root]
  while pending:
    for child in pending.pop().iterdir():
      if child.is_dir():
        pending.append(child)
      else:
        out.append(os.fspath(child)[len(os.fspath(root)) :].lstrip("/"))
  return sorted(out)


def cache_root() -> str:
  """vqjax's local cache directory: `VQJAX_CACHE`, else ~/.cache/vqjax."""
  return os.path.expanduser(os.environ.get("VQJAX_CACHE") or os.path.join("~", ".cache", "vqjax"))


def local_root(directory: PathLike) -> str:
  """Where `local_copy(..., under=directory)` puts its copies: `<cache>/remote/<hash of URL>`."""
  digest = hashlib.sha1(os.fspath(directory).rstrip("/").encode()).hexdigest()[:16]
  return os.path.join(cache_root(), "remote", digest)


def local_copy(path: PathLike, under: PathLike | None = None) -> str:
  """A local file with the contents of `path`: `path` itself when local; for a file in a bucket,
  a copy in the local cache, fetched again when the sizes differ or the file in the bucket is
  newer. For readers that open local files only (ArrayRecord's).

  Args:
    path: the file.
    under: a directory above `path` (in the bucket): the copy keeps its path relative to it
      below `local_root(under)`, so several files keep their layout (a tfds data_dir). By
      default the copy is `local_root(path)/<name>`.
  """
  if not is_remote(path):
    return os.fspath(path)
  source = epath.Path(path)
  if under is None:
    target = epath.Path(local_root(source), source.name)
  else:
    rel = os.fspath(source)[len(os.fspath(under).rstrip("/")) :].lstrip("/")
    target = epath.Path(local_root(under), rel)
  stat = source.stat()
  fresh = target.exists() and target.stat().length == stat.length
  if not (fresh and target.stat().mtime >= stat.mtime):
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    source.copy(tmp, overwrite=True)
    os.replace(tmp, target)
  return os.fspath(target)
