"""Host-side helpers of the training loop: stop requests from signals, and a clock of when each
dispatched step finished on the devices (for the loop's data-wait share)."""

import queue
import signal
import threading
import time
from typing import Any

import jax
import numpy as np
from absl import logging


class StopRequest:
  """Records SIGTERM / SIGINT so the loop can finish its step and save; a second signal of
  the same kind gets the previous handler (a second Ctrl-C interrupts at once)."""

  def __init__(self):
    self.signum = None
    self._previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. a notebook worker): no handlers
        pass

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
    logging.warning(
      "received %s: finishing this step, saving, stopping", signal.Signals(signum).name
    )

  def requested(self, sync: bool) -> bool:
    """Whether to stop. With several processes all must stop at the same step, so the answer
    is True only on `sync` steps, where every process learns whether any was signalled."""
    local = self.signum is not None
    if jax.process_count() == 1:
      return local
    if not sync:
      return False
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([local]))))

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class DeviceClock:
  """When each dispatched step finished on the devices, seen from a helper thread.

  The loop hands every step's output to `dispatched`; the thread blocks on them in order and
  notes the time each became ready, so the loop can tell, after reading a batch, how long the
  devices had already been idle (`idle_during`) without ever blocking on them itself.
  """

  def __init__(self):
    self._queue: queue.SimpleQueue = queue.SimpleQueue()
    self._done: dict[int, float] = {}
    self._lock = threading.Lock()
    self._thread = threading.Thread(target=self._run, name="vqjax-device-clock", daemon=True)
    self._thread.start()

  def _run(self) -> None:
    while (item := self._queue.get()) is not None:
      step, outputs = item
      try:
        jax.block_until_ready(outputs)
      except Exception:  # noqa: BLE001 -- the loop reports a failed step itself
        pass
      with self._lock:
        self._done[step] = time.perf_counter()

  def dispatched(self, step: int, outputs: Any) -> None:
    """Notes that `step` was dispatched; `outputs` become ready when it has run."""
    self._queue.put((step, outputs))

  def idle_during(self, step: int, start: float, end: float) -> float:
    """Seconds of [start, end] after `step` had finished (0 if it had not by `end`)."""
    with self._lock:
      done = self._done.pop(step, None)
      for old in [s for s in self._done if s < step]:  # steps nobody asked about
        del self._done[old]
    return max(0.0, end - max(start, done)) if done is not None and done < end else 0.0

  def close(self) -> None:
    self._queue.put(None)
    self._thread.join(timeout=60)
