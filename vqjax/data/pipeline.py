"""Preprocessing, per-host batching and resumable iteration over the sources of `sources.py`.

Batches are host-local dicts of numpy arrays, one per source feature. Features are handled by
kind: "image" (uint8 [H, W, C] in the source) is fitted to `image_size` x `image_size` x
`channels` (`fit_images`); every other feature (a "label", integer code maps, ...) passes
through with its dtype, stacked. `image_size`, `resize` and `channels` only matter when the
source has an "image".

Training batches keep their images uint8 and unflipped: the scale to [-1, 1] and the random
flips run on the devices, inside the jitted step (`device_transform.py`), so the host moves a
quarter of the bytes and does no per-pixel arithmetic. Eval batches (and `preprocess`) are
scaled on the host (`transform_batch`): float32 in [-1, 1], never flipped.

Training splits the examples the same way whatever the reader: process p of P owns the strided
shard `p, p + P, p + 2P, ...` of the first `P * (N // P)` examples (every host owns as many, so
all hosts take the same number of steps and none waits in a collective), each epoch visits the
shard in a seeded permutation of its own, and the last partial batch of an epoch is dropped.

  * Random-access sources ("local", "folder", "grain"): one grain `MapDataset` of batches, so
    batch k of the endless stream is a pure function of (seed, k, process). Batches are read
    in `config.data.num_workers` threads, and with `config.data.worker_processes` > 0 in that
    many grain worker processes (each with its threads; batches come back through shared
    memory): worker k reads batches k, k + W, ... and they are taken in turn, so the stream
    is the same for every number of threads and processes. The resume point is the index of
    the next batch, counted by the iterator itself; resuming starts the stream at that index.
    Worker processes are started with "spawn": they import the program's main module again,
    so a script that trains must keep its work under `if __name__ == "__main__":`.
  * "tfdata" (TFRecord through `tfds.load`, needs TensorFlow; in `tfds_data.py`): a seeded
    shuffle per epoch of this host's `tfds.even_splits` part, resumed by skipping into it.

A state is the same on every process, so saving process 0's state is enough to resume all of
them. It records what must match on resume (seed, dataset size, process count, per-process
batch, concrete reader); a mismatch is a one-line error saying what differs.
"""

import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from vqjax.data import sources
from vqjax.errors import UserError

IMAGE = "image"
MASK = "mask"


def fit_image(image: np.ndarray, size: int, mode: str, name: str = "") -> np.ndarray:
  """Pads, crops or resizes one uint8 [H, W, C] image to [size, size, C].

  Args:
    image: uint8 [H, W, C].
    size: the output height and width.
    mode: "pad" (centre-pad with 0), "center_crop", or "resize_crop" (shorter side to `size`
      with bicubic filtering, then centre-crop).
    name: how errors name the image (a path, or "example 12").

  Returns:
    uint8 [size, size, C].
  """
  h, w = image.shape[:2]
  what = f"image {name} is" if name else "got"
  if mode == "pad":
    if h > size or w > size:
      raise UserError(
        f"resize='pad' needs images no larger than {size}x{size}: {what} {h}x{w}; "
        "set --config.data.resize=resize_crop or a larger image_size"
      )
    top, left = (size - h) // 2, (size - w) // 2
    # Zero is the background of the datasets padded this way (MNIST-like: black, -1 later).
    return np.pad(image, ((top, size - h - top), (left, size - w - left), (0, 0)))
  if mode == "center_crop":
    if h < size or w < size:
      raise UserError(
        f"resize='center_crop' needs images of at least {size}x{size}: {what} {h}x{w}"
      )
  elif mode == "resize_crop":
    if min(h, w) != size:
      scale = size / min(h, w)
      nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
      pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
      # PIL's bicubic resize filters over the whole footprint, so downscaling does not alias.
      image = np.asarray(pil.resize((nw, nh), Image.Resampling.BICUBIC)).reshape(nh, nw, -1)
      h, w = nh, nw
  else:
    raise UserError(f"config.data.resize must be pad|resize_crop|center_crop, not {mode!r}")
  top, left = (h - size) // 2, (w - size) // 2
  return image[top : top + size, left : left + size]


def fit_images(
  images: Any, data_config: Any, name_of: Callable[[int], str] = lambda j: f"example {j}"
) -> np.ndarray:
  """Fits uint8 images to `config.data` (image_size, resize, channels).

  Args:
    images: uint8 [B, H, W, C], or a list of uint8 [H, W, C] arrays of any sizes.
    data_config: `config.data`.
    name_of: names image j of the batch in errors.

  Returns:
    uint8 [B, image_size, image_size, channels].
  """
  size, mode, channels = data_config.image_size, data_config.resize, data_config.channels
  if isinstance(images, np.ndarray) and images.ndim == 4:  # one shape: the whole batch at once
    images = sources.convert_channels(images, channels)
    h, w = images.shape[1:3]
    if mode == "pad" and h <= size and w <= size:
      top, left = (size - h) // 2, (size - w) // 2
      return np.pad(images, ((0, 0), (top, size - h - top), (left, size - w - left), (0, 0)))
    if h == w == size or (mode == "center_crop" and h >= size and w >= size):
      top, left = (h - size) // 2, (w - size) // 2
      return images[:, top : top + size, left : left + size]
  fitted = [
    fit_image(sources.convert_channels(np.asarray(im), channels), size, mode, name_of(j))
    for j, im in enumerate(images)
  ]
  return np.stack(fitted) if fitted else np.zeros((0, size, size, channels), np.uint8)


def transform_batch(batch: dict[str, np.ndarray], data_config: Any) -> dict[str, np.ndarray]:
  """The host's per-kind transform of a fitted batch for eval: images scaled, never flipped.

  "image" (uint8 [B, S, S, C]) becomes float32 in [-1, 1] (0 -> -1 and 255 -> 1 exactly, the
  same values `device_transform` gives training batches on the devices). Every other feature
  passes through unchanged.

  Args:
    batch: {name: array [B, ...]} from `load_batch`.
    data_config: `config.data`.

  Returns:
    A new dict with the same keys.
  """
  del data_config  # scaling needs no setting; kept so every transform takes the data config
  out = dict(batch)
  if IMAGE in out:
    # Division by 127.5 (exact in float32) keeps 255 at exactly 1.0; a multiply would overshoot.
    out[IMAGE] = out[IMAGE].astype(np.float32) / np.float32(127.5) - np.float32(1.0)
  return out


def preprocess(images: Any, data_config: Any) -> np.ndarray:
  """Fits and scales images as eval does: float32 [B, image_size, image_size, channels].

  Args:
    images: a uint8 array [B, H, W, C] or a list of uint8 [H, W, C] arrays of any sizes.
    data_config: `config.data` (image_size, resize, channels).

  Returns:
    float32 in [-1, 1]; 0 maps to -1 and 255 to 1 exactly.
  """
  return transform_batch({IMAGE: fit_images(images, data_config)}, data_config)[IMAGE]


def _stack(
  examples: list[dict[str, Any]], data_config: Any, name_of: Callable[[int], str]
) -> dict[str, np.ndarray]:
  """Stacks examples feature by feature, fitting images to the configured size."""
  keys = list(examples[0])
  out = {}
  for k in keys:
    try:
      values = [ex[k] for ex in examples]
    except KeyError:
      raise UserError(
        f"Examples of one dataset differ in features: {sorted(examples[0])} vs "
        f"{sorted(next(ex for ex in examples if k not in ex))}"
      ) from None
    if k == IMAGE:
      out[k] = fit_images(values, data_config, name_of)
    else:
      out[k] = np.stack([np.asarray(v) for v in values])
  return out


def load_batch(source: Any, indices: Any, data_config: Any) -> dict[str, np.ndarray]:
  """Reads the examples at `indices` and stacks them, images fitted but still uint8.

  Args:
    source: a source of `sources.py` (anything with `__getitem__`; `read_batch` or
      `__getitems__` are used when present, `name_of` to name examples in errors).
    indices: example indices.
    data_config: `config.data`.

  Returns:
    {name: array [len(indices), ...]}; "image" uint8 [B, image_size, image_size, channels].
  """
  indices = np.asarray(indices, np.int64)

  def name_of(j: int) -> str:
    i = int(indices[j])
    return source.name_of(i) if hasattr(source, "name_of") else f"example {i}"

  if hasattr(source, "read_batch"):  # in memory: one fancy-index per feature
    batch = source.read_batch(indices)
    if IMAGE in batch:
      batch[IMAGE] = fit_images(batch[IMAGE], data_config, name_of)
    return batch
  idx = [int(i) for i in indices]
  items = source.__getitems__(idx) if hasattr(source, "__getitems__") else [source[i] for i in idx]
  return _stack(items, data_config, name_of)


def _local_batch_size(batch_size: int, process_count: int, what: str) -> int:
  if batch_size <= 0 or batch_size % process_count:
    raise UserError(f"{what}={batch_size} must be a positive multiple of {process_count} processes")
  return batch_size // process_count


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise UserError(f"process_index {process_index} not in [0, {process_count})")


_RESUME_HINTS = {
  "seed": "set --config.seed={saved}",
  "num_examples": "the training split changed (config.data.train_split, or the files in it)",
  "process_count": "resume on as many processes as the run that saved it",
  "local_batch_size": "keep config.data.batch_size / process count as it was",
}


def _check_identity(state: dict[str, Any], identity: dict[str, Any]) -> None:
  """Raises a one-line UserError when `state` was saved under another identity."""
  saved = state.get("reader")
  if saved is not None and saved != identity["reader"]:
    raise UserError(
      f"Cannot resume data iterator: saved by reader {saved!r}, this run reads "
      f"with {identity['reader']!r}; set --config.data.reader={saved}"
    )
  for k, v in identity.items():
    if k != "reader" and k in state and int(state[k]) != v:
      hint = _RESUME_HINTS[k].format(saved=state[k])
      raise UserError(
        f"Cannot resume data iterator: saved {k}={state[k]}, this run has {v}; {hint}"
      )


class DataWorkerError(UserError):
  """A worker process of the input pipeline died (killed for memory, or a crash in a decoder)."""


# Each grain worker process holds this many finished batches, ready for the loop.
_BATCHES_PER_PROCESS = 2
# What grain says when a worker process exits without a Python exception (a kill, a crash).
_WORKER_DIED = "Worker process was terminated unexpectedly"


def _allow_grain_processes() -> None:
  """grain reads its absl flags when it starts worker processes; a program that never parsed
  flags (a notebook, pytest) gets their defaults. A later `app.run` parses them again."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class TrainIterator:
  """Endless, resumable training batches of one process over a random-access source.

  source indices -> this host's shard -> per-epoch shuffle -> batch (dropping each epoch's
  partial batch) -> repeat -> read and fit the batch (images stay uint8 and unflipped: see
  `device_transform.py`) -> read ahead in `config.data.num_workers` threads, in each of
  `config.data.worker_processes` processes when that is > 0. Every stage is a random-access
  grain `MapDataset` before the read-ahead, so batch k is a pure function of (seed, k,
  process) whatever the threads and processes; the iterator counts the batches it has handed
  out, and a resume starts the stream at that count.

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

    _check_process(process_index, process_count)
    b = _local_batch_size(data_config.batch_size, process_count, "config.data.batch_size")
    n = len(source)
    self.local_batch_size, self.reader = b, reader
    self.steps_per_epoch = n // process_count // b
    if self.steps_per_epoch == 0:
      raise UserError(
        f"{n} examples make no batch of {data_config.batch_size} over {process_count} processes"
      )
    threads = data_config.num_workers
    if threads < 0:
      raise UserError(f"config.data.num_workers must be >= 0, not {threads}")
    processes = data_config.get("worker_processes", 0)
    if processes < 0:
      raise UserError(f"config.data.worker_processes must be >= 0, not {processes}")
    seed = int(seed) % 2**63
    self._identity = {
      "seed": seed,
      "num_examples": n,
      "process_count": process_count,
      "local_batch_size": b,
      "reader": reader,
    }
    # grain seeds epoch e of a shuffle with shuffle_seed + e (32 bits), so hosts get unrelated
    # permutations from a hash of (seed, process) rather than from seed + process.
    shuffle_seed = int(np.random.SeedSequence((seed, process_index)).generate_state(1)[0])
    ds = grain.MapDataset.range(process_index, n - n % process_count, process_count)
    ds = ds.shuffle(seed=shuffle_seed)
    # Batching indices before the repeat drops each epoch's partial batch instead of letting a
    # batch straddle two epochs; the shuffle still sees the epoch through the repeated indices.
    # Reading whole batches lets in-memory and tfds sources read them in one call.
    ds = ds.batch(b, drop_remainder=True).repeat()
    self._batches = ds.map(functools.partial(_read_batch, source=source, data_config=data_config))
    # num_threads=0 reads in the calling thread (or worker process), as num_workers=0
    # promises; with threads, two batches per thread in flight keep them all busy without
    # holding many batches in memory.
    self._read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
    self._processes = processes
    self._next = 0  # index of the next batch handed out: the resume point
    self._it = None  # grain's iterator from batch `_next` on; started by the first read
    self._peeked = None  # batch `_next`, read by `peek` and not handed out yet

  def _start(self) -> None:
    import grain

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
      "seed", "num_examples", "process_count", "local_batch_size", "reader"}.
    """
    epoch, step = divmod(self._next, self.steps_per_epoch)
    return {"grain": {"next_index": self._next}, "epoch": epoch, "step": step, **self._identity}

  def set_state(self, state: dict[str, Any]) -> None:
    """Moves to a state from `get_state`; the next batch is the one that followed it.

    Args:
      state: a dict from `get_state`, possibly through a JSON round trip.

    Raises:
      UserError: the state was saved by another reader or under another seed, dataset size,
        process count or per-process batch size.
    """
    _check_identity(state, self._identity)
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


def _read_batch(indices: np.ndarray, source: Any, data_config: Any) -> dict[str, np.ndarray]:
  """One training batch: its examples read and fitted, images still uint8 (module-level, so
  grain's worker processes import it rather than pickling it)."""
  return load_batch(source, indices, data_config)


def _pad(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Pads every feature to `size` rows (images with -1, the rest with 0) and adds "mask"."""
  n = len(next(iter(batch.values())))
  out = {}
  for k, v in batch.items():
    padded = np.full((size, *v.shape[1:]), -1 if k == IMAGE else 0, v.dtype)
    padded[:n] = v
    out[k] = padded
  mask = np.zeros(size, np.float32)
  mask[:n] = 1.0
  out[MASK] = mask
  return out


class EvalIterable:
  """One pass over an eval split in padded batches with a "mask" (1 = real example).

  Process p reads examples p, p + P, ...; every process yields the same number of batches
  (padding the short ones), so metrics can be summed across hosts. Padding rows are -1 in
  "image" (black), 0 in every other feature.
  """

  def __init__(
    self,
    source: Any,
    data_config: Any,
    process_index: int,
    process_count: int,
    max_batches: int,
    num_total: int = -1,
  ):
    _check_process(process_index, process_count)
    self._source, self._config = source, data_config
    self.local_batch_size = _local_batch_size(
      data_config.eval_batch_size, process_count, "config.data.eval_batch_size"
    )
    num_total = len(source) if num_total < 0 else num_total
    self._indices = np.arange(process_index, num_total, process_count)
    self.num_batches = math.ceil(math.ceil(num_total / process_count) / self.local_batch_size)
    if max_batches > 0:
      self.num_batches = min(self.num_batches, max_batches)

  def __len__(self) -> int:
    return self.num_batches

  def _chunks(self) -> Iterator[dict[str, np.ndarray] | None]:
    """The fitted uint8 batches of this process; None where it has no examples left."""
    b = self.local_batch_size
    for k in range(self.num_batches):
      idx = self._indices[k * b : (k + 1) * b]
      yield load_batch(self._source, idx, self._config) if len(idx) else None

  def _template(self) -> dict[str, np.ndarray]:
    """An empty batch with the features, shapes and dtypes of the real ones."""
    one = transform_batch(load_batch(self._source, [0], self._config), self._config)
    return {k: v[:0] for k, v in one.items()}

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    template = None
    for chunk in self._chunks():
      if chunk is None:
        template = self._template() if template is None else template
        batch = template
      else:
        batch = transform_batch(chunk, self._config)
        template = {k: v[:0] for k, v in batch.items()}
      yield _pad(batch, self.local_batch_size)


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
  if reader == "tfdata":
    from vqjax.data import tfds_data  # TensorFlow only when this reader is chosen

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
    from vqjax.data import tfds_data

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
    import tensorflow_datasets as tfds

    from vqjax.data import tfds_data

    tfds_data.check_tfds_prepared(data_config.name, data_config.data_dir, False, "tfdata")
    builder = tfds.builder(data_config.name, data_dir=data_config.data_dir or None)
    return builder.info.splits[split].num_examples
  return len(sources.make_source(data_config, split))
