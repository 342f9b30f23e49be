"""Host-side helpers of the training loop: stop requests from signals, a clock of when each
dispatched step finished on the devices (for the loop's data-wait share), and a profiler trace
of the steps `config.log.profile_steps` asks for."""

import contextlib
import queue
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from vqjax import errors, paths


class StopRequest:
  """Records SIGTERM / SIGINT so the loop can finish its step and save; a second signal of
  the same kind gets the previous handler (a second Ctrl-C interrupts at once).

  With several processes SIGTERM (a preemption notice) is left to JAX's distributed runtime:
  its preemption notifier is a C++ SIGTERM handler, which a Python handler would replace. The
  runtime tells every host of the notice and agrees on a step to stop at, which the loop asks
  about at every step (`multihost_utils.reached_preemption_sync_point`); a second SIGTERM is
  then no faster way out. SIGINT keeps the handler above and its own agreement (`requested`).
  """

  def __init__(self):
    self.signum = None
    self._previous = {}
    # `jax.distributed.initialize` starts the notifier and the sync point with the service.
    self._preemption_sync = (
      jax.process_count() > 1
      and jax.distributed.is_initialized()
      and jax.config.jax_enable_preemption_service
    )
    signals = (signal.SIGINT,) if self._preemption_sync else (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
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

  def requested(self, step: int, sync: bool) -> bool:
    """Whether to stop after `step`. Every process must call it at every step.

    With several processes all must stop at the same step. A preemption notice (SIGTERM to
    any host) stops every host at the step JAX's runtime agreed on, as SIGTERM. Otherwise the
    answer is True only on `sync` steps, where every process learns whether any was signalled,
    and by which signal: a process that got none takes it as its own (`signum`), so every host
    of a preempted pod exits with the same status (128 + SIGTERM), and the scheduler sees each
    unfinished in the same way."""
    local = self.signum is not None
    if jax.process_count() == 1:
      return local
    if self._preemption_sync and multihost_utils.reached_preemption_sync_point(step):
      self.signum = signal.SIGTERM
      logging.warning("preemption notice (SIGTERM to a host): saving step %d, stopping", step)
      return True
    if not sync:
      return False
    signums = multihost_utils.process_allgather(np.array([self.signum or 0], np.int32))
    if not local and np.any(signums):
      self.signum = int(np.max(signums))
      logging.warning(
        "another process received %s: finishing this step, saving, stopping",
        signal.Signals(self.signum).name,
      )
    return bool(np.any(signums))

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


def profile_window(steps: Sequence[int] | None, total: int) -> tuple[int, int] | None:
  """Checks `config.log.profile_steps`: () = off, else (start, stop) within the run.

  Args:
    steps: the field's value.
    total: `config.train.steps`.

  Returns:
    None (off) or (start, stop) as ints.

  Raises:
    errors.UserError: one line, when the value is not two integers with
      0 <= start < stop <= total.
  """
  if steps is None or (isinstance(steps, (tuple, list)) and len(steps) == 0):
    return None
  ok = (
    isinstance(steps, (tuple, list))
    and len(steps) == 2
    and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in steps)
  )
  if ok:
    start, stop = int(steps[0]), int(steps[1])
    if 0 <= start < stop <= total:
      return start, stop
  raise errors.UserError(
    f"config.log.profile_steps={steps!r} must be () (off) or (start, stop) with "
    f"0 <= start < stop <= config.train.steps={total}; e.g. (10, 15) traces steps 11 to 15"
  )


class Profiler:
  """A JAX profiler trace of the train steps `config.log.profile_steps` selects.

  With `steps=(start, stop)` the trace starts before the step that takes the state from step
  `start` and stops once step `stop` has been computed, so it holds steps start + 1 ... stop as
  the progress line numbers them: `(1, 2)` leaves out the first step (compilation) and traces
  the second. The trace goes to `directory` (`plugins/profile/<time>/<host>.xplane.pb`, read by
  TensorBoard's profile plugin, XProf or Perfetto); each traced step is marked with a
  `StepTraceAnnotation`. A resumed run traces what is left of the window. Leaving the `with`
  block stops a trace still running (a stop request, an error).

  Args:
    steps: `config.log.profile_steps`.
    total: `config.train.steps`.
    directory: where the trace is written.
    active: whether this process traces (process 0 in a multi-host run).

  Raises:
    errors.UserError: `steps` malformed or outside the run (see `profile_window`).
  """

  def __init__(self, steps: Sequence[int] | None, total: int, directory: str, active: bool = True):
    self.window = profile_window(steps, total)
    self.directory = paths.absolute(directory)
    self.active = active and self.window is not None
    self.tracing = False

  def before_step(self, step: int) -> None:
    """Starts the trace if the step about to run from state step `step` is in the window."""
    if not self.active or self.tracing:
      return
    start, stop = self.window
    if step >= stop:
      self.active = False
      logging.info("no profile: the run is at step %d, past config.log.profile_steps", step)
    elif step >= start:
      jax.profiler.start_trace(self.directory)
      self.tracing = True
      logging.info("profiling steps %d to %d into %s", step + 1, stop, self.directory)

  def annotate(self, step: int) -> contextlib.AbstractContextManager:
    """Marks the dispatch of the step from state step `step` in the trace (when tracing)."""
    if not self.tracing:
      return contextlib.nullcontext()
    return jax.profiler.StepTraceAnnotation("train", step_num=step + 1)

  def after_step(self, step: int, state: Any) -> None:
    """Stops the trace once state step `step` ends the window, after `state` is computed."""
    if self.tracing and step >= self.window[1]:
      jax.block_until_ready(state)  # the last step's device work belongs in the trace
      self._stop()

  def _stop(self) -> None:
    jax.profiler.stop_trace()
    self.tracing = self.active = False
    logging.info("profile written to %s", self.directory)

  def __enter__(self) -> "Profiler":
    return self

  def __exit__(self, *exc) -> None:
    if self.tracing:
      self._stop()
