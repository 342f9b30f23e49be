"""End-to-end tests of the training system (vqjax/train.py, vqjax/training/trainer.py,
experiments/*.py): one real step per smoke config, a full short run with its outputs, exact
resume after SIGKILL, SIGTERM, two cooperating processes, and clear errors. Nothing downloads:
data are the local Fashion-MNIST idx files or a temporary image folder."""

import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vqjax.data import pipeline, sources
from vqjax.training import checkpoint, sharding, steps, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = ("fashion_mnist", "vqvae_cifar10", "vqvae2_imagenet", "vqvae2_ffhq1024")
FMNIST = "/usr/share/datasets/fashion-mnist"
needs_fmnist = pytest.mark.skipif(
    not sources.fashion_mnist_files_exist(FMNIST), reason="Fashion-MNIST idx files not installed"
)


def load_config(name: str, arg: str | None = None):
  path = os.path.join(ROOT, "experiments", name + ".py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f]


def train_losses(workdir: str) -> dict[int, float]:
  """step -> loss; a step logged twice (before a kill and after the resume) keeps the last."""
  return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if r["split"] == "train"}


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
  """One persistent compilation cache for every run of the Fashion-MNIST smoke model: the
  in-process run, the CLI runs and their resumes compile each program once."""
  return tmp_path_factory.mktemp("jax_cache")


def quick(config, cache_dir):
  """Shortens a smoke config for the in-process runs (and shares compiled programs)."""
  config.log.tensorboard = True
  config.log.compilation_cache = str(cache_dir)
  config.optim.schedule = "constant"
  return config


def cli_env(num_devices: int = 8) -> dict:
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
             PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
  return env


def cli(workdir, *overrides, config="experiments/fashion_mnist.py:smoke"):
  return [sys.executable, "-m", "vqjax.train", f"--config={config}", f"--workdir={workdir}",
          *overrides]


# --- one real step for each experiment's smoke variant -----------------------------------------


@needs_fmnist
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_smoke_config_takes_one_real_step(name):
  config = load_config(name, "smoke")
  assert config.train.steps == 1
  task = steps.make_task(config)
  mesh = sharding.make_mesh(config.mesh)
  it = pipeline.make_train_iterator(config.data, config.seed)
  batch = sharding.global_batch(next(it), mesh)
  init = jax.jit(task.init)
  state = init(jax.random.key(0, impl="rbg"), {"image": batch["image"][:1]})
  before = jax.device_get(state.params)
  new_state, metrics = jax.jit(task.train_step)(state, batch, jax.random.key(1))
  assert int(new_state.step) == 1
  assert np.isfinite(float(metrics["loss"]))
  assert 0 < float(metrics["mse"]) < 4
  after = jax.device_get(new_state.params)
  changed = [not np.allclose(a, b)
             for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)]
  assert sum(changed) > len(changed) // 2


def test_full_configs_describe_the_papers():
  c = load_config("vqvae_cifar10")
  assert (c.model.name, c.model.channels, c.model.downsample) == ("vqvae", 256, 2)
  assert c.vq.num_codes == 512
  assert (c.optim.lr, c.data.batch_size, c.train.steps) == (2e-4, 128, 250_000)
  c = load_config("vqvae2_imagenet")
  assert (c.data.image_size, c.model.first_stride * c.model.level_stride) == (256, 8)
  assert (c.model.channels, c.model.res_channels, c.vq.code_dim, c.optim.lr) == (128, 32, 64, 3e-4)
  c = load_config("vqvae2_ffhq1024")
  assert (c.data.image_size, c.model.levels) == (1024, 3)
  assert 1024 // (c.model.first_stride * c.model.level_stride**2) == 32
  with pytest.raises(ValueError, match="unknown variant"):
    load_config("fashion_mnist", "smokee")


# --- a whole run in-process ---------------------------------------------------------------------


@needs_fmnist
def test_train_and_evaluate_writes_everything_and_resumes(tmp_path, shared_cache):
  config = quick(load_config("fashion_mnist", "smoke"), shared_cache)
  config.train.steps = 2
  config.ckpt.every_steps = 1
  config.log.image_every_steps = 2
  workdir = str(tmp_path / "run")
  result = trainer.train_and_evaluate(config, workdir)
  assert result["step"] == 2 and result["first_step_s"] > 0
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
  (ev,) = [r for r in records if r["split"] == "eval"]
  assert math.isclose(ev["psnr"], 10 * math.log10(4 / ev["mse"]), rel_tol=1e-6)
  assert ev["examples"] == 8  # one eval batch of 8
  assert 0 < ev["level0/usage"] <= 1 and 1 <= ev["level1/perplexity"] <= 32
  grid = Image.open(os.path.join(workdir, "images", "recon_0000002.png"))
  assert grid.size == (8 * 34 + 2, 2 * 34 + 2)  # 8 images of 32 px + 2 px padding, 2 rows
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tb")))
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["train"]["steps"] == 2
  assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [1, 2]

  # Same workdir, more steps: resumes at 2, runs only step 3.
  config.train.steps = 3
  result = trainer.train_and_evaluate(config, workdir)
  assert result["step"] == 3
  assert [r["step"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if r["split"] == "train"] == [1, 2, 3]


@needs_fmnist
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = quick(load_config("fashion_mnist", "smoke"), tmp_path / "cache")
  config.optim.lr = 1e30
  config.train.steps = 6
  config.ckpt.every_steps = 1
  config.ckpt.keep = 10
  workdir = str(tmp_path / "run")
  with pytest.raises(FloatingPointError, match="Last good checkpoint"):
    trainer.train_and_evaluate(config, workdir)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  last = ckpt.latest_step()
  assert last is not None and last < 6
  task = steps.make_task(config)
  abstract = jax.eval_shape(lambda k: task.init(k, {"image": jnp.zeros((1, 32, 32, 1))}),
                            jax.random.key(0, impl="rbg"))
  mesh = sharding.make_mesh(config.mesh)
  target = checkpoint.abstract_with_shardings(abstract, sharding.state_shardings(abstract, mesh, 1))
  state, _ = ckpt.restore(target)
  assert int(state.step) == last
  assert bool(sharding.all_finite((state.params, state.model_state)))


@needs_fmnist
def test_missing_data_is_a_clear_error(tmp_path):
  config = load_config("fashion_mnist", "smoke")
  config.data.local_dir = str(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="not found"):
    trainer.train_and_evaluate(config, str(tmp_path / "run"))


def test_corrupt_image_is_a_clear_error(tmp_path):
  folder = tmp_path / "images"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(7):
    Image.fromarray(rng.integers(0, 255, (16, 16), np.uint8)).save(folder / f"{i}.png")
  (folder / "7.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  config = load_config("fashion_mnist", "smoke")
  config.data.name, config.data.reader, config.data.folder = "folder", "auto", str(folder)
  config.data.train_split = config.data.eval_split = "train"
  config.data.image_size, config.data.resize = 16, "pad"
  with pytest.raises(ValueError, match="Cannot decode image .*7.png"):
    trainer.train_and_evaluate(config, str(tmp_path / "run"))


def test_misspelled_override_is_a_clear_error(tmp_path):
  out = subprocess.run(cli(tmp_path / "w", "--config.optim.lrr=1"), cwd=ROOT, env=cli_env(),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  last = out.stderr.strip().splitlines()[-1]
  assert "bad config override" in last and "lrr" in last and "Did you mean" in last


# --- processes: kill and resume, SIGTERM, two hosts ---------------------------------------------

_CLI_RUN = ("--config.optim.schedule=constant", "--config.log.every_steps=1",
            "--config.log.eval_every_steps=0", "--config.log.image_every_steps=0",
            "--config.log.tensorboard=False", "--config.ckpt.every_steps=2")


@needs_fmnist
def test_sigkill_then_resume_reproduces_uninterrupted_losses(tmp_path, shared_cache):
  cache = f"--config.log.compilation_cache={shared_cache}"
  total = 12
  ref = tmp_path / "ref"
  subprocess.run(cli(ref, *_CLI_RUN, cache, f"--config.train.steps={total}"), cwd=ROOT,
                 env=cli_env(), check=True, capture_output=True, timeout=300)
  expected = train_losses(str(ref))
  assert sorted(expected) == list(range(1, total + 1))

  run = tmp_path / "run"
  proc = subprocess.Popen(cli(run, *_CLI_RUN, cache, "--config.train.steps=100000"), cwd=ROOT,
                          env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 240
    while not (run / "checkpoints" / "2").is_dir():
      assert proc.poll() is None and time.time() < deadline, "no checkpoint before timeout"
      time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait(30)
  saved = checkpoint.Checkpointer(str(run / "checkpoints")).latest_step()
  assert saved is not None and saved < total, f"killed too late (checkpoint {saved})"

  subprocess.run(cli(run, *_CLI_RUN, cache, f"--config.train.steps={total}"), cwd=ROOT,
                 env=cli_env(), check=True, capture_output=True, timeout=300)
  got = train_losses(str(run))
  assert sorted(got)[: total] == list(range(1, total + 1))
  assert [got[s] for s in range(1, total + 1)] == [expected[s] for s in range(1, total + 1)]


@needs_fmnist
def test_sigterm_saves_a_restorable_checkpoint(tmp_path, shared_cache):
  run = tmp_path / "run"
  args = cli(run, *_CLI_RUN, "--config.ckpt.every_steps=100000", "--config.train.steps=100000",
             f"--config.log.compilation_cache={shared_cache}")
  proc = subprocess.Popen(args, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = run / "metrics.jsonl"
  deadline = time.time() + 240
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
    assert proc.poll() is None and time.time() < deadline, "run did not start"
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert "stopped at step" in err
  last_logged = max(train_losses(str(run)))
  ckpt = checkpoint.Checkpointer(str(run / "checkpoints"))
  assert ckpt.all_steps() == [last_logged]
  # The saved step is complete: its state and the data position come back.
  config = load_config("fashion_mnist", "smoke")
  task = steps.make_task(config)
  abstract = jax.eval_shape(lambda k: task.init(k, {"image": jnp.zeros((1, 32, 32, 1))}),
                            jax.random.key(0, impl="rbg"))
  mesh = sharding.make_mesh(config.mesh)
  target = checkpoint.abstract_with_shardings(abstract, sharding.state_shardings(abstract, mesh, 1))
  state, data_state = ckpt.restore(target)
  assert int(state.step) == last_logged
  assert data_state["epoch"] * 8 + data_state["step"] == last_logged  # 64 images / batch 8


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@needs_fmnist
def test_two_processes_train_together(tmp_path):
  port = _free_port()
  env = cli_env(num_devices=2)
  env["XLA_FLAGS"] = ""
  env["JAX_NUM_CPU_DEVICES"] = "2"
  procs = []
  for i in range(2):
    args = cli(tmp_path / "run", *_CLI_RUN, "--config.train.steps=2",
               f"--config.distributed.coordinator_address=127.0.0.1:{port}",
               "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}")
    procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    outs.append(out)
  done = [dict(kv.split("=") for kv in o.split("done: ")[1].split()) for o in outs]
  assert "process 0/2" in outs[0] and "process 1/2" in outs[1]
  assert done[0]["loss"] == done[1]["loss"] and done[0]["eval/mse"] == done[1]["eval/mse"]
  assert np.isfinite(float(done[0]["loss"])) and done[0]["step"] == "2"
  assert checkpoint.Checkpointer(str(tmp_path / "run" / "checkpoints")).all_steps() == [2]
