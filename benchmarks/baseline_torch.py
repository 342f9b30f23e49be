"""Times the PyTorch reference, rosinality/vq-vae-2-pytorch, on the workloads of
`benchmarks/suite.py`, with torch on the device JAX uses.

No code of that repository is part of vqjax: the user passes `--baseline-dir` pointing at their
own clone; `Baseline` imports its `vqvae.VQVAE` and `pixelsnail.PixelSNAIL` from there at run
time and drives them the way its scripts do:
  * stage 1 (its train_vqvae.py): Adam, loss = MSE(reconstruction, image) + 0.25 * latent loss;
    reconstruction = the model in eval mode under `torch.no_grad()`;
  * a prior (its train_pixelsnail.py): Adam, cross-entropy of the logits against the codes, the
    bottom prior conditioned on top codes;
  * sampling (its sample.py): for each position the whole network re-run on the rows so far,
    softmax and a multinomial draw (only the condition is cached).
Inputs are random (images in [-1, 1], codes in [0, K)), NCHW as the reference expects.
"""

import importlib
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

REFERENCE = "rosinality"


class Unavailable(Exception):
  """The reference cannot be run here; the message says why in one line."""


def vqvae_kwargs(config: Any) -> dict | None:
  """The reference `VQVAE(...)` arguments of a vqjax stage-1 config, or None when the config is
  not the reference's architecture (two levels, strides 4 and 2, EMA codebooks)."""
  m, vq = config.model, config.vq
  if (m.name, m.levels, m.first_stride, m.level_stride, vq.ema) != ("vqvae2", 2, 4, 2, True):
    return None
  return dict(
    in_channel=config.data.channels,
    channel=m.channels,
    n_res_block=m.num_res_blocks,
    n_res_channel=m.res_channels,
    embed_dim=vq.code_dim,
    n_embed=vq.num_codes,
    decay=vq.decay,
  )


def pixelsnail_kwargs(fields: Mapping, num_codes: int, shape: tuple[int, int]) -> dict:
  """The reference `PixelSNAIL(...)` arguments of vqjax PixelSNAIL fields (`config.model` or
  `benchmarks/sampling.py`'s sizes). The reference always uses 8 attention heads."""
  return dict(
    shape=list(shape),
    n_class=num_codes,
    channel=fields["channels"],
    kernel_size=fields["kernel_size"],
    n_block=fields["num_blocks"],
    n_res_block=fields["num_res_blocks"],
    res_channel=fields["res_channels"],
    attention=fields.get("attention", True),
    dropout=fields.get("dropout", 0.1),
    n_cond_res_block=fields.get("num_cond_res_blocks", 0),
    cond_res_channel=fields.get("cond_res_channels", 0),
    cond_res_kernel=fields.get("cond_res_kernel", 3),
    n_out_res_block=fields.get("num_out_res_blocks", 0),
  )


class Baseline:
  """The reference's modules, imported from `directory`, on the torch device matching JAX's.

  Args:
    directory: a clone of rosinality/vq-vae-2-pytorch (holds vqvae.py and pixelsnail.py).
    platform: JAX's backend ("gpu", "cpu", ...); torch runs on the same kind of device.
    threads: torch's CPU threads (0 = its default, one per core).

  Raises:
    Unavailable: torch missing, not a clone, an import failing, or no matching torch device.
  """

  def __init__(self, directory: str, platform: str, threads: int = 0):
    try:
      import torch
    except ImportError:
      raise Unavailable("torch is not installed (pip install torch)") from None
    self.torch = torch
    if threads:
      torch.set_num_threads(threads)
    directory = os.path.abspath(os.path.expanduser(directory))
    missing = [f for f in ("vqvae.py", "pixelsnail.py") if not os.path.isfile(f"{directory}/{f}")]
    if missing:
      raise Unavailable(
        f"{directory} has no {' or '.join(missing)}: not a clone of rosinality/vq-vae-2-pytorch"
      )
    if platform == "gpu":
      if not torch.cuda.is_available():
        raise Unavailable("JAX runs on a GPU but this torch has no CUDA device")
      self.device = torch.device("cuda")
      self.device_kind = torch.cuda.get_device_name()
    elif platform == "cpu":
      self.device = torch.device("cpu")
      self.device_kind = "cpu"
    else:
      raise Unavailable(f"JAX runs on {platform!r}, which torch cannot use")
    sys.path.insert(0, directory)
    try:
      self.vqvae = importlib.import_module("vqvae")
      self.pixelsnail = importlib.import_module("pixelsnail")
    except Exception as e:  # noqa: BLE001 -- whatever their import raises, one line
      raise Unavailable(f"importing the reference from {directory} failed: {e!r}") from None
    finally:
      sys.path.remove(directory)
    self.version = torch.__version__
    # As shipped: float32, with cuDNN's default TF32 convolutions on a GPU.
    self.precision = "fp32 (TF32 convs)" if self.device.type == "cuda" else "fp32"

  # --- timing helpers ---------------------------------------------------------------------

  def _sync(self) -> None:
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()

  def timed(self, fn, steps: int, warmup: int = 2) -> float:
    """Seconds per call of `fn()` over `steps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
      fn()
    self._sync()
    t0 = time.perf_counter()
    for _ in range(steps):
      fn()
    self._sync()
    return (time.perf_counter() - t0) / steps

  def _reset_peak(self) -> None:
    if self.device.type == "cuda":
      self.torch.cuda.empty_cache()
      self.torch.cuda.reset_peak_memory_stats()

  def _peak_gib(self) -> float | None:
    if self.device.type == "cuda":
      return self.torch.cuda.max_memory_allocated() / 2**30
    return None

  def _codes(self, batch: int, shape: tuple[int, int], num_codes: int):
    return self.torch.randint(0, num_codes, (batch, *shape), device=self.device)

  # --- workloads --------------------------------------------------------------------------

  def stage1_fns(self, kwargs: dict, batch: int, size: int):
    """(train, recon): closures running one train step / one reconstruction of the reference
    VQ-VAE-2 on a fixed batch of random images (train mode / eval mode set by each)."""
    torch = self.torch
    model = self.vqvae.VQVAE(**kwargs).to(self.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    criterion = torch.nn.MSELoss()
    image = torch.rand(batch, kwargs["in_channel"], size, size, device=self.device) * 2 - 1

    def train():
      model.train()
      model.zero_grad()
      out, latent_loss = model(image)
      loss = criterion(out, image) + 0.25 * latent_loss.mean()
      loss.backward()
      optimizer.step()

    @torch.no_grad()
    def recon():
      model.eval()
      model(image)

    return train, recon

  def stage1(self, kwargs: dict, batch: int, size: int, steps: int) -> dict:
    """The reference VQ-VAE-2's train step and reconstruction on random images.

    Returns:
      {"train_s", "recon_s": seconds per call, "peak_gib": allocator peak (None on the CPU)}.
    """
    self._reset_peak()
    train, recon = self.stage1_fns(kwargs, batch, size)
    train_s = self.timed(train, steps)
    peak = self._peak_gib()
    recon_s = self.timed(recon, steps)
    return {"train_s": train_s, "recon_s": recon_s, "peak_gib": peak}

  def prior_fn(self, kwargs: dict, batch: int, cond_shape: tuple[int, int] | None):
    """A closure running one train step of the reference PixelSNAIL on random codes
    (conditioned on random codes of `cond_shape` when given)."""
    torch = self.torch
    model = self.pixelsnail.PixelSNAIL(**kwargs).to(self.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    criterion = torch.nn.CrossEntropyLoss()
    k = kwargs["n_class"]
    codes = self._codes(batch, tuple(kwargs["shape"]), k)
    condition = self._codes(batch, cond_shape, k) if cond_shape else None
    model.train()

    def train():
      model.zero_grad()
      out, _ = model(codes, condition=condition)
      criterion(out, codes).backward()
      optimizer.step()

    return train

  def prior(self, kwargs: dict, batch: int, cond_shape: tuple[int, int] | None, steps: int) -> dict:
    """The reference PixelSNAIL's train step on random codes. Returns {"train_s", "peak_gib"}."""
    self._reset_peak()
    train = self.prior_fn(kwargs, batch, cond_shape)
    train_s = self.timed(train, steps)
    return {"train_s": train_s, "peak_gib": self._peak_gib()}

  def sample(self, kwargs: dict, batch: int, condition_shape, max_positions: int) -> dict:
    """The reference's sampling of one level (its sample.py loop) on random weights.

    A map of more than `max_positions` positions is estimated instead: for each row i one
    timed forward over the rows up to i (what each of that row's W positions runs), times W.

    Returns:
      {"seconds", "estimated": bool}.
    """
    torch = self.torch
    model = self.pixelsnail.PixelSNAIL(**kwargs).to(self.device).eval()
    height, width = kwargs["shape"]
    k = kwargs["n_class"]
    condition = self._codes(batch, condition_shape, k) if condition_shape else None
    row = torch.zeros(batch, height, width, dtype=torch.int64, device=self.device)
    estimated = height * width > max_positions
    with torch.no_grad():
      model(row[:, :1], condition=condition)  # warm-up (cuDNN autotuning, allocations)
      self._sync()
      cache: dict = {}
      t0 = time.perf_counter()
      if estimated:
        total = 0.0
        for i in range(height):
          self._sync()
          t1 = time.perf_counter()
          model(row[:, : i + 1], condition=condition, cache=cache)
          self._sync()
          total += (time.perf_counter() - t1) * width
        seconds = total
      else:
        for i in range(height):
          for j in range(width):
            out, cache = model(row[:, : i + 1], condition=condition, cache=cache)
            prob = torch.softmax(out[:, :, i, j], 1)
            row[:, i, j] = torch.multinomial(prob, 1).squeeze(-1)
        self._sync()
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "estimated": estimated}
