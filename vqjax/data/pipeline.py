"""Preprocessing, per-host batching and resumable iteration over the sources of `sources.py`.

Every reader splits the training set the same way: process p of P owns the strided shard
`p, p + P, p + 2P, ...` of the first `P * (N // P)` examples (every host owns as many examples,
so all hosts take the same number of steps and none waits in a collective), each epoch visits
the shard in a seeded permutation that depends on the epoch and p, and the last partial batch
of an epoch is dropped.

  * "grain" (tfds ArrayRecord through `tfds.data_source`): a grain `MapDataset` pipeline;
    grain's iterator state (the index of the next batch) is the resume point.
  * "local" and "folder": plain index arithmetic, batch k of epoch e is a pure function of
    (seed, e, k, p) and the state is (epoch, step).
  * "tfdata" (TFRecord through `tfds.load`, needs TensorFlow): a seeded shuffle per epoch,
    resumed by skipping into it.

A state is the same on every process, so saving process 0's state is enough to resume all of
them. Batches are host-local numpy: {"image": float32 [B_local, H, W, C] in [-1, 1],
"label": int32}.
"""

import collections
import concurrent.futures
import functools
import itertools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from vqjax.data import sources


def _fit(image: np.ndarray, size: int, mode: str) -> np.ndarray:
  """Pads, crops or resizes one uint8 [H, W, C] image to [size, size, C]."""
  h, w = image.shape[:2]
  if mode == "pad":
    if h > size or w > size:
      raise ValueError(f"resize='pad' needs images no larger than {size}, got {h}x{w}")
    top, left = (size - h) // 2, (size - w) // 2
    # Zero is the background of the datasets padded this way (MNIST-like: black, -1 later).
    return np.pad(image, ((top, size - h - top), (left, size - w - left), (0, 0)))
  if mode == "center_crop":
    if h < size or w < size:
      raise ValueError(f"resize='center_crop' needs images of at least {size}, got {h}x{w}")
  elif mode == "resize_crop":
    if min(h, w) != size:
      scale = size / min(h, w)
      nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
      pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
      # PIL's bicubic resize filters over the whole footprint, so downscaling does not alias.
      image = np.asarray(pil.resize((nw, nh), Image.Resampling.BICUBIC)).reshape(nh, nw, -1)
      h, w = nh, nw
  else:
    raise ValueError(f"config.data.resize must be pad|resize_crop|center_crop, not {mode!r}")
  top, left = (h - size) // 2, (w - size) // 2
  return image[top : top + size, left : left + size]


def preprocess(images: Any, data_config: Any) -> np.ndarray:
  """Turns uint8 images into a float32 NHWC batch in [-1, 1] of the configured size.

  Args:
    images: a uint8 array [B, H, W, C] or a list of uint8 [H, W, C] arrays of any sizes.
    data_config: `config.data` (image_size, resize, channels).

  Returns:
    float32 [B, image_size, image_size, channels]; 0 maps to -1 and 255 to 1 exactly.
  """
  size, mode, channels = data_config.image_size, data_config.resize, data_config.channels
  if isinstance(images, np.ndarray):  # one shape: the whole batch at once
    images = sources.convert_channels(images, channels)
    h, w = images.shape[1:3]
    if mode == "pad" and h <= size and w <= size:
      top, left = (size - h) // 2, (size - w) // 2
      pad = ((0, 0), (top, size - h - top), (left, size - w - left), (0, 0))
      x = np.pad(images, pad)
    elif h == w == size or (mode == "center_crop" and h >= size and w >= size):
      top, left = (h - size) // 2, (w - size) // 2
      x = images[:, top : top + size, left : left + size]
    else:
      x = np.stack([_fit(im, size, mode) for im in images])
  else:
    x = np.stack([_fit(sources.convert_channels(im, channels), size, mode) for im in images])
  # Division by 127.5 (exact in float32) keeps 255 at exactly 1.0; a multiply would overshoot.
  return x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _read(source: Any, indices: np.ndarray) -> tuple[Any, np.ndarray]:
  """Reads examples by index: one fancy-index for in-memory arrays, else one batched call."""
  if isinstance(source, sources.ArraySource):
    return source.images[indices], source.labels[indices]
  idx = [int(i) for i in indices]
  items = source.__getitems__(idx) if hasattr(source, "__getitems__") else [source[i] for i in idx]
  return [it["image"] for it in items], np.array([it["label"] for it in items], np.int32)


def _local_batch_size(batch_size: int, process_count: int, what: str) -> int:
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"{what}={batch_size} must be a positive multiple of {process_count} "
                     "processes")
  return batch_size // process_count


def _flip(images: np.ndarray, data_config: Any, key: tuple[int, ...]) -> np.ndarray:
  """Flips horizontally half the images, chosen by a generator seeded from the batch position."""
  if not data_config.random_flip:
    return images
  flip = np.random.default_rng(key + (1,)).random(len(images)) < 0.5
  images[flip] = images[flip, :, ::-1]
  return images


class TrainIterator:
  """Endless, resumable iterator of training batches over a random-access source.

  Attributes:
    local_batch_size: examples per batch on this process (global batch // process_count).
    image_shape: (H, W, C) of every image.
    steps_per_epoch: batches per epoch (the last partial batch is dropped).
  """

  def __init__(self, source: Any, data_config: Any, seed: int, process_index: int,
               process_count: int):
    self._source = source
    self._setup(data_config, seed, process_index, process_count, len(source))
    # num_workers > 0: decode ahead in threads; batches depend only on their position, so the
    # order and the resume point are unchanged.
    n = data_config.num_workers
    self._pool = concurrent.futures.ThreadPoolExecutor(n) if n > 0 else None

  def _setup(self, data_config: Any, seed: int, process_index: int, process_count: int,
             num_examples: int) -> None:
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    self._config, self._seed, self._pi = data_config, int(seed) % 2**63, process_index
    self.local_batch_size = _local_batch_size(data_config.batch_size, process_count,
                                              "config.data.batch_size")
    size = data_config.image_size
    self.image_shape = (size, size, data_config.channels)
    # Equal shards for every host: the remainder N % P is left out of every epoch.
    self._shard = np.arange(process_index, num_examples - num_examples % process_count,
                            process_count)
    self.steps_per_epoch = len(self._shard) // self.local_batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f"{num_examples} examples make no batch of {data_config.batch_size} "
                       f"over {process_count} processes")
    # What a saved state must agree with to mean the same batches in this run.
    self._identity = {"seed": self._seed, "num_examples": num_examples,
                      "process_count": process_count, "local_batch_size": self.local_batch_size}
    self._epoch = self._step = 0
    self._perm = (-1, None)  # (epoch, permutation of the shard), computed once per epoch
    self._ahead = collections.deque()  # futures of the batches from (epoch, step) on, in order

  def _read_batch(self, epoch: int, step: int) -> tuple[Any, np.ndarray]:
    cached_epoch, perm = self._perm
    if cached_epoch != epoch:
      perm = np.random.default_rng((self._seed, epoch, self._pi)).permutation(len(self._shard))
      self._perm = (epoch, perm)
    b = self.local_batch_size
    return _read(self._source, self._shard[perm[step * b : (step + 1) * b]])

  def batch_at(self, epoch: int, step: int) -> dict[str, np.ndarray]:
    """The batch at (epoch, step), without moving the iterator."""
    images, labels = self._read_batch(epoch, step)
    x = _flip(preprocess(images, self._config), self._config, (self._seed, epoch, step, self._pi))
    return {"image": x, "label": np.asarray(labels, np.int32)}

  def _advance(self, epoch: int, step: int) -> tuple[int, int]:
    return (epoch, step + 1) if step + 1 < self.steps_per_epoch else (epoch + 1, 0)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._pool is None:
      batch = self.batch_at(self._epoch, self._step)
    else:
      pos = (self._epoch, self._step)
      for _ in range(len(self._ahead)):
        pos = self._advance(*pos)
      for _ in range(len(self._ahead), 2 * self._config.num_workers):
        self._ahead.append(self._pool.submit(self.batch_at, *pos))
        pos = self._advance(*pos)
      batch = self._ahead.popleft().result()
    self._epoch, self._step = self._advance(self._epoch, self._step)
    return batch

  def get_state(self) -> dict[str, int]:
    """The position of the next batch, plus what must match on resume (JSON-serialisable)."""
    return {"epoch": self._epoch, "step": self._step, **self._identity}

  def set_state(self, state: dict[str, Any]) -> None:
    """Moves to a state from `get_state`; the next batch is the one that followed it."""
    for k, v in self._identity.items():
      if k in state and int(state[k]) != v:
        raise ValueError(f"Cannot resume data iterator: saved {k}={state[k]}, this run has {v}")
    if not 0 <= int(state["step"]) < self.steps_per_epoch:
      raise ValueError(f"Cannot resume data iterator: step {state['step']} out of range")
    for f in self._ahead:
      f.cancel()
    self._ahead.clear()
    self._epoch, self._step = int(state["epoch"]), int(state["step"])

  def close(self) -> None:
    """Stops the decoding threads, if any."""
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)


class GrainTrainIterator:
  """The "grain" reader: a grain pipeline over a random-access source (a tfds ArrayRecord set).

  source (reads and decodes) -> this host's shard -> per-epoch shuffle -> fit to size -> batch
  -> repeat -> scale and flip -> prefetch in `config.data.num_workers` threads. Every stage
  before the prefetch is a random-access `MapDataset`, so batch k of the endless stream is a
  pure function of (seed, k, process) whatever the threads, and grain's iterator state (the
  index of the next batch) resumes it exactly.

  Attributes:
    local_batch_size: examples per batch on this process (global batch // process_count).
    image_shape: (H, W, C) of every image.
    steps_per_epoch: batches per epoch (the last partial batch is dropped).
  """

  def __init__(self, source: Any, data_config: Any, seed: int, process_index: int,
               process_count: int):
    import grain  # deferred: grain takes a second to import and only this reader needs it

    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    b = _local_batch_size(data_config.batch_size, process_count, "config.data.batch_size")
    self.local_batch_size = b
    size = data_config.image_size
    self.image_shape = (size, size, data_config.channels)
    n = len(source)
    self.steps_per_epoch = n // process_count // b
    if self.steps_per_epoch == 0:
      raise ValueError(f"{n} examples make no batch of {data_config.batch_size} over "
                       f"{process_count} processes")
    seed = int(seed) % 2**63
    # What a saved state must agree with to mean the same batches in this run.
    self._identity = {"seed": seed, "num_examples": n, "process_count": process_count,
                      "local_batch_size": b}
    # grain seeds epoch e of a shuffle with shuffle_seed + e (32 bits), so hosts get unrelated
    # permutations from a hash of (seed, process) rather than from seed + process.
    shuffle_seed = int(np.random.SeedSequence((seed, process_index)).generate_state(1)[0])
    ds = grain.MapDataset.source(source)
    ds = ds[process_index : n - n % process_count : process_count]
    ds = ds.shuffle(seed=shuffle_seed)
    ds = ds.map(functools.partial(_fit_example, data_config=data_config))
    # Batching before the repeat drops each epoch's partial batch instead of letting a batch
    # straddle two epochs; the shuffle still sees the epoch through the repeated indices.
    ds = ds.batch(b, drop_remainder=True).repeat()
    ds = ds.map_with_index(functools.partial(_scale_and_flip, data_config=data_config,
                                             key=(seed, process_index)))
    workers = data_config.num_workers
    # num_threads=0 reads in the calling thread, as num_workers=0 promises; with threads, two
    # batches per thread in flight keep them all busy without holding many batches in memory.
    self._ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=workers,
                                                    prefetch_buffer_size=2 * workers))
    self._it = iter(self._ds)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def get_state(self) -> dict[str, Any]:
    """grain's iterator state under "grain", plus what must match on resume (JSON-serialisable).

    Returns:
      {"grain": {"next_index": batches consumed}, "seed", "num_examples", "process_count",
      "local_batch_size"}.
    """
    return {"grain": self._it.get_state(), **self._identity}

  def set_state(self, state: dict[str, Any]) -> None:
    """Moves to a state from `get_state`; the next batch is the one that followed it.

    Args:
      state: a dict from `get_state`, possibly through a JSON round trip.

    Raises:
      ValueError: the state was saved by another reader or under another seed, dataset size,
        process count or per-process batch size.
    """
    for k, v in self._identity.items():
      if k in state and int(state[k]) != v:
        raise ValueError(f"Cannot resume data iterator: saved {k}={state[k]}, this run has {v}")
    if not isinstance(state.get("grain"), dict):
      raise ValueError(f"Cannot resume data iterator: no grain state in the saved state "
                       f"(keys {sorted(state)}); it was saved by another reader")
    # A fresh iterator rather than set_state on the live one: it drops the batches the threads
    # prefetched from the old position.
    self._it.close()
    self._it = iter(self._ds)
    self._it.set_state(state["grain"])

  def close(self) -> None:
    """Stops the prefetch threads, if any."""
    self._it.close()


def _fit_example(example: dict[str, Any], data_config: Any) -> dict[str, np.ndarray]:
  """One source example -> uint8 [S, S, C] at the configured size and channels, int32 label."""
  image = sources.convert_channels(np.asarray(example["image"]), data_config.channels)
  return {"image": _fit(image, data_config.image_size, data_config.resize),
          "label": np.int32(example["label"])}


def _scale_and_flip(index: int, batch: dict[str, np.ndarray], data_config: Any,
                    key: tuple[int, int]) -> dict[str, np.ndarray]:
  """Maps batch `index` of the stream to [-1, 1] and flips it with a key fixed by its index."""
  x = _flip(preprocess(batch["image"], data_config), data_config, key + (index,))
  return {"image": x, "label": np.asarray(batch["label"], np.int32)}


class TfDataTrainIterator(TrainIterator):
  """The "tfdata" reader: TFRecords through `tfds.load`, read in order (needs TensorFlow).

  Same batches-from-(epoch, step) contract, but a TFRecord stream has no random access: each
  epoch is a seeded shuffle of this host's `tfds.even_splits` part, and resuming skips into it.
  """

  def __init__(self, data_config: Any, seed: int, process_index: int, process_count: int):
    tf = sources.require_tensorflow()
    import tensorflow_datasets as tfds

    c = data_config
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    sources.check_tfds_prepared(c.name, c.data_dir, c.download, "tfdata")
    split = tfds.even_splits(c.train_split, n=process_count, drop_remainder=True)[process_index]
    # Images stay encoded until after the shuffle, so the buffer holds bytes, not pixels.
    self._ds = _tfds_load(c, split, c.download, {"image": tfds.decode.SkipDecoding()})
    self._tf = tf
    # An Image feature skips to its encoded bytes (tf.string); a Tensor feature has no encoding
    # and comes back as pixels, which `decode_image` would reject.
    self._encoded = self._ds.element_spec["image"].dtype == tf.string
    local = int(self._ds.cardinality())
    if local < 0:
      raise ValueError(f"tfds {c.name!r} split {c.train_split!r} has no known size "
                       f"(cardinality {local})")
    # `even_splits` gave every host `local` examples; as P * local examples in all, `_setup`
    # derives the per-host batch from the global one and a shard of `local` positions.
    self._setup(data_config, seed, process_index, process_count, local * process_count)
    self._pool, self._live = None, None

  def _read_batch(self, epoch: int, step: int) -> tuple[Any, np.ndarray]:
    tf, b = self._tf, self.local_batch_size
    if self._live is None or self._live[:2] != (epoch, step):
      shuffle_seed = int(np.random.default_rng((self._seed, epoch, self._pi)).integers(2**31))
      ds = self._ds.shuffle(min(len(self._shard), 16384), seed=shuffle_seed,
                            reshuffle_each_iteration=False).skip(step * b)
      decode = (functools.partial(tf.io.decode_image, expand_animations=False) if self._encoded
                else tf.identity)
      ds = ds.map(lambda ex: (decode(ex["image"]), ex.get("label", 0)),
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(2 * b)
      self._live = (epoch, step, ds.as_numpy_iterator())
    it = self._live[2]
    pairs = [next(it) for _ in range(b)]
    self._live = (epoch, step + 1, it) if step + 1 < self.steps_per_epoch else None
    return [p[0] for p in pairs], np.array([p[1] for p in pairs], np.int32)


class EvalIterable:
  """One pass over an eval split in padded batches with a "mask" (1 = real example).

  Process p reads examples p, p + P, ...; every process yields the same number of batches
  (padding the short ones), so metrics can be summed across hosts.
  """

  def __init__(self, source: Any, data_config: Any, process_index: int, process_count: int,
               max_batches: int, num_total: int = -1):
    self._source, self._config = source, data_config
    self.local_batch_size = _local_batch_size(data_config.eval_batch_size, process_count,
                                              "config.data.eval_batch_size")
    num_total = len(source) if num_total < 0 else num_total
    self._indices = np.arange(process_index, num_total, process_count)
    self.num_batches = math.ceil(math.ceil(num_total / process_count) / self.local_batch_size)
    if max_batches > 0:
      self.num_batches = min(self.num_batches, max_batches)

  def __len__(self) -> int:
    return self.num_batches

  def _chunks(self) -> Iterator[tuple[Any, np.ndarray]]:
    b = self.local_batch_size
    for k in range(self.num_batches):
      idx = self._indices[k * b : (k + 1) * b]
      yield _read(self._source, idx) if len(idx) else ([], np.zeros(0, np.int32))

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    b, size = self.local_batch_size, self._config.image_size
    for images, lab in self._chunks():
      x = np.full((b, size, size, self._config.channels), -1.0, np.float32)
      labels, mask = np.zeros(b, np.int32), np.zeros(b, np.float32)
      n = len(lab)
      if n:
        x[:n], labels[:n], mask[:n] = preprocess(images, self._config), lab, 1.0
      yield {"image": x, "label": labels, "mask": mask}


class TfDataEvalIterable(EvalIterable):
  """EvalIterable over TFRecords through `tfds.load` (needs TensorFlow), read in order."""

  def __init__(self, data_config: Any, process_index: int, process_count: int,
               max_batches: int):
    self._tf = sources.require_tensorflow()
    import tensorflow_datasets as tfds

    c = data_config
    total = num_examples(c, c.eval_split)
    super().__init__(None, c, process_index, process_count, max_batches, num_total=total)
    parts = tfds.even_splits(c.eval_split, n=process_count, drop_remainder=False)
    self._ds = _tfds_load(c, parts[process_index], False, None)

  def _chunks(self) -> Iterator[tuple[Any, np.ndarray]]:
    it = self._ds.as_numpy_iterator()
    for _ in range(self.num_batches):
      exs = list(itertools.islice(it, self.local_batch_size))
      yield [ex["image"] for ex in exs], np.array([ex.get("label", 0) for ex in exs], np.int32)


def _tfds_load(data_config: Any, split: Any, download: bool, decoders: Any) -> Any:
  """`tfds.load` of one split in file order, with a one-line error for an ArrayRecord dataset."""
  import tensorflow_datasets as tfds

  c = data_config
  try:
    return tfds.load(c.name, split=split, data_dir=c.data_dir or None, download=download,
                     shuffle_files=False, decoders=decoders)
  except NotImplementedError as e:  # prepared as ArrayRecord: only data_source reads it
    raise ValueError(f"tfds {c.name!r} is not TFRecord; use reader='grain' ({e})") from None


def make_train_iterator(data_config: Any, seed: int, process_index: int = 0,
                        process_count: int = 1) -> Any:
  """Builds the endless, resumable training iterator of this process.

  Args:
    data_config: `config.data`.
    seed: the run seed; it fixes the example order and the random flips.
    process_index: this process (`jax.process_index()`).
    process_count: number of processes (`jax.process_count()`).

  Returns:
    An iterator with `__next__`, `get_state()`, `set_state(state)`, `close()`,
    `local_batch_size`, `image_shape` and `steps_per_epoch`, yielding
    {"image": float32 [B_local, H, W, C], "label": int32 [B_local]}.
  """
  reader = sources.resolve_reader(data_config)
  if reader == "tfdata":
    return TfDataTrainIterator(data_config, seed, process_index, process_count)
  source = sources.make_source(data_config, data_config.train_split)
  if reader == "grain":
    return GrainTrainIterator(source, data_config, seed, process_index, process_count)
  return TrainIterator(source, data_config, seed, process_index, process_count)


def make_eval_iterator(data_config: Any, process_index: int = 0, process_count: int = 1,
                       max_batches: int = 0) -> EvalIterable:
  """Builds one pass over `config.data.eval_split` in padded, masked batches.

  Args:
    data_config: `config.data`.
    process_index: this process.
    process_count: number of processes.
    max_batches: stop after this many batches; 0 = the whole split.

  Returns:
    An iterable (re-iterable, with `len`) of {"image", "label", "mask": float32 [B_local]}.
  """
  if sources.resolve_reader(data_config) == "tfdata":
    return TfDataEvalIterable(data_config, process_index, process_count, max_batches)
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

    sources.check_tfds_prepared(data_config.name, data_config.data_dir, False, "tfdata")
    builder = tfds.builder(data_config.name, data_dir=data_config.data_dir or None)
    return builder.info.splits[split].num_examples
  return len(sources.make_source(data_config, split))
