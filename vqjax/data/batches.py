"""Host batches from a source's examples: images fitted to the configured size (`fit_images`),
features stacked, eval batches scaled (`transform_batch`) and padded with a "mask"
(`EvalIterable`), and the per-host contract every reader keeps (`check_process`,
`local_batch_size`, `check_identity`). The iterators are in `pipeline.py` (grain) and
`tfds_data.py` (tf.data).

Batches are host-local dicts of numpy arrays, one per source feature. Features are handled by
kind: "image" (uint8 [H, W, C] in the source) is fitted to `image_size` x `image_size` x
`channels`; every other feature (a "label", integer code maps, ...) passes through with its
dtype, stacked. Eval batches (and `preprocess`) are scaled on the host: float32 in [-1, 1],
never flipped; training batches stay uint8 (`device_transform.py`).
"""

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from PIL import Image

from vqjax.errors import UserError

IMAGE = "image"
MASK = "mask"


def convert_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """Converts uint8 [..., H, W, C] with C in {1, 3, 4} to `channels` (1 or 3) channels."""
  c = image.shape[-1]
  if c == 4:  # alpha is dropped: the models see opaque images
    image, c = image[..., :3], 3
  if c == channels:
    return image
  if c == 1 and channels == 3:
    return np.repeat(image, 3, axis=-1)
  if c == 3 and channels == 1:
    # ITU-R 601 luma, as PIL's convert("L").
    y = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)[..., None]
  raise UserError(f"Cannot convert {c} image channels to {channels}")


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
    images = convert_channels(images, channels)
    h, w = images.shape[1:3]
    if mode == "pad" and h <= size and w <= size:
      top, left = (size - h) // 2, (size - w) // 2
      return np.pad(images, ((0, 0), (top, size - h - top), (left, size - w - left), (0, 0)))
    if h == w == size or (mode == "center_crop" and h >= size and w >= size):
      top, left = (h - size) // 2, (w - size) // 2
      return images[:, top : top + size, left : left + size]
  fitted = [
    fit_image(convert_channels(np.asarray(im), channels), size, mode, name_of(j))
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


def stack_examples(
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
  return stack_examples(items, data_config, name_of)


def local_batch_size(batch_size: int, process_count: int, what: str) -> int:
  if batch_size <= 0 or batch_size % process_count:
    raise UserError(f"{what}={batch_size} must be a positive multiple of {process_count} processes")
  return batch_size // process_count


def check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise UserError(f"process_index {process_index} not in [0, {process_count})")


_RESUME_HINTS = {
  "seed": "set --config.seed={saved}",
  "num_examples": "the training split changed (config.data.train_split, or the files in it)",
  "process_count": "resume on as many processes as the run that saved it",
  "local_batch_size": "keep config.data.batch_size / process count as it was",
  "batch_size": "set --config.data.batch_size={saved}",
}


def check_identity(state: dict[str, Any], identity: dict[str, Any]) -> None:
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


def pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
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
    check_process(process_index, process_count)
    self._source, self._config = source, data_config
    self.local_batch_size = local_batch_size(
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
      yield pad_batch(batch, self.local_batch_size)
