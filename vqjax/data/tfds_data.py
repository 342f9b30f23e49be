"""tfds datasets: the ArrayRecord source the grain pipeline reads (`TfdsSource`, through
`tfds.data_source`, no TensorFlow) and the "tfdata" reader of TFRecord datasets (tf.data).

The tf.data reader keeps most of the contract of the grain pipeline of `pipeline.py` (disjoint
per-host batches that are a function of (seed, epoch, step, process), a resumable state with
its identity, training images uint8 and unflipped for `device_transform` to scale and flip on
the devices), but a TFRecord stream has no random access: each epoch is a seeded shuffle of
this host's `tfds.even_splits` part, and resuming skips into it. So its order depends on the
number of processes, and a resume on another number of processes restarts it (the grain
pipeline follows one global order and continues exactly). TensorFlow Datasets (a second or
more to import) and TensorFlow (optional: vqjax[tf]) are imported inside the functions that read
a tfds dataset, so the other sources never load them.
"""

import functools
import itertools
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from absl import logging

from vqjax import paths
from vqjax.data.batches import (
  IMAGE,
  EvalIterable,
  check_identity,
  check_process,
  local_batch_size,
  stack_examples,
)
from vqjax.errors import UserError


class TfDataTrainIterator:
  """The "tfdata" reader: TFRecords through `tfds.load`, read in order (needs TensorFlow).

  Batch (epoch, step) is a pure function of (seed, epoch, step, process): each epoch is a seeded
  shuffle of this host's `tfds.even_splits` part, and resuming skips into it. Images stay
  encoded through the shuffle buffer and are decoded in `config.data.num_workers` tf.data
  threads (0 = in order, one at a time); they come out fitted but uint8 and unflipped, as the
  grain reader's do. `config.data.worker_processes` is a grain setting: tf.data decodes in its
  own threads, outside the GIL.

  Attributes:
    local_batch_size: examples per batch on this process (global batch // process_count).
    steps_per_epoch: batches per epoch.
    reader: "tfdata".
  """

  def __init__(self, data_config: Any, seed: int, process_index: int, process_count: int):
    tf = require_tensorflow()
    import tensorflow_datasets as tfds

    c = data_config
    check_process(process_index, process_count)
    if c.num_workers < 0:
      raise UserError(f"config.data.num_workers must be >= 0, not {c.num_workers}")
    if c.get("worker_processes", 0):
      logging.warning(
        "config.data.worker_processes=%d is ignored by reader='tfdata': tf.data decodes in "
        "config.data.num_workers threads",
        c.worker_processes,
      )
    check_tfds_prepared(c.name, c.data_dir, c.download, "tfdata")
    split = tfds.even_splits(c.train_split, n=process_count, drop_remainder=True)[process_index]
    # Images stay encoded until after the shuffle, so the buffer holds bytes, not pixels.
    self._ds = _tfds_load(c, split, c.download, skip_image_decoding=True)
    self._tf, self._config, self._pi = tf, c, process_index
    # An Image feature skips to its encoded bytes (tf.string); a Tensor feature has no encoding
    # and comes back as pixels, which `decode_image` would reject.
    spec = self._ds.element_spec
    self._encoded = IMAGE in spec and spec[IMAGE].dtype == tf.string
    local = int(self._ds.cardinality())
    if local < 0:
      raise UserError(
        f"tfds {c.name!r} split {c.train_split!r} has no known size (cardinality {local})"
      )
    self.reader, self._local = "tfdata", local
    self.local_batch_size = b = local_batch_size(
      c.batch_size, process_count, "config.data.batch_size"
    )
    self.steps_per_epoch = local // b
    if self.steps_per_epoch == 0:
      raise UserError(
        f"{local * process_count} examples make no batch of {c.batch_size} over "
        f"{process_count} processes"
      )
    self._seed = int(seed) % 2**63
    # `even_splits` gave every host `local` examples: P * local in all.
    self._identity = {
      "seed": self._seed,
      "num_examples": local * process_count,
      "process_count": process_count,
      "local_batch_size": b,
      "reader": "tfdata",
    }
    self._epoch = self._step = 0
    self._live = None  # (epoch, step, numpy iterator positioned at that batch)
    self._peeked = None  # the batch at (epoch, step), read by `peek` and not handed out yet

  def _stream(self, epoch: int, step: int) -> Iterator[dict[str, np.ndarray]]:
    tf, c, b = self._tf, self._config, self.local_batch_size
    shuffle_seed = int(np.random.default_rng((self._seed, epoch, self._pi)).integers(2**31))
    ds = self._ds.shuffle(
      min(self._local, 16384), seed=shuffle_seed, reshuffle_each_iteration=False
    ).skip(step * b)
    if self._encoded:
      decode = functools.partial(tf.io.decode_image, expand_animations=False)
      ds = ds.map(
        lambda ex: {**ex, IMAGE: decode(ex[IMAGE])},
        num_parallel_calls=c.num_workers or None,
        deterministic=True,
      )
    return ds.prefetch(2 * b).as_numpy_iterator()

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.peek()
    self._peeked = None
    if self._step + 1 < self.steps_per_epoch:
      self._step += 1
    else:
      self._epoch, self._step, self._live = self._epoch + 1, 0, None
    return batch

  def peek(self) -> dict[str, np.ndarray]:
    """The next batch without consuming it: `next` hands out the same batch after it."""
    if self._peeked is None:
      self._peeked = self._read()
    return self._peeked

  def _read(self) -> dict[str, np.ndarray]:
    """Batch (epoch, step), leaving the live stream positioned at the batch after it."""
    epoch, step, b = self._epoch, self._step, self.local_batch_size
    if self._live is None or self._live[:2] != (epoch, step):
      self._live = (epoch, step, self._stream(epoch, step))
    it = self._live[2]
    examples = [tfds_example(next(it)) for _ in range(b)]
    self._live = (epoch, step + 1, it)
    return stack_examples(
      examples, self._config, lambda j: f"example {step * b + j} of epoch {epoch}"
    )

  def get_state(self) -> dict[str, Any]:
    """The position of the next batch, plus what must match on resume (JSON-serialisable)."""
    return {"epoch": self._epoch, "step": self._step, **self._identity}

  def set_state(self, state: dict[str, Any]) -> None:
    """Moves to a state from `get_state`; the next batch is the one that followed it. A state
    saved on another number of processes (other shards) leaves the iterator at its start."""
    saved_count = state.get("process_count")
    if saved_count is not None and int(saved_count) != self._identity["process_count"]:
      logging.warning(
        "data state saved on %s processes, this run has %d: the tf.data order restarts",
        saved_count,
        self._identity["process_count"],
      )
      return
    check_identity(state, self._identity)
    if "epoch" not in state or "step" not in state:
      raise UserError(
        f"Cannot resume data iterator: no epoch/step in the saved state "
        f"(keys {sorted(state)}); it was saved by another reader"
      )
    if not 0 <= int(state["step"]) < self.steps_per_epoch:
      raise UserError(f"Cannot resume data iterator: step {state['step']} out of range")
    self._epoch, self._step = int(state["epoch"]), int(state["step"])
    self._live = self._peeked = None

  def close(self) -> None:
    """Drops the open tf.data iterator."""
    self._live = self._peeked = None


class TfDataEvalIterable(EvalIterable):
  """EvalIterable over TFRecords through `tfds.load` (needs TensorFlow), read in order."""

  def __init__(self, data_config: Any, process_index: int, process_count: int, max_batches: int):
    self._tf = require_tensorflow()
    import tensorflow_datasets as tfds

    c = data_config
    total = num_examples(c, c.eval_split)
    super().__init__(None, c, process_index, process_count, max_batches, num_total=total)
    parts = tfds.even_splits(c.eval_split, n=process_count, drop_remainder=False)
    self._ds = _tfds_load(c, parts[process_index], False, skip_image_decoding=False)

  def _chunks(self) -> Iterator[dict[str, np.ndarray] | None]:
    it = self._ds.as_numpy_iterator()
    b = self.local_batch_size
    for k in range(self.num_batches):
      exs = [tfds_example(ex) for ex in itertools.islice(it, b)]
      yield (
        stack_examples(exs, self._config, lambda j, k=k: f"eval example {k * b + j}")
        if exs
        else None
      )

  def _template(self) -> dict[str, np.ndarray]:
    # Only a process with no eval example at all gets here (its parts are never empty after a
    # non-empty one); it has nothing to read a shape from.
    raise UserError(f"eval split {self._config.eval_split!r} has fewer examples than processes")


def _tfds_load(data_config: Any, split: Any, download: bool, skip_image_decoding: bool) -> Any:
  """`tfds.load` of one split in file order, with a one-line error for an ArrayRecord dataset."""
  import tensorflow_datasets as tfds

  c = data_config
  decoders = None
  if skip_image_decoding:
    features = tfds.builder(c.name, data_dir=c.data_dir or None).info.features
    if IMAGE in features.keys():
      decoders = {IMAGE: tfds.decode.SkipDecoding()}
  try:
    return tfds.load(
      c.name,
      split=split,
      data_dir=c.data_dir or None,
      download=download,
      shuffle_files=False,
      decoders=decoders,
    )
  except NotImplementedError as e:  # prepared as ArrayRecord: only data_source reads it
    raise UserError(f"tfds {c.name!r} is not TFRecord; use reader='grain' ({e})") from None


def num_examples(data_config: Any, split: str, own_sources: Any = ()) -> int:
  """Examples in a split of a prepared tfds dataset (`pipeline.num_examples` of "tfdata")."""
  import tensorflow_datasets as tfds  # deferred: tfds takes a second to import

  c = data_config
  check_tfds_prepared(c.name, c.data_dir, False, "tfdata", own_sources)
  return tfds.builder(c.name, data_dir=c.data_dir or None).info.splits[split].num_examples


class TfdsSource:
  """A tfds ArrayRecord dataset read through `tfds.data_source` (no TensorFlow needed).

  Every numeric feature is kept under its tfds name; text and bytes features (e.g. a file name)
  are dropped, as they cannot go to the devices. 64-bit numbers become 32-bit, JAX's default.
  Record i is the i-th record of the prepared files: tfds shuffles examples when it writes them,
  so it is not the i-th example the builder generated.
  """

  def __init__(self, name: str, split: str, data_dir: str, download: bool, own_sources: Any = ()):
    import tensorflow_datasets as tfds  # deferred: tfds takes a second to import

    check_tfds_prepared(name, data_dir, download, "grain", own_sources)
    if data_dir and paths.is_remote(data_dir):
      data_dir = _local_tfds_copy(name, data_dir)
    try:
      self._ds = tfds.data_source(name, split=split, data_dir=data_dir or None, download=download)
    except NotImplementedError as e:  # prepared as TFRecord: data_source cannot read it
      raise UserError(f"tfds {name!r} is not ArrayRecord; use reader='tfdata' ({e})") from None

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return tfds_example(self._ds[i])

  def __getitems__(self, indices: list[int]) -> list[dict[str, np.ndarray]]:
    # One ArrayRecord call for the batch is much faster than one per index; the source is safe
    # to read from the pipeline's threads (checked with 8 threads against serial reads).
    return [tfds_example(r) for r in self._ds.__getitems__(list(indices))]


def _local_tfds_copy(name: str, data_dir: str) -> str:
  """A local data_dir holding a copy of the prepared `name` of a data_dir in a bucket: the
  ArrayRecord reader opens local files only (`paths.local_copy`; copied once per host)."""
  import tensorflow_datasets as tfds

  version_dir = os.fspath(tfds.builder(name, data_dir=data_dir).data_dir)
  for rel in paths.files_under(version_dir):
    paths.local_copy(os.path.join(version_dir, rel), under=data_dir)
  return paths.local_root(data_dir)


def tfds_example(record: dict[str, Any]) -> dict[str, np.ndarray]:
  """Maps a decoded tfds record to a source example (see `TfdsSource`)."""
  out = {}
  for k, v in record.items():
    v = np.asarray(v)
    if v.dtype.kind not in "biuf":
      continue
    if v.dtype == np.int64:
      v = v.astype(np.int32)
    elif v.dtype == np.uint64:
      v = v.astype(np.uint32)
    elif v.dtype == np.float64:
      v = v.astype(np.float32)
    out[k] = v
  if "image" in out and out["image"].ndim == 2:
    out["image"] = out["image"][..., None]
  return out


def check_tfds_prepared(
  name: str, data_dir: str, download: bool, reader: str, own_sources: Any = ()
) -> None:
  """Fails fast, with one line, when a tfds dataset is not prepared and may not be downloaded.

  Without this check an offline `tfds.load` retries for minutes, and the tfds errors are pages
  long (a catalogue listing) rather than one actionable line. `own_sources`: the names vqjax
  reads itself (`sources.SOURCES`), listed when `name` is unknown.
  """
  import tensorflow_datasets as tfds

  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(
      f"Unknown tfds dataset {name!r}: not in the tfds catalogue nor prepared in "
      f"{data_dir or 'the tfds default data_dir'} (vqjax's own sources: {sorted(own_sources)})"
    ) from None
  if builder.is_prepared() or download:
    return
  hint = ""
  if name == "fashion_mnist":
    hint = "; or `apt-get install dataset-fashion-mnist` and use reader='local'"
  raise UserError(
    f"tfds dataset {name!r} is not prepared in {os.path.dirname(builder.data_dir)} and "
    f"config.data.download=False (reader={reader!r}): set --config.data.download=True or "
    f"--config.data.data_dir{hint}"
  )


def require_tensorflow() -> Any:
  """Imports TensorFlow for the "tfdata" reader, or fails with how to get it."""
  try:
    import tensorflow as tf
  except ImportError:
    raise UserError(
      "reader='tfdata' needs TensorFlow: `pip install tensorflow-cpu`, or use reader='grain' "
      "with an ArrayRecord dataset"
    ) from None
  return tf
