"""What a user sees while a run goes: progress lines, JSON lines, TensorBoard, image grids.

Only process 0 writes files or prints progress (`MetricWriter(active=...)`); every process
may call the methods. Metrics arrive as host floats: the trainer pulls them from the device
on logging steps only.
"""

import contextlib
import json
import logging as std_logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import ml_collections
import numpy as np
from absl import logging
from etils import epath
from PIL import Image, ImageDraw, ImageFont

from vqjax import paths


def _fmt_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# Orbax warnings about what vqjax does on purpose: opening a finished run read-only (stage 1
# under a prior), and restoring only some items of a step (the weights without the data position).
_ORBAX_NOISE = (
  "Given directory is read only",
  "CheckpointManagerOptions.read_only=True",
  'Item "',
)


class _DropLibraryInfo(std_logging.Filter):
  """Drops INFO records from Orbax (dozens of lines per save would bury the progress lines) and
  its warnings about what vqjax does on purpose (`_ORBAX_NOISE`; "is read only" reads like a
  permission problem), and keeps its errors to one line each."""

  def filter(self, record) -> bool:
    if "/orbax/" not in record.pathname:
      return True
    if record.levelno < std_logging.WARNING:
      return False
    msg = str(record.msg)
    if any(msg.startswith(noise) for noise in _ORBAX_NOISE):
      return False
    # An error in a background save (a full disk) reaches the user as one line from vqjax
    # (errors.CheckpointSaveError); Orbax's record of it keeps its line, not a traceback.
    record.exc_info = record.exc_text = None
    return True


def drop_library_noise() -> Callable[[], None]:
  """Makes absl's logger (which Orbax logs through) drop Orbax's INFO chatter and its notes on
  what vqjax does on purpose; its other warnings and errors stay. Returns what undoes it (a
  no-op where the filter was there already). A program calls it for its whole run
  (vqjax/_cli.py); library calls use `quiet_library_logs`."""
  logger = std_logging.getLogger("absl")
  if any(isinstance(f, _DropLibraryInfo) for f in logger.filters):
    return lambda: None
  drop = _DropLibraryInfo()
  logger.addFilter(drop)
  return lambda: logger.removeFilter(drop)


@contextlib.contextmanager
def quiet_library_logs() -> Iterator[None]:
  """`drop_library_noise` within; afterwards the logger's filters are as they were. Library
  calls that read or write checkpoints enter it for their own duration."""
  undo = drop_library_noise()
  try:
    yield
  finally:
    undo()


def _failed_read_leftover(unraisable) -> bool:
  return (
    unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
  ) or "_read_array_index_and_device_put" in repr(unraisable.object)


def drop_failed_read_leftovers() -> Callable[[], None]:
  """Makes `sys.unraisablehook` drop the leftovers of checkpoint reads that failed; returns
  what undoes it (a no-op where they are dropped already, or where the hook was replaced since).

  Orbax reads a step's arrays concurrently; when one read fails, the others are left pending
  and fail later, when their event loop is gone: up to thousands of lines of "RuntimeError:
  Event loop is closed" and "Exception ignored in <coroutine ...
  _read_array_index_and_device_put>" for a damage vqjax already reports in one line. Exactly
  those are dropped; any other unraisable exception is still shown. A program calls it for its
  whole run (vqjax/_cli.py); library calls use `failed_read_leftovers_dropped`.
  """
  previous = sys.unraisablehook
  if getattr(previous, "vqjax_leftovers", False):
    return lambda: None

  # The predicate is bound here: at interpreter exit, when the last leftovers may arrive, this
  # module's globals are already gone.
  def hook(unraisable, leftover=_failed_read_leftover) -> None:
    if not leftover(unraisable):
      previous(unraisable)

  def undo() -> None:
    if sys.unraisablehook is hook:
      sys.unraisablehook = previous

  hook.vqjax_leftovers = True
  sys.unraisablehook = hook
  return undo


@contextlib.contextmanager
def failed_read_leftovers_dropped() -> Iterator[None]:
  """`drop_failed_read_leftovers` within; afterwards the previous hook is back. The leftovers
  arrive while the next step is read, so `checkpoint_integrity.first_intact` and `runs.load_run`
  enter it; stragglers after that are shown (a program drops them all)."""
  undo = drop_failed_read_leftovers()
  try:
    yield
  finally:
    undo()


def _records_up_to(path: str, step: int) -> tuple[list[str], int]:
  """The lines of a metrics.jsonl at or before `step`, and how many lines could not be parsed
  (a line half-written when the process was killed)."""
  kept, dropped = [], 0
  for line in _lines(path):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      record_step = int(record["step"])
    except (ValueError, KeyError, TypeError):
      dropped += 1
      continue
    if record_step <= step:
      kept.append(line if line.endswith("\n") else line + "\n")
  return kept, dropped


def _lines(path: str) -> list[str]:
  """A text file's lines (with their ends), undecodable bytes replaced: a kill can cut a line
  anywhere, even inside a character."""
  return epath.Path(path).read_bytes().decode(errors="replace").splitlines(keepends=True)


def read_records(path: str) -> list[dict]:
  """Every readable record of a metrics.jsonl (a partial last line is skipped)."""
  records = []
  if not epath.Path(path).exists():
    return records
  for line in _lines(path):
    try:
      records.append(json.loads(line))
    except ValueError:
      continue
  return records


class MetricWriter:
  """JSON lines (`metrics.jsonl`), TensorBoard events and progress lines in `workdir`.

  On a bucket, where nothing can be appended to, metrics.jsonl is rewritten whole at each
  record (one upload; a record is written only on logging steps).

  Args:
    workdir: the run directory (local or a bucket's URL).
    tensorboard: write TensorBoard event files (needs `tensorboardX`; skipped with a warning
      when it is missing).
    active: whether this process writes (True on process 0 only).
  """

  def __init__(self, workdir: str, tensorboard: bool = True, active: bool = True):
    self.active = active
    self.workdir = workdir
    self.tensorboard = tensorboard
    self._tb = None
    self._jsonl = None
    self._lines: list[str] | None = None  # a bucket's metrics.jsonl, rewritten at each record

  def start_at(self, step: int) -> None:
    """Opens the logs for a run that continues after `step` (0 for a fresh run).

    Records of later steps, written by a run that was killed after its last checkpoint, are
    dropped from metrics.jsonl and purged from TensorBoard, so every step appears once.
    """
    if not self.active:
      return
    epath.Path(self.workdir).mkdir(parents=True, exist_ok=True)
    path = os.path.join(self.workdir, "metrics.jsonl")
    kept = []
    if epath.Path(path).exists():
      kept, dropped = _records_up_to(path, step)
      if dropped:
        logging.warning(
          "%s: dropped %d unreadable line(s) (a write cut short by a kill)", path, dropped
        )
      paths.write_text(path, "".join(kept))
    if paths.is_remote(path):
      self._lines, self._jsonl = kept, epath.Path(path)
    else:
      self._jsonl = open(path, "a")
    if self.tensorboard:
      try:
        from tensorboardX import SummaryWriter  # optional, and 2 s to import: only when asked
      except ImportError:
        logging.warning("tensorboardX is not installed: no TensorBoard event files")
      else:
        # A suffix of the pid and the step: a resume within the same second (the default
        # name has one-second resolution) must not reopen, and truncate, the earlier file.
        self._tb = SummaryWriter(
          os.path.join(self.workdir, "tb"),
          purge_step=step + 1,
          filename_suffix=f".{os.getpid()}.{step}",
        )

  def write(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> None:
    """Appends one JSON line `{"step", "split", **metrics}` and the TensorBoard scalars."""
    if not self.active:
      return
    if self._jsonl is None:
      raise RuntimeError("MetricWriter.start_at(step) must be called before write()")
    clean = {k: float(v) for k, v in metrics.items()}
    record = {"step": int(step), "split": prefix, **clean}
    # json writes NaN/Infinity tokens; keep them so a diverged run is visible in the file.
    if self._lines is not None:
      self._lines.append(json.dumps(record) + "\n")
      self._jsonl.write_text("".join(self._lines))
    else:
      self._jsonl.write(json.dumps(record) + "\n")
      self._jsonl.flush()
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(f"{prefix}/{k}", v, int(step))
      self._tb.flush()

  def write_images(self, step: int, name: str, grid: np.ndarray) -> None:
    """Adds a uint8 [H, W, C] grid to TensorBoard."""
    if self.active and self._tb is not None:
      self._tb.add_image(name, grid, int(step), dataformats="HWC")
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None and self._lines is None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class Progress:
  """Throughput, ETA and input-boundness between logging steps, measured on the host.

  `add_data_wait` collects the time the devices sat idle waiting for the next batch (the
  trainer measures it); `line` reports it as a share of the interval's wall time, "data_wait"
  in the timing metrics and on the line, and logs a warning when it is above `warn_above`:
  on the first such line, then at most once every `warn_every` lines and `warn_interval_s`
  seconds (a tiny model logging every step would otherwise warn several times a second).

  Args:
    total_steps: the step the run stops at.
    global_batch: examples per step, for the throughput.
    start_step: the step the run starts (or resumes) at.
    unit: what an example is, as the task names it ("img" -> "img/s", "codes" -> "codes/s").
    warn_above: the data-wait share above which the run is called input-bound.
    warn_every: lines between two input-bound warnings.
    warn_interval_s: seconds between two input-bound warnings.
  """

  def __init__(
    self,
    total_steps: int,
    global_batch: int,
    start_step: int,
    unit: str = "img",
    warn_above: float = 0.1,
    warn_every: int = 10,
    warn_interval_s: float = 60.0,
  ):
    self.total = total_steps
    self.batch = global_batch
    self.unit = unit
    self.warn_above, self.warn_every = warn_above, warn_every
    self.warn_interval_s = warn_interval_s
    self._last_warning_t = -math.inf
    self._t = time.perf_counter()
    self._step = start_step
    self._wait = 0.0
    self._lines_since_warning = None  # None: no warning yet

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` (an eval, an image grid) out of the training throughput."""
    self._t += seconds

  def add_data_wait(self, seconds: float) -> None:
    """Counts `seconds` the devices spent waiting for input since the last line."""
    self._wait += max(0.0, seconds)

  def line(self, step: int, metrics: Mapping[str, float], keys: Sequence[str]) -> tuple[str, dict]:
    """The progress line and the timing metrics (`{unit}_per_s`, `eta_s`, `data_wait`; empty
    when no step ran since the last call) since the last call."""
    now = time.perf_counter()
    dt, ds = now - self._t, step - self._step
    wait, self._wait = self._wait, 0.0
    self._t, self._step = now, step
    rate = ds * self.batch / dt if dt > 0 and ds > 0 else float("nan")
    eta = (self.total - step) * dt / ds if ds > 0 else float("nan")
    data_wait = min(wait / dt, 1.0) if dt > 0 and ds > 0 else float("nan")
    timing = {f"{self.unit}_per_s": rate, "eta_s": eta, "data_wait": data_wait} if ds > 0 else {}
    shown = []
    for key in keys:
      for name in sorted(metrics):
        if name == key or name.endswith("/" + key):
          shown.append(f"{name}={metrics[name]:.4g}")
    width = len(str(self.total))
    wait_text = f"{data_wait:.0%}" if math.isfinite(data_wait) else "?"
    text = (
      f"step {step:>{width}}/{self.total} "
      + " ".join(shown)
      + f" | {rate:.1f} {self.unit}/s, data_wait {wait_text}, ETA {_fmt_duration(eta)}"
    )
    self._maybe_warn(data_wait)
    return text, timing

  def _maybe_warn(self, data_wait: float) -> None:
    if self._lines_since_warning is not None:
      self._lines_since_warning += 1
    due = self._lines_since_warning is None or self._lines_since_warning >= self.warn_every
    due = due and self._t - self._last_warning_t >= self.warn_interval_s
    if math.isfinite(data_wait) and data_wait > self.warn_above and due:
      self._lines_since_warning = 0
      self._last_warning_t = self._t
      logging.warning(
        "input-bound: the devices waited for data %.0f%% of the time since the last log line; "
        "read in more threads or processes (config.data.num_workers, "
        "config.data.worker_processes) or store the data decoded and smaller",
        100 * data_wait,
      )


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 [0, 255]."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(rows: Sequence[np.ndarray], pad: int = 2) -> np.ndarray:
  """Stacks equally long image rows ([N, H, W, C] in [-1, 1]) into one uint8 grid.

  Args:
    rows: e.g. (inputs, reconstructions): row r, column i shows rows[r][i].
    pad: white pixels between images.

  Returns:
    uint8 [R * (H + pad) + pad, N * (W + pad) + pad, C] with C in {1, 3}.
  """
  rows = [to_uint8(r) for r in rows]
  n, h, w, c = rows[0].shape
  grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, c), 255, np.uint8)
  for r, row in enumerate(rows):
    for i in range(n):
      y, x = pad + r * (h + pad), pad + i * (w + pad)
      grid[y : y + h, x : x + w] = row[i]
  return grid


def save_png(path: str, grid: np.ndarray) -> None:
  """Writes a uint8 [H, W, 1|3] grid as PNG, atomically (readers never see half a file)."""
  img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  if paths.is_remote(path):  # one upload is all-or-nothing already
    with epath.Path(path).open("wb") as f:
      img.save(f, format="PNG")
    return
  tmp = path + ".tmp"
  img.save(tmp, format="PNG")
  os.replace(tmp, path)


def comparison_grid(images: Mapping[str, np.ndarray], per_row: int = 8) -> np.ndarray:
  """Named rows of images ({"input": x, "reconstruction": y}), `per_row` images per row, each
  row labelled with its name in a white margin on the left.

  Args:
    images: row name -> [N, H, W, C] in [-1, 1]; every entry has the same N.
    per_row: images per row; longer entries wrap onto further groups of rows.

  Returns:
    uint8 [rows, width, C] grid.
  """
  names = list(images)
  n = len(images[names[0]])
  rows, labels = [], []
  for start in range(0, n, per_row):
    chunk = slice(start, min(start + per_row, n))
    for name in names:
      row = np.asarray(images[name][chunk])
      if len(row) < per_row:  # pad a short last row with blank (white) images
        blank = np.ones((per_row - len(row),) + row.shape[1:], row.dtype)
        row = np.concatenate([row, blank])
      rows.append(row)
      labels.append(name)
  return label_rows(image_grid(rows), labels, rows[0].shape[1])


def label_rows(grid: np.ndarray, labels: Sequence[str], cell: int, pad: int = 2) -> np.ndarray:
  """Adds a white margin left of `grid` with `labels[r]` written beside image row r."""
  font = ImageFont.load_default()
  probe = ImageDraw.Draw(Image.new("L", (1, 1)))
  width = max(int(probe.textlength(t, font=font)) for t in labels) + 2 * pad
  margin = Image.new("L", (width, grid.shape[0]), 255)
  draw = ImageDraw.Draw(margin)
  for r, text in enumerate(labels):
    y = pad + r * (cell + pad) + max(cell // 2 - 6, 0)
    draw.text((pad, y), text, fill=0, font=font)
  left = np.asarray(margin)[..., None]
  if grid.shape[-1] == 3:
    left = np.repeat(left, 3, axis=-1)
  return np.concatenate([left, grid], axis=1)


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes the resolved config as `config.json` and as a readable `config.py` dump."""
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  with epath.Path(workdir, "config.json").open("w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  with epath.Path(workdir, "config.py").open("w") as f:
    f.write('"""The resolved config of this run (written by vqjax.training.logs)."""\n\n')
    f.write("import ml_collections\n\n\ndef get_config(arg=None):\n  del arg\n")
    f.write(f"  return ml_collections.ConfigDict({config.to_dict()!r})\n")
