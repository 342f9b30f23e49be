"""The training loop's input: host batches on the devices, in order, with their resumable position.

`DeviceFeed` wraps a host iterator (`data/pipeline.make_train_iterator`) the way big_vision's
`start_global` does: it yields global batches already split over the mesh
(`sharding.global_batch`, whose transfer starts at once), and it knows its own position, the
data state after the last batch it handed out (`get_state`), which is what a checkpoint saved
after that batch's step records. A batch read ahead is not counted, so a resume feeds exactly
the batch the interrupted run would have fed next.

Reading overlaps the device's work in either of two ways:
  * asynchronous dispatch (accelerators; several CPU devices): a step call returns at once, so
    the loop's next `next(feed)` reads batch t + 1 while step t runs on the devices;
  * synchronous dispatch (one CPU device with asynchronous dispatch off, as the training CLIs
    set it, vqjax.tune_cpu_malloc): a step call returns only when the step has run, so with
    `read_ahead` the feed reads batch t + 1 on a helper thread, started as it hands out batch t
    (one read at a time, in order: the same batches as reading in the loop's thread).

`last_read` is the (start, end) of the loop's last wait in `next`: with the device clock
(`host.DeviceClock`) it gives the time the devices sat idle for want of a batch ("data_wait").
"""

import concurrent.futures
import time
from typing import Any

import jax

from vqjax.training import sharding


def synchronous_dispatch() -> bool:
  """Whether step calls return only after the step has run: one CPU device with asynchronous
  dispatch off (JAX dispatches a computation over several CPU devices asynchronously whatever
  the option says)."""
  try:
    asynchronous = jax.config.read("jax_cpu_enable_async_dispatch")
  except (AttributeError, KeyError):  # a JAX without the option
    return False
  return not asynchronous and jax.default_backend() == "cpu" and jax.device_count() == 1


class DeviceFeed:
  """At most `limit` training batches on the devices, then StopIteration.

  Args:
    host_iter: a host iterator with `__next__` and `get_state()` (already at the position to
      start from).
    mesh: the mesh the batches are split over.
    limit: how many batches to hand out (the steps left); nothing is read past them.
    read_ahead: read the next batch on a helper thread (see the module docstring).
  """

  def __init__(self, host_iter: Any, mesh: jax.sharding.Mesh, limit: int, read_ahead: bool):
    self._host_iter, self._mesh = host_iter, mesh
    self._left = limit
    self._state = host_iter.get_state()
    self._pool = None
    if read_ahead:
      self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vqjax-read")
    self._ahead: concurrent.futures.Future | None = None
    self.last_read = (0.0, 0.0)

  def _read(self) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    """The next host batch, its transfer to the devices started, and the position after it."""
    batch = next(self._host_iter)
    return sharding.global_batch(batch, self._mesh), self._host_iter.get_state()

  def __iter__(self) -> "DeviceFeed":
    return self

  def __next__(self) -> dict[str, jax.Array]:
    if self._left <= 0:
      raise StopIteration
    start = time.perf_counter()
    ahead, self._ahead = self._ahead, None
    batch, self._state = ahead.result() if ahead is not None else self._read()
    self.last_read = (start, time.perf_counter())
    self._left -= 1
    if self._pool is not None and self._left > 0:
      self._ahead = self._pool.submit(self._read)
    return batch

  def get_state(self) -> dict[str, Any]:
    """The data position after the last batch handed out (a batch read ahead is read again)."""
    return self._state

  def close(self) -> None:
    """Stops the helper thread (a batch read ahead is dropped)."""
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None
    self._ahead = None
