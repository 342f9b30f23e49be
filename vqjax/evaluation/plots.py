"""Small matplotlib figures of evaluation results, written as PNG files.

  plots.line_panels("tradeoff.png", [0.7, 0.85, 1.0], "temperature",
                    [("Frechet distance", {"FD": fd}), ("share", {"precision": p, "recall": r})])
  plots.usage_histograms("code_usage.png", {"top": counts_top, "bottom": counts_bottom})

matplotlib is imported inside the functions (only the evaluation CLI needs it) and only its
object-oriented API is used, with the Agg canvas: no pyplot state, no display, any thread.
Each figure is `PANEL_INCHES` per panel at `DPI`, so a PNG of n panels is exactly
n * 400 x 300 pixels. Missing values (NaN) leave gaps in a line instead of failing.
"""

import os
from collections.abc import Mapping, Sequence

import numpy as np
from etils import epath

from vqjax import paths

# Size of one panel in inches, and pixels per inch of the written PNG.
PANEL_INCHES = (4.0, 3.0)
DPI = 100


def _figure(panels: int):
  """A figure with `panels` side-by-side axes on an Agg canvas, and the axes."""
  # matplotlib only where a plot is drawn: half a second to import.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  if panels < 1:
    raise ValueError(f"a figure needs at least one panel, got {panels}")
  fig = Figure(figsize=(PANEL_INCHES[0] * panels, PANEL_INCHES[1]), dpi=DPI)
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, panels, squeeze=False)[0]
  return fig, list(axes)


def _save(fig, path: str) -> str:
  """Writes the figure as PNG, atomically (a reader never sees half a file)."""
  epath.Path(paths.absolute(path)).parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  if paths.is_remote(path):  # one upload is all-or-nothing already
    with epath.Path(path).open("wb") as f:
      fig.savefig(f, format="png", dpi=DPI)
    return path
  tmp = path + ".tmp"
  fig.savefig(tmp, format="png", dpi=DPI)
  os.replace(tmp, path)
  return path


def line_panels(
  path: str,
  x: Sequence[float],
  xlabel: str,
  panels: Sequence[tuple[str, Mapping[str, Sequence[float]]]],
  title: str = "",
) -> str:
  """Line plots of several series against one x axis, one panel per y quantity.

  Args:
    path: the PNG to write (its directory is created).
    x: [n] x values, shared by every series.
    xlabel: the x-axis label.
    panels: (y-axis label, {series name: [n] values}) per panel, left to right; series of
      very different scales (a distance, a share) go in separate panels.
    title: the figure title (empty: none).

  Returns:
    `path`.
  """
  x = np.asarray(x, np.float64)
  fig, axes = _figure(len(panels))
  for ax, (ylabel, series) in zip(axes, panels, strict=True):
    for name, values in series.items():
      values = np.asarray(values, np.float64)
      if values.shape != x.shape:
        raise ValueError(f"series {name!r} has {values.shape} values for {x.shape} x values")
      ax.plot(x, values, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def usage_histograms(
  path: str,
  counts: Mapping[str, Sequence[float]],
  perplexity: Mapping[str, float] | None = None,
) -> str:
  """Code-usage histograms, one panel per code level: counts per code, most used first.

  Args:
    path: the PNG to write.
    counts: level name -> [K] how often each code was chosen.
    perplexity: level name -> perplexity of its code distribution, shown in the panel's title.

  Returns:
    `path`.
  """
  fig, axes = _figure(len(counts))
  for ax, (level, c) in zip(axes, counts.items(), strict=True):
    c = np.sort(np.asarray(c, np.float64).reshape(-1))[::-1]
    used = int(np.sum(c > 0))
    ax.bar(np.arange(len(c)), c, width=1.0)
    ax.set_xlabel("code rank (most used first)")
    ax.set_ylabel("count")
    title = f"{level}: {used}/{len(c)} codes used"
    if perplexity is not None and level in perplexity:
      title += f", perplexity {perplexity[level]:.1f}"
    ax.set_title(title, fontsize=9)
    ax.set_xlim(-0.5, len(c) - 0.5)
  return _save(fig, path)
