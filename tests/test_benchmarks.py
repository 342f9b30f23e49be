"""Tests of the benchmark suite (benchmarks/suite.py, train_step.py, baseline_torch.py, plot.py):
the rows' structure (never their speed), the FLOPs counter against a hand count, the reference
driver on stand-in modules, and the chart."""

import json
import os
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import baseline_torch  # noqa: E402
import plot  # noqa: E402
import suite  # noqa: E402
import train_step  # noqa: E402

from vqjax import errors  # noqa: E402


@pytest.fixture
def fast_compile():
  """Compiles without most XLA optimisations: the programs here run a couple of times."""
  saved = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", saved)


def table_rows(text: str) -> list[dict]:
  """The printed markdown table's data rows as {column: cell}."""
  lines = [line for line in text.splitlines() if line.startswith("| ")]
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  assert tuple(header) == suite.COLUMNS
  assert set(lines[1].replace("|", "").split()) == {"---"}
  return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


@pytest.mark.slow
def test_quick_cifar_prints_parseable_rows_and_appends_them(tmp_path, capsys, fast_compile):
  jsonl = tmp_path / "rows.jsonl"
  not_a_clone = tmp_path / "empty"
  not_a_clone.mkdir()
  argv = ["--quick", "--only", "cifar", "--steps", "1", "--jsonl", str(jsonl)]
  returned = suite.main(argv + ["--baseline-dir", str(not_a_clone)])
  captured = capsys.readouterr()
  out = captured.out
  # No reference there: one line on stderr says why, and only vqjax rows follow.
  assert len([line for line in captured.err.splitlines() if "no rosinality rows" in line]) == 1
  assert "suite:" not in out  # stdout is the table alone
  rows = table_rows(out)
  assert len(rows) == len(returned) >= 4
  metrics = {r["metric"]: r for r in rows}
  assert {"train", "compile", "recon", "flops"} <= metrics.keys()
  for row in rows:
    assert row["impl"] == "vqjax" and row["workload"] == "cifar"
    assert float(row["value"].replace(",", "")) > 0
    assert row["dtype"] == "float32"
    assert row["shape"] == "32x32x3"
    assert int(row["batch"]) == 8
    assert int(row["devices"]) == jax.device_count()
    assert row["device"] == jax.devices()[0].device_kind
  assert metrics["train"]["unit"] == "img/s" and metrics["recon"]["unit"] == "img/s"
  assert metrics["flops"]["unit"] == "GFLOP/img"
  with open(jsonl) as f:
    written = [json.loads(line) for line in f]
  assert [r["metric"] for r in written] == [r["metric"] for r in rows]
  assert all(r["jax"] == jax.__version__ for r in written)


def test_an_unknown_workload_is_refused():
  with pytest.raises(SystemExit):
    suite.parse(["--only", "cifar,mnist"])


def test_flops_counter_agrees_with_a_hand_count_of_one_conv():
  b, h, w, cin, cout, k = 2, 32, 32, 8, 16, 3
  conv = jax.jit(
    lambda x, kernel: jax.lax.conv_general_dilated(
      x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
  )
  x = jax.ShapeDtypeStruct((b, h, w, cin), jnp.float32)
  kernel = jax.ShapeDtypeStruct((k, k, cin, cout), jnp.float32)
  counted = train_step.flops(conv.lower(x, kernel))
  by_hand = 2 * h * w * cin * cout * k * k * b
  assert counted is not None
  assert abs(counted - by_hand) / by_hand < 0.10  # XLA skips the padded taps at the border


def test_peak_flops_finds_each_device_kind_its_own_row():
  """`suite.PEAK_TFLOPS` is matched in order by substring, so a shorter pattern listed before a
  longer one containing it ("h100" before "h100 pcie") would hand the longer one's devices the
  wrong peak. Each row is reached by its own pattern, whatever the case; the device kinds JAX
  reports reach the intended row; what the table lacks is None."""
  rows = dict(suite.PEAK_TFLOPS)
  for pattern, (bf16, fp32) in suite.PEAK_TFLOPS:
    kind = f"Vendor {pattern.upper()} 80GB"
    assert suite.peak_flops(kind, "bfloat16") == bf16 * 1e12, pattern
    assert suite.peak_flops(kind, "float32") == (None if fp32 is None else fp32 * 1e12), pattern
  reported = {
    "NVIDIA H100 80GB HBM3": "h100",
    "NVIDIA H100 PCIe": "h100 pcie",
    "NVIDIA A100-SXM4-80GB": "a100",
    "TPU v5 lite": "tpu v5 lite",
    "TPU v5p": "tpu v5",
  }
  for kind, pattern in reported.items():
    assert suite.peak_flops(kind, "bfloat16") == rows[pattern][0] * 1e12, kind
  assert suite.peak_flops("cpu", "float32") is None


STAND_INS = {
  # Stand-ins with the reference's interfaces (not its code): enough to run the driver.
  "vqvae.py": """
    import torch
    from torch import nn

    class VQVAE(nn.Module):
      def __init__(self, in_channel=3, channel=8, n_res_block=1, n_res_channel=4,
                   embed_dim=4, n_embed=8, decay=0.99):
        super().__init__()
        self.conv = nn.Conv2d(in_channel, in_channel, 3, padding=1)

      def forward(self, x):
        out = self.conv(x)
        return out, (out - x).pow(2).mean().reshape(1)
  """,
  "pixelsnail.py": """
    import torch
    from torch import nn
    from torch.nn import functional as F

    class PixelSNAIL(nn.Module):
      def __init__(self, shape, n_class, channel, kernel_size, n_block, n_res_block,
                   res_channel, attention=True, dropout=0.1, n_cond_res_block=0,
                   cond_res_channel=0, cond_res_kernel=3, n_out_res_block=0):
        super().__init__()
        self.n_class = n_class
        self.out = nn.Conv2d(n_class, n_class, 1)

      def forward(self, input, condition=None, cache=None):
        x = F.one_hot(input, self.n_class).permute(0, 3, 1, 2).float()
        return self.out(x), cache or {}
  """,
}


def test_reference_driver_runs_modules_found_at_the_given_path(tmp_path):
  pytest.importorskip("torch")
  for name, text in STAND_INS.items():
    (tmp_path / name).write_text(textwrap.dedent(text))
  ref = baseline_torch.Baseline(str(tmp_path), "cpu", threads=1)
  assert str(tmp_path) not in sys.path  # nothing of it stays importable afterwards
  stage1 = ref.stage1(dict(in_channel=3, channel=8), batch=2, size=8, steps=1)
  assert stage1["train_s"] > 0 and stage1["recon_s"] > 0
  kwargs = dict(channels=8, kernel_size=3, num_blocks=1, num_res_blocks=1, res_channels=8)
  top = baseline_torch.pixelsnail_kwargs(kwargs, 4, (4, 4))
  assert ref.prior(top, batch=2, cond_shape=None, steps=1)["train_s"] > 0
  bottom = baseline_torch.pixelsnail_kwargs(kwargs, 4, (8, 8))
  assert ref.prior(bottom, batch=2, cond_shape=(4, 4), steps=1)["train_s"] > 0
  drawn = ref.sample(top, batch=2, condition_shape=None, max_positions=16)
  assert drawn["seconds"] > 0 and not drawn["estimated"]
  assert ref.sample(bottom, 2, (4, 4), max_positions=16)["estimated"]  # 64 > 16 positions


def test_reference_absent_is_one_line(tmp_path):
  pytest.importorskip("torch")
  with pytest.raises(baseline_torch.Unavailable, match="not a clone") as e:
    baseline_torch.Baseline(str(tmp_path), "cpu")
  assert "\n" not in str(e.value)


def test_plot_sets_vqjax_cached_sampling_beside_the_reference_naive_one():
  common = dict(workload="sampling", batch=8, shape="32x32+64x64", unit="s")
  rows = [
    dict(impl="vqjax", metric="sample_cached", value=2.0, **common),
    dict(impl="vqjax", metric="sample_naive", value=60.0, **common),
    dict(impl="rosinality", metric="sample_naive", value=93.0, **common),
  ]
  groups = plot.panels(rows)
  cached = groups[("sampling", "sample_cached", 8, "32x32+64x64")]
  assert {k: r["value"] for k, r in cached.items()} == {"vqjax": 2.0, "rosinality (naive)": 93.0}
  naive = groups[("sampling", "sample_naive", 8, "32x32+64x64")]
  assert {k: r["value"] for k, r in naive.items()} == {"vqjax": 60.0, "rosinality": 93.0}


def test_plot_writes_a_png_of_two_rows(tmp_path):
  rows = [
    dict(impl="vqjax", workload="imagenet", metric="train", value=6500.0, unit="img/s"),
    dict(impl="rosinality", workload="imagenet", metric="train", value=1977.0, unit="img/s"),
    dict(impl="vqjax/rosinality", workload="imagenet", metric="train", value=3.3, unit="x"),
  ]
  jsonl = tmp_path / "rows.jsonl"
  jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"config": "other"}\n')
  assert len(plot.read_rows([str(jsonl)])) == 3  # the line of another schema is skipped
  groups = plot.panels(plot.read_rows([str(jsonl)]))
  assert list(groups) == [("imagenet", "train", "", "")]
  assert sorted(next(iter(groups.values()))) == ["rosinality", "vqjax"]  # no ratio bar
  out = plot.main(["--jsonl", str(jsonl), "--out", str(tmp_path / "chart.png")])
  with open(out, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  from PIL import Image

  image = np.asarray(Image.open(out).convert("RGB"))
  # Both bars are drawn in their colours.
  for color in (plot.COLORS["vqjax"], plot.OTHER_COLOR):
    rgb = np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)])
    assert np.any(np.all(image == rgb, axis=-1)), color


@pytest.mark.slow
def test_variants_times_each_override_set_and_checks_their_losses_agree(
  capsys, fast_compile, tmp_path
):
  """Two exact forms of the stride-2 convolutions: one JSON row each, equal losses; with
  --baseline-dir a reference row timed in the same rounds and each row's ratio to it."""
  pytest.importorskip("torch")
  import variants

  for name, text in STAND_INS.items():
    (tmp_path / name).write_text(textwrap.dedent(text))
  rows = variants.main(
    [
      "--baseline-dir",
      str(tmp_path),
      "--set",
      "vq.restart_after=0",
      "--set",
      "train.rng_impl=rbg",
      "--config",
      "experiments/vqvae2_imagenet.py:smoke",
      "--dtype",
      "float32",
      "--batch",
      "8",
      "--steps",
      "1",
      "--rounds",
      "2",
      "--variant",
      "model.upconv_impl=lax model.downconv_impl=lax",
      "--variant",
      "model.upconv_impl=adjoint model.downconv_impl=adjoint",
    ]
  )
  printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert printed == rows and len(rows) == 3
  ref = rows.pop()
  assert [r["variant"] for r in rows] == [
    "model.upconv_impl=lax model.downconv_impl=lax",
    "model.upconv_impl=adjoint model.downconv_impl=adjoint",
  ]
  assert rows[0]["vs_first"] == 1.0 and rows[1]["img/s"] > 0
  assert ref["variant"] == baseline_torch.REFERENCE and ref["batch"] == 8
  for r in rows:  # the ratio is the two rows' own throughputs (rounded to 3 decimals)
    np.testing.assert_allclose(r["vs_reference"], r["img/s"] / ref["img/s"], rtol=0.02, atol=6e-4)
  assert all(r["loss_matches_first"] for r in rows)
  np.testing.assert_allclose(rows[1]["loss"], rows[0]["loss"], rtol=1e-4)


def test_an_unknown_override_field_is_one_clear_error():
  config = train_step.load_config("experiments/fashion_mnist.py:smoke")
  with pytest.raises(errors.UserError, match="config has no field 'model.nope'"):
    train_step.apply_override(config, "model.nope=1")


@pytest.mark.slow
def test_xla_options_of_a_variant_reach_its_executable_alone(tmp_path, fast_compile):
  """`xla.NAME=value` tokens are parsed by type and passed to that executable's compile: a
  dump directory named there fills, and one compiled without them stays empty."""
  import variants

  assert variants.compiler_options(
    [
      "xla.xla_cpu_use_fusion_emitters=False",
      "xla.xla_cpu_prefer_vector_width=512",
      f"xla.xla_dump_to={tmp_path}",
    ]
  ) == {
    "xla_cpu_use_fusion_emitters": False,
    "xla_cpu_prefer_vector_width": 512,
    "xla_dump_to": str(tmp_path),
  }
  for bad in ("xla.xla_cpu_use_fusion_emitters", "xla.fusion=1"):
    with pytest.raises(errors.UserError, match="xla.xla_OPTION=value"):
      variants.compiler_options([bad])
  config = train_step.load_config("experiments/fashion_mnist.py:smoke", "float32")
  b = train_step.setup(config, 8)
  train_step.compile_step(b)
  assert not os.listdir(tmp_path)
  b = train_step.setup(config, 8)
  train_step.compile_step(b, {"xla_dump_to": str(tmp_path), "xla_dump_hlo_as_text": True})
  assert any(name.endswith(".txt") for name in os.listdir(tmp_path))


@pytest.mark.slow
def test_the_prepared_gpu_run_names_only_valid_configs_overrides_and_options(tmp_path):
  """benchmarks/gpu_candidates.sh is run on a short GPU lease: a misspelled override would cost
  its section. With PYTHON pointing at a recorder, every command it would run is checked here
  against the scripts' own argument parsers and the configs' validation."""
  import subprocess

  import sampling
  import variants

  calls = tmp_path / "calls.jsonl"
  shim = tmp_path / "python"
  shim.write_text(
    f"#!{sys.executable}\nimport json, sys\n"
    f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
  )
  shim.chmod(0o755)
  env = {**os.environ, "PYTHON": str(shim), "BUDGET": "3000"}
  out = subprocess.run(
    ["bash", os.path.join(ROOT, "benchmarks", "gpu_candidates.sh"), "/ref", str(tmp_path / "o")],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=True,
  ).stdout
  assert "skipped" not in out and "== done" in out
  runs = [json.loads(line) for line in calls.read_text().splitlines()]
  runs = [r for r in runs if r and r[0].startswith("benchmarks/")]
  assert [r[0] for r in runs] == [
    "benchmarks/variants.py",
    "benchmarks/variants.py",
    "benchmarks/sampling.py",
    "benchmarks/sampling.py",
    "benchmarks/profile_step.py",
    "benchmarks/variants.py",
  ]
  for script, *args in runs:
    if script == "benchmarks/sampling.py":
      sampling.parse(args)
      continue
    parsed = dict(config=None, dtype="", sets=[], variants=[None])
    it = iter(args)
    for flag in it:
      if flag in ("--config", "--dtype"):
        parsed[flag[2:]] = next(it)
      elif flag == "--set":
        parsed["sets"].append(next(it))
      elif flag == "--variant":
        parsed["variants"] = [v for v in parsed["variants"] if v is not None] + [next(it)]
      elif flag in ("--baseline-dir", "--rounds", "--steps", "--top", "--out"):
        next(it)
      else:
        raise AssertionError(f"{script}: unexpected argument {flag!r}")
    for variant in parsed["variants"]:
      tokens = [*parsed["sets"], *(variant or "").split()]
      variants.compiler_options([t for t in tokens if t.startswith("xla.")])
      overrides = [t for t in tokens if not t.startswith("xla.")]
      train_step.load_config(parsed["config"], parsed["dtype"], overrides)


# --- bad input: one clear line (or argparse's usage error) before anything compiles ----------

SMOKE = "experiments/fashion_mnist.py:smoke"


@pytest.fixture
def no_setup(monkeypatch):
  """Records every `train_step.setup` call (the step's build and compile) and fails it, so a
  test of input checking stays fast, and can assert that nothing was built."""
  calls = []

  def refuse(*args, **kwargs):
    calls.append(args)
    raise AssertionError("train_step.setup reached: the input was not checked first")

  monkeypatch.setattr(train_step, "setup", refuse)
  return calls


@pytest.mark.parametrize(
  "assignment, shown",
  [("model.channels=abc", "'abc' of type str"), ("model.channels=1.5", "1.5 of type float")],
)
def test_a_wrongly_typed_override_value_names_field_value_and_type(assignment, shown):
  config = train_step.load_config(SMOKE)
  message = f"--set '{assignment}': config.model.channels takes a value of type int, got {shown}"
  with pytest.raises(errors.UserError) as e:
    train_step.apply_override(config, assignment)
  assert str(e.value) == message
  # Values of the field's type still apply, at any depth of path.
  train_step.apply_override(config, "model.channels=24")
  train_step.apply_override(config, "seed=7")
  assert config.model.channels == 24 and config.seed == 7
  with pytest.raises(errors.UserError, match=r"^--set 'seed.x=1': config has no field 'seed.x'$"):
    train_step.apply_override(config, "seed.x=1")


def test_the_clis_report_a_wrongly_typed_override_on_one_line(no_setup):
  with pytest.raises(SystemExit) as e, errors.one_line("train_step"):
    train_step.main(["--config", SMOKE, "--set", "model.channels=abc"])
  assert str(e.value) == (
    "train_step: UserError: --set 'model.channels=abc': config.model.channels takes a value "
    "of type int, got 'abc' of type str"
  )
  import variants

  # A bad token of any variant stops the run before the first variant is built.
  argv = ["--config", SMOKE, "--variant", "", "--variant", "model.channels=abc"]
  with pytest.raises(errors.UserError, match=r"^--variant 'model.channels=abc': config\.model"):
    variants.main(argv)
  with pytest.raises(errors.UserError, match=r"^--set 'model.channels=1.5': .* got 1.5 of type"):
    variants.main(["--config", SMOKE, "--variant", "", "--set", "model.channels=1.5"])
  assert no_setup == []


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--variant", "noequals"], "--variant 'noequals': an override is given as group.field=value"),
    (["--variant", "", "--set", "noequals"], "--set 'noequals': an override is given as"),
    (["--variant", "model.nope=1"], "--variant 'model.nope=1': config has no field 'model.nope'"),
    (["--variant", "xla.fusion=1"], "--variant 'xla.fusion=1': an XLA option is given as"),
    (["--variant", "", "--set", "xla.fusion=1"], "--set 'xla.fusion=1': an XLA option is given"),
  ],
)
def test_a_variants_error_names_the_flag_its_token_came_from(argv, message, no_setup):
  import variants

  with pytest.raises(errors.UserError) as e:
    variants.main(["--config", SMOKE, *argv])
  assert str(e.value).startswith(message)
  assert no_setup == []


def _script(name):
  import profile_step
  import sampling
  import variants

  return {
    "train_step": train_step,
    "variants": variants,
    "profile_step": profile_step,
    "suite": suite,
    "sampling": sampling,
  }[name]


@pytest.mark.parametrize(
  "script, argv, message",
  [
    ("train_step", ["--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
    ("train_step", ["--steps", "-1"], "argument --steps: must be an integer >= 1, got -1"),
    ("train_step", ["--batch", "-8"], "argument --batch: must be an integer >= 0, got -8"),
    ("variants", ["--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
    ("variants", ["--steps", "-1"], "argument --steps: must be an integer >= 1, got -1"),
    ("variants", ["--rounds", "0"], "argument --rounds: must be an integer >= 1, got 0"),
    ("variants", ["--batch", "-1"], "argument --batch: must be an integer >= 0, got -1"),
    ("variants", ["--steps", "x"], "argument --steps: not an integer: 'x'"),
    ("profile_step", ["--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
    ("profile_step", ["--top", "-1"], "argument --top: must be an integer >= 0, got -1"),
    ("profile_step", ["--batch", "-1"], "argument --batch: must be an integer >= 0, got -1"),
    ("suite", ["--steps", "-1"], "argument --steps: must be an integer >= 0, got -1"),
    ("suite", ["--batch", "-1"], "argument --batch: must be an integer >= 0, got -1"),
    ("suite", ["--naive-max-positions", "-1"], "argument --naive-max-positions: must be"),
    ("suite", ["--torch-threads", "-1"], "argument --torch-threads: must be an integer >= 0"),
    ("suite", ["--sample-batches", "2,x"], "--sample-batches '2,x': give comma-separated"),
    ("suite", ["--sample-batches", "8,0"], "--sample-batches: every batch must be >= 1"),
    ("sampling", ["--batch", "0"], "argument --batch: must be an integer >= 1, got 0"),
    ("sampling", ["--repeats", "0"], "argument --repeats: must be an integer >= 1, got 0"),
    ("sampling", ["--num-codes", "-1"], "argument --num-codes: must be an integer >= 0"),
    ("sampling", ["--top-side", "-1"], "argument --top-side: must be an integer >= 0"),
    ("sampling", ["--pixelcnn-layers", "0"], "argument --pixelcnn-layers: must be an integer"),
    ("sampling", ["--pixelcnn-channels", "0"], "argument --pixelcnn-channels: must be an int"),
  ],
)
def test_a_count_out_of_range_is_a_usage_error(script, argv, message, capsys):
  module = _script(script)
  if script == "variants":
    argv = ["--variant", "", *argv]
  with pytest.raises(SystemExit) as e:
    module.parse(argv)
  assert e.value.code == 2
  last = capsys.readouterr().err.splitlines()[-1]  # "PROG: error: ..." after the usage
  assert last.split(": error: ", 1)[1].startswith(message), last


def test_counts_at_their_least_are_accepted():
  import profile_step
  import sampling
  import variants

  a = variants.parse(["--variant", "", "--steps", "1", "--rounds", "1", "--batch", "0"])
  assert (a.steps, a.rounds, a.batch) == (1, 1, 0)
  assert train_step.parse(["--steps", "1", "--batch", "0"]).steps == 1
  assert profile_step.parse(["--steps", "1", "--top", "0"]).top == 0
  a = suite.parse(["--steps", "0", "--batch", "0", "--sample-batches", "1,4", "--quick"])
  assert (a.steps, a.sample_batches, a.naive_max_positions) == (0, [1, 4], 64)
  a = sampling.parse(["--batch", "1", "--repeats", "1", "--naive-max-positions", "0"])
  assert (a.batch, a.repeats, a.naive_max_positions, a.num_codes) == (1, 1, 0, 128)


def test_a_bad_count_stops_variants_and_train_step_before_any_compile(no_setup):
  import variants

  with pytest.raises(SystemExit):
    variants.main(["--config", SMOKE, "--variant", "", "--steps", "0"])
  with pytest.raises(SystemExit):
    train_step.main(["--config", SMOKE, "--steps", "-1"])
  assert no_setup == []


def test_profile_step_refuses_an_out_that_is_a_file(tmp_path, capsys):
  import profile_step

  (tmp_path / "trace").write_text("")
  with pytest.raises(SystemExit):
    profile_step.parse(["--out", str(tmp_path / "trace")])
  assert "is a file, not a directory" in capsys.readouterr().err
  assert profile_step.parse(["--out", str(tmp_path / "new")]).out == str(tmp_path / "new")


def test_suite_checks_its_jsonl_path_before_running(tmp_path, monkeypatch, capsys):
  def refuse(*args):
    raise AssertionError("the suite ran before --jsonl was checked")

  monkeypatch.setattr(suite, "Suite", refuse)
  missing = tmp_path / "nonexistent" / "r.jsonl"
  with pytest.raises(SystemExit) as e, errors.one_line("suite"):
    suite.main(["--quick", "--only", "fashion", "--jsonl", str(missing)])
  assert str(e.value) == (
    f"suite: UserError: --jsonl '{missing}' cannot be created: no directory '{missing.parent}'"
  )
  assert capsys.readouterr().out == ""  # not even the table's header
  (tmp_path / "file").write_text("")
  with pytest.raises(errors.UserError, match="cannot be created: no directory"):
    suite.check_writable(str(tmp_path / "file" / "r.jsonl"))
  with pytest.raises(errors.UserError, match=r"is a directory$"):
    suite.check_writable(str(tmp_path))
  suite.check_writable(str(tmp_path / "r.jsonl"))  # a new file in an existing directory
  suite.check_writable("")  # no file asked for
  assert sorted(os.listdir(tmp_path)) == ["file"]  # the check creates nothing


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to a read-only directory")
def test_suite_refuses_a_jsonl_in_a_read_only_directory(tmp_path):
  locked = tmp_path / "locked"
  locked.mkdir()
  (locked / "old.jsonl").write_text("")
  locked.chmod(0o500)
  (locked / "old.jsonl").chmod(0o400)
  try:
    with pytest.raises(errors.UserError, match="is not writable"):
      suite.check_writable(str(locked / "r.jsonl"))
    with pytest.raises(errors.UserError, match="is not writable"):
      suite.check_writable(str(locked / "old.jsonl"))
  finally:
    locked.chmod(0o700)
