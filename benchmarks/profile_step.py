"""Where one train step's device time goes: a profiler trace of the trainer's exact jitted step,
summarised by kernel and by named scope (the model's modules, the quantizer's phases).

  python benchmarks/profile_step.py --config vqvae2_imagenet --dtype bfloat16 --out /tmp/prof
  python benchmarks/profile_step.py --config vqvae2_imagenet --set vq.matmul_impl=float32

Traces `--steps` steps after two untimed ones (the codebook init runs in the first) with
`jax.profiler.trace(..., create_perfetto_trace=True)`, then reads the Perfetto JSON it writes
(`OUT/plugins/profile/<time>/perfetto_trace.json.gz`, also openable in ui.perfetto.dev) and
prints JSON lines: the device time per step, the `--top` kernels by time per step, and the time
per named scope at depth 1 to 3 below the step function. Device events are those of the
trace's "/device:..." processes. A CPU backend has none: there the ops are the host's thunk
events named after the compiled step's HLO instructions, their scopes read from its HLO text,
an asynchronous thunk (a convolution or matrix product run on the intra-op threads: "NAME",
then "end: NAME") timed from its start to its end; such spans overlap other ops, so their sum
("op_ms_per_step") can exceed the step's wall time ("wall_ms_per_step").
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import time
from collections.abc import Sequence

import jax
import train_step

from vqjax import errors
from vqjax.training import trainer


def device_events(trace: dict | list) -> list[dict]:
  """The complete ("X") events of the trace's device processes (pid named "/device:...")."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  names = {
    e["pid"]: e.get("args", {}).get("name", "")
    for e in events
    if e.get("ph") == "M" and e.get("name") == "process_name"
  }
  devices = {pid for pid, name in names.items() if name.startswith("/device:")}
  return [e for e in events if e.get("ph") == "X" and e.get("pid") in devices]


def hlo_scopes(hlo_text: str) -> dict[str, str]:
  """{instruction name: its op_name metadata (the JAX scope path)} of a compiled HLO module's
  text (`compiled.as_text()`); instructions without metadata map to ""."""
  scopes = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%([^\s=]+) = ", line)
    if m:
      op = re.search(r'op_name="([^"]*)"', line)
      scopes[m.group(1)] = op.group(1) if op else ""
  return scopes


def host_op_events(trace: dict | list, scopes: dict[str, str]) -> list[dict]:
  """The CPU backend's per-op events: the complete ("X") events named after an instruction in
  `scopes` (`hlo_scopes`), with "args": {"tf_op": its scope}, as `device_events` gives them. An
  asynchronous thunk's begin event is paired, in time order, with its "end: NAME" event and
  spans from the one's start to the other's end."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  begins, ends = collections.defaultdict(list), collections.defaultdict(list)
  for e in events:
    if e.get("ph") != "X":
      continue
    name = e.get("name", "")
    if name.startswith("end: ") and name[5:] in scopes:
      ends[name[5:]].append(e)
    elif name in scopes:
      begins[name].append(e)
  out = []
  for name, found in begins.items():
    found.sort(key=lambda e: e["ts"])
    done = sorted(ends.get(name, []), key=lambda e: e["ts"])
    for i, e in enumerate(found):
      dur = float(e.get("dur", 0.0))
      if i < len(done):  # asynchronous: to the end of its "end:" event
        dur = done[i]["ts"] + float(done[i].get("dur", 0.0)) - e["ts"]
      out.append({"name": name, "ts": e["ts"], "dur": dur, "args": {"tf_op": scopes[name]}})
  return out


def _scope(event: dict) -> str:
  """The op's name-scope path (e.g. "jit(step)/.../level1/vq_distances_argmin/dot_general"), or
  "" where the event carries none."""
  args = event.get("args") or {}
  for key in ("tf_op", "name_scope", "long_name", "hlo_op"):
    value = args.get(key)
    if isinstance(value, str) and "/" in value:
      return value
  return ""


_JITS = ("jit(", "pjit(")
_WRAPPERS = ("jvp(", "transpose(", "vmap(", "remat(", "checkpoint(")


def _unwrap(part: str) -> str:
  while part.startswith(_WRAPPERS) and part.endswith(")"):
    part = part[part.index("(") + 1 : -1]
  return part


def summarise(
  events: list[dict], steps: int, top: int, total: str = "device_ms_per_step"
) -> list[dict]:
  """Rows: total ms per step (row "what": `total`), the `top` kernels, and per-scope totals
  (depths 1-3)."""
  per_kernel = collections.Counter()
  per_scope = collections.Counter()
  for e in events:
    ms = float(e.get("dur", 0.0)) / 1000.0 / steps  # trace times are microseconds
    per_kernel[e.get("name", "?")] += ms
    # Drop the jit(...) levels (depth 1 is the first scope inside the step function) and
    # unwrap transformation wrappers: "transpose(jvp(Decoder_0))" counts as "Decoder_0".
    parts = [_unwrap(p) for p in _scope(e).split("/") if p and not p.startswith(_JITS)]
    for depth in (1, 2, 3):
      if len(parts) > depth:  # the last part is the op itself
        per_scope["/".join(parts[:depth])] += ms
  rows = [{"what": total, "ms": round(sum(per_kernel.values()), 3)}]
  rows += [
    {"what": "kernel", "name": name[:160], "ms": round(ms, 3)}
    for name, ms in per_kernel.most_common(top)
  ]
  rows += [
    {"what": "scope", "name": name, "ms": round(ms, 3)}
    for name, ms in sorted(per_scope.items(), key=lambda kv: -kv[1])
    if ms >= 0.01
  ]
  return rows


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
  at_least = train_step.at_least
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="experiments/vqvae2_imagenet.py")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--batch", type=at_least(0), default=0, help="global batch (0 = the config's)")
  p.add_argument("--set", action="append", default=[], help="config override group.field=value")
  p.add_argument("--steps", type=at_least(1), default=3, help="traced steps")
  p.add_argument("--top", type=at_least(0), default=30, help="kernels listed")
  p.add_argument("--out", default="/tmp/vqjax_profile", help="trace directory")
  p.add_argument("--cache", default="", help="persistent compilation cache directory")
  a = p.parse_args(argv)
  if os.path.exists(a.out) and not os.path.isdir(a.out):  # found before compiling, not after
    p.error(f"--out {a.out!r} is a file, not a directory")
  return a


def main(argv: Sequence[str] | None = None) -> list[dict]:
  a = parse(argv)
  trainer.setup_compilation_cache(a.cache)
  b = train_step.setup(train_step.load_config(a.config, a.dtype, a.set), a.batch)
  train_step.compile_step(b)
  for _ in range(2):
    jax.block_until_ready(train_step.run_step(b))
  with jax.profiler.trace(a.out, create_perfetto_trace=True):
    t0 = time.perf_counter()
    for _ in range(a.steps):
      train_step.run_step(b)
    jax.block_until_ready(b.metrics)
    wall_ms = 1000 * (time.perf_counter() - t0) / a.steps
  paths = sorted(glob.glob(os.path.join(a.out, "**", "perfetto_trace.json.gz"), recursive=True))
  if not paths:
    raise errors.UserError(f"no perfetto_trace.json.gz under {a.out}")
  with gzip.open(paths[-1], "rt") as f:
    trace = json.load(f)
  events, total = device_events(trace), "device_ms_per_step"
  if not events:  # a CPU backend: the host's thunks, named after the step's instructions
    events, total = host_op_events(trace, hlo_scopes(b.compiled.as_text())), "op_ms_per_step"
    print(json.dumps({"what": "wall_ms_per_step", "ms": round(wall_ms, 3)}))
  if not events:
    print(f"profile_step: no device or op events in {paths[-1]}", file=sys.stderr)
    return []
  keys = sorted({k for e in events[:200] for k in (e.get("args") or {})})
  print(json.dumps({"what": "trace", "path": paths[-1], "events": len(events), "arg_keys": keys}))
  rows = summarise(events, a.steps, a.top, total)
  for row in rows:
    print(json.dumps(row), flush=True)
  return rows


if __name__ == "__main__":
  with errors.one_line("profile_step"):
    main()
