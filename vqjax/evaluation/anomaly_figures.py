"""Figures of anomaly detection: error heat maps, the input / reconstruction / map grid of
`evaluate_anomalies`, and the side-by-side figure of `vqjax.anomaly` with its colour bar."""

import numpy as np
from etils import epath

from vqjax import paths
from vqjax.training import logs


def heat_map(maps: np.ndarray, vmax: float | None = None) -> np.ndarray:
  """Error maps [B, H, W] as RGB images in [-1, 1] on a black-red-yellow-white scale.

  Args:
    maps: non-negative error maps.
    vmax: the error shown white; default the largest error in `maps` (one scale for all).

  Returns:
    float32 [B, H, W, 3] in [-1, 1].
  """
  m = np.asarray(maps, np.float64)
  vmax = float(m.max()) if vmax is None else float(vmax)
  t = np.clip(m / vmax, 0.0, 1.0) if vmax > 0 else np.zeros_like(m)
  # Red rises first, then green, then blue, so brightness grows with the error.
  rgb = np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], -1)
  return (2.0 * rgb - 1.0).astype(np.float32)


def _rgb(images: np.ndarray) -> np.ndarray:
  images = np.asarray(images, np.float32)
  return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def save_anomaly_png(
  path: str,
  images: np.ndarray,
  recons: np.ndarray,
  maps: np.ndarray,
  per_row: int = 8,
  vmax: float | None = None,
) -> np.ndarray:
  """Writes a labelled grid: inputs, reconstructions and error heat maps, one row each.

  Args:
    path: the PNG file to write (its directory is created).
    images: [N, H, W, C] in [-1, 1].
    recons: [N, H, W, C] in [-1, 1] (clipped for display).
    maps: [N, H, W] error maps.
    per_row: images per row; more wrap onto further groups of three rows.
    vmax: the error shown white; default the largest error shown.

  Returns:
    The uint8 RGB grid that was written.
  """
  grid = logs.comparison_grid(
    {
      "input": _rgb(images),
      "reconstruction": np.clip(_rgb(recons), -1.0, 1.0),
      "error": heat_map(maps, vmax),
    },
    per_row=per_row,
  )
  epath.Path(paths.absolute(path)).parent.mkdir(parents=True, exist_ok=True)
  logs.save_png(path, grid)
  return grid


def save_anomaly_figure(
  path: str,
  columns: dict[str, np.ndarray],
  maps: np.ndarray,
  row_titles: list[str],
  map_title: str = "anomaly map",
  vmax: float | None = None,
  inches: float = 1.9,
) -> str:
  """Writes examples side by side, one per row: image columns, then the map with a colour bar.

  Args:
    path: the PNG file (its directory is created).
    columns: column title -> [N, H, W, C] images in [-1, 1] (e.g. input, reconstruction,
      restoration), shown in grey (one channel) or colour.
    maps: [N, H, W] non-negative maps, one colour scale for all rows.
    row_titles: N titles written left of the rows (e.g. "normal, score 0.01").
    map_title: the map column's title (its colour bar carries the same name).
    vmax: the value at the top of the colour scale; default the 99.5th percentile of the maps
      shown, so one hot pixel does not turn every other map dark.
    inches: size of one panel (at 100 dots per inch).

  Returns:
    `path`.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  maps = np.asarray(maps, np.float64)
  n = len(maps)
  if n == 0 or len(row_titles) != n or any(len(v) != n for v in columns.values()):
    raise ValueError(f"save_anomaly_figure needs N > 0 rows in every column, got {n}")
  vmax = float(np.percentile(maps, 99.5)) if vmax is None else float(vmax)
  vmax = vmax if vmax > 0 else 1.0
  ncols = len(columns) + 1
  width, height = inches * ncols + 1.6, inches * n + 0.5
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  # Image panels, then a narrow column for the colour bar; margins in inches (row titles on
  # the left, the colour bar's label on the right, column titles on top).
  grid = fig.add_gridspec(
    n,
    ncols + 1,
    width_ratios=[1.0] * ncols + [0.07],
    left=0.6 / width,
    right=1 - 0.75 / width,
    top=1 - 0.35 / height,
    bottom=0.1 / height,
    wspace=0.06,
    hspace=0.06,
  )
  shown = None
  for r in range(n):
    axes = [fig.add_subplot(grid[r, c]) for c in range(ncols)]
    for ax, (title, images) in zip(axes, columns.items()):
      image = np.clip((np.asarray(images[r], np.float32) + 1.0) / 2.0, 0.0, 1.0)
      grey = image.shape[-1] == 1
      ax.imshow(image[..., 0] if grey else image, cmap="gray" if grey else None, vmin=0, vmax=1)
      if r == 0:
        ax.set_title(title, fontsize=11)
    shown = axes[-1].imshow(maps[r], cmap="inferno", vmin=0.0, vmax=vmax)
    if r == 0:
      axes[-1].set_title(map_title, fontsize=11)
    axes[0].set_ylabel(row_titles[r], fontsize=9)
    for ax in axes:
      ax.set_xticks([])
      ax.set_yticks([])
  bar = fig.colorbar(shown, cax=fig.add_subplot(grid[:, -1]))
  bar.set_label(f"{map_title} (squared difference; top = 99.5th percentile)", fontsize=9)
  epath.Path(paths.absolute(path)).parent.mkdir(parents=True, exist_ok=True)
  with epath.Path(path).open("wb") as f:  # a local file or one upload to a bucket
    fig.savefig(f, format="png")
  return path
