"""Tests for vqjax/prepare.py and vqjax/data/prepared.py: prepared datasets hold exactly what the
data layer's reader yields, restart after an interruption, and refuse mismatched configs."""

import gzip
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from data_helpers import data_config
from PIL import Image

from vqjax import errors, prepare
from vqjax.data import codes, pipeline, prepared, sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _idx(array: np.ndarray) -> bytes:
  """uint8 idx bytes, from the format spec (magic 0 0 8 ndim, big-endian sizes, data)."""
  dims = b"".join(struct.pack(">I", d) for d in array.shape)
  return bytes([0, 0, 0x08, array.ndim]) + dims + array.astype(np.uint8).tobytes()


def _fashion_dir(path, n_train=40, n_test=12):
  """Debian-like Fashion-MNIST idx .gz files of random images; returns {split: (images, labels)}."""
  os.makedirs(path, exist_ok=True)
  rng = np.random.default_rng(1)
  out = {}
  for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
      with gzip.open(os.path.join(path, f"{prefix}-{kind}-ubyte.gz"), "wb") as f:
        f.write(_idx(array))
    out[split] = images, labels
  return out


def _image_folder(root, n=14):
  """Class folders "cat" and "dog" of JPEGs and PNGs of several sizes, all larger than 16."""
  rng = np.random.default_rng(2)
  for i in range(n):
    cls = ("cat", "dog")[i % 2]
    os.makedirs(os.path.join(root, cls), exist_ok=True)
    h, w = 20 + 3 * i, 36 - i
    # Smooth content (an upsampled 4x4 noise) so JPEG and bicubic resizing behave as on photos.
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
    image.save(os.path.join(root, cls, f"{i:02d}.{'jpg' if i % 3 else 'png'}"))
  return root


def _folder_config(tmp_path, **overrides):
  c = data_config(
    tmp_path,
    name="folder",
    reader="auto",
    folder=_image_folder(str(tmp_path / "images")),
    image_size=16,
    channels=3,
    resize="resize_crop",
    train_split="train",
    eval_split="train[:5]",
    batch_size=4,
  )
  for k, v in overrides.items():
    c[k] = v
  return c


def _as_prepared(c, out):
  p = c.copy_and_resolve_references()
  p.name, p.reader, p.prepared_dir = "prepared", "auto", str(out)
  return p


def _assert_same(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype, k
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_folder_round_trip_equals_the_reader(tmp_path):
  c = _folder_config(tmp_path)
  out = tmp_path / "prepared"
  meta = prepare.prepare(c, str(out), examples_per_shard=4, workers=2, batch=3)
  assert meta["complete"] and meta["splits"]["train"]["num_examples"] == 14
  assert meta["splits"]["train"]["shards"] == [
    f"train-0000{k}-of-00004.array_record" for k in range(4)
  ]
  on_disk = json.loads((out / "metadata.json").read_text())
  assert (on_disk["image_size"], on_disk["channels"], on_disk["resize"]) == (16, 3, "resize_crop")
  assert on_disk["source"]["folder"] == c.folder and on_disk["source"]["reader"] == "folder"

  reader = sources.make_source(c, "train")
  source = sources.make_source(_as_prepared(c, out), "train")
  assert isinstance(source, prepared.PreparedSource) and len(source) == 14
  idx = np.array([13, 0, 5, 5, 8, 2])
  got = pipeline.load_batch(source, idx, _as_prepared(c, out))
  _assert_same(got, pipeline.load_batch(reader, idx, c))
  assert got["image"].shape == (6, 16, 16, 3)
  # Labels follow the class folders ("cat" 0, "dog" 1), files sorted by path.
  names = [os.path.relpath(p, c.folder) for p in reader.paths]
  np.testing.assert_array_equal(got["label"], [n.startswith("dog") for n in np.array(names)[idx]])
  # One example alone reads the same as within a batch.
  _assert_same({k: v[None] for k, v in source[13].items()}, {k: v[:1] for k, v in got.items()})
  # Running it again on the finished dataset rewrites nothing.
  old_ns = 1_000_000_000 * 10**9
  for f in os.listdir(out):
    os.utime(out / f, ns=(old_ns, old_ns))
  assert prepare.prepare(c, str(out), examples_per_shard=4)["complete"]
  assert len(os.listdir(out)) == 9  # metadata, 4 shards and their check records
  assert all(os.stat(out / f).st_mtime_ns == old_ns for f in os.listdir(out))


def test_fashion_mnist_round_trip_equals_the_reader_and_numpy(tmp_path):
  raw = _fashion_dir(tmp_path / "fmnist")
  c = data_config(tmp_path, train_split="train[:30]", eval_split="test")  # pad 28 -> 32, 1 channel
  out = tmp_path / "prepared"
  meta = prepare.prepare(c, str(out), workers=1, batch=7)
  assert {k: v["num_examples"] for k, v in meta["splits"].items()} == {"train": 30, "test": 12}
  p = _as_prepared(c, out)
  for split, n in (("train[:30]", 30), ("test", 12)):
    source = sources.make_source(p, split)
    idx = np.arange(n)[::-1]
    got = pipeline.load_batch(source, idx, p)
    _assert_same(got, pipeline.load_batch(sources.make_source(c, split), idx, c))
    images, labels = raw[sources.parse_split(split)[0]]
    padded = np.zeros((n, 32, 32, 1), np.uint8)
    padded[:, 2:30, 2:30, 0] = images[:n][::-1]
    np.testing.assert_array_equal(got["image"], padded)
    np.testing.assert_array_equal(got["label"], labels[:n][::-1].astype(np.int32))


def test_training_batches_from_prepared_data_equal_the_folder_readers(tmp_path):
  c = _folder_config(tmp_path, random_flip=True, num_workers=2)
  out = tmp_path / "prepared"
  prepare.prepare(c, str(out), examples_per_shard=5, workers=2)
  runs = []
  for config in (c, _as_prepared(c, out)):
    it = pipeline.make_train_iterator(config, seed=3)
    runs.append([next(it) for _ in range(5)])  # more than an epoch of 3 batches
    it.close()
  for a, b in zip(*runs, strict=True):
    _assert_same(a, b)
  evals = [list(pipeline.make_eval_iterator(x)) for x in (c, _as_prepared(c, out))]
  assert len(evals[0]) == len(evals[1]) == 1
  _assert_same(evals[0][0], evals[1][0])


def _shards(out, split="train"):
  return sorted(f for f in os.listdir(out) if f.startswith(split) and f.endswith(".array_record"))


def test_restart_redoes_unfinished_shards_and_skips_finished_ones(tmp_path):
  c = _folder_config(tmp_path)
  out = tmp_path / "prepared"
  prepare.prepare(c, str(out), examples_per_shard=4, workers=2)
  expected = pipeline.load_batch(sources.make_source(c, "train"), np.arange(14), c)
  shards = [str(out / s) for s in _shards(out)]
  assert len(shards) == 4
  # An interrupted run: the metadata still says incomplete, shard 1 was never started and
  # shard 2 was being written (only its temporary file exists, half-written).
  meta = prepared.read_metadata(str(out))
  codes.write_metadata(str(out), dict(meta, complete=False))
  os.remove(shards[1])
  with open(shards[2], "rb") as f:
    half = f.read()[:100]
  os.remove(shards[2])
  with open(shards[2] + ".tmp", "wb") as f:
    f.write(half)
  old_ns = 1_000_000_000 * 10**9  # 2001: far older than anything this run writes
  for path in (shards[0], shards[3]):
    os.utime(path, ns=(old_ns, old_ns))
  with pytest.raises(errors.UserError, match="incomplete.*prepare"):
    sources.make_source(_as_prepared(c, out), "train")

  meta = prepare.prepare(c, str(out), examples_per_shard=4, workers=2)
  assert meta["complete"]
  assert [os.stat(shards[k]).st_mtime_ns == old_ns for k in range(4)] == [True, False, False, True]
  assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
  source = sources.make_source(_as_prepared(c, out), "train")
  _assert_same(pipeline.load_batch(source, np.arange(14), _as_prepared(c, out)), expected)


def test_a_run_killed_after_its_last_shard_is_marked_complete_by_the_next(tmp_path):
  c = _folder_config(tmp_path)
  out = tmp_path / "prepared"
  meta = prepare.prepare(c, str(out), examples_per_shard=8)
  codes.write_metadata(str(out), dict(meta, complete=False))
  with pytest.raises(errors.UserError, match="incomplete"):
    prepared.PreparedSource(str(out), "train")
  shard = out / "train-00000-of-00002.array_record"
  os.utime(shard, ns=(10**18, 10**18))
  assert prepare.prepare(c, str(out), examples_per_shard=8)["complete"]
  assert os.stat(shard).st_mtime_ns == 10**18
  assert len(prepared.PreparedSource(str(out), "train")) == 14


def test_processes_write_their_own_shards_and_the_last_completes_it(tmp_path):
  c = _folder_config(tmp_path)
  out = tmp_path / "prepared"
  first = prepare.prepare(c, str(out), examples_per_shard=3, process_index=1, process_count=2)
  assert not first["complete"]
  assert _shards(out) == [f"train-0000{k}-of-00005.array_record" for k in (1, 3)]
  with pytest.raises(errors.UserError, match="incomplete"):
    prepared.PreparedSource(str(out), "train")
  last = prepare.prepare(c, str(out), examples_per_shard=3, process_index=0, process_count=2)
  assert last["complete"] and len(_shards(out)) == 5
  idx = np.arange(14)
  got = pipeline.load_batch(prepared.PreparedSource(str(out), "train"), idx, c)
  _assert_same(got, pipeline.load_batch(sources.make_source(c, "train"), idx, c))


def _one_line_error(fn, *args, match):
  with pytest.raises(errors.UserError, match=match) as e:
    fn(*args)
  assert "\n" not in str(e.value)
  return str(e.value)


def test_a_missing_shard_is_named(tmp_path):
  c = _folder_config(tmp_path)
  out = tmp_path / "prepared"
  prepare.prepare(c, str(out), examples_per_shard=4)
  os.remove(out / "train-00002-of-00004.array_record")
  _one_line_error(
    prepared.PreparedSource, str(out), "train", match="missing.*train-00002-of-00004.array_record"
  )


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_shard_is_named_by_readers_and_rewritten_by_a_rerun(tmp_path, damage):
  """`truncate -s 50%` on a shard used to pass as complete, and training died in a Riegeli
  traceback; a flipped byte (size kept) is caught by the re-run's checksum."""
  c = _folder_config(tmp_path)
  out = tmp_path / "prepared"
  prepare.prepare(c, str(out), examples_per_shard=4)
  expected = pipeline.load_batch(prepared.PreparedSource(str(out), "train"), np.arange(14), c)
  victim = out / "train-00001-of-00004.array_record"
  data = bytearray(victim.read_bytes())
  if damage == "truncate":
    victim.write_bytes(bytes(data[: len(data) // 2]))
    _one_line_error(
      prepared.PreparedSource,
      str(out),
      "train",
      match=f"{victim.name} is damaged: it has {len(data) // 2} bytes, {len(data)} when written",
    )
  else:
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
  assert codes.shard_problem(str(victim))  # the full check finds either
  old_ns = 1_000_000_000 * 10**9
  for name in _shards(out):
    os.utime(out / name, ns=(old_ns, old_ns))
  assert prepare.prepare(c, str(out), examples_per_shard=4)["complete"]
  rewritten = [os.stat(out / n).st_mtime_ns != old_ns for n in _shards(out)]
  assert rewritten == [False, True, False, False]
  assert codes.shard_problem(str(victim)) == ""
  got = pipeline.load_batch(prepared.PreparedSource(str(out), "train"), np.arange(14), c)
  _assert_same(got, expected)


@pytest.mark.parametrize(
  "field, value", [("image_size", 8), ("channels", 1), ("resize", "center_crop")]
)
def test_a_config_asking_for_other_images_is_refused(tmp_path, field, value):
  c = _folder_config(tmp_path)
  out = tmp_path / "prepared"
  prepare.prepare(c, str(out))
  asked = _as_prepared(c, out)
  asked[field] = value
  message = _one_line_error(
    sources.make_source, asked, "train", match=f"made with {field}=.*--config.data.{field}={value}"
  )
  assert str(out) in message
  # Preparing into the same directory with that config is refused too, before writing.
  other = c.copy_and_resolve_references()
  other[field] = value
  _one_line_error(prepare.prepare, other, str(out), match=f"prepared with {field}=")


def test_splits_and_directories_that_do_not_match_are_clear_errors(tmp_path):
  _fashion_dir(tmp_path / "fmnist")
  c = data_config(tmp_path, train_split="train[:20]", eval_split="test")
  out = tmp_path / "prepared"
  prepare.prepare(c, str(out), examples_per_shard=5)
  p = _as_prepared(c, out)
  assert len(sources.make_source(p, "train[:20]")) == 20
  assert len(sources.make_source(p, "test[:5]")) == 5  # a split prepared whole can be sliced
  _one_line_error(sources.make_source, p, "train[:10]", match="holds 'train\\[:20\\]'")
  _one_line_error(sources.make_source, p, "validation", match="splits.*not 'validation'")
  # The same directory cannot take another slice of a split it holds.
  _one_line_error(
    prepare.prepare, c, str(out), ["train[:25]"], match="split 'train' prepared as 'train\\[:20\\]'"
  )
  # 20 examples in 4 shards of 5 are not the 4 shards of 6 the same command would resume.
  c.train_split = "train[:20]"
  _one_line_error(
    prepare.prepare, c, str(out), ["train[:20]"], 6, match="5 per shard.*examples_per_shard"
  )
  missing = _as_prepared(c, tmp_path / "nowhere")
  _one_line_error(sources.make_source, missing, "test", match="no prepared dataset.*vqjax.prepare")
  codes.write_metadata(str(tmp_path), {"format": codes.FORMAT})
  _one_line_error(
    sources.make_source, _as_prepared(c, tmp_path), "test", match="not a vqjax prepared dataset"
  )
  stored = _as_prepared(c, out)
  _one_line_error(prepare.prepare, stored, str(tmp_path / "again"), match="nothing to prepare")


@pytest.mark.slow
def test_cli_prepares_an_experiment_and_answers_mistakes_in_one_line(tmp_path):
  _fashion_dir(tmp_path / "fmnist")
  out = tmp_path / "prepared"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  base = [sys.executable, "-m", "vqjax.prepare", "--config", "fashion_mnist:smoke"]
  ok = subprocess.run(
    base
    + [
      f"--config.data.local_dir={tmp_path / 'fmnist'}",
      f"--config.data.data_dir={tmp_path / 'cache'}",
      f"--out={out}",
      "--workers=1",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert ok.returncode == 0, ok.stderr
  assert "prepared train=40, test=12" in ok.stderr  # smoke asks train[:64] and test[:16]
  meta = prepared.read_metadata(str(out))
  assert meta["experiment"].endswith("fashion_mnist.py:smoke")
  assert meta["splits"]["train"]["split"] == "train[:64]"
  bad = subprocess.run(
    base + [f"--config.data.local_dir={tmp_path / 'nowhere'}", f"--out={out}2"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert bad.returncode != 0
  assert bad.stderr.strip().splitlines()[-1].startswith("vqjax.prepare: UserError: Fashion-MNIST")
  assert "Traceback" not in bad.stderr


def test_input_pipeline_benchmark_times_the_readers_it_can(tmp_path, capsys):
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  try:
    import input_pipeline
  finally:
    sys.path.remove(os.path.join(REPO, "benchmarks"))
  argv = ["--dir", str(tmp_path), "--images", "12", "--size", "40", "--image_size", "32"]
  argv += ["--batch", "4", "--workers", "1", "--modes", "threads,direct", "--readers"]
  rows = input_pipeline.main(argv + ["folder,prepared,grain"])
  got = [(r["reader"], r["mode"], r["workers"]) for r in rows]
  assert got == [
    ("prepare", "threads", 1),
    ("folder", "threads", 1),
    ("folder", "direct", 1),
    ("prepared", "threads", 1),
    ("prepared", "direct", 1),
  ]
  assert all(r["img_s"] > 0 and r["image"] == "40->32" for r in rows)
  assert len(os.listdir(tmp_path / "images_12x40_q90")) == 13  # the JPEGs and their marker
  assert "grain | skipped: no tfds dataset" in capsys.readouterr().out
