"""Tests of vqjax/training/logs.py: image grids, PNG files, JSON lines, the progress line."""

import json
import os

import numpy as np
from PIL import Image

from vqjax import configs
from vqjax.training import logs


def test_grid_layout_and_values(tmp_path):
  inputs = np.full((3, 4, 5, 1), -1.0, np.float32)  # black
  recons = np.full((3, 4, 5, 1), 1.0, np.float32)  # white
  grid = logs.comparison_grid({"input": inputs, "reconstruction": recons}, per_row=2)
  # 2 images per row, 2 row pairs (3 images -> the second pair padded with a blank image).
  assert grid.shape == (4 * (4 + 2) + 2, 2 * (5 + 2) + 2, 1)
  assert grid[2, 2, 0] == 0 and grid[2 + 6, 2, 0] == 255
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
  assert rows == [{"step": 3, "split": "train", "loss": 0.5, "level0/usage": 0.25},
                  {"step": 3, "split": "eval", "mse": 0.1}]
  p = logs.Progress(total_steps=100, global_batch=10, start_step=0)
  text, timing = p.line(10, {"loss": 0.5, "level0/usage": 0.25, "level1/usage": 1.0},
                        ("loss", "usage"))
  assert text.startswith("step  10/100 loss=0.5 level0/usage=0.25 level1/usage=1")
  assert "img/s" in text and "ETA" in text and timing["img_per_s"] > 0
  inactive = logs.MetricWriter(str(tmp_path / "other"), active=False)
  inactive.start_at(0)
  inactive.write(1, {"loss": 1.0})
  assert not os.path.exists(tmp_path / "other")


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
      (1, "train"), (2, "train"), (3, "train"), (4, "train"), (4, "eval"), (5, "train")]
  assert rows[-1]["loss"] == 50.0


def test_save_config_round_trips(tmp_path):
  c = configs.base_config()
  c.optim.lr = 1e-4
  logs.save_config(str(tmp_path), c)
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["optim"]["lr"] == 1e-4
  scope = {}
  exec((tmp_path / "config.py").read_text(), scope)
  assert scope["get_config"]().optim.lr == 1e-4
