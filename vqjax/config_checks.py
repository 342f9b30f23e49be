"""Checks of a config: the values no code would read, or that cannot be right, and a saved
config read back.

`validate(config)` runs before every run starts: numeric fields lie in their ranges
(`check_ranges`), choice fields hold a known value, data fields belong to the chosen source, and
no field that the chosen model, quantizer or task ignores differs from its `configs.base_config()`
default. `read_config(path)` reads a config saved as JSON (a converted model's config.json) onto
the current schema and validates it.
"""

import json
import math

import ml_collections
from etils import epath

from vqjax import configs, errors, plugins

# The models models/registry.py builds (config.model.name) and the dtype names it maps to JAX
# dtypes; tests/test_config_checks.py checks that both files name the same ones.
MODEL_NAMES = plugins.BUILTIN_MODELS
DTYPE_NAMES = ("float32", "bfloat16", "float16")

# Fields with a fixed set of values.
_CHOICES = {
  "task": ("autoencoder", "prior", "classifier"),
  "model.dtype": DTYPE_NAMES,
  "model.param_dtype": DTYPE_NAMES,
  "data.reader": ("auto", "grain", "tfdata", "local", "folder"),
  "data.resize": ("pad", "resize_crop", "center_crop"),
  "model.upconv_impl": ("auto", "subpixel", "lax", "adjoint"),  # models/strided.py
  "model.downconv_impl": ("auto", "lax", "adjoint"),
  "model.causal_conv_impl": ("auto", "masked", "split"),
  "train.rng_impl": ("threefry", "rbg", "unsafe_rbg"),
  "vq.init": ("normal", "uniform", "kmeans++", "kmeans"),
  "vq.stats_impl": ("auto", "onehot", "scatter"),
  "vq.distance_impl": ("auto", "xla", "pallas"),
  "vq.matmul_impl": ("auto", "float32", "bf16"),
  "optim.name": ("adam", "adamw"),
  "optim.schedule": ("constant", "cosine"),
  "distributed.initialize": ("auto", "yes", "no"),
}

# (selector field, its value) -> fields that nothing reads with that value: setting one is
# a mistake (e.g. tuning vq.beta of a Gumbel quantizer), so it is rejected rather than ignored.
# Mirrors models/registry.py (quantizer_kwargs and the model builders) and training/optim.py.
_STAGE1_MODEL_FIELDS = (
  "model.levels",
  "model.first_stride",
  "model.level_stride",
  "model.downsample",
  "model.upconv_impl",
  "model.downconv_impl",
  "model.channel_multiple",
)
# Read by PixelSNAIL alone among the non-autoencoders (PixelCNN and the classifier ignore them).
_PIXELSNAIL_ONLY_FIELDS = (
  "model.attention",
  "model.num_heads",
  "model.num_cond_res_blocks",
  "model.cond_res_channels",
  "model.cond_res_kernel",
  "model.num_out_res_blocks",
  "model.remat",
  "model.causal_conv_impl",
)
_PRIOR_MODEL_FIELDS = (
  "model.kernel_size",
  "model.num_layers",
  "model.num_blocks",
  "model.dropout",
  "model.cond_channels",
) + _PIXELSNAIL_ONLY_FIELDS
# The nearest-code quantizer's own fields (its loss, EMA codebook and initialisation): a Gumbel
# quantizer and the classifier read none of them.
_NEAREST_CODE_FIELDS = (
  "vq.beta",
  "vq.ema",
  "vq.decay",
  "vq.eps",
  "vq.bias_correction",
  "vq.init",
  "vq.kmeans_iters",
  "vq.restart_after",
)
_VQ_IMPL_FIELDS = ("vq.stats_impl", "vq.distance_impl", "vq.matmul_impl")
_CLASSIFIER_FIELDS = (
  "classifier.num_classes",
  "classifier.label_smoothing",
  "classifier.stem_stride",
)
IGNORED_FIELDS = {
  ("vq.kind", "gumbel"): _NEAREST_CODE_FIELDS + _VQ_IMPL_FIELDS + ("vq.options",),
  ("vq.kind", "vq"): ("vq.temperature", "vq.kl_weight", "vq.options"),
  ("model.name", "vqvae"): ("model.levels", "model.first_stride", "model.level_stride")
  + _PRIOR_MODEL_FIELDS
  + ("model.options",),
  ("model.name", "vqvae2"): ("model.downsample",) + _PRIOR_MODEL_FIELDS + ("model.options",),
  ("model.name", "pixelcnn"): _STAGE1_MODEL_FIELDS
  + _PIXELSNAIL_ONLY_FIELDS
  + ("model.res_channels", "model.num_res_blocks", "model.num_blocks", "model.options"),
  ("model.name", "pixelsnail"): _STAGE1_MODEL_FIELDS
  + ("model.num_layers", "model.cond_channels", "model.options"),
  ("model.name", "classifier"): _STAGE1_MODEL_FIELDS
  + _PIXELSNAIL_ONLY_FIELDS
  + (
    "model.res_channels",
    "model.kernel_size",
    "model.num_layers",
    "model.cond_channels",
    "model.options",
  ),
  ("task", "autoencoder"): ("prior.level", "prior.class_conditional", "prior.num_classes")
  + _CLASSIFIER_FIELDS,
  ("task", "prior"): _CLASSIFIER_FIELDS,
  ("task", "classifier"): (
    "prior.level",
    "prior.class_conditional",
    "prior.num_classes",
    "vq.kind",
    "vq.num_codes",
    "vq.code_dim",
  )
  + _NEAREST_CODE_FIELDS
  + ("vq.temperature", "vq.kl_weight")
  + _VQ_IMPL_FIELDS
  + ("vq.options",),
  ("optim.name", "adam"): ("optim.weight_decay",),  # decoupled decay is adamw's
}


# The range of every numeric field: (kind, low, high), both ends included; kind "int" wants an
# integer (never a bool or a float), "float" any finite number; "prob" is [0, 1). A value out of
# range cannot be right (a negative step count "finished" untrained; a negative learning rate
# trained to a commitment loss of 1e31; image_size=1e9 or model.levels=10**6 in a damaged
# config.json failed deep inside NumPy or ran for minutes), so `validate` refuses it in one line.
_BIG = 2**31 - 1
_RANGES = {
  "data.image_size": ("int", 1, 65536),
  "data.channels": ("int", 1, 4),
  "data.batch_size": ("int", 1, _BIG),
  "data.eval_batch_size": ("int", 1, _BIG),
  "data.num_workers": ("int", 0, 4096),
  "data.worker_processes": ("int", 0, 4096),
  "data.synthetic_num_codes": ("int", 0, _BIG),
  "data.synthetic_examples": ("int", 1, _BIG),
  "model.channels": ("int", 1, 65536),
  "model.res_channels": ("int", 1, 65536),
  "model.num_res_blocks": ("int", 0, 1024),
  "model.levels": ("int", 1, 16),
  "model.first_stride": ("int", 1, 64),
  "model.level_stride": ("int", 1, 64),
  "model.downsample": ("int", 0, 16),
  "model.kernel_size": ("int", 1, 63),
  "model.num_layers": ("int", 1, 1024),
  "model.num_blocks": ("int", 1, 1024),
  "model.num_heads": ("int", 1, 1024),
  "model.dropout": ("prob", 0.0, 1.0),
  "model.cond_channels": ("int", 0, 65536),
  "model.num_cond_res_blocks": ("int", 0, 1024),
  "model.cond_res_channels": ("int", 0, 65536),
  "model.cond_res_kernel": ("int", 1, 63),
  "model.num_out_res_blocks": ("int", 0, 1024),
  "vq.num_codes": ("int", 1, 2**24),
  "vq.code_dim": ("int", 1, 65536),
  "vq.beta": ("float", 0.0, 1e6),
  "vq.decay": ("prob", 0.0, 1.0),
  "vq.eps": ("float", 0.0, 1.0),
  "vq.kmeans_iters": ("int", 0, 10**6),
  "vq.restart_after": ("int", 0, _BIG),
  "vq.temperature": ("float", 1e-6, 1e6),
  "vq.kl_weight": ("float", 0.0, 1e6),
  "prior.level": ("int", 0, 15),
  "prior.num_classes": ("int", 0, 2**24),
  "classifier.num_classes": ("int", 1, 2**24),
  "classifier.label_smoothing": ("prob", 0.0, 1.0),
  "classifier.stem_stride": ("int", 1, 64),
  "optim.lr": ("float", 1e-12, 1e30),  # huge ones make divergence tests
  "optim.b1": ("prob", 0.0, 1.0),
  "optim.b2": ("prob", 0.0, 1.0),
  "optim.weight_decay": ("float", 0.0, 1e3),
  "optim.warmup_steps": ("int", 0, _BIG),
  "optim.grad_clip": ("float", 0.0, 1e12),
  "train.steps": ("int", 1, _BIG),
  "ckpt.every_steps": ("int", 0, _BIG),
  "ckpt.keep": ("int", 1, 10**6),
  "log.every_steps": ("int", 1, _BIG),
  "log.eval_every_steps": ("int", 0, _BIG),
  "log.eval_batches": ("int", 0, _BIG),
  "log.image_every_steps": ("int", 0, _BIG),
  "log.num_images": ("int", 0, 4096),
  "mesh.data": ("int", -1, 2**20),
  "mesh.fsdp": ("int", 1, 2**20),
  "mesh.fsdp_min_size": ("int", 0, 2**62),
}


def check_ranges(config: ml_collections.ConfigDict) -> None:
  """UserError (one line, naming the field) unless every field of `_RANGES` that the config
  has holds a number of its kind inside its range."""
  for field, (kind, low, high) in _RANGES.items():
    group, name = field.split(".")
    if group not in config or name not in config[group]:
      continue
    value = config[group][name]
    if kind == "int":
      ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
      want = f"an integer in [{low}, {high}]"
    else:
      ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and low <= value <= high
        and (kind != "prob" or value < high)
      )
      want = f"a number in [{low}, {high}{')' if kind == 'prob' else ']'}"
    if not ok:
      raise errors.UserError(f"config.{field}={value!r} cannot be right: it must be {want}")
  if config.mesh.data == 0:
    raise errors.UserError("config.mesh.data=0 cannot be right: use -1 (all devices) or >= 1")


# Data fields read by some sources only: field -> the data.name values that read it. A field
# set for another source is an error (a prior's `:smoke` given --config.data.codes_dir trained
# on synthetic codes with exit 0).
DATA_SOURCE_FIELDS = {
  "data.folder": ("folder", "prepared"),  # prepared: checked against what was prepared
  "data.codes_dir": ("codes",),
  "data.prepared_dir": ("prepared",),
  "data.synthetic_shapes": ("synthetic_codes",),
  "data.synthetic_num_codes": ("synthetic_codes",),
  "data.synthetic_examples": ("synthetic_codes",),
}


# What a plugin quantizer / model reads of its group; the group's other fields are the
# built-ins' and are ignored for it (vqjax/plugins.py).
_PLUGIN_READS = {
  "vq.kind": ("vq.kind", "vq.num_codes", "vq.code_dim", "vq.options"),
  "model.name": ("model.name", "model.dtype", "model.param_dtype", "model.options"),
}
# Free-form groups: a plugin's own settings, any keys (read from a config.json as they are).
FREE_FORM_FIELDS = ("vq.options", "model.options")


def _ignored_fields(config: ml_collections.ConfigDict):
  """(selector, its value, the fields nothing reads with it) for the config's selectors."""
  for (selector, selected), fields in IGNORED_FIELDS.items():
    if _get(config, selector) == selected:
      yield selector, selected, fields
  for selector, reads in _PLUGIN_READS.items():
    value = _get(config, selector)
    what = "quantizer" if selector == "vq.kind" else "model"
    if not plugins.is_builtin(what, value):
      group = selector.partition(".")[0]
      fields = [f"{group}.{k}" for k in configs.base_config()[group]]
      yield selector, value, tuple(f for f in fields if f not in reads)


def _check_plugins(config: ml_collections.ConfigDict) -> None:
  """A quantizer kind / model name is a built-in or a plugin that can be found; a plugin
  quantizer checks its own settings (`from_config(config.vq)`). A plugin model's are checked
  when it is built, as they may need what the run fills in (a prior's code shapes)."""
  if not plugins.is_builtin("model", config.model.name):
    plugins.find("model", config.model.name)
  if config.task != "classifier" and not plugins.is_builtin("quantizer", config.vq.kind):
    plugins.kwargs_from_config("quantizer", config.vq.kind, config.vq)


def _get(config: ml_collections.ConfigDict, dotted: str):
  group, _, field = dotted.rpartition(".")
  value = (config[group] if group else config)[field]
  # A free-form group as a plain dict (ConfigDicts locked and unlocked compare unequal).
  return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks a config before a run: numeric fields lie in their ranges (`check_ranges`), choice
  fields hold a known value, and no field that the chosen model or quantizer ignores differs
  from its `configs.base_config()` default.

  Args:
    config: a full config (from an experiment, with overrides).

  Raises:
    errors.UserError: one line naming the offending field(s).
  """
  check_ranges(config)
  for field, allowed in _CHOICES.items():
    value = _get(config, field)
    if value not in allowed:
      raise errors.UserError(
        f"config.{field}={value!r} is not one of {', '.join(map(repr, allowed))}"
      )
  _check_plugins(config)
  if config.vq.matmul_impl == "bf16" and config.model.dtype != "bfloat16":
    raise errors.UserError(
      "config.vq.matmul_impl='bf16' needs config.model.dtype='bfloat16' (its products are "
      f"exact only for bfloat16 inputs), got {config.model.dtype!r}; use 'auto' or 'float32'"
    )
  if config.model.channel_multiple < -1:  # (an int: ConfigDict refuses other types)
    raise errors.UserError(
      "config.model.channel_multiple must be an integer >= -1 (-1 = auto, 0 = no padding), "
      f"got {config.model.channel_multiple!r}"
    )
  excluded = config.data.exclude_labels
  if not all(isinstance(v, int) and not isinstance(v, bool) for v in excluded):
    raise errors.UserError(f"config.data.exclude_labels must be integers, got {excluded!r}")
  if excluded and config.data.reader == "tfdata":
    raise errors.UserError(
      "config.data.exclude_labels needs a random-access reader; reader='tfdata' cannot filter"
    )
  defaults = configs.base_config()
  for field, names in DATA_SOURCE_FIELDS.items():
    if config.data.name not in names and _get(config, field) != _get(defaults, field):
      raise errors.UserError(
        f"config.{field}={_get(config, field)!r} is ignored by data.name="
        f"{config.data.name!r} (only {' / '.join(map(repr, names))} read it); leave it at the "
        "default or choose that data.name"
      )
  for selector, selected, fields in _ignored_fields(config):
    changed = [
      f"config.{f}={_get(config, f)!r}" for f in fields if _get(config, f) != _get(defaults, f)
    ]
    if changed:
      raise errors.UserError(
        f"{', '.join(changed)} {'is' if len(changed) == 1 else 'are'} ignored by "
        f"{selector}={selected!r}; leave {'it' if len(changed) == 1 else 'them'} at the "
        f"default or choose another {selector}"
      )


# ---- saved configs ---------------------------------------------------------------------------


def _merge_known(config: ml_collections.ConfigDict, values: dict, what: str, prefix="") -> None:
  # Onto the current schema, so fields added since the file was written keep their defaults,
  # while a field the schema no longer has is an error rather than silently dropped.
  for key, value in values.items():
    name = f"{prefix}{key}"
    if name in FREE_FORM_FIELDS and isinstance(value, dict):
      config[key] = value  # a plugin's own settings: its from_config checks them
      continue
    if key not in config:
      raise errors.UserError(f"{what} has a field {name!r} that vqjax's config does not know")
    if isinstance(config[key], ml_collections.ConfigDict):
      if not isinstance(value, dict):
        raise errors.UserError(f"{what} field {name!r} should be a group, got {value!r:.80}")
      _merge_known(config[key], value, what, f"{name}.")
    else:
      try:
        config[key] = value
      except TypeError:  # ConfigDict keeps each field's type: 1e9 for an integer field
        raise errors.UserError(
          f"{what} field {name}={value!r:.80} has the wrong type: it must be "
          f"{type(config[key]).__name__}"
        ) from None


def read_config(path: str) -> ml_collections.ConfigDict:
  """Reads a config written with `ConfigDict.to_json()` (a converted model's config.json,
  `vqjax.convert`) onto `configs.base_config()`.

  Args:
    path: the JSON file.

  Returns:
    The config, checked as a training config is (`validate`: ranges, choices, ignored fields).

  Raises:
    errors.UserError: one line naming the file (and the field): not JSON, not an object, an
      unknown field, a value of the wrong type or out of range. A damaged config.json used to
      give a 39-line traceback, an AttributeError, NumPy's "array is too big" or a hang.
  """
  try:
    with epath.Path(path).open() as f:
      values = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    where = f" (line {e.lineno}, column {e.colno})" if hasattr(e, "lineno") else ""
    raise errors.UserError(
      f"{path} is damaged: not valid JSON{where}: {getattr(e, 'msg', e)}"
    ) from None
  if not isinstance(values, dict):
    raise errors.UserError(
      f"{path} is damaged: it must hold a JSON object of config groups, not a "
      f"{type(values).__name__}"
    )
  config = configs.base_config()
  _merge_known(config, configs.drop_retired(values), path)
  try:
    validate(config)
  except errors.UserError as e:
    raise errors.UserError(f"{path}: {e}") from None
  return config
