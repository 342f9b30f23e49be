"""What is trained: the stage-1 autoencoder and the priors as `Task`s (the interface:
`task_base.py`), and `make_task(config)`, the task `config.task` names.

A prior or a classifier is one more `Task` subclass (the classifier's: `classifier_task.py`)
and one line in `TASKS`.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vqjax import errors
from vqjax.data import codes as codes_data
from vqjax.data.device_transform import device_transform
from vqjax.models import quantizer, registry
from vqjax.training import classifier_task, optim
from vqjax.training.task_base import Batch, Metrics, Task, TrainState


def level_names(levels: int) -> tuple[str, ...]:
  """Names of the code levels, coarsest first: what a user reads in logs and metrics."""
  if levels == 1:
    return ("codes",)
  if levels == 2:
    return ("top", "bottom")
  if levels == 3:
    return ("top", "middle", "bottom")
  return tuple(f"level{i}" for i in range(levels))


def _rename_levels(metrics: dict[str, Any], levels: int) -> dict[str, Any]:
  """ "level{i}/x" -> "top/x", "bottom/x", ... (see `level_names`)."""
  names = level_names(levels)
  out = {}
  for k, v in metrics.items():
    if k.startswith("level") and "/" in k:
      head, tail = k.split("/", 1)
      k = f"{names[int(head[len('level') :])]}/{tail}"
    out[k] = v
  return out


class AutoencoderTask(Task):
  """Stage 1: a VQ-VAE / VQ-VAE-2 trained on reconstruction + latent losses.

  Args:
    config: the full run config (`config.model`, `config.vq`, `config.optim`, ...).
    model: a module following the contract of `models/registry.py`; default
      `registry.build_model(config)`.
  """

  progress_keys = ("loss", "mse", "batch_usage")
  config_sections = ("task", "model", "vq")

  def __init__(self, config: ml_collections.ConfigDict, model: nn.Module | None = None):
    self.config = config
    self.model = registry.build_model(config) if model is None else model
    self.tx, self.schedule = optim.make_optimizer(config.optim, config.train.steps)
    self.levels = config.model.levels if config.model.name == "vqvae2" else 1

  def dummy_batch(self) -> dict[str, np.ndarray]:
    size, channels = self.config.data.image_size, self.config.data.channels
    return {"image": np.zeros((1, size, size, channels), np.float32)}

  def init(self, rng: jax.Array, batch: Batch) -> TrainState:
    """Creates parameters, EMA state and optimiser state from the shape of `batch`."""
    if "image" not in batch:
      raise errors.UserError(
        f"the autoencoder task needs an 'image' feature; the data has {sorted(batch)}"
      )
    batch = device_transform(batch, None, self.config.data)
    params_rng, vq_rng = jax.random.split(rng)
    variables = self.model.init({"params": params_rng, "vq": vq_rng}, batch["image"], train=False)
    variables = dict(variables)
    params = variables.pop("params")
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=self.tx.init(params),
      model_state=variables,
    )

  def _loss(self, params, model_state, image, rng):
    (recon, aux), updates = self.model.apply(
      {"params": params, **model_state},
      image,
      train=True,
      rngs={"vq": rng},
      mutable=list(model_state.keys()),
    )
    del recon
    # The loss is reduced in float32 whatever the compute dtype (bf16 sums lose small terms).
    return aux["loss"].astype(jnp.float32), (aux, updates)

  def train_step(self, state: TrainState, batch: Batch, rng: jax.Array, frozen: Any = None):
    """One optimiser update. Returns (new state, scalar metrics)."""
    del frozen
    batch = device_transform(batch, rng, self.config.data)
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)
    (loss, (aux, model_state)), grads = grad_fn(
      state.params, state.model_state, batch["image"], rng
    )
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
      k: jnp.asarray(v, jnp.float32)
      for k, v in aux.items()
      if not k.endswith("/counts") and jnp.ndim(v) == 0
    }
    # Per-batch statistics are told apart from the eval ones over the whole split.
    metrics = {
      k.replace("/usage", "/batch_usage").replace("/perplexity", "/batch_perplexity"): v
      for k, v in _rename_levels(metrics, self.levels).items()
    }
    metrics["loss"] = loss
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["lr"] = jnp.asarray(self.schedule(state.step), jnp.float32)
    new_state = state.replace(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      model_state={**state.model_state, **model_state},
    )
    return new_state, metrics

  def _variables(self, state: TrainState) -> dict:
    return {"params": state.params, **state.model_state}

  def eval_step(self, state: TrainState, batch: Batch, frozen: Any = None) -> Metrics:
    """Masked sums over one eval batch: squared error, example count, code histograms."""
    del frozen
    batch = device_transform(batch, None, self.config.data)
    image, mask = batch["image"], batch["mask"].astype(jnp.float32)
    recon, aux = self.model.apply(self._variables(state), image, train=False)
    err = jnp.mean(jnp.square(recon.astype(jnp.float32) - image), axis=(1, 2, 3))
    sums = {"sq_err": jnp.sum(err * mask), "count": jnp.sum(mask)}
    names = level_names(self.levels)
    for i, name in enumerate(names):
      codes = aux[f"level{i}/indices"]
      # Padded examples weigh zero, so the counts cover the real split only.
      sums[f"{name}/counts"] = quantizer.code_histogram(
        codes, self.config.vq.num_codes, weights=mask
      )
    return sums

  def eval_summary(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
    """MSE, PSNR and code statistics over the whole eval split.

    PSNR is 10 log10(4 / MSE) of the split's mean squared error (images in [-1, 1], so the
    peak-to-peak range is 2), not a mean of per-image PSNRs.
    """
    mse = float(sums["sq_err"]) / max(float(sums["count"]), 1.0)
    out = {"mse": mse, "psnr": float(10.0 * np.log10(4.0 / max(mse, 1e-12)))}
    for key, counts in sums.items():
      if not key.endswith("/counts"):
        continue
      level = key[: -len("/counts")]
      stats = quantizer.usage_metrics(np.asarray(counts, np.float32))
      out[f"{level}/usage"] = float(stats["usage"])
      out[f"{level}/perplexity"] = float(stats["perplexity"])
    out["examples"] = float(sums["count"])
    return out

  def images(self, state: TrainState, batch: Batch, rng: jax.Array, frozen: Any = None) -> dict:
    """One grid, "recon": inputs over their reconstructions, both in [-1, 1]."""
    del rng, frozen
    batch = device_transform(batch, None, self.config.data)
    recon, _ = self.model.apply(self._variables(state), batch["image"], train=False)
    recon = jnp.clip(recon.astype(jnp.float32), -1, 1)
    return {"recon": {"input": batch["image"], "reconstruction": recon}}


def codes_key(level: int) -> str:
  """The feature name of level `level`'s code map in a code dataset (0 = coarsest)."""
  return f"codes{level}"


class PriorTask(Task):
  """Stage 2: an autoregressive prior (Gated PixelCNN or PixelSNAIL) over one level's codes.

  The modelled level is `config.prior.level` (0 = the coarsest, top); it is conditioned on every
  coarser level's code map and, with `config.prior.class_conditional`, on the label. The loss is
  the mean cross-entropy per code in nats; metrics report it in bits per code and in bits per
  image dimension (the level's total bits over H * W * C of the images the codes encode).

  Args:
    config: the run config, with `config.prior.code_shapes` (and `image_shape`, for bits per
      image dimension): `make_task` fills them from a code dataset, the config records them.
    model: a prior module; default `registry.build_model(config)`.
    stage1: (module, variables) of the stage-1 model the codes came from, whose decoder draws
      the sample grids in the logs (`frozen`, `images`); None = no grids.
    sample: draws this level's codes for the grids, as `vqjax.sampling`'s samplers do:
      sample(model, variables, num, shape, rng, condition=, label=) -> int32 [num, *shape].
    (`vqjax.runs.make_task` gives both, from `config.prior.stage1`.)
  """

  progress_keys = ("loss", "bits_per_code")
  unit = "samples"
  config_sections = ("task", "model", "vq", "prior")

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    model: nn.Module | None = None,
    stage1: tuple[nn.Module, Any] | None = None,
    sample: Callable[..., jax.Array] | None = None,
  ):
    self.config = config
    p = config.prior
    if config.data.name == "synthetic_codes" and not p.code_shapes:
      p.code_shapes = [list(s) for s in config.data.synthetic_shapes or []]
    if not p.code_shapes:
      raise errors.UserError(
        "config.prior.code_shapes is not set: train priors on a code dataset "
        "(--config.data.name=codes --config.data.codes_dir=DIR) or set it"
      )
    if not 0 <= p.level < len(p.code_shapes):
      raise errors.UserError(
        f"config.prior.level={p.level} but the codes have {len(p.code_shapes)} level(s) "
        f"(0 = top ... {len(p.code_shapes) - 1} = bottom)"
      )
    if p.class_conditional and p.num_classes <= 0:
      raise errors.UserError("config.prior.class_conditional needs config.prior.num_classes > 0")
    m = config.model
    conditioned = m.cond_channels if m.name == "pixelcnn" else m.cond_res_channels
    if p.level > 0 and not conditioned:
      field = "cond_channels" if m.name == "pixelcnn" else "cond_res_channels"
      raise errors.UserError(
        f"config.prior.level={p.level} is conditioned on the coarser codes: set "
        f"config.model.{field} > 0"
      )
    if p.level == 0 and conditioned:
      raise errors.UserError(
        "config.prior.level=0 (the top) has no coarser codes to condition on: leave "
        "config.model.cond_channels / cond_res_channels at 0"
      )
    self.level = p.level
    self.shape = tuple(p.code_shapes[p.level])
    image_dims = int(np.prod(p.image_shape)) if p.image_shape else 0
    # bits per image dimension = (bits of the whole map) / (image dimensions)
    self.dims_per_code = image_dims / float(np.prod(self.shape)) if image_dims else 0.0
    self.model = registry.build_model(config) if model is None else model
    self.tx, self.schedule = optim.make_optimizer(config.optim, config.train.steps)
    self.stage1, self.sample = (stage1, sample) if stage1 and sample else (None, None)

  def dummy_batch(self) -> dict[str, np.ndarray]:
    batch = {
      codes_key(i): np.zeros((1, *s), np.int32)
      for i, s in enumerate(self.config.prior.code_shapes[: self.level + 1])
    }
    batch["label"] = np.zeros((1,), np.int32)
    return batch

  def _inputs(self, batch: Batch) -> tuple[jax.Array, Any, Any]:
    key = codes_key(self.level)
    if key not in batch:
      raise errors.UserError(
        f"the prior of level {self.level} needs feature {key!r}; the data has {sorted(batch)}"
      )
    condition = tuple(batch[codes_key(i)] for i in range(self.level)) or None
    label = None
    if self.config.prior.class_conditional:
      if "label" not in batch:
        raise errors.UserError("config.prior.class_conditional is set but the codes have no labels")
      label = batch["label"]
    return batch[key], condition, label

  def init(self, rng: jax.Array, batch: Batch) -> TrainState:
    """Creates parameters and optimiser state from the shapes of `batch`."""
    codes, condition, label = self._inputs(batch)
    params_rng, dropout_rng = jax.random.split(rng)
    variables = self.model.init(
      {"params": params_rng, "dropout": dropout_rng},
      codes,
      condition=condition,
      label=label,
      train=False,
    )
    variables = dict(variables)
    params = variables.pop("params")
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=self.tx.init(params),
      model_state=variables,
    )

  def _nll(self, params, model_state, batch, rng, train: bool) -> jax.Array:
    """Cross-entropy in nats of every code, [B, H, W], float32."""
    codes, condition, label = self._inputs(batch)
    logits = self.model.apply(
      {"params": params, **model_state},
      codes,
      condition=condition,
      label=label,
      train=train,
      rngs={"dropout": rng} if rng is not None else None,
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), codes)

  def train_step(self, state: TrainState, batch: Batch, rng: jax.Array, frozen: Any = None):
    """One optimiser update on the mean cross-entropy per code."""
    del frozen

    def loss_fn(params):
      return jnp.mean(self._nll(params, state.model_state, batch, rng, True))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    metrics = {
      "loss": loss,
      "bits_per_code": loss / np.log(2.0),
      "grad_norm": optax.tree.norm(grads),
      "lr": jnp.asarray(self.schedule(state.step), jnp.float32),
    }
    if self.dims_per_code:
      metrics["bits_per_dim"] = metrics["bits_per_code"] / self.dims_per_code
    new_state = state.replace(
      step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
    )
    return new_state, metrics

  def eval_step(self, state: TrainState, batch: Batch, frozen: Any = None) -> Metrics:
    """Summed cross-entropy over the real examples' codes, and how many codes that was."""
    del frozen
    mask = batch["mask"].astype(jnp.float32)
    nll = self._nll(state.params, state.model_state, batch, None, False)
    per_example = jnp.sum(nll.reshape(nll.shape[0], -1), axis=1)
    return {
      "nll": jnp.sum(per_example * mask),
      "count": jnp.sum(mask),
      "codes": jnp.sum(mask) * float(np.prod(self.shape)),
    }

  def eval_summary(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
    """Held-out cross-entropy: nats and bits per code, bits per image dimension."""
    per_code = float(sums["nll"]) / max(float(sums["codes"]), 1.0)
    out = {
      "loss": per_code,
      "bits_per_code": per_code / float(np.log(2.0)),
      "examples": float(sums["count"]),
    }
    if self.dims_per_code:
      out["bits_per_dim"] = out["bits_per_code"] / self.dims_per_code
    return out

  def frozen(self) -> Any:
    """The stage-1 model's variables (host arrays), for the sample grids; None without."""
    return None if self.stage1 is None else self.stage1[1]

  def images(self, state: TrainState, batch: Batch, rng: jax.Array, frozen: Any = None) -> dict:
    """One grid, "samples": the decoded real codes over the same codes with this level drawn
    from the prior (given the real coarser codes and label), so the grid shows what the prior
    has learnt at its level."""
    if frozen is None or self.stage1 is None:
      return {}
    # Sampling costs a network pass per position: only the images the grid shows.
    batch = jax.tree.map(lambda x: x[: self.config.log.num_images], batch)
    levels = len(self.config.prior.code_shapes)
    real = tuple(batch[codes_key(i)] for i in range(levels))
    _, condition, label = self._inputs(batch)
    drawn = self.sample(
      self.model,
      {"params": state.params, **state.model_state},
      real[0].shape[0],
      self.shape,
      rng,
      condition=condition,
      label=label,
    )
    mixed = real[: self.level] + (drawn,) + real[self.level + 1 :]

    def decode(maps):
      images = self.stage1[0].apply(frozen, maps, method="decode_from_indices")
      return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)

    name = level_names(levels)[self.level]
    return {"samples": {"real codes": decode(real), f"{name} sampled": decode(mixed)}}


def fill_from_codes(config: ml_collections.ConfigDict) -> None:
  """Records in `config.prior` what a prior's code dataset (`config.data.codes_dir`) says: the
  code-map shapes, the image shape and the stage-1 run (unless set), checked against the config.
  The run's config then holds them, so loading the trained prior needs no codes."""
  meta = codes_data.read_metadata(config.data.codes_dir)
  shapes = [list(level["shape"]) for level in meta["levels"]]
  if meta["num_codes"] != config.vq.num_codes:
    raise errors.UserError(
      f"the codes in {config.data.codes_dir} use {meta['num_codes']} codes per level, the "
      f"config {config.vq.num_codes}: set --config.vq.num_codes={meta['num_codes']}"
    )
  p = config.prior
  if p.code_shapes and [list(s) for s in p.code_shapes] != shapes:
    raise errors.UserError(
      f"the codes in {config.data.codes_dir} have level shapes {shapes}, the config (or the "
      f"checkpoint) {[list(s) for s in p.code_shapes]}: they come from another stage-1 model"
    )
  if p.class_conditional and not meta.get("has_labels"):
    raise errors.UserError(
      f"config.prior.class_conditional is set but the codes in "
      f"{config.data.codes_dir} have no labels"
    )
  p.code_shapes = shapes
  p.image_shape = list(meta["image_shape"])
  recorded = meta.get("stage1", {})
  if not p.stage1:
    p.stage1 = recorded.get("workdir", "")
  if not p.stage1_run_id:
    p.stage1_run_id = recorded.get("run_id") or ""
  if p.stage1_step < 0 and isinstance(recorded.get("step"), int):
    p.stage1_step = recorded["step"]


TASKS = {
  "autoencoder": AutoencoderTask,
  "prior": PriorTask,
  "classifier": classifier_task.ClassifierTask,
}


def make_task(config: ml_collections.ConfigDict) -> Task:
  """The task named by `config.task`, to train `config`: a prior on a code dataset first gets
  what the codes record (`fill_from_codes`, which reads them)."""
  if config.task not in TASKS:
    raise errors.UserError(f"unknown config.task {config.task!r}; expected one of {sorted(TASKS)}")
  if config.task == "prior" and config.data.name == "codes":
    fill_from_codes(config)
  return TASKS[config.task](config)
