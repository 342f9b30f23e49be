"""`config.model.name` -> Flax module, with its implementation choices (models/impl.py)
resolved once, here, for the platform it is built on. A new model or quantizer is one file of
its own, found by name (vqjax/plugins.py: `register_model` / `register_quantizer`, or an
import path in the config); this file builds the built-ins.

Contract of every stage-1 model built here (NHWC, images in [-1, 1]):
  variables = model.init({"params": rng, "vq": rng}, x, train=False)
      -> {"params": ..., "vq_state": ...}
  (recon, aux), updates = model.apply(variables, x, train=True, rngs={"vq": rng},
                                      mutable=["vq_state"])
      aux["loss"]              scalar to minimise (reconstruction + latent losses)
      aux["mse"]               reconstruction mean squared error, images in [-1, 1]
      aux["latent_loss"]       commitment (+ codebook) loss summed over levels
      aux["level{i}/perplexity"], aux["level{i}/usage"], aux["level{i}/top_share"]
                               per-batch code statistics, level 0 = coarsest (top)
      aux["level{i}/counts"]   int32 [num_codes] histogram of the batch's codes
      aux["level{i}/indices"]  int32 code map of level i
  model.apply(variables, x, method="encode_to_indices") -> tuple of int32 code maps,
      coarsest first: ([B, h0, w0], ..., [B, hN, wN])
  model.apply(variables, codes, method="decode_from_indices") -> images [B, H, W, C]
With train=False nothing in "vq_state" changes.
"""

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from vqjax import errors, plugins
from vqjax.models import classifier, hierarchy, impl, pixelcnn, pixelsnail, vqvae

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_from_name(name: str):
  """Maps a config dtype string to a JAX dtype, with a clear error for unknown names."""
  if name not in DTYPES:
    raise errors.UserError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
  return DTYPES[name]


register_quantizer = plugins.register_quantizer
register_model = plugins.register_model


def quantizer_kwargs(vq: ml_collections.ConfigDict) -> dict:
  """Quantizer constructor arguments from `config.vq` (for its `kind`); a plugin kind's are
  its `from_config(config.vq)`, with the kind. The built-in quantizer's forms (vq.*_impl) are
  the model's `Impl` (models/impl.py), which the autoencoder hands it."""
  if not plugins.is_builtin("quantizer", vq.kind):
    return dict(kind=vq.kind, **plugins.kwargs_from_config("quantizer", vq.kind, vq))
  if vq.kind == "gumbel":
    return dict(
      kind="gumbel",
      num_codes=vq.num_codes,
      code_dim=vq.code_dim,
      temperature=vq.temperature,
      kl_weight=vq.kl_weight,
    )
  return dict(
    num_codes=vq.num_codes,
    code_dim=vq.code_dim,
    beta=vq.beta,
    ema=vq.ema,
    decay=vq.decay,
    eps=vq.eps,
    bias_correction=vq.bias_correction,
    codebook_init=vq.init,
    kmeans_iters=vq.kmeans_iters,
    restart_after=vq.restart_after,
  )


def quantizer_forms(vq: ml_collections.ConfigDict) -> dict:
  """The built-in quantizer's implementation choices in `config.vq` (vq.*_impl), as
  `impl.resolve` arguments; none for another kind (a Gumbel or plugin quantizer reads none)."""
  if vq.kind != "vq":
    return {}
  return dict(vq_stats=vq.stats_impl, vq_distance=vq.distance_impl, vq_matmul=vq.matmul_impl)


def _autoencoder_impl(config, dtype) -> impl.Impl:
  m = config.model
  return impl.resolve(
    upconv=m.upconv_impl,
    downconv=m.downconv_impl,
    channel_multiple=m.channel_multiple,
    dtype=dtype,
    **quantizer_forms(config.vq),
  )


def _build_vqvae(config, dtype, param_dtype):
  m = config.model
  return vqvae.VQVAE(
    out_channels=config.data.channels,
    channels=m.channels,
    res_channels=m.res_channels,
    num_res_blocks=m.num_res_blocks,
    downsample=m.downsample,
    quantizer=quantizer_kwargs(config.vq),
    impl=_autoencoder_impl(config, dtype),
    dtype=dtype,
    param_dtype=param_dtype,
  )


def _build_vqvae2(config, dtype, param_dtype):
  m = config.model
  return hierarchy.VQVAE2(
    out_channels=config.data.channels,
    channels=m.channels,
    res_channels=m.res_channels,
    num_res_blocks=m.num_res_blocks,
    levels=m.levels,
    first_stride=m.first_stride,
    level_stride=m.level_stride,
    quantizer=quantizer_kwargs(config.vq),
    impl=_autoencoder_impl(config, dtype),
    dtype=dtype,
    param_dtype=param_dtype,
  )


def _prior_classes(config) -> int:
  return config.prior.num_classes if config.prior.class_conditional else 0


def _build_pixelcnn(config, dtype, param_dtype):
  m = config.model
  return pixelcnn.GatedPixelCNN(
    num_codes=config.vq.num_codes,
    channels=m.channels,
    num_layers=m.num_layers,
    kernel_size=m.kernel_size,
    num_classes=_prior_classes(config),
    cond_channels=m.cond_channels,
    dropout=m.dropout,
    dtype=dtype,
    param_dtype=param_dtype,
  )


def _build_pixelsnail(config, dtype, param_dtype):
  m = config.model
  shapes = config.prior.code_shapes
  if not shapes:
    raise errors.UserError(
      "config.prior.code_shapes is not set: a PixelSNAIL needs the code-map shape (set "
      "--config.data.codes_dir to the code dataset; the shapes are read from it)"
    )
  return pixelsnail.PixelSNAIL(
    shape=tuple(shapes[config.prior.level]),
    num_codes=config.vq.num_codes,
    channels=m.channels,
    kernel_size=m.kernel_size,
    num_blocks=m.num_blocks,
    num_res_blocks=m.num_res_blocks,
    res_channels=m.res_channels,
    attention=m.attention,
    num_heads=m.num_heads,
    dropout=m.dropout,
    num_cond_res_blocks=m.num_cond_res_blocks,
    cond_res_channels=m.cond_res_channels,
    cond_res_kernel=m.cond_res_kernel,
    num_out_res_blocks=m.num_out_res_blocks,
    num_classes=_prior_classes(config),
    remat=m.remat,
    impl=impl.resolve(
      causal_conv=m.causal_conv_impl,
      kernel_size=m.kernel_size,
      code_shape=shapes[config.prior.level],
      dtype=dtype,
    ),
    dtype=dtype,
    param_dtype=param_dtype,
  )


def _build_classifier(config, dtype, param_dtype):
  return classifier.from_config(config, dtype, param_dtype)


# The built-in config.model.name -> (config, dtype, param_dtype) -> module. Other names are
# plugins (vqjax/plugins.py), built by `_build_plugin`.
MODELS = {
  "vqvae": _build_vqvae,
  "vqvae2": _build_vqvae2,
  "pixelcnn": _build_pixelcnn,
  "pixelsnail": _build_pixelsnail,
  "classifier": _build_classifier,
}
# The stage-1 models, and the priors over their codes (the rest: the classifier).
AUTOENCODERS = ("vqvae", "vqvae2")
PRIORS = ("pixelcnn", "pixelsnail")


def _build_plugin(config, dtype, param_dtype):
  name = config.model.name
  kwargs = plugins.kwargs_from_config("model", name, config)
  return plugins.module_class(plugins.find("model", name))(
    **kwargs, dtype=dtype, param_dtype=param_dtype
  )


def _check_name(name: str) -> None:
  """An unknown built-in name or an unusable plugin: one-line UserError."""
  if name not in MODELS:
    plugins.find("model", name)


def is_autoencoder(config: ml_collections.ConfigDict) -> bool:
  """Whether the model is a stage-1 autoencoder: a built-in one, or a plugin trained by the
  autoencoder task."""
  if config.model.name in MODELS:
    return config.model.name in AUTOENCODERS
  return config.task == "autoencoder"


def is_prior(config: ml_collections.ConfigDict) -> bool:
  """Whether the model is a prior over codes: a built-in one, or a plugin of the prior task."""
  if config.model.name in MODELS:
    return config.model.name in PRIORS
  return config.task == "prior"


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  """Builds the model named by `config.model.name` (a built-in or a plugin)."""
  _check_name(config.model.name)
  return MODELS.get(config.model.name, _build_plugin)(
    config, dtype_from_name(config.model.dtype), dtype_from_name(config.model.param_dtype)
  )


def init_inputs(config: ml_collections.ConfigDict) -> tuple[tuple, dict]:
  """Zero inputs of one example for `model.init` of the model `config` names: they fix the
  shapes of its variables (`vqjax.load_run` restores a run into them).

  Args:
    config: a full config; a prior's needs `config.prior.code_shapes` (recorded with the run).

  Returns:
    (args, kwargs) with train=False: autoencoders and classifiers take images float32
    [1, image_size, image_size, channels]; priors the int32 code map [1, h, w] of
    `config.prior.level`, the coarser levels' maps as `condition` and, class-conditional, an
    int32 [1] `label`.
  """
  _check_name(config.model.name)
  if not is_prior(config):
    size, channels = config.data.image_size, config.data.channels
    return (jnp.zeros((1, size, size, channels), jnp.float32),), {"train": False}
  p = config.prior
  if not p.code_shapes or not 0 <= p.level < len(p.code_shapes):
    raise errors.UserError(
      f"config.prior.code_shapes={p.code_shapes} has no level {p.level}: the prior's code maps "
      "are not recorded in its config"
    )
  maps = [jnp.zeros((1, *shape), jnp.int32) for shape in p.code_shapes[: p.level + 1]]
  label = jnp.zeros((1,), jnp.int32) if p.class_conditional else None
  return (maps[-1],), {"condition": tuple(maps[:-1]) or None, "label": label, "train": False}


def total_stride(config: ml_collections.ConfigDict) -> int:
  """The factor by which the model's coarsest code map is smaller than the image.

  The config-level answer (the model need not be built); image sizes must be multiples of it.

  Args:
    config: a full config; `config.model.name` picks the formula.

  Returns:
    The stride; an unknown model name raises `errors.UserError`.
  """
  _check_name(config.model.name)
  if not is_autoencoder(config):
    raise errors.UserError(
      f"total_stride: {config.model.name!r} is not an autoencoder ({', '.join(AUTOENCODERS)})"
    )
  # The module's own definition (it checks input sizes with it); building one is cheap.
  model = build_model(config)
  if not hasattr(model, "total_stride"):
    raise errors.UserError(f"total_stride: the model {config.model.name!r} has no total_stride")
  return model.total_stride
