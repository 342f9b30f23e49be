"""Image folders as a source: every PNG/JPEG below a directory, labelled by parent directory.

Files are checked once before training (in threads; the result is cached by path, size and
mtime), unreadable ones are skipped, counted and listed in `bad_images.txt`, and the split's
slice applies to the readable files only. `decode_image` reads one file (16-bit grayscale
scaled to 8 bits, JPEGs decoded at a reduced size where the target allows).

The folder may be in a bucket (`gs://...`, through etils.epath): its files are listed level by
level (an object store has no links to follow) and each image is read whole into memory.
"""

import concurrent.futures
import hashlib
import io
import json
import os
from typing import Any

import numpy as np
from absl import logging
from etils import epath
from PIL import Image

from vqjax import paths
from vqjax.data.splits import parse_split, slice_range
from vqjax.errors import UserError

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_CHECK_VERSION = 3  # 2: JPEGs without an end marker decoded; 3: grey-filled JPEG tails
_WARNED: set[tuple[str, tuple[str, ...]]] = set()  # (folder, skipped files) already logged


def _open_image(path: str) -> Image.Image:
  """PIL's `Image.open` of a local file, or of a file in a bucket (read whole: one request)."""
  if paths.is_remote(path):
    return Image.open(io.BytesIO(epath.Path(path).read_bytes()))
  return Image.open(path)


def _write_text(path: str, text: str) -> bool:
  """Writes a text file atomically; False where the directory is not writable."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
    return True
  except OSError:
    return False


def decode_image(path: str, channels: int, min_size: int = 0) -> np.ndarray:
  """Decodes an image file to uint8 [H, W, channels].

  16-bit grayscale (PIL modes "I;16*" and "I") is scaled to 8 bits as round(value / 257), so
  65535 maps to 255; PIL's own convert("L") would clip everything above 255.

  With `min_size` (the caller then resizes the shorter side to it: `resize="resize_crop"`), a
  JPEG at least twice that size is decoded at 1/2, 1/4 or 1/8 scale instead (libjpeg's DCT
  scaling through PIL's `draft`: the largest reduction that keeps the shorter side >=
  `min_size`), which skips most of the decoding work and most of the resize that follows.
  It is deterministic; other files, and smaller JPEGs, decode at full size.

  Args:
    path: the image file.
    channels: 1 (grayscale) or 3 (RGB).
    min_size: the size the shorter side will be resized to; 0 = decode at full size.

  Raises:
    UserError: one line naming the file, when it cannot be decoded.
  """
  try:
    with _open_image(path) as im:
      if im.mode.startswith("I;16") or im.mode == "I":
        wide = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        # (v + 128) // 257 is v / 257 rounded: v / 257 is never exactly halfway for integer v.
        image = ((wide + 128) // 257).astype(np.uint8)[..., None]
        return np.repeat(image, 3, axis=-1) if channels == 3 else image
      if min_size and im.format == "JPEG" and min(im.size) >= 2 * min_size:
        im.draft(None, (min_size, min_size))  # mode unchanged: convert() below does colour
      image = np.asarray(im.convert("L" if channels == 1 else "RGB"))
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    reason = " ".join(str(e).split())  # one line, whatever PIL put in the message
    raise UserError(f"Cannot decode image {path}: {reason}") from None
  return image[..., None] if image.ndim == 2 else image


def _ends_with_jpeg_end_marker(path: str) -> bool:
  with epath.Path(path).open("rb") as f:
    f.seek(max(0, paths.getsize(path) - 64))
    return f.read().rstrip(b"\x00").endswith(b"\xff\xd9")


def _jpeg_tail_is_grey_fill(path: str) -> bool:
  """Whether a JPEG's last block decodes to libjpeg's fill for missing data: a file cut short
  with an end marker after it (some copy tools write one) decodes without an error, the blocks
  after the cut all mid-grey (every DCT coefficient 0: exactly 128 in every channel). Decoded at
  1/8 scale, where each 8x8 block is its DC term alone, so the check costs a fraction of a
  decode. A genuine image whose bottom-right block is exactly 128 in every channel is skipped
  too (rare in photographs)."""
  with _open_image(path) as im:
    w, h = im.size
    im.draft(im.mode, (max(1, -(-w // 8)), max(1, -(-h // 8))))
    tail = np.asarray(im)
  tail = tail.reshape(tail.shape[0], tail.shape[1], -1)[-1, -1]
  return bool(np.all(tail == 128))


def _check_image(path: str) -> str:
  """ "" when PIL can open and verify `path`, else why not (one line).

  `verify` walks the file's structure (a PNG's chunk CRCs) without decoding pixels, so it is
  cheap, but it reads only a JPEG's header: a JPEG is also checked for its end marker, and one
  without (a file cut short, e.g. by an interrupted copy) is decoded to decide; one cut short
  with an end marker appended is told by its grey-filled tail (`_jpeg_tail_is_grey_fill`). A
  JPEG damaged inside its entropy-coded data otherwise still passes and fails at decode time.
  """
  try:
    with _open_image(path) as im:
      fmt = im.format
      im.verify()
    if fmt == "JPEG" and not _ends_with_jpeg_end_marker(path):
      with _open_image(path) as im:
        im.load()
    if fmt == "JPEG" and _jpeg_tail_is_grey_fill(path):
      return "its data ends early (cut short, an end marker after it): the last blocks are grey"
    return ""
  except Exception as e:  # noqa: BLE001 -- whatever PIL raises, the file is unusable
    return " ".join(f"{type(e).__name__}: {e}".split())


def _folder_check_path(cache_dir: str, folder: str) -> str:
  digest = hashlib.sha1(paths.absolute(folder).encode()).hexdigest()[:16]
  return os.path.join(cache_dir, "folder_checks", digest) if cache_dir else ""


def check_images(
  folder: str, relpaths: list[str], cache_dir: str, threads: int = 16
) -> dict[str, str]:
  """Checks that PIL can read every image, reusing earlier results for unchanged files.

  A result is keyed by the file's relative path, size and modification time, kept in
  `<cache_dir>/folder_checks/<hash of folder>/checks.json`, so a relaunch on a big folder only
  stats its files.

  Args:
    folder: the root the paths are relative to.
    relpaths: image paths relative to `folder`.
    cache_dir: where the results are kept; "" = check every file every time.
    threads: files checked in parallel.

  Returns:
    {relative path: why it is unreadable} for the bad files only.
  """
  where = _folder_check_path(cache_dir, folder)
  cache_file = os.path.join(where, "checks.json") if where else ""
  known = {}
  if cache_file and os.path.isfile(cache_file):
    try:
      with open(cache_file) as f:
        saved = json.load(f)
      if saved.get("version") == _CHECK_VERSION:
        known = saved["files"]
    except (OSError, ValueError, KeyError, TypeError):
      pass  # a damaged record only costs checking again

  def one(rel: str) -> tuple[str, list[Any]]:
    path = os.path.join(folder, rel)
    try:
      if paths.is_remote(path):
        st = epath.Path(path).stat()
        size, mtime = int(st.length), int(st.mtime)
      else:
        st = os.stat(path)
        size, mtime = st.st_size, st.st_mtime_ns
    except OSError as e:
      return rel, [-1, -1, f"cannot stat: {e}"]
    entry = known.get(rel)
    if isinstance(entry, list) and entry[:2] == [size, mtime]:
      return rel, entry
    return rel, [size, mtime, _check_image(path)]

  # Threads, not processes: the work is file reads and zlib, which release the GIL.
  with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
    results = dict(pool.map(one, relpaths, chunksize=64))
  if cache_file and results != {k: known.get(k) for k in results}:
    _write_text(
      cache_file,
      json.dumps({"version": _CHECK_VERSION, "folder": paths.absolute(folder), "files": results}),
    )
  return {rel: r[2] for rel, r in results.items() if r[2]}


def image_paths(folder: str) -> list[str]:
  """The image files below `folder`, relative to it, sorted.

  Links to directories are followed, but each real directory is walked once (by device and
  inode), and never one outside the folder's real path: a link back up (`loop -> ..`) would
  otherwise repeat every image until the kernel's link limit, and a link above the folder
  would train on files outside it. What was skipped is said in one warning line.
  """
  if paths.is_remote(folder):  # no links in a bucket
    return [f for f in paths.files_under(folder) if f.lower().endswith(_IMAGE_EXTENSIONS)]
  top = os.path.realpath(folder)
  seen: set[tuple[int, int]] = set()
  skipped: list[str] = []
  rel: list[str] = []
  for root, dirs, files in os.walk(folder, followlinks=True):
    st = os.stat(root)
    if (st.st_dev, st.st_ino) in seen:  # reached twice through links: walked already
      dirs[:] = []
      continue
    seen.add((st.st_dev, st.st_ino))
    keep = []
    for d in sorted(dirs):
      path = os.path.join(root, d)
      real = os.path.realpath(path)
      if os.path.islink(path):
        if os.path.commonpath([top, real]) != top:
          skipped.append(f"{os.path.relpath(path, folder)} (a link outside the folder)")
          continue
        try:
          target = os.stat(real)
        except OSError:
          continue  # a dangling link: nothing to walk
        if (target.st_dev, target.st_ino) in seen:
          skipped.append(f"{os.path.relpath(path, folder)} (a link to a folder walked already)")
          continue
      keep.append(d)
    dirs[:] = keep
    rel += [
      os.path.relpath(os.path.join(root, f), folder)
      for f in files
      if f.lower().endswith(_IMAGE_EXTENSIONS)
    ]
  if skipped:
    logging.warning(
      "not following %d linked folder(s) below %s: %s",
      len(skipped),
      folder,
      "; ".join(skipped[:5]) + ("; ..." if len(skipped) > 5 else ""),
    )
  return sorted(set(rel))


class FolderSource:
  """Every readable PNG/JPEG found recursively below a folder, sorted by path.

  Every file is checked (PIL open + verify, in threads, cached by size and mtime) when the
  source is built, so an unreadable file is found before training rather than when its batch
  comes up. Such files are skipped with a warning, listed in `skipped` and in the file
  `skipped_list`; they are not counted, so deleting one later leaves the dataset, and the
  resume point, unchanged.

  The label is the index of the file's immediate parent directory name among the sorted parent
  names, so "cats/1.png, dogs/2.png" gives 0 and 1, and a flat folder gives 0 everywhere.

  Attributes:
    paths: the good image paths, sorted by path relative to the folder.
    labels: int32 [len(paths)].
    class_names: sorted parent directory names.
    skipped: [(path, reason)] of the unreadable files left out.
    skipped_list: the file listing `skipped` ("" when nothing was skipped or it could not be
      written).
    min_size: passed to `decode_image`: the size images will be resized to (shorter side),
      so large JPEGs are decoded at a reduced scale; 0 (the default) = full size.
  """

  min_size = 0

  def __init__(self, folder: str, channels: int, cache_dir: str = "", threads: int = 16):
    if not folder or not epath.Path(folder).is_dir():
      raise UserError(f"Image folder {folder!r} not found: set --config.data.folder")
    rel = image_paths(folder)
    if not rel:
      raise UserError(f"No .png/.jpg/.jpeg images found below {folder}")
    rel.sort()
    bad = check_images(folder, rel, cache_dir, threads)
    self.skipped = [(os.path.join(folder, r), bad[r]) for r in rel if r in bad]
    self.skipped_list = ""
    if self.skipped:
      where = _folder_check_path(cache_dir, folder)
      text = "".join(f"{p}\t{why}\n" for p, why in self.skipped)
      if where and _write_text(os.path.join(where, "bad_images.txt"), text):
        self.skipped_list = os.path.join(where, "bad_images.txt")
      shown = self.skipped_list or "; ".join(p for p, _ in self.skipped[:5])
      # The train and eval splits of one folder check it twice (the second time from the
      # cache); one warning is enough.
      key = (paths.absolute(folder), tuple(p for p, _ in self.skipped))
      if key not in _WARNED:
        _WARNED.add(key)
        logging.warning(
          "skipping %d of %d images below %s that cannot be read: %s",
          len(self.skipped),
          len(rel),
          folder,
          shown,
        )
    rel = [r for r in rel if r not in bad]
    if not rel:
      raise UserError(
        f"None of the images below {folder} can be read (first: "
        f"{self.skipped[0][0]}: {self.skipped[0][1]})"
      )
    self.paths = [os.path.join(folder, r) for r in rel]
    parents = [os.path.basename(os.path.dirname(r)) for r in rel]
    self.class_names = sorted(set(parents))
    index = {name: i for i, name in enumerate(self.class_names)}
    self.labels = np.array([index[p] for p in parents], np.int32)
    self.channels = channels

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> dict[str, Any]:
    image = decode_image(self.paths[i], self.channels, self.min_size)
    return {"image": image, "label": self.labels[i]}

  def name_of(self, i: int) -> str:
    """How errors name example i: its path."""
    return self.paths[i]


def folder_source(
  folder: str, split: str, channels: int, cache_dir: str = "", threads: int = 16
) -> FolderSource:
  """A FolderSource over `folder/<split>` when that directory exists, else over all of `folder`.

  The split's slice ("train[:-1000]") applies to the readable files only, so skipping or
  deleting a bad file never moves another file between slices.
  """
  base, spec = parse_split(split)
  sub = os.path.join(folder, base) if folder else ""
  source = FolderSource(
    sub if sub and epath.Path(sub).is_dir() else folder, channels, cache_dir, threads
  )
  rows = slice_range(spec, len(source), split)
  source.paths = [source.paths[i] for i in rows]
  source.labels = source.labels[rows.start : rows.stop : rows.step]
  return source
