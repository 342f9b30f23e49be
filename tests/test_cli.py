"""Tests of the `python -m vqjax.train` command line (vqjax/train.py): help, and one-line
messages for every mistake a user can fix, each in a subprocess as a user would run it; and
every other command's --help."""

import os
import stat
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # every test runs a command in a subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIS = (
  "train",
  "pipeline",
  "extract_codes",
  "sample",
  "evaluate",
  "features",
  "anomaly",
  "prepare",
  "convert",
)
SMOKE = "experiments/fashion_mnist.py:smoke"
needs_fmnist = pytest.mark.skipif(
  not os.path.isdir("/usr/share/datasets/fashion-mnist"),
  reason="Fashion-MNIST idx files not installed",
)


def run(*args, timeout=120):
  env = dict(
    os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
  )
  return subprocess.run(
    [sys.executable, "-m", "vqjax.train", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def one_line_error(result) -> str:
  """The error of a failed run, which must be a single line without a traceback."""
  assert result.returncode != 0, result.stdout
  err = result.stderr.strip()
  assert "Traceback" not in err, err
  assert len(err.splitlines()) == 1, err
  return err


def test_help_lists_experiments_and_config_fields():
  result = run("--help")
  assert result.returncode == 0, result.stderr
  for name in (
    "fashion_mnist",
    "vqvae2_imagenet",
    "vq.beta=0.25",
    "optim.lr=",
    "--workdir",
    "verbose",
  ):
    assert name in result.stdout


def test_every_command_answers_help_with_its_usage_and_status_0():
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  running = {
    name: subprocess.Popen(
      [sys.executable, "-m", f"vqjax.{name}", "--help"],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for name in CLIS
  }
  for name, process in running.items():
    out, err = process.communicate(timeout=180)
    assert process.returncode == 0, (name, err[-2000:])
    assert f"python -m vqjax.{name}" in out, (name, out[:500])
    # Each usage form on its own line, none run together by a line continuation.
    usage = [s[s.index("python -m") :] for s in out.splitlines() if "python -m vqjax." in s]
    assert not any("   " in line or line.endswith("\\") for line in usage), usage
    assert "--workdir" in out or "--data" in out or name in ("prepare", "convert"), name


def test_a_stray_argument_is_one_line_in_every_command():
  """absl would print the whole usage before the message; each command says it in one line."""
  env = dict(
    os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
  )
  running = {
    name: subprocess.Popen(
      [sys.executable, "-m", f"vqjax.{name}", f"--config={SMOKE}", "--workdir=/nowhere", "stray"]
      if name == "train"
      else [sys.executable, "-m", f"vqjax.{name}", "--workdir=/nowhere", "stray"],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for name in ("train", "anomaly", "sample")
  }
  for name, process in running.items():
    out, err = process.communicate(timeout=180)
    assert process.returncode == 1, (name, err[-2000:])
    assert err.strip() == (
      f"vqjax.{name}: unexpected arguments: ['stray'] (--help lists the flags)"
    ), (name, err[-2000:])


@pytest.mark.parametrize(
  "args,expected",
  [
    ((f"--config={SMOKE}",), "--workdir is required"),
    (("--workdir=/tmp/unused",), "--config is required"),
  ],
)
def test_a_missing_flag_is_named(args, expected):
  err = one_line_error(run(*args))
  assert expected in err and "override" not in err


@pytest.mark.parametrize("spec", ["experiments/nope.py", "nope:smoke"])
def test_a_misspelled_config_names_the_experiments(spec):
  err = one_line_error(run(f"--config={spec}", "--workdir=/tmp/unused"))
  assert "nope" in err and "fashion_mnist" in err and "vqvae2_ffhq1024" in err


def test_an_unknown_variant_names_the_known_ones():
  err = one_line_error(run("--config", "fashion_mnist:smok", "--workdir=/tmp/unused"))
  assert "'smok'" in err and "smoke" in err


def test_a_bad_override_is_one_line():
  err = one_line_error(run(f"--config={SMOKE}", "--workdir=/tmp/unused", "--config.optim.lrr=1"))
  assert "bad config override" in err and "lrr" in err


def test_an_ignored_field_is_rejected_before_training(tmp_path):
  err = one_line_error(
    run(
      f"--config={SMOKE}",
      f"--workdir={tmp_path / 'w'}",
      "--config.vq.kind=gumbel",
      "--config.vq.beta=0.5",
    )
  )
  assert "vq.beta" in err and "gumbel" in err
  assert not (tmp_path / "w").exists()


def test_verbose_adds_the_traceback_of_a_user_error(tmp_path):
  result = run(
    f"--config={SMOKE}",
    f"--workdir={tmp_path / 'w'}",
    "--verbose",
    "--config.vq.kind=gumbel",
    "--config.vq.beta=0.5",
  )
  assert result.returncode != 0 and "Traceback" in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("vqjax.train: UserError")


def _unwritable_dir(tmp_path) -> str:
  """A directory nothing can be created in: mode 0o500, or (as root, who ignores modes) a
  directory of a pseudo filesystem that refuses new entries."""
  path = tmp_path / "read_only"
  path.mkdir()
  path.chmod(stat.S_IRUSR | stat.S_IXUSR)
  try:
    (path / "probe").mkdir()
  except OSError:
    return str(path / "workdir")
  for candidate in ("/sys/vqjax_test_workdir", "/proc/vqjax_test_workdir"):
    try:
      os.mkdir(candidate)
    except OSError:
      return candidate
    os.rmdir(candidate)
  pytest.skip("no unwritable directory available")


@needs_fmnist
@pytest.mark.parametrize("case", ["regular_file", "under_a_file", "unwritable"])
def test_an_unusable_workdir_is_one_line_naming_it(case, tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory")
  workdir = {"regular_file": str(a_file), "under_a_file": str(a_file / "run"), "unwritable": None}[
    case
  ] or _unwritable_dir(tmp_path)
  err = one_line_error(run(f"--config={SMOKE}", f"--workdir={workdir}"))
  assert workdir in err and "Error" in err


# The trainer replaced by one that raises `error`, to see how the CLI reports each kind.
_RAISING_TRAINER = """
import sys
from absl import app
from vqjax import errors, train
from vqjax.training import trainer

def train_and_evaluate(config, workdir, **kwargs):
  raise {error}

trainer.train_and_evaluate = train_and_evaluate
sys.argv = ["vqjax.train", "--config={smoke}", "--workdir=/tmp/unused"]
app.run(train.main, flags_parser=train.parse_flags)
"""


@pytest.mark.parametrize(
  "error,one_line",
  [
    ("errors.CheckpointError('checkpoint 7 is damaged')", "CheckpointError: checkpoint 7"),
    ("errors.DivergenceError('loss is nan at step 3')", "DivergenceError: loss is nan"),
    ("PermissionError(13, 'Permission denied', '/data/run')", "/data/run: Permission denied"),
    ("ValueError('an internal bug')", None),
    ("FloatingPointError('an internal bug')", None),
  ],
)
def test_only_user_and_os_errors_lose_their_traceback(error, one_line):
  env = dict(
    os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
  )
  code = _RAISING_TRAINER.format(error=error, smoke=SMOKE)
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
  )
  if one_line:
    assert one_line in one_line_error(result)
  else:
    # A bug: the traceback, ending at the raise, is what a report needs.
    assert result.returncode != 0 and "Traceback" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"{error.split('(')[0]}: an internal bug"


def test_cli_modules_import_together():
  """Several CLIs share flag names (--workdir): importing them into one process (a notebook, a
  test) must not define a flag twice."""
  code = "import vqjax.train, vqjax.sample, vqjax.evaluate, vqjax.extract_codes; print('ok')"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize(
  "args, message",
  [
    (["-m", "vqjax.evaluate", "--workdir", "/nonexistent/run"], "is not a directory"),
    (["-m", "vqjax.extract_codes", "--workdir", "/nonexistent/run"], "--out is required"),
    (["-m", "vqjax.sample", "--out", "/tmp/unused"], "give the priors' workdirs"),
  ],
)
def test_other_clis_answer_bad_input_in_one_line(args, message):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, *args], capture_output=True, text=True, timeout=120, env=env
  )
  assert out.returncode != 0
  last = out.stderr.strip().splitlines()[-1]
  assert message in last and "Traceback" not in out.stderr


def test_ctrl_c_outside_the_trainer_is_one_line_and_status_130():
  """Ctrl-C during setup or compilation (before the trainer handles SIGINT itself) ends a CLI
  with one line and 130, not a traceback and, while XLA compiles on other threads, a crash."""
  code = (
    "from vqjax import errors\n"
    "print('partial output', end='')\n"
    "with errors.one_line('vqjax.x'):\n"
    "  raise KeyboardInterrupt\n"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert out.returncode == 130 and out.stdout == "partial output"
  assert out.stderr == "vqjax.x: interrupted (Ctrl-C); run the same command to go on\n"
