"""Tests of vqjax/training/logs.py: image grids, PNG files, JSON lines, the progress line."""

import json
import os
import struct

import numpy as np
import pytest
from absl import logging
from PIL import Image

from vqjax import configs
from vqjax.training import logs


def test_grid_layout_and_values(tmp_path):
  inputs = np.full((3, 16, 5, 1), -1.0, np.float32)  # black
  recons = np.full((3, 16, 5, 1), 1.0, np.float32)  # white
  labelled = logs.comparison_grid({"input": inputs, "reconstruction": recons}, per_row=2)
  # 2 images per row, 2 row pairs (3 images -> the second pair padded with a blank image),
  # after a white margin holding the row names.
  width = 2 * (5 + 2) + 2
  margin = labelled.shape[1] - width
  assert labelled.shape[0] == 4 * (16 + 2) + 2 and margin > 20
  grid = labelled[:, margin:]
  assert grid[2, 2, 0] == 0 and grid[2 + 18, 2, 0] == 255
  assert grid[2 + 36, 2 + 7, 0] == 255  # the blank padding image
  assert grid[2 + 36, 2, 0] == 0
  # Each row's label is ink in the margin level with that row; the names differ in length.
  ink = [
    (labelled[2 + r * 18 : 2 + r * 18 + 16, :margin, 0] < 128).sum(0).nonzero()[0].max()
    for r in range(4)
  ]
  assert ink[0] == ink[2] and ink[1] == ink[3] and ink[1] > ink[0]
  path = os.path.join(tmp_path, "g.png")
  logs.save_png(path, grid)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), grid[..., 0])
  assert logs.to_uint8(np.array([-1.0, 0.0, 1.0, 7.0])).tolist() == [0, 128, 255, 255]


def test_writer_and_progress(tmp_path):
  w = logs.MetricWriter(str(tmp_path), tensorboard=False)
  w.start_at(0)
  w.write(3, {"loss": 0.5, "level0/usage": 0.25})
  w.write(3, {"mse": 0.1}, prefix="eval")
  w.close()
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert rows == [
    {"step": 3, "split": "train", "loss": 0.5, "level0/usage": 0.25},
    {"step": 3, "split": "eval", "mse": 0.1},
  ]
  p = logs.Progress(total_steps=100, global_batch=10, start_step=0)
  text, timing = p.line(
    10, {"loss": 0.5, "level0/usage": 0.25, "level1/usage": 1.0}, ("loss", "usage")
  )
  assert text.startswith("step  10/100 loss=0.5 level0/usage=0.25 level1/usage=1")
  assert "img/s" in text and "ETA" in text
  # 10 steps of 10 examples over the measured interval.
  elapsed = 100 / timing["img_per_s"]
  assert 0 < elapsed < 5 and abs(timing["eta_s"] - 9 * elapsed) < 1e-6 * timing["eta_s"]
  codes = logs.Progress(total_steps=4, global_batch=3, start_step=0, unit="codes")
  text, timing = codes.line(2, {"loss": 1.0}, ("loss",))
  assert "codes/s" in text and "img/s" not in text
  assert set(timing) == {"codes_per_s", "eta_s", "data_wait"} and timing["data_wait"] == 0
  assert "data_wait 0%" in text
  inactive = logs.MetricWriter(str(tmp_path / "other"), active=False)
  inactive.start_at(0)
  inactive.write(1, {"loss": 1.0})
  assert not os.path.exists(tmp_path / "other")


def test_progress_reports_data_wait_and_warns_when_input_bound(monkeypatch, caplog):
  now = [100.0]
  monkeypatch.setattr(logs.time, "perf_counter", lambda: now[0])
  p = logs.Progress(total_steps=60, global_batch=10, start_step=0, warn_every=3, warn_interval_s=0)
  # Seconds the devices waited for data in each 10-second interval between log lines.
  waits = [0.5, 3.0, 4.0, 2.5, 6.0, 0.2]
  warned = []
  for i, wait in enumerate(waits):
    p.add_data_wait(wait / 2)  # collected in pieces, as the loop does step by step
    p.add_data_wait(wait / 2)
    now[0] += 10.0
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      text, timing = p.line(10 * (i + 1), {"loss": 1.0}, ("loss",))
    assert timing["data_wait"] == pytest.approx(wait / 10)
    assert f"data_wait {round(100 * wait / 10)}%" in text
    warned.append(any("input-bound" in r.getMessage() for r in caplog.records))
  # Above 10% from the second line on: warned then, and again only 3 lines later.
  assert warned == [False, True, False, False, True, False]
  # Time left out of the throughput (an eval) is left out of the share too: 1 s of 5.
  p.add_data_wait(1.0)
  now[0] += 10.0
  p.exclude(5.0)
  _, timing = p.line(70, {"loss": 1.0}, ("loss",))
  assert timing["data_wait"] == pytest.approx(0.2)
  # Lines 10 s apart but warnings at most once a minute: the third line after the last warning
  # is due by count, not yet by time (30 s); the sixth is.
  q = logs.Progress(total_steps=60, global_batch=10, start_step=0, warn_every=3)
  warned = []
  for i in range(7):
    q.add_data_wait(5.0)
    now[0] += 10.0
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      q.line(10 * (i + 1), {"loss": 1.0}, ("loss",))
    warned.append(any("input-bound" in r.getMessage() for r in caplog.records))
  assert warned == [True, False, False, False, False, False, True]


def test_resumed_writer_drops_records_after_the_checkpoint(tmp_path):
  """A run killed after its step-4 checkpoint had logged steps 5-6; the resumed run logs them
  again, and each step must appear once."""
  w = logs.MetricWriter(str(tmp_path), tensorboard=True)
  w.start_at(0)
  for step in range(1, 7):
    w.write(step, {"loss": float(step)})
  w.write(4, {"mse": 0.5}, prefix="eval")
  w.close()
  w = logs.MetricWriter(str(tmp_path), tensorboard=True)
  w.start_at(4)
  w.write(5, {"loss": 50.0})
  w.close()
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [(r["step"], r["split"]) for r in rows] == [
    (1, "train"),
    (2, "train"),
    (3, "train"),
    (4, "train"),
    (4, "eval"),
    (5, "train"),
  ]
  assert rows[-1]["loss"] == 50.0
  # TensorBoard: the resumed writer asks for steps after 4 to be purged (a SessionLog START
  # at step 5), so TensorBoard hides the first run's steps 5-6.
  files = sorted((tmp_path / "tb").iterdir(), key=os.path.getmtime)
  assert len(files) == 2
  starts = [(e.step, e.session_log.status) for e in _events(files[-1]) if e.HasField("session_log")]
  assert starts == [(5, 1)]  # 1 = SessionLog.START
  first = [(e.step, e.session_log.status) for e in _events(files[0]) if e.HasField("session_log")]
  assert first == [(1, 1)]
  assert [e.step for e in _events(files[0]) if e.summary.value] == [1, 2, 3, 4, 5, 6, 4]


def _events(path):
  """Event protos of a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
  from tensorboardX.proto import event_pb2

  data = path.read_bytes()
  pos, out = 0, []
  while pos < len(data):
    (n,) = struct.unpack("<Q", data[pos : pos + 8])
    out.append(event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n]))
    pos += 12 + n + 4
  return out


def test_half_written_last_line_is_dropped_on_resume(tmp_path):
  w = logs.MetricWriter(str(tmp_path), tensorboard=False)
  w.start_at(0)
  w.write(1, {"loss": 1.0})
  w.write(2, {"loss": 2.0})
  w.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 3, "split": "tr')  # a kill in the middle of a write
  assert [r["step"] for r in logs.read_records(str(tmp_path / "metrics.jsonl"))] == [1, 2]
  w = logs.MetricWriter(str(tmp_path), tensorboard=False)
  w.start_at(2)
  w.write(3, {"loss": 3.0})
  w.close()
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0)]


def test_save_config_round_trips(tmp_path):
  c = configs.base_config()
  c.optim.lr = 1e-4
  logs.save_config(str(tmp_path), c)
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["optim"]["lr"] == 1e-4
  scope = {}
  exec((tmp_path / "config.py").read_text(), scope)
  assert scope["get_config"]().optim.lr == 1e-4


def test_library_filter_drops_orbax_chatter_and_keeps_its_real_warnings():
  def record(path, level, msg):
    return logging.logging.LogRecord("absl", level, path, 1, msg, (), None)

  orbax = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
  keep = logs._DropLibraryInfo().filter
  info, warning = logging.logging.INFO, logging.logging.WARNING
  assert not keep(record(orbax, info, "Saving checkpoint at step 10"))
  # A directory opened read-only on purpose (stage 1 restored under a prior) is not a problem.
  assert not keep(record(orbax, warning, "Given directory is read only=%s"))
  assert keep(record(orbax, warning, "Checkpoint directory is not empty"))
  # Restoring some items of a step on purpose (weights without the data position).
  assert not keep(record(orbax, warning, 'Item "%s" was found in the checkpoint, but could not'))
  # A background save's error keeps its line; vqjax reports it once (CheckpointSaveError).
  try:
    raise OSError(28, "No space left on device")
  except OSError:
    import sys

    failed = logging.logging.LogRecord(
      "absl", logging.logging.ERROR, orbax, 1, "save failed", (), sys.exc_info()
    )
  assert keep(failed) and failed.exc_info is None
  assert keep(record("/work/vqjax/training/trainer.py", info, "first step done"))
  assert keep(record("/work/vqjax/training/trainer.py", warning, "Given directory is read only"))
