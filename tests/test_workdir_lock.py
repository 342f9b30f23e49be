"""The workdir lock (vqjax/training/workdir_lock.py): a second trainer on one workdir is one
line naming the holder, a lock left by a killed process is taken over, and the trainer holds
the lock for the whole launch."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from vqjax import configs, errors
from vqjax.training import trainer, workdir_lock

HOLD = """
import sys, time
from vqjax.training import workdir_lock
workdir_lock.WorkdirLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def _holder(workdir):
  """A separate process that takes the lock and keeps it (its pid, its Popen)."""
  proc = subprocess.Popen(
    [sys.executable, "-c", HOLD, str(workdir)], stdout=subprocess.PIPE, text=True
  )
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_a_second_holder_is_one_line_naming_the_first(tmp_path):
  proc = _holder(tmp_path)
  try:
    with pytest.raises(errors.UserError) as e:
      workdir_lock.WorkdirLock(str(tmp_path)).acquire()
    message = str(e.value)
    assert f"pid {proc.pid}" in message and "in use by another trainer" in message
    assert "\n" not in message
  finally:
    proc.kill()
    proc.wait()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, caplog):
  proc = _holder(tmp_path)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.getsize(tmp_path / workdir_lock.LOCK_FILE) > 0  # its record is still there
  with caplog.at_level("WARNING"):
    lock = workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  assert any(f"pid {proc.pid}" in r.getMessage() for r in caplog.records)
  lock.release()
  # Released cleanly: the next one takes it without a word.
  caplog.clear()
  with caplog.at_level("WARNING"), workdir_lock.WorkdirLock(str(tmp_path)):
    pass
  assert not [r for r in caplog.records if "taking over" in r.getMessage()]


def test_without_flock_a_stale_file_of_a_dead_local_process_is_removed(tmp_path, monkeypatch):
  def no_flock(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(workdir_lock.fcntl, "flock", no_flock)
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()  # a pid that no longer runs
  path = tmp_path / workdir_lock.LOCK_FILE
  path.write_text(f'{{"host": "{os.uname().nodename}", "pid": {proc.pid}}}')
  lock = workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  with pytest.raises(errors.UserError, match="in use by another trainer"):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()  # the live holder: this process
  lock.release()
  assert not path.exists()


@pytest.mark.slow
def test_the_trainer_refuses_a_locked_workdir_and_leaves_it_alone(tmp_path):
  config = configs.load_experiment("fashion_mnist_prior_top:smoke")
  config.log.tensorboard = False
  workdir = tmp_path / "run"
  proc = _holder(workdir)
  try:
    start = time.monotonic()
    with pytest.raises(errors.UserError, match=f"pid {proc.pid}"):
      trainer.train_and_evaluate(config, str(workdir))
    assert time.monotonic() - start < 60  # at once, not after Orbax's 5-minute timeout
    assert sorted(os.listdir(workdir)) == [workdir_lock.LOCK_FILE]  # nothing written
  finally:
    proc.kill()
    proc.wait()
  # Free again: the run trains, and holds no lock once finished.
  result = trainer.train_and_evaluate(config, str(workdir))
  assert result["step"] == config.train.steps
  with workdir_lock.WorkdirLock(str(workdir)):
    pass
