"""Tests of vqjax/evaluation/plots.py: the PNGs have one panel per quantity or level at the
documented size, something is drawn, and mismatched series are refused."""

import numpy as np
import pytest
from PIL import Image

from vqjax.evaluation import plots


def _ink(path: str) -> float:
  """Share of pixels clearly darker than the white background."""
  with Image.open(path) as im:
    return float(np.mean(np.asarray(im.convert("L")) < 128))


def test_line_panels_writes_one_panel_per_quantity(tmp_path):
  png = plots.line_panels(
    str(tmp_path / "sub" / "p.png"),  # the directory is created
    [0.5, 1.0, 1.5],
    "temperature",
    [("FD", {"FD": [3.0, float("nan"), 1.0]}), ("share", {"a": [0.1, 0.2, 0.3], "b": [1, 0, 1]})],
    title="t",
  )
  with Image.open(png) as im:
    assert im.format == "PNG" and im.size == (2 * 400, 300)
  assert _ink(png) > 0.001
  assert not (tmp_path / "sub" / "p.png.tmp").exists()
  one = plots.line_panels(str(tmp_path / "one.png"), [1, 2], "x", [("y", {"s": [1.0, 2.0]})])
  with Image.open(one) as im:
    assert im.size == (400, 300)


def test_line_panels_refuse_series_of_another_length(tmp_path):
  with pytest.raises(ValueError, match=r"series 's' has \(1,\) values for \(2,\) x values"):
    plots.line_panels(str(tmp_path / "q.png"), [0, 1], "x", [("y", {"s": [1.0]})])
  with pytest.raises(ValueError, match="at least one panel"):
    plots.line_panels(str(tmp_path / "r.png"), [0, 1], "x", [])


def test_usage_histograms_one_panel_per_level(tmp_path):
  counts = {"top": np.array([0, 5, 1, 0]), "middle": np.arange(8.0), "bottom": np.ones(16)}
  png = plots.usage_histograms(str(tmp_path / "u.png"), counts, {"top": 1.9, "bottom": 16.0})
  with Image.open(png) as im:
    assert im.size == (3 * 400, 300)
  # A level whose codes are all used fills its panel with bars; the sparse one barely.
  pixels = np.asarray(Image.open(png).convert("L"))
  top, bottom = pixels[:, :400], pixels[:, 800:]
  assert np.mean(bottom < 200) > 2 * np.mean(top < 200)
