"""Stopping and resuming across processes (vqjax/train.py, vqjax/training/trainer.py): a
SIGKILLed run resumed reproduces the uninterrupted losses, SIGTERM saves a restorable
checkpoint with the exact data position, and two cooperating processes train as one."""

import math
import os
import signal
import socket
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import (
  ROOT,
  cli,
  cli_env,
  load_config,
  needs_fmnist,
  train_losses,
)

from vqjax.data import pipeline
from vqjax.training import checkpoint, sharding, tasks

# --- processes: kill and resume, SIGTERM, two hosts ---------------------------------------------

_CLI_RUN = (
  "--config.optim.schedule=constant",
  "--config.log.every_steps=1",
  "--config.log.eval_every_steps=0",
  "--config.log.image_every_steps=0",
  "--config.log.tensorboard=False",
  "--config.ckpt.every_steps=2",
)


@pytest.mark.slow
@needs_fmnist
def test_sigkill_then_resume_reproduces_uninterrupted_losses(tmp_path, shared_cache):
  cache = f"--config.log.compilation_cache={shared_cache}"
  total = 12
  ref = tmp_path / "ref"
  subprocess.run(
    cli(ref, *_CLI_RUN, cache, f"--config.train.steps={total}"),
    cwd=ROOT,
    env=cli_env(),
    check=True,
    capture_output=True,
    timeout=300,
  )
  expected = train_losses(str(ref))
  assert sorted(expected) == list(range(1, total + 1))

  run = tmp_path / "run"
  proc = subprocess.Popen(
    cli(run, *_CLI_RUN, cache, "--config.train.steps=100000"),
    cwd=ROOT,
    env=cli_env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
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

  subprocess.run(
    cli(run, *_CLI_RUN, cache, f"--config.train.steps={total}"),
    cwd=ROOT,
    env=cli_env(),
    check=True,
    capture_output=True,
    timeout=300,
  )
  got = train_losses(str(run))
  assert sorted(got)[:total] == list(range(1, total + 1))
  assert [got[s] for s in range(1, total + 1)] == [expected[s] for s in range(1, total + 1)]


@pytest.mark.slow
@needs_fmnist
def test_sigterm_saves_a_restorable_checkpoint(tmp_path, shared_cache):
  run = tmp_path / "run"
  args = cli(
    run,
    *_CLI_RUN,
    "--config.ckpt.every_steps=100000",
    "--config.train.steps=100000",
    f"--config.log.compilation_cache={shared_cache}",
  )
  proc = subprocess.Popen(
    args, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  metrics = run / "metrics.jsonl"
  deadline = time.time() + 240
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
    assert proc.poll() is None and time.time() < deadline, "run did not start"
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  # Stopped, not finished: 128 + SIGTERM, as a shell reports it, and the reason on stderr.
  assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
  assert "stopped at step" in err and "the same command resumes" in err
  last_logged = max(train_losses(str(run)))
  ckpt = checkpoint.Checkpointer(str(run / "checkpoints"))
  assert ckpt.all_steps() == [last_logged]
  # The saved step is complete: its state and the data position come back.
  config = load_config("fashion_mnist", "smoke")
  task = tasks.make_task(config)
  abstract = jax.eval_shape(
    lambda k: task.init(k, task.dummy_batch()), jax.random.key(0, impl="rbg")
  )
  mesh = sharding.make_mesh(config.mesh)
  target = checkpoint.abstract_with_shardings(abstract, sharding.state_shardings(abstract, mesh, 1))
  state, data_state = ckpt.restore(target)
  ckpt.close()
  assert int(state.step) == last_logged
  resumed = pipeline.make_train_iterator(config.data, config.seed)
  resumed.set_state(data_state)
  fresh = pipeline.make_train_iterator(config.data, config.seed)
  for _ in range(last_logged):
    next(fresh)
  np.testing.assert_array_equal(next(resumed)["image"], next(fresh)["image"])
  resumed.close()
  fresh.close()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# `python -c` this, LOG, ARGS...: `vqjax.train ARGS` with every file it opens for writing (or
# renames onto) appended to LOG as an absolute path, seen by a Python audit hook (PEP 578).
_TRAIN_LOGGING_WRITES = """
import os, runpy, sys
log = open(sys.argv[1], "a", buffering=1)
def written(event, args):
  if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
    mode, flags = args[1], args[2]
    writes = set(mode) & set("wax+") if isinstance(mode, str) else flags & (os.O_WRONLY | os.O_RDWR)
    if writes:
      log.write(os.path.abspath(os.fsdecode(args[0])) + "\\n")
  elif event == "os.rename":
    log.write(os.path.abspath(os.fsdecode(args[1])) + "\\n")
sys.addaudithook(written)
sys.argv = ["vqjax.train", *sys.argv[2:]]
runpy.run_module("vqjax.train", run_name="__main__", alter_sys=True)
"""


def _written(log, workdir) -> set[str]:
  """The files below `workdir` a `_TRAIN_LOGGING_WRITES` run wrote, relative to it."""
  top = str(workdir) + os.sep
  with open(log) as f:
    return {line.strip()[len(top) :] for line in f if line.startswith(top)}


@pytest.mark.slow
@needs_fmnist
def test_two_processes_train_together(tmp_path):
  port = _free_port()
  env = cli_env(num_devices=2)
  env["XLA_FLAGS"] = ""
  env["JAX_NUM_CPU_DEVICES"] = "2"
  procs = []
  for i in range(2):
    args = cli(
      tmp_path / "run",
      *_CLI_RUN,
      "--config.train.steps=3",  # step 3's check records step 2's checkpoint good
      f"--config.distributed.coordinator_address=127.0.0.1:{port}",
      "--config.distributed.num_processes=2",
      f"--config.distributed.process_id={i}",
    )
    args[1:3] = ["-c", _TRAIN_LOGGING_WRITES, str(tmp_path / f"writes{i}.txt")]
    procs.append(
      subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
      )
    )
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    outs.append(out)
  assert "process 0/2" in outs[0] and "process 1/2" in outs[1]
  # The shared records are the primary's alone (it writes them: the check can see them).
  shared = {"metrics.jsonl", "config.json", os.path.join("checkpoints", "health.json")}
  primary, secondary = (_written(tmp_path / f"writes{i}.txt", tmp_path / "run") for i in range(2))
  assert shared <= primary, sorted(primary)
  assert not shared & secondary, sorted(secondary)
  assert checkpoint.Checkpointer(str(tmp_path / "run" / "checkpoints")).all_steps() == [2, 3]
  logged = train_losses(str(tmp_path / "run"))

  # The same global batch in one process: each host's first batch, host 0's rows first (the
  # order make_array_from_process_local_data puts them in), and the same init and step keys.
  config = load_config("fashion_mnist", "smoke")
  hosts = [pipeline.make_train_iterator(config.data, config.seed, i, 2) for i in range(2)]
  local = [next(h) for h in hosts]
  for h in hosts:
    h.close()
  ids = [{x.tobytes() for x in b["image"]} for b in local]
  assert not ids[0] & ids[1]  # the hosts read disjoint examples
  batch = {k: jnp.concatenate([b[k] for b in local]) for k in local[0]}
  task = tasks.make_task(config)
  state = jax.jit(task.init)(jax.random.key(config.seed, impl="rbg"), {"image": batch["image"][:1]})
  rng = jax.random.fold_in(jax.random.key(config.seed + 1), 0)
  _, metrics = jax.jit(task.train_step)(state, batch, rng, None)
  assert math.isclose(logged[1], float(metrics["loss"]), rel_tol=1e-5)
