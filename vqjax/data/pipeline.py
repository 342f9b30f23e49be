"""Resumable per-host iteration over the sources of `sources.py`: `make_train_iterator`,
`make_eval_iterator` and `num_examples`, whatever the reader.

How examples become batches (images fitted, features stacked, eval batches scaled and padded
with a "mask") is `batches.py`; its functions are named here too (`pipeline.load_batch`,
`pipeline.preprocess`, `pipeline.transform_batch`, `pipeline.fit_image`).

Training batches keep their images uint8 and unflipped: the scale to [-1, 1] and the random
flips run on the devices, inside the jitted step (`device_transform.py`), so the host moves a
quarter of the bytes and does no per-pixel arithmetic. Eval batches (and `preprocess`) are
scaled on the host (`transform_batch`): float32 in [-1, 1], never flipped.

Training with a random-access source ("local", "folder", "grain") follows one global order,
whatever the number of processes: each epoch visits all N examples in a seeded permutation,
cut into global batches of `config.data.batch_size` (the last partial one dropped), and
process p of P reads only its slice `[p * B/P, (p + 1) * B/P)` of each global batch. Global
batch k is therefore the same examples on one process or on many (in the same order), every
host takes the same number of steps (none waits in a collective), and a run resumes exactly on
another number of processes.

  * Random-access sources: one grain `MapDataset` of batches, so batch k of the endless stream
    is a pure function of (seed, k, process index and count). Batches are read
    in `config.data.num_workers` threads, and with `config.data.worker_processes` > 0 in that
    many grain worker processes (each with its threads; batches come back through shared
    memory): worker k reads batches k, k + W, ... and they are taken in turn, so the stream
    is the same for every number of threads and processes. The resume point is the index of
    the next batch, counted by the iterator itself; resuming starts the stream at that index.
    Worker processes are started with "spawn": they import the program's main module again,
    so a script that trains must keep its work under `if __name__ == "__main__":`.
  * "tfdata" (TFRecord through `tfds.load`, needs TensorFlow; in `tfds_data.py`): per host, a
    seeded shuffle per epoch of this host's `tfds.even_splits` part, resumed by skipping into
    it; a resume on another number of processes restarts its order.

A state is the same on every process. It records what must match on resume (seed, dataset
size, global batch, concrete reader; the tf.data reader also the process count); a mismatch is
a one-line error saying what differs. A random-access state is the number of global batches
handed out, valid for any number of processes.
"""

import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
from absl import flags, logging

from vqjax.data import sources, tfds_data
from vqjax.data.batches import (  # noqa: F401  (fit_image, preprocess, transform_batch: re-exported)
  IMAGE,
  MASK,
  EvalIterable,
  check_identity,
  check_process,
  fit_image,
  load_batch,
  local_batch_size,
  preprocess,
  transform_batch,
)
from vqjax.errors import UserError


class DataWorkerError(UserError):
  """A worker process of the input pipeline died (killed for memory, or a crash in a decoder)."""


# Each grain worker process holds this many finished batches, ready for the loop.
_BATCHES_PER_PROCESS = 2
# What grain says when a worker process exits without a Python exception (a kill, a crash).
_WORKER_DIED = "Worker process was terminated unexpectedly"


def _allow_grain_processes() -> None:
  """grain reads its absl flags when it starts worker processes; a program that never parsed
  flags (a notebook, pytest) gets their defaults. A later `app.run` parses them again."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class TrainIterator:
  """Endless, resumable training batches of one process over a random-access source.

  all source indices -> per-epoch shuffle -> global batches (dropping each epoch's partial
  batch) -> repeat -> this host's slice of each, read and fitted (images stay uint8 and
  unflipped: see `device_transform.py`) -> read ahead in `config.data.num_workers` threads, in
  each of `config.data.worker_processes` processes when that is > 0. Every stage is a
  random-access grain `MapDataset` before the read-ahead, so batch k is a pure function of
  (seed, k, process index and count) whatever the threads and processes, and the processes'
  batches k together are global batch k whatever their count. The iterator counts the batches
  it has handed out, and a resume (on any number of processes) starts the stream there.

  Attributes:
    local_batch_size: examples per batch on this process (global batch // process_count).
    steps_per_epoch: batches per epoch.
    reader: the concrete reader ("local", "folder", "grain").
  """

  def __init__(
    self,
    source: Any,
    data_config: Any,
    seed: int,
    process_index: int,
    process_count: int,
    reader: str,
  ):
    import grain  # deferred: grain takes a second to import

    check_process(process_index, process_count)
    b = local_batch_size(data_config.batch_size, process_count, "config.data.batch_size")
    global_batch, n = b * process_count, len(source)
    self.local_batch_size, self.reader = b, reader
    self.steps_per_epoch = n // global_batch
    if self.steps_per_epoch == 0:
      raise UserError(f"{n} examples make no batch of {global_batch}")
    threads = data_config.num_workers
    if threads < 0:
      raise UserError(f"config.data.num_workers must be >= 0, not {threads}")
    processes = data_config.get("worker_processes", 0)
    if processes < 0:
      raise UserError(f"config.data.worker_processes must be >= 0, not {processes}")
    seed = int(seed) % 2**63
    # No process count or index: a state is valid on any number of processes.
    self._identity = {"seed": seed, "num_examples": n, "batch_size": global_batch, "reader": reader}
    # grain seeds epoch e of a shuffle with shuffle_seed + e (32 bits): a hash of the seed
    # rather than the seed itself (the hash of (seed, 0) is the one per-host shuffles of
    # earlier versions gave process 0, so one-process runs keep their order).
    shuffle_seed = int(np.random.SeedSequence((seed, 0)).generate_state(1)[0])
    ds = grain.MapDataset.range(n).shuffle(seed=shuffle_seed)
    # Batching indices before the repeat drops each epoch's partial batch instead of letting a
    # batch straddle two epochs; the shuffle still sees the epoch through the repeated indices.
    # Each host cuts its slice from the global batch of indices before reading, so it reads
    # only its own examples; reading whole batches lets in-memory and tfds sources read them
    # in one call.
    ds = ds.batch(global_batch, drop_remainder=True).repeat()
    own = slice(process_index * b, (process_index + 1) * b)
    read = functools.partial(_read_batch, source=source, data_config=data_config, own=own)
    self._batches = ds.map(read)
    # num_threads=0 reads in the calling thread (or worker process), as num_workers=0
    # promises; with threads, two batches per thread in flight keep them all busy without
    # holding many batches in memory.
    self._read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
    self._processes = processes
    self._next = 0  # index of the next batch handed out: the resume point
    self._it = None  # grain's iterator from batch `_next` on; started by the first read
    self._peeked = None  # batch `_next`, read by `peek` and not handed out yet

  def _start(self) -> None:
    import grain  # deferred: see __init__

    ds = self._batches[self._next :] if self._next else self._batches
    ds = ds.to_iter_dataset(self._read_options)
    if self._processes:
      _allow_grain_processes()
      # Worker k reads batches k, k + W, ... of the slice; grain takes them in turn (the same
      # stream as one process) and passes their arrays through shared memory.
      ds = ds.mp_prefetch(
        grain.MultiprocessingOptions(
          num_workers=self._processes, per_worker_buffer_size=_BATCHES_PER_PROCESS
        )
      )
    self._it = iter(ds)

  def _read_next(self) -> dict[str, np.ndarray]:
    if self._it is None:
      self._start()
    try:
      return next(self._it)
    except Exception as e:
      self._stop()  # no worker lingers behind an error
      if isinstance(e, RuntimeError) and _WORKER_DIED in str(e):
        raise DataWorkerError(
          f"a data worker process died before batch {self._next} arrived ({e}); if it was "
          "killed for memory, lower config.data.worker_processes or config.data.num_workers"
        ) from e
      raise

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch, self._peeked = self._peeked, None
    if batch is None:
      batch = self._read_next()
    self._next += 1
    return batch

  def peek(self) -> dict[str, np.ndarray]:
    """The next batch without consuming it: `next` hands out the same batch after it.

    While nothing is read ahead (before the first `next`, after `set_state`) it is read here,
    in this process, without starting threads or worker processes: the trainer peeks for
    shapes, then may move to a checkpoint's position.
    """
    if self._peeked is None:
      # Random access: batch `_next` of the MapDataset is the batch the stream would give.
      self._peeked = self._batches[self._next] if self._it is None else self._read_next()
    return self._peeked

  def get_state(self) -> dict[str, Any]:
    """The resume point and what must match on resume (JSON-serialisable).

    Returns:
      {"grain": {"next_index": batches handed out}, "epoch", "step" (for people reading it),
      "seed", "num_examples", "batch_size" (global), "reader"}: the same on every process,
      and valid for any number of processes.
    """
    epoch, step = divmod(self._next, self.steps_per_epoch)
    return {"grain": {"next_index": self._next}, "epoch": epoch, "step": step, **self._identity}

  def set_state(self, state: dict[str, Any]) -> None:
    """Moves to a state from `get_state`; the next batch is the one that followed it.

    Args:
      state: a dict from `get_state`, possibly through a JSON round trip.

    Raises:
      UserError: the state was saved by another reader or under another seed, dataset size
        or global batch size.
    """
    state = _global_state(state)
    check_identity(state, self._identity)
    grain_state = state.get("grain")
    if grain_state is None and "reader" not in state and {"epoch", "step"} <= set(state):
      # Saved by the index-arithmetic iterator of earlier versions: same position, but its
      # permutations are not grain's, so the rest of that epoch visits other examples.
      logging.warning(
        "data state from an earlier vqjax: resuming at epoch %s step %s with "
        "a different example order",
        state["epoch"],
        state["step"],
      )
      grain_state = {"next_index": int(state["epoch"]) * self.steps_per_epoch + int(state["step"])}
    if not isinstance(grain_state, dict) or "next_index" not in grain_state:
      raise UserError(
        f"Cannot resume data iterator: no grain state in the saved state "
        f"(keys {sorted(state)}); it was saved by another reader"
      )
    # What was read ahead belongs to the old position: it is dropped, and the next read
    # starts the stream at the new one.
    self._stop()
    self._next = int(grain_state["next_index"])

  def _stop(self) -> None:
    self._peeked = None
    if self._it is not None:
      it, self._it = self._it, None
      it.close()

  def close(self) -> None:
    """Stops the read-ahead threads and worker processes, if any."""
    self._stop()


def _global_state(state: dict[str, Any]) -> dict[str, Any]:
  """A state of earlier versions (per-host orders, recorded with "process_count" and
  "local_batch_size") -> the same position in the global order. With one process the orders
  are the same, so the resume is exact; with several it continues in another order."""
  if "batch_size" in state or "local_batch_size" not in state:
    return state
  saved_count = int(state.get("process_count", 1))
  if saved_count != 1:
    logging.warning(
      "data state of %d per-host orders from an earlier vqjax: resuming at its position in "
      "the global order, with a different example order",
      saved_count,
    )
  return {**state, "batch_size": int(state["local_batch_size"]) * saved_count}


def _read_batch(
  indices: np.ndarray, source: Any, data_config: Any, own: slice
) -> dict[str, np.ndarray]:
  """This host's part (`own`) of a global batch of indices, read and fitted, images still
  uint8 (module-level, so grain's worker processes import it rather than pickling it)."""
  return load_batch(source, indices[own], data_config)


def make_train_iterator(
  data_config: Any, seed: int, process_index: int = 0, process_count: int = 1
) -> Any:
  """Builds the endless, resumable training iterator of this process.

  Args:
    data_config: `config.data`.
    seed: the run seed; it fixes the example order (the flips come from the step key, on
      the devices).
    process_index: this process (`jax.process_index()`).
    process_count: number of processes (`jax.process_count()`).

  Returns:
    An iterator with `__next__`, `peek()`, `get_state()`, `set_state(state)`, `close()`,
    `local_batch_size`, `steps_per_epoch` and `reader`, yielding {feature: array [B_local, ...]}
    with "image" uint8 [B_local, image_size, image_size, channels], unscaled and unflipped
    (`device_transform.device_transform` finishes it in the train step).
  """
  reader = sources.resolve_reader(data_config)
  if reader == "tfdata":  # TensorFlow is imported only by this reader
    return tfds_data.TfDataTrainIterator(data_config, seed, process_index, process_count)
  source = sources.make_source(data_config, data_config.train_split)
  return TrainIterator(source, data_config, seed, process_index, process_count, reader)


def make_eval_iterator(
  data_config: Any, process_index: int = 0, process_count: int = 1, max_batches: int = 0
) -> EvalIterable:
  """Builds one pass over `config.data.eval_split` in padded, masked batches.

  Args:
    data_config: `config.data`.
    process_index: this process.
    process_count: number of processes.
    max_batches: stop after this many batches; 0 = the whole split.

  Returns:
    An iterable (re-iterable, with `len`) of the train features plus "mask": float32 [B_local].
  """
  if sources.resolve_reader(data_config) == "tfdata":
    return tfds_data.TfDataEvalIterable(data_config, process_index, process_count, max_batches)
  source = sources.make_source(data_config, data_config.eval_split)
  return EvalIterable(source, data_config, process_index, process_count, max_batches)


def num_examples(data_config: Any, split: str) -> int:
  """Number of examples in `split` (all processes together).

  Args:
    data_config: `config.data`.
    split: split name, optionally sliced.

  Returns:
    The example count.
  """
  if sources.resolve_reader(data_config) == "tfdata":
    return tfds_data.num_examples(data_config, split, sorted(sources.SOURCES))
  return len(sources.make_source(data_config, split))
