"""Draws the rows of `benchmarks/suite.py --jsonl` as a PNG: vqjax against the reference.

One panel per workload and figure (training and reconstruction throughput, sampling time), one
bar per implementation, the value written on it; a panel names the batch, shape, dtype and
device. Rows of other JSON-lines files (e.g. benchmarks/train_step.py's) are skipped; of rows
repeating a figure, the last one read is drawn.

  python benchmarks/plot.py                          # every benchmarks/results/*.jsonl
  python benchmarks/plot.py --jsonl run.jsonl --out run.png
"""

import argparse
import glob
import json
import os
from collections.abc import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
# The figures drawn, in this order within a workload; the others (compile, memory, ...) are
# in the table.
METRICS = ("train", "recon", "sample_naive", "sample_cached")
COLORS = {"vqjax": "#1f77b4"}
OTHER_COLOR = "#ff7f0e"


def read_rows(paths: Sequence[str]) -> list[dict]:
  """The suite's rows in `paths` (lines that are not suite rows are skipped)."""
  rows = []
  for path in paths:
    with open(path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue
        if isinstance(row, dict) and {"impl", "workload", "metric", "value"} <= row.keys():
          rows.append(row)
  return rows


def panels(rows: Sequence[dict]) -> dict[tuple, dict[str, dict]]:
  """(workload, metric, batch, shape) -> {implementation: row}, drawn figures only; ratio rows
  ("vqjax/reference") are left out. The reference samples only naively: its naive time is
  drawn beside vqjax's cached one too, as "<reference> (naive)"."""
  out: dict[tuple, dict[str, dict]] = {}
  for row in rows:
    if row["metric"] not in METRICS or "/" in row["impl"]:
      continue
    # The reference runs in float32 on its own device name: the panel is vqjax's row's.
    key = (row["workload"], row["metric"], row.get("batch", ""), row.get("shape", ""))
    out.setdefault(key, {})[row["impl"]] = row
  for (workload, metric, batch, shape), by_impl in out.items():
    if metric == "sample_cached":
      naive = out.get((workload, "sample_naive", batch, shape), {})
      by_impl.update({f"{impl} (naive)": r for impl, r in naive.items() if impl != "vqjax"})
  order = {m: i for i, m in enumerate(METRICS)}
  return dict(sorted(out.items(), key=lambda kv: (kv[0][0], order[kv[0][1]], str(kv[0][2]))))


def plot(rows: Sequence[dict], out: str) -> str:
  """Writes the chart of `rows` to `out` (PNG); returns `out`.

  Raises:
    ValueError: no row holds a drawn figure.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  groups = panels(rows)
  if not groups:
    raise ValueError(f"no rows with a figure of {', '.join(METRICS)} to draw")
  cols = min(4, len(groups))
  nrows = -(-len(groups) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 3.0 * nrows), squeeze=False)
  for ax, ((workload, metric, batch, shape), by_impl) in zip(axes.flat, groups.items()):
    impls = sorted(by_impl, key=lambda name: (name != "vqjax", name))
    values = [float(by_impl[name]["value"]) for name in impls]
    colors = [COLORS.get(name, OTHER_COLOR) for name in impls]
    bars = ax.bar(impls, values, color=colors)
    labels = [f"{v:,.0f}" if v >= 100 else f"{v:.3g}" for v in values]
    ax.bar_label(bars, labels=labels, fontsize=8)
    first = by_impl[impls[0]]
    ax.set_title(f"{workload} {metric}\nbatch {batch}, {shape}", fontsize=9)
    ax.set_ylabel(first.get("unit", ""), fontsize=8)
    ax.tick_params(labelsize=8)
    ax.margins(y=0.15)
    ax.text(
      0.5,
      -0.18,
      f"{first.get('dtype', '')} on {first.get('device', '')}",
      transform=ax.transAxes,
      ha="center",
      fontsize=7,
    )
  for ax in list(axes.flat)[len(groups) :]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def main(argv: Sequence[str] | None = None) -> str:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    "--jsonl", action="append", default=[], help="(default: benchmarks/results/*.jsonl)"
  )
  p.add_argument("--out", default=os.path.join(HERE, "suite.png"))
  a = p.parse_args(argv)
  paths = a.jsonl or sorted(glob.glob(os.path.join(HERE, "results", "*.jsonl")))
  path = plot(read_rows(paths), a.out)
  print(f"wrote {path}")
  return path


if __name__ == "__main__":
  main()
