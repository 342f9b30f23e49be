"""Tests for vqjax/data's image folders: labels and channels, unreadable files found before
training and skipped (resume unaffected), 16-bit PNGs, decode and size errors naming the file."""

import json
import logging
import os

import numpy as np
import pytest
from data_helpers import data_config, take
from PIL import Image

from vqjax import errors
from vqjax.data import folder, pipeline, sources


def _save(path, array, fmt="PNG"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, fmt)


def test_folder_source_labels_and_channels(tmp_path):
  rng = np.random.default_rng(0)
  root = tmp_path / "imgs"
  _save(root / "zebra" / "a.png", rng.integers(0, 256, (40, 30), dtype=np.uint8))
  _save(root / "deep" / "x" / "ant" / "b.png", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
  _save(root / "zebra" / "c.JPG", np.full((36, 48, 3), 200, np.uint8), "JPEG")
  (root / "notes.txt").write_text("not an image")
  c = data_config(
    tmp_path,
    name="folder",
    folder=str(root),
    channels=3,
    resize="resize_crop",
    image_size=16,
    batch_size=3,
    eval_batch_size=3,
  )
  src = sources.make_source(c, "train")
  assert [os.path.relpath(p, root) for p in src.paths] == [
    "deep/x/ant/b.png",
    "zebra/a.png",
    "zebra/c.JPG",
  ]
  assert [int(src[i]["label"]) for i in range(3)] == [0, 1, 1] and src.skipped == []
  assert src[1]["image"].shape == (40, 30, 3)  # grayscale converted to RGB
  it = pipeline.make_train_iterator(c, seed=0)
  assert it.reader == "folder" and it.get_state()["reader"] == "folder"
  batch = next(it)
  assert batch["image"].shape == (3, 16, 16, 3) and batch["label"].dtype == np.int32
  assert batch["image"].dtype == np.uint8  # training images: the devices scale them
  assert any(np.allclose(im, 200, atol=7) for im in batch["image"])  # the JPEG
  c.channels = 1
  assert sources.make_source(c, "train")[0]["image"].shape == (20, 20, 1)


def test_folder_flat_and_missing(tmp_path):
  _save(tmp_path / "flat" / "1.png", np.zeros((8, 8), np.uint8))
  _save(tmp_path / "flat" / "2.png", np.zeros((8, 8), np.uint8))
  c = data_config(tmp_path, name="folder", folder=str(tmp_path / "flat"))
  assert [int(s["label"]) for s in sources.make_source(c, "train")] == [0, 0]
  c.folder = str(tmp_path / "nowhere")
  with pytest.raises(errors.UserError, match="nowhere"):
    sources.make_source(c, "train")


def _numbered_folder(root, n=60):
  """n flat 8x8 PNGs; image i is filled with 4 * i, so a batch tells which files it read."""
  for i in range(n):
    _save(root / f"{i:02d}.png", np.full((8, 8), 4 * i, np.uint8))


def _indices(batch):
  return batch["image"][:, 0, 0, 0].astype(int) // 4


def test_bad_image_is_found_before_training_skipped_and_deletable(tmp_path, caplog):
  root = tmp_path / "imgs"
  _numbered_folder(root)
  bad = root / "37.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")  # far from the first batch
  truncated = root / "41.png"
  truncated.write_bytes(truncated.read_bytes()[:60])  # a valid header, then nothing
  c = data_config(
    tmp_path, name="folder", folder=str(root), image_size=8, batch_size=4, random_flip=True
  )
  with caplog.at_level(logging.WARNING):
    it = pipeline.make_train_iterator(c, seed=0)
  # Found when the iterator is built, before any batch is read: warned, listed, not counted.
  assert "skipping 2 of 60 images" in caplog.text
  report = [line.split("\t")[0] for line in open(_report_path(caplog.text)).read().splitlines()]
  assert report == [str(bad), str(truncated)]
  src = sources.make_source(c, "train")
  assert [p for p, _ in src.skipped] == [str(bad), str(truncated)]
  assert len(src) == 58 and it.get_state()["num_examples"] == 58
  read = np.concatenate([_indices(b) for b in take(it, it.steps_per_epoch)])
  # 58 good files = 14 batches of 4 and 2 left out of the epoch; never a bad one.
  assert len(read) == len(set(read)) == 56 and set(read) <= set(range(60)) - {37, 41}
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 5)
  # Deleting the bad files does not change the dataset the saved state refers to.
  bad.unlink()
  truncated.unlink()
  resumed = pipeline.make_train_iterator(c, seed=0)
  resumed.set_state(state)
  for x, y in zip(expected, take(resumed, 5), strict=True):
    np.testing.assert_array_equal(x["image"], y["image"])


def _report_path(log_text):
  path = log_text.split("cannot be read: ")[1].split()[0]
  assert os.path.isfile(path), log_text
  return path


def test_image_checks_are_cached_by_size_and_mtime(tmp_path, monkeypatch):
  root = tmp_path / "imgs"
  _numbered_folder(root, 6)
  c = data_config(tmp_path, name="folder", folder=str(root), image_size=8)
  checked = []
  real = folder._check_image
  monkeypatch.setattr(folder, "_check_image", lambda p: checked.append(p) or real(p))
  assert len(sources.make_source(c, "train")) == 6 and len(checked) == 6
  checked.clear()
  assert len(sources.make_source(c, "train")) == 6 and checked == []  # all from the cache
  (root / "03.png").write_bytes(b"garbage")  # changed file: checked again, now skipped
  src = sources.make_source(c, "train")
  assert checked == [str(root / "03.png")] and len(src) == 5
  assert src.skipped[0][0] == str(root / "03.png")


def test_file_broken_after_the_check_is_a_one_line_error(tmp_path):
  root = tmp_path / "imgs"
  _numbered_folder(root, 12)
  c = data_config(tmp_path, name="folder", folder=str(root), image_size=8, batch_size=4)
  it = pipeline.make_train_iterator(c, seed=0)
  for i in range(12):  # replaced under the running job: every file now fails to decode
    (root / f"{i:02d}.png").write_bytes(b"\x89PNG\r\n\x1a\n gone")
  with pytest.raises(errors.UserError, match=r"Cannot decode image .*imgs/\d\d\.png") as e:
    next(it)
  assert "\n" not in str(e.value)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
  values = np.array(
    [[0, 1, 128, 129, 385, 386], [30000, 32767, 32768, 65279, 65534, 65535]], np.uint16
  )
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 65536, (6, 6), dtype=np.uint16)
  _save(tmp_path / "imgs" / "a.png", values)
  _save(tmp_path / "imgs" / "b.png", noise)
  assert Image.open(tmp_path / "imgs" / "a.png").mode.startswith("I")  # really 16-bit
  c = data_config(tmp_path, name="folder", folder=str(tmp_path / "imgs"))
  src = sources.make_source(c, "train")
  for i, raw in enumerate((values, noise)):
    expected = np.floor(raw.astype(np.float64) / 257 + 0.5).astype(np.uint8)  # v / 257 rounded
    got = src[i]["image"]
    assert got.dtype == np.uint8 and got.shape == (*raw.shape, 1)
    np.testing.assert_array_equal(got[..., 0], expected)
  c.channels = 3
  rgb = sources.make_source(c, "train")[0]["image"]
  np.testing.assert_array_equal(rgb, np.repeat(src[0]["image"], 3, axis=-1))


def test_pad_error_names_the_file(tmp_path):
  _save(tmp_path / "imgs" / "small.png", np.zeros((8, 8), np.uint8))
  _save(tmp_path / "imgs" / "wide.png", np.zeros((8, 40), np.uint8))
  c = data_config(
    tmp_path,
    name="folder",
    folder=str(tmp_path / "imgs"),
    image_size=32,
    resize="pad",
    eval_batch_size=2,
  )
  with pytest.raises(errors.UserError, match=r"image .*imgs/wide\.png is 8x40"):
    list(pipeline.make_eval_iterator(c))


def test_a_jpeg_cut_short_is_found_by_the_check(tmp_path):
  """PIL's verify reads only a JPEG's header: a file cut short (an interrupted copy) must still
  be found before training, while a whole one, or one padded with zeros after its end marker,
  passes."""
  pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
  whole = tmp_path / "whole.jpg"
  Image.fromarray(pixels).save(whole, quality=90)
  data = whole.read_bytes()
  cut = tmp_path / "cut.jpg"
  cut.write_bytes(data[: len(data) // 2])
  padded = tmp_path / "padded.jpg"
  padded.write_bytes(data + b"\x00" * 100)
  assert folder._check_image(str(whole)) == "" and folder._check_image(str(padded)) == ""
  assert "truncated" in folder._check_image(str(cut))
  # Cut short with an end marker appended: PIL decodes it without a word, libjpeg filling the
  # missing blocks with mid-grey (it trained as a grey-filled image before). Cut at 30% and
  # 90% of the file, grey and colour.
  for mode, shape in (("RGB", (64, 64, 3)), ("L", (48, 40))):
    array = np.random.default_rng(1).integers(0, 256, shape, np.uint8)
    path = tmp_path / f"marked_{mode}.jpg"
    Image.fromarray(array, mode).save(path, quality=90)
    data = path.read_bytes()
    assert folder._check_image(str(path)) == ""
    for frac in (0.3, 0.9):
      path.write_bytes(data[: int(len(data) * frac)] + b"\xff\xd9")
      with Image.open(path) as im:
        im.load()  # what the check is for: no error from PIL
      assert "ends early" in folder._check_image(str(path))


def test_links_are_followed_once_and_never_outside_the_folder(tmp_path, caplog):
  """A link back up would walk the folder again until the kernel's link limit (40 images ->
  1,640 entries before), and a link above it would train on files outside; both are skipped
  with one warning line. A link to another folder inside is walked once (the set below is
  written out by hand)."""
  root = tmp_path / "imgs"
  img = np.zeros((8, 8), np.uint8)
  for name in ("a/1.png", "a/2.png", "b/3.png"):
    _save(root / name, img)
  _save(tmp_path / "outside" / "secret.png", img)
  os.symlink("..", root / "a" / "up")  # a loop: a/up -> imgs
  os.symlink(tmp_path / "outside", root / "leak")  # above the folder
  os.symlink(root / "b", root / "a" / "alias_of_b")  # inside: b walked once, via the link
  with caplog.at_level(logging.WARNING):
    rel = folder.image_paths(str(root))
  assert rel == ["a/1.png", "a/2.png", "a/alias_of_b/3.png"]
  warnings = [r.getMessage() for r in caplog.records if "linked folder" in r.getMessage()]
  assert len(warnings) == 1 and "\n" not in warnings[0]
  assert "a/up" in warnings[0] and "leak (a link outside the folder)" in warnings[0]
  src = folder.FolderSource(str(root), channels=1)
  assert len(src) == 3 and not any("secret" in p for p in src.paths)
