"""benchmarks/profile_step.py's trace summary on a hand-made trace, and benchmarks/variants.py
going on past a variant that fails to build."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import profile_step  # noqa: E402
import train_step  # noqa: E402
import variants  # noqa: E402

from vqjax import errors  # noqa: E402


def _trace():
  """Two device streams and a host thread; times in microseconds, as Perfetto's JSON."""
  meta = [
    {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
    {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
    {"ph": "M", "name": "process_name", "pid": 3, "args": {"name": "/device:GPU:0 Compute"}},
  ]

  def ev(pid, name, dur, op=""):
    return {"ph": "X", "pid": pid, "name": name, "dur": dur, "ts": 0, "args": {"tf_op": op}}

  step = "jit(train_step)/jit(main)"
  events = [
    ev(1, "PjitFunction", 99999.0),  # host: not device time
    ev(2, "gemm_a", 3000.0, f"{step}/level1/vq_distances_argmin/dot_general"),
    ev(2, "gemm_a", 1000.0, f"{step}/level1/vq_distances_argmin/dot_general"),
    ev(3, "reduce_b", 2000.0, f"{step}/level1/vq_statistics/reduce_sum"),
    ev(3, "conv_c", 6000.0, f"{step}/transpose(jvp(Decoder_0))/conv"),
    ev(3, "memcpy", 500.0),  # no scope
  ]
  return {"traceEvents": meta + events}


def test_summary_of_a_hand_made_trace():
  events = profile_step.device_events(_trace())
  assert len(events) == 5  # the host event is left out
  rows = profile_step.summarise(events, steps=2, top=2)
  assert rows[0] == {"what": "device_ms_per_step", "ms": 6.25}  # 12,500 us over 2 steps
  kernels = [(r["name"], r["ms"]) for r in rows if r["what"] == "kernel"]
  assert kernels == [("conv_c", 3.0), ("gemm_a", 2.0)]  # the top 2, largest first
  scopes = {r["name"]: r["ms"] for r in rows if r["what"] == "scope"}
  assert scopes == {
    "level1": 3.0,
    "level1/vq_distances_argmin": 2.0,
    "level1/vq_statistics": 1.0,
    "Decoder_0": 3.0,  # its transpose(jvp(...)) wrapper unwrapped
  }


def test_cpu_summary_from_host_thunks_and_hlo_scopes():
  hlo = "\n".join(
    [
      "ENTRY %main {",
      '  %dot.1 = f32[8,8]{1,0} dot(%a, %b), metadata={op_name="jit(step)/jvp(M)/blk/dot_general"}',
      '  %fusion.2 = f32[8]{0} fusion(%dot.1), metadata={op_name="jit(step)/transpose(M)/blk/mul"}',
      "  ROOT %copy.3 = f32[8]{0} copy(%fusion.2)",
      "}",
    ]
  )
  scopes = profile_step.hlo_scopes(hlo)
  assert scopes["dot.1"].endswith("blk/dot_general") and scopes["copy.3"] == ""

  def ev(name, ts, dur):
    return {"ph": "X", "pid": 1, "name": name, "ts": ts, "dur": dur}

  trace = [  # two steps; dot.1 runs asynchronously ("end: dot.1"), the fusion inline
    ev("ThunkExecutor::Execute", 0, 5000),
    ev("dot.1", 0, 10),
    ev("end: dot.1", 1990, 10),
    ev("fusion.2", 2000, 1000),
    ev("dot.1", 5000, 10),
    ev("end: dot.1", 5990, 10),
    ev("fusion.2", 6000, 1000),
  ]
  events = profile_step.host_op_events(trace, scopes)
  rows = profile_step.summarise(events, steps=2, top=5, total="op_ms_per_step")
  assert rows[0] == {"what": "op_ms_per_step", "ms": 2.5}  # (2,000 + 1,000 + 1,000 + 1,000) / 2
  assert {r["name"]: r["ms"] for r in rows if r["what"] == "kernel"} == {
    "dot.1": 1.5,
    "fusion.2": 1.0,
  }
  assert {r["name"]: r["ms"] for r in rows if r["what"] == "scope"} == {"M": 2.5, "M/blk": 2.5}


@pytest.mark.slow
def test_variants_reports_a_failing_variant_and_times_the_rest(capsys, monkeypatch):
  real_setup = train_step.setup

  def setup(config, batch_size=0, devices=None):
    if config.model.upconv_impl == "lax":
      raise RuntimeError("backend rejected the kernel\nsecond line")
    return real_setup(config, batch_size, devices)

  monkeypatch.setattr(train_step, "setup", setup)
  argv = ["--config", "experiments/fashion_mnist.py:smoke", "--dtype", "float32", "--batch", "8"]
  argv += ["--steps", "1", "--rounds", "1"]
  rows = variants.main(argv + ["--variant", "model.upconv_impl=lax", "--variant", ""])
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert lines[0] == {
    "variant": "model.upconv_impl=lax",
    "failed": "RuntimeError: backend rejected the kernel",
  }
  assert [r["variant"] for r in rows] == [""] and rows[0]["vs_first"] == 1.0
  with pytest.raises(errors.UserError, match="every variant failed"):
    variants.main(argv + ["--variant", "model.upconv_impl=lax"])
