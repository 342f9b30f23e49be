"""The benchmark suite: what a user runs on their own accelerator to see vqjax's speed there.

Workloads (`--only` picks some; all by default), every one on synthetic data (no dataset, no
tfds), timing the exact jitted step `python -m vqjax.train` runs (`trainer.jit_train_step`, as
benchmarks/train_step.py does, whose functions build it):
  cifar, imagenet, ffhq  stage-1 training and reconstruction throughput, compile time, memory,
                         FLOPs and model FLOPs utilisation of experiments/vqvae_cifar10.py,
                         vqvae2_imagenet.py (ImageNet-256) and vqvae2_ffhq1024.py (3 levels);
  fashion                the same for experiments/fashion_mnist.py:reference (the PyTorch
                         reference's default sizes, 32x32, batch 128: the CPU comparison);
  prior_top, prior_bottom  PixelSNAIL training throughput of experiments/pixelsnail_top_imagenet.py
                         and pixelsnail_bottom_imagenet.py on random codes;
  sampling               hierarchical (top then bottom) PixelSNAIL sampling, full recompute
                         (naive) and incremental (cached), batches 8 and 64, through
                         benchmarks/sampling.py;
  scaling                the ImageNet stage-1 step on 1 device and on N (data axis, fsdp axis),
                         same batch per device; only where JAX sees more than one device.

  python benchmarks/suite.py                              # every workload, bfloat16
  python benchmarks/suite.py --quick                      # CPU-sized, a few minutes on a CPU
  python benchmarks/suite.py --only imagenet,sampling --jsonl benchmarks/results/mine.jsonl
  python benchmarks/suite.py --baseline-dir ~/src/vq-vae-2-pytorch   # and the reference

With `--baseline-dir` pointing at the user's own clone of rosinality/vq-vae-2-pytorch, the same
workloads run with its modules under torch on the same device (benchmarks/baseline_torch.py;
its VQ-VAE-2 is the ImageNet one, so not cifar or ffhq) and rows of implementation
"vqjax/rosinality", unit "x", give the speedup (above 1: vqjax is faster). Its code is imported
from that path at run time; none of it is part of vqjax. Without torch or that clone, one line
says so and only vqjax's rows follow. On a shared CPU, `--torch-threads 1` keeps torch's threads
from waiting on each other.

Prints one markdown table row per figure: implementation, workload, metric, value, unit, dtype,
global batch, shape, device count, mesh, device kind, note. MFU is the step's FLOPs (XLA's cost
analysis of the step before optimisation: the compiled GPU program hides its convolutions in cuDNN
calls that the cost model counts as 0) over its time and the device's peak (`PEAK_TFLOPS`), for the
devices listed there. Memory is XLA's analysis of the compiled step (arguments, outputs and
temporaries), comparable across workloads of one process; the reference's is torch's allocator peak.
`--jsonl FILE` appends every row as JSON (with the JAX version, date and commit), which
`benchmarks/plot.py` draws. Notes (what was skipped and why, the total time) go to stderr.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling benchmark scripts

import baseline_torch  # noqa: E402
import jax  # noqa: E402
import sampling  # noqa: E402
import train_step  # noqa: E402

from vqjax import errors  # noqa: E402
from vqjax.training import trainer  # noqa: E402

STAGE1 = {
  "cifar": "vqvae_cifar10",
  "imagenet": "vqvae2_imagenet",
  "ffhq": "vqvae2_ffhq1024",
  "fashion": "fashion_mnist:reference",  # CPU-sized already: the same with --quick
}
PRIORS = {"prior_top": "pixelsnail_top_imagenet", "prior_bottom": "pixelsnail_bottom_imagenet"}
WORKLOADS = (*STAGE1, *PRIORS, "sampling", "scaling")
COLUMNS = (
  "impl",
  "workload",
  "metric",
  "value",
  "unit",
  "dtype",
  "batch",
  "shape",
  "devices",
  "mesh",
  "device",
  "note",
)

# Peak dense TFLOP/s of one device, (bfloat16, float32), from the vendors' datasheets; None:
# not given. The NVIDIA float32 figure is the TF32 tensor-core one, which float32 convolutions
# and matmuls use at JAX's default precision there (and PyTorch's cuDNN convolutions by default).
#   NVIDIA H100 Tensor Core GPU datasheet: H100 SXM BF16 989.4 (1,979 with sparsity), TF32
#     494.7; H100 PCIe BF16 756, TF32 378.
#   NVIDIA H200 Tensor Core GPU datasheet: H200 SXM BF16 989 (1,979 with sparsity), TF32 494.
#   NVIDIA A100 Tensor Core GPU datasheet: BF16 312 (624 with sparsity), TF32 156.
#   Google Cloud TPU documentation, system architecture pages: v4 275, v5e 197, v5p 459 bf16
#     TFLOP/s per chip (no float32 figure).
# Matched in this order against the lower-cased `device_kind`.
PEAK_TFLOPS = (
  ("h100 pcie", (756.0, 378.0)),
  ("h100", (989.4, 494.7)),
  ("h200", (989.4, 494.7)),
  ("a100", (312.0, 156.0)),
  ("tpu v4", (275.0, None)),
  ("tpu v5 lite", (197.0, None)),
  ("tpu v5e", (197.0, None)),
  ("tpu v5", (459.0, None)),  # v5p reports "TPU v5" (or "TPU v5p")
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """Peak FLOP/s of one device of `device_kind` in `dtype`, or None when not known."""
  kind = device_kind.lower()
  for pattern, (bf16, fp32) in PEAK_TFLOPS:
    if pattern in kind:
      peak = bf16 if dtype == "bfloat16" else fp32
      return None if peak is None else peak * 1e12
  return None


def _commit() -> str:
  try:
    out = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"],
      cwd=os.path.dirname(os.path.abspath(__file__)),
      capture_output=True,
      text=True,
      timeout=10,
    )
  except (OSError, subprocess.SubprocessError):
    return ""
  return out.stdout.strip()


def _cell(value) -> str:
  if isinstance(value, float):
    if value != value:  # nan
      return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
  return str(value).replace("|", "/")


class Table:
  """Prints rows as a markdown table and appends them to a JSON-lines file (optional)."""

  def __init__(self, jsonl: str = "", out=None):
    self.out = out or sys.stdout
    self.jsonl = jsonl
    self.rows: list[dict] = []
    self.extra = {
      "jax": jax.__version__,
      "date": datetime.date.today().isoformat(),
      "commit": _commit(),
    }
    print("| " + " | ".join(COLUMNS) + " |", file=self.out)
    print("|" + " --- |" * len(COLUMNS), file=self.out, flush=True)

  def add(self, **fields) -> dict:
    """One figure; missing columns are "" (the device columns default to JAX's devices)."""
    row = {c: fields.pop(c, "") for c in COLUMNS}
    row["device"] = row["device"] or jax.devices()[0].device_kind
    row.update(fields)
    self.rows.append(row)
    print("| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |", file=self.out, flush=True)
    if self.jsonl:
      with open(self.jsonl, "a") as f:
        f.write(json.dumps({**row, **self.extra}) + "\n")
    return row


def _say(text: str) -> None:
  """A note beside the table (on stderr: stdout stays one markdown table)."""
  print(f"suite: {text}", file=sys.stderr, flush=True)


def _mesh(mesh) -> str:
  return ",".join(f"{k}={v}" for k, v in mesh.shape.items())


def _shape(batch: dict) -> str:
  if "image" in batch:
    return "x".join(map(str, batch["image"].shape[1:]))
  maps = sorted(k for k in batch if k.startswith("codes"))
  return "+".join("x".join(map(str, batch[k].shape[1:])) for k in reversed(maps))


class Suite:
  """The workloads of one invocation, writing to one `Table`."""

  def __init__(self, a: argparse.Namespace, table: Table):
    self.a = a
    self.table = table
    self.steps = a.steps or (3 if a.quick else 20)
    self.baseline = None
    if a.baseline_dir:
      try:
        self.baseline = baseline_torch.Baseline(
          a.baseline_dir, jax.default_backend(), a.torch_threads
        )
      except baseline_torch.Unavailable as e:
        _say(f"no {baseline_torch.REFERENCE} rows: {e}")

  def _config(self, name: str, overrides: Sequence[str] = ()):
    name = f"{name}:smoke" if self.a.quick and ":" not in name else name
    return train_step.load_config(name, self.a.dtype, overrides)

  def _common(self, b: train_step.Bench) -> dict:
    return dict(
      dtype=self.a.dtype,
      batch=b.batch_size,
      shape=_shape(b.batch),
      devices=b.mesh.devices.size,
      mesh=_mesh(b.mesh),
    )

  def _speedup(self, workload: str, metric: str, ours: float, theirs: float, how: str, **common):
    self.table.add(
      impl=f"vqjax/{baseline_torch.REFERENCE}",
      workload=workload,
      metric=metric,
      value=ours / theirs,
      unit="x",
      note=how,
      **common,
    )

  def _step_rows(self, workload: str, b: train_step.Bench, item: str) -> tuple[float, dict]:
    """Compiles and times `b`'s train step; adds its rows. Returns (`item`s/s, common cells)."""
    common = self._common(b)
    add = lambda metric, value, unit, note="": self.table.add(
      impl="vqjax", workload=workload, metric=metric, value=value, unit=unit, note=note, **common
    )
    compile_s = train_step.compile_step(b)
    step_s = train_step.time_steps(b, self.steps)
    throughput = b.batch_size / step_s
    add("train", throughput, f"{item}/s", f"{1000 * step_s:.2f} ms/step, {self.steps} steps")
    add("compile", compile_s, "s", "the train step")
    memory = train_step.memory_gib(b.compiled)
    if memory is not None:
      add("memory", memory, "GiB", "XLA memory analysis of the train step")
    flops = train_step.flops(b.lowered)  # the whole step, all devices
    if flops:
      n = b.mesh.devices.size
      note = "XLA cost analysis of the unoptimised step"
      add("flops", flops / b.batch_size / 1e9, f"GFLOP/{item}", note)
      peak = peak_flops(jax.devices()[0].device_kind, self.a.dtype)
      if peak:
        mfu = 100 * flops / n / step_s / peak
        add("mfu", mfu, "%", f"of {peak / 1e12:.0f} TFLOP/s per device")
    return throughput, common

  # --- workloads --------------------------------------------------------------------------

  def stage1(self, workload: str) -> None:
    config = self._config(STAGE1[workload])
    b = train_step.setup(config, self.a.batch)
    train, common = self._step_rows(workload, b, "img")
    recon = b.batch_size / train_step.time_recon(b, self.steps)
    self.table.add(
      impl="vqjax", workload=workload, metric="recon", value=recon, unit="img/s", **common
    )
    size = b.batch["image"].shape[1]
    del b
    kwargs = baseline_torch.vqvae_kwargs(config)
    if self.baseline is None:
      return
    if kwargs is None:
      _say(f"{workload}: the reference has no model of this architecture")
      return
    r = self.baseline.stage1(kwargs, common["batch"], size, self.steps)
    ref = dict(impl=baseline_torch.REFERENCE, workload=workload, **self._ref_common(common))
    theirs = common["batch"] / r["train_s"]
    self.table.add(metric="train", value=theirs, unit="img/s", note=self.baseline.precision, **ref)
    their_recon = common["batch"] / r["recon_s"]
    self.table.add(metric="recon", value=their_recon, unit="img/s", **ref)
    if r["peak_gib"] is not None:
      self.table.add(metric="memory", value=r["peak_gib"], unit="GiB", note="torch peak", **ref)
    self._speedup(workload, "train", train, theirs, "throughput ratio", **common)
    self._speedup(workload, "recon", recon, their_recon, "throughput ratio", **common)

  def _ref_common(self, common: dict) -> dict:
    ref = dict(common, dtype="float32", devices=1, mesh="")
    ref.update(device=self.baseline.device_kind, torch=self.baseline.version)
    return ref

  def prior(self, workload: str) -> None:
    overrides = []
    if not self.a.quick:  # random codes of the ImageNet maps instead of a code dataset
      overrides = [
        "data.name=synthetic_codes",
        "data.synthetic_shapes=[[32, 32], [64, 64]]",
        "data.synthetic_num_codes=512",
      ]
    config = self._config(PRIORS[workload], overrides)
    b = train_step.setup(config, self.a.batch)
    train, common = self._step_rows(workload, b, "sample")
    del b
    if self.baseline is None:
      return
    shapes, level = config.prior.code_shapes, config.prior.level
    kwargs = baseline_torch.pixelsnail_kwargs(config.model, config.vq.num_codes, shapes[level])
    cond = tuple(shapes[level - 1]) if level else None
    r = self.baseline.prior(kwargs, common["batch"], cond, self.steps)
    ref = dict(impl=baseline_torch.REFERENCE, workload=workload, **self._ref_common(common))
    theirs = common["batch"] / r["train_s"]
    self.table.add(
      metric="train", value=theirs, unit="sample/s", note=self.baseline.precision, **ref
    )
    if r["peak_gib"] is not None:
      self.table.add(metric="memory", value=r["peak_gib"], unit="GiB", note="torch peak", **ref)
    self._speedup(workload, "train", train, theirs, "throughput ratio", **common)

  def sampling(self) -> None:
    batches = self.a.sample_batches
    for batch in batches:
      words = ["--prior", "pixelsnail", "--batch", str(batch), "--repeats", "1"]
      words += ["--dtype", self.a.dtype, "--naive-max-positions", str(self.a.naive_max_positions)]
      a = sampling.parse(words if self.a.quick else words + ["--rosinality"])
      times = {}
      for sampler in ("naive", "cached"):
        levels = [sampling.run("pixelsnail", level, sampler, a) for level in ("top", "bottom")]
        total = sum(r["seconds"] for r in levels)
        notes = [f"{r['level']} {r['seconds']:.3g} s" for r in levels]
        notes += [f"{r['level']} {r['note']}" for r in levels if r["note"]]
        times[sampler] = total
        common = dict(
          dtype=self.a.dtype,
          batch=batch,
          shape="+".join(r["map"] for r in levels),
          devices=1,
          mesh="",
        )
        self.table.add(
          impl="vqjax",
          workload="sampling",
          metric=f"sample_{sampler}",
          value=total,
          unit="s",
          note="; ".join(notes),
          **common,
        )
      if self.baseline is None:
        continue
      sizes = sampling.network_sizes(a)
      side = {"top": a.top_side or sizes["sides"]["top"], "bottom": sizes["sides"]["bottom"]}
      side["bottom"] = a.bottom_side or side["bottom"]
      top = dict(sizes["snail"], attention=True, dropout=0.0)
      bottom = dict(sizes["snail"], attention=False, dropout=0.0, **sizes["snail_cond"])
      k = a.num_codes
      runs = {
        "top": self.baseline.sample(
          baseline_torch.pixelsnail_kwargs(top, k, (side["top"],) * 2),
          batch,
          None,
          a.naive_max_positions,
        ),
        "bottom": self.baseline.sample(
          baseline_torch.pixelsnail_kwargs(bottom, k, (side["bottom"],) * 2),
          batch,
          (side["top"],) * 2,
          a.naive_max_positions,
        ),
      }
      theirs = sum(r["seconds"] for r in runs.values())
      notes = [f"{level} {r['seconds']:.3g} s" for level, r in runs.items()]
      notes += [f"{level} estimated" for level, r in runs.items() if r["estimated"]]
      ref = self._ref_common(common)
      self.table.add(
        impl=baseline_torch.REFERENCE,
        workload="sampling",
        metric="sample_naive",
        value=theirs,
        unit="s",
        note="; ".join(notes) + " (its sample.py loop)",
        **ref,
      )
      for sampler, ours in times.items():
        self._speedup(
          "sampling", f"sample_{sampler}", theirs, ours, "reference time / vqjax time", **common
        )

  def scaling(self) -> None:
    n = jax.device_count()
    if n == 1:
      _say("scaling: one device, nothing to scale over")
      return
    base = self._config(STAGE1["imagenet"])
    per_device = max(1, base.data.batch_size // n) if self.a.quick else base.data.batch_size
    one = None
    for devices, data, fsdp in ((1, 1, 1), (n, n, 1), (n, 1, n)):
      config = self._config(STAGE1["imagenet"], [f"mesh.data={data}", f"mesh.fsdp={fsdp}"])
      b = train_step.setup(config, per_device * devices, jax.devices()[:devices])
      train_step.compile_step(b)
      throughput = b.batch_size / train_step.time_steps(b, self.steps)
      common = self._common(b)
      del b
      self.table.add(
        impl="vqjax",
        workload="scaling",
        metric="train",
        value=throughput,
        unit="img/s",
        note=f"images per device: {per_device}",
        **common,
      )
      if devices == 1:
        one = throughput
      else:
        self.table.add(
          impl="vqjax",
          workload="scaling",
          metric="efficiency",
          value=100 * throughput / (devices * one),
          unit="%",
          note=f"img/s over {devices} x the one-device img/s",
          **common,
        )


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
  at_least = train_step.at_least
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="CPU-sized models, batches and steps")
  p.add_argument(
    "--only", action="append", default=[], help=f"comma-separated workloads of {WORKLOADS}"
  )
  p.add_argument("--jsonl", default="", help="append every row to this JSON-lines file")
  p.add_argument("--baseline-dir", default="", help="a clone of rosinality/vq-vae-2-pytorch")
  p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
  p.add_argument("--batch", type=at_least(0), default=0, help="global batch (0: configs')")
  p.add_argument("--steps", type=at_least(0), default=0, help="timed steps (0: 20, 3 quick)")
  p.add_argument("--sample-batches", default="", help="comma-separated (default 8,64; 2,8 quick)")
  p.add_argument("--naive-max-positions", type=at_least(0), default=0, help="(0: 256, 64 quick)")
  p.add_argument("--torch-threads", type=at_least(0), default=0, help="the reference's CPU threads")
  p.add_argument("--cache", default="", help="persistent compilation cache directory")
  a = p.parse_args(argv)
  a.only = [w for words in a.only for w in words.split(",") if w] or list(WORKLOADS)
  unknown = sorted(set(a.only) - set(WORKLOADS))
  if unknown:
    p.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
  # bfloat16 is what an accelerator trains in; a CPU runs float32 far faster.
  a.dtype = a.dtype or ("float32" if a.quick else "bfloat16")
  default_batches = "2,8" if a.quick else "8,64"
  try:
    a.sample_batches = [int(x) for x in (a.sample_batches or default_batches).split(",")]
  except ValueError:
    p.error(f"--sample-batches {a.sample_batches!r}: give comma-separated integers, e.g. 8,64")
  if min(a.sample_batches) < 1:
    p.error(f"--sample-batches: every batch must be >= 1, got {a.sample_batches}")
  a.naive_max_positions = a.naive_max_positions or (64 if a.quick else 256)
  return a


def check_writable(path: str) -> None:
  """UserError (one line) unless rows can be appended to `path` ("" = no file): the file or its
  directory must exist and be writable."""
  if not path:
    return
  parent = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    problem = "is a directory"
  elif os.path.exists(path):
    problem = "" if os.access(path, os.W_OK) else "is not writable"
  elif not os.path.isdir(parent):
    problem = f"cannot be created: no directory {parent!r}"
  elif not os.access(parent, os.W_OK | os.X_OK):
    problem = f"cannot be created: {parent!r} is not writable"
  else:
    problem = ""
  if problem:
    raise errors.UserError(f"--jsonl {path!r} {problem}")


def main(argv: Sequence[str] | None = None) -> list[dict]:
  """Runs the suite; returns its rows (also printed, and appended to --jsonl)."""
  a = parse(argv)
  check_writable(a.jsonl)  # before the benchmark, not after it
  if a.baseline_dir:
    # Torch shares the accelerator: JAX must not take most of its memory up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  trainer.setup_compilation_cache(a.cache)
  t0 = time.perf_counter()
  table = Table(a.jsonl)
  suite = Suite(a, table)
  for workload in a.only:
    if workload in STAGE1:
      suite.stage1(workload)
    elif workload in PRIORS:
      suite.prior(workload)
    else:
      getattr(suite, workload)()
  _say(
    f"{len(table.rows)} rows in {time.perf_counter() - t0:.0f} s on "
    f"{jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}"
  )
  return table.rows


if __name__ == "__main__":
  with errors.one_line("suite"):
    main()
