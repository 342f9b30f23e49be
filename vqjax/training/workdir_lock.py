"""An exclusive lock on a run's workdir, so two trainers never write one run.

Two trainers started on one workdir used to both run: started together, both failed deep in
Orbax after a 5-minute hang; started one after the other, both exited 0 having written the same
steps, and health.json listed good steps that no longer existed. The primary process of a run
now holds `WORKDIR/.vqjax.lock` for the whole launch:

- The lock is a `fcntl.flock` on that file, so the kernel drops it when the holder exits in any
  way (a crash, SIGKILL, a lost container); a lock file left behind by a dead process is
  therefore free, and the next trainer takes it over (and says so).
- The file holds who took it (host, pid, start time, command), so a second trainer fails at once
  with one line naming the holder.
- Where the file system has no flock (some network file systems), the file is created
  exclusively instead, and one left by a process that no longer runs on this host is taken over.

Only the primary process (jax.process_index() == 0) of a multi-host run locks: the others
write nothing the lock protects.

A workdir in a bucket (`gs://...`) is not locked: an object store has no file locks, and a lock
object could not tell a live holder from one preempted a second ago (on a pod, the relaunch after
a preemption would find its own dead lock). `acquire` logs one warning and holds nothing there;
the scheduler that launches the workers is what keeps one run per workdir.
"""

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from typing import Any

from absl import logging

from vqjax import errors, paths

LOCK_FILE = ".vqjax.lock"


def _holder() -> dict[str, Any]:
  return {
    "host": socket.gethostname(),
    "pid": os.getpid(),
    "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "command": " ".join(sys.argv)[:500],
  }


def _describe(info: dict[str, Any]) -> str:
  if not info:
    return "another process (it left no record)"
  return (
    f"pid {info.get('pid')} on {info.get('host')} since {info.get('started')} "
    f"({info.get('command') or 'no command recorded'})"
  )


def _read(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      info = json.load(f)
  except (OSError, ValueError):
    return {}
  return info if isinstance(info, dict) else {}


def _alive_here(info: dict[str, Any]) -> bool:
  """Whether the recorded holder may still run: True unless it was on this host and its pid is
  gone (another host's process cannot be checked from here)."""
  if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
    return bool(info)
  try:
    os.kill(info["pid"], 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """Holds `WORKDIR/.vqjax.lock` from `acquire()` until `release()` (or the process ends).

  Args:
    workdir: the run directory (created if needed).
    what: how the error names the holder's job ("trainer", "pipeline").
  """

  def __init__(self, workdir: str, what: str = "trainer"):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self.what = what
    self._fd: int | None = None
    self._exclusive_file = False

  def acquire(self) -> "WorkdirLock":
    """Takes the lock; errors.UserError (one line naming the holder) if a live process has it.
    On a bucket nothing is locked (the module docstring): one warning, and no lock held."""
    if paths.is_remote(self.workdir):
      logging.warning("%s is in a bucket: not locked (object stores have no locks)", self.workdir)
      return self
    os.makedirs(self.workdir, exist_ok=True)
    previous = _read(self.path)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise errors.UserError(
        f"{self.workdir} is in use by another {self.what}: {_describe(_read(self.path))}; "
        "wait for it to finish or stop it, or use another --workdir"
      ) from None
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        raise
      return self._acquire_exclusive_file()
    if previous and previous.get("pid") != os.getpid():
      logging.warning(
        "%s: taking over the lock left by %s, which no longer holds it",
        self.workdir,
        _describe(previous),
      )
    self._fd = fd
    self._write(fd)
    return self

  def _acquire_exclusive_file(self) -> "WorkdirLock":
    # No flock here: the file's existence is the lock; a stale one from a dead local process
    # is removed first.
    info = _read(self.path)
    if os.path.exists(self.path) and not _alive_here(info):
      logging.warning("%s: removing the stale lock of %s", self.workdir, _describe(info))
      os.unlink(self.path)
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      raise errors.UserError(
        f"{self.workdir} is in use by another {self.what}: {_describe(_read(self.path))}; "
        f"wait for it to finish or stop it (if it is gone, delete {self.path})"
      ) from None
    self._fd, self._exclusive_file = fd, True
    self._write(fd)
    return self

  def _write(self, fd: int) -> None:
    data = (json.dumps(_holder()) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)

  def release(self) -> None:
    """Drops the lock (the file stays, emptied, unless it was the lock itself)."""
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      if self._exclusive_file:
        os.unlink(self.path)
      else:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError:
      pass  # the kernel drops the lock with the descriptor anyway
    finally:
      os.close(fd)

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
