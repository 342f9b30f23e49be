"""Tests of vqjax/config_checks.py: the fields a model, quantizer, task or data source ignores
(found by reading the registry, not from a list), unknown choices, values out of range."""

import ml_collections
import pytest

from vqjax import config_checks, configs, errors
from vqjax.models import registry

# --- validation ---------------------------------------------------------------------------------


class _Recorder:
  """A read-only view of a ConfigDict that records which dotted fields are read."""

  def __init__(self, config, seen, prefix=""):
    self._config, self._seen, self._prefix = config, seen, prefix

  def __getattr__(self, name):
    value = self._config[name]
    if isinstance(value, ml_collections.ConfigDict):
      return _Recorder(value, self._seen, f"{self._prefix}{name}.")
    self._seen.add(f"{self._prefix}{name}")
    return value


def _fields(group: str) -> set[str]:
  return {f"{group}.{k}" for k in configs.base_config()[group]}


def _read_by_quantizer(kind: str) -> set[str]:
  config = configs.base_config()
  config.vq.kind = kind
  seen = set()
  registry.quantizer_kwargs(_Recorder(config.vq, seen, "vq."))
  registry.quantizer_forms(_Recorder(config.vq, seen, "vq."))  # its forms (models/impl.py)
  return seen


def _read_by_model(name: str) -> set[str]:
  config = configs.base_config()
  config.model.name = name
  config.prior.code_shapes = [[8, 8]]  # what a prior run fills in from its code dataset
  seen = set()
  registry.MODELS[name](_Recorder(config, seen), None, None)
  # build_model reads these itself, for every model.
  return seen | {"model.name", "model.dtype", "model.param_dtype"}


# Which field values no code reads, found by reading the registry rather than from a list.
IGNORED = [("vq.kind", k, _fields("vq") - _read_by_quantizer(k)) for k in ("vq", "gumbel")] + [
  ("model.name", n, _fields("model") - _read_by_model(n)) for n in sorted(registry.MODELS)
]


def _other_value(field: str, value):
  """A valid value different from `value` for a field."""
  if isinstance(value, bool):
    return not value
  if isinstance(value, float) and 0 <= value < 1:  # probabilities and rates stay in range
    return value / 2 if value else 0.5
  if isinstance(value, (int, float)):
    return value + 1
  if isinstance(value, ml_collections.ConfigDict):  # vq.options, model.options: a plugin's
    return {"seed": 1}
  other = {"vq.init": "normal", "vq.stats_impl": "scatter", "vq.distance_impl": "xla"}
  other["vq.matmul_impl"] = "float32"
  other["model.causal_conv_impl"] = "split"
  return other.get(field, "lax")  # model.upconv_impl, model.downconv_impl


def _set(config, field, value):
  group, _, name = field.partition(".")
  config[group][name] = value


def test_the_ignored_fields_found_match_the_brief():
  # A guard on the recorder itself: the Gumbel quantizer reads none of the EMA/commitment
  # settings, and each model reads the stride fields of the other not at all.
  ignored = {(s, v): f for s, v, f in IGNORED}
  # (vq.options and model.options are a plugin's: no built-in reads them.)
  assert len(ignored[("vq.kind", "gumbel")]) == 12 and "vq.beta" in ignored[("vq.kind", "gumbel")]
  assert ignored[("vq.kind", "vq")] == {"vq.temperature", "vq.kl_weight", "vq.options"}
  assert {"model.levels", "model.first_stride", "model.level_stride"} <= ignored[
    ("model.name", "vqvae")
  ]
  assert "model.downsample" in ignored[("model.name", "vqvae2")]
  assert "model.levels" not in ignored[("model.name", "vqvae2")]
  # The autoencoders read none of the priors' fields, and the priors none of theirs.
  for name in ("vqvae", "vqvae2"):
    assert {"model.attention", "model.num_layers", "model.kernel_size"} <= ignored[
      ("model.name", name)
    ]
  assert "model.attention" not in ignored[("model.name", "pixelsnail")]
  assert "model.num_layers" in ignored[("model.name", "pixelsnail")]
  assert "model.num_layers" not in ignored[("model.name", "pixelcnn")]
  assert "model.upconv_impl" in ignored[("model.name", "pixelcnn")]


@pytest.mark.parametrize(
  "selector,selected,fields", IGNORED, ids=[f"{s}={v}" for s, v, _ in IGNORED]
)
def test_validate_rejects_each_ignored_field(selector, selected, fields):
  base = configs.base_config()
  _set(base, selector, selected)
  config_checks.validate(base)  # the defaults are fine
  for field in sorted(fields):
    config = configs.base_config()
    _set(config, selector, selected)
    group, _, name = field.partition(".")
    _set(config, field, _other_value(field, base[group][name]))
    with pytest.raises(errors.UserError) as e:
      config_checks.validate(config)
    assert f"config.{field}=" in str(e.value) and f"{selector}={selected!r}" in str(e.value)


def test_validate_accepts_the_read_fields_of_the_other_kind():
  # The fields one kind ignores are exactly those the other reads: changing them is fine there.
  config = configs.base_config()
  config.vq.update(kind="gumbel", temperature=0.5, kl_weight=0.0)
  config.model.update(name="vqvae", downsample=3)
  config_checks.validate(config)
  config = configs.base_config()
  config.vq.update(kind="vq", beta=0.5, ema=False, init="normal", restart_after=0)
  config.model.update(name="vqvae2", levels=3, first_stride=2, level_stride=4)
  config_checks.validate(config)


def test_validate_rejects_weight_decay_that_adam_ignores():
  config = configs.base_config()
  config.optim.weight_decay = 1e-4
  with pytest.raises(
    errors.UserError,
    match=r"optim\.weight_decay=0\.0001 is ignored by "
    r"optim\.name='adam'",
  ):
    config_checks.validate(config)
  config.optim.name = "adamw"
  config_checks.validate(config)


@pytest.mark.parametrize(
  "field,bad",
  [
    ("model.dtype", "fp16"),
    ("model.param_dtype", "float64"),
    ("model.name", "vqvae3"),
    ("vq.kind", "fsq"),
    ("vq.init", "zeros"),
    ("optim.schedule", "linear"),
    ("optim.name", "sgd"),
    ("data.reader", "tfds"),
    ("data.resize", "crop"),
    ("model.upconv_impl", "conv"),
    ("distributed.initialize", "maybe"),
  ],
)
def test_validate_rejects_unknown_choices(field, bad):
  config = configs.base_config()
  _set(config, field, bad)
  with pytest.raises(errors.UserError, match=rf"config\.{field}='{bad}' is not one of"):
    config_checks.validate(config)


def test_the_config_names_the_models_and_dtypes_the_registry_builds():
  # config_checks.py is below models/ (tests/test_layers_imports.py): it keeps the names, the
  # registry the builders.
  assert config_checks.MODEL_NAMES == tuple(registry.MODELS)
  assert config_checks.DTYPE_NAMES == tuple(registry.DTYPES)
  assert set(registry.AUTOENCODERS + registry.PRIORS) < set(registry.MODELS)


@pytest.mark.parametrize(
  "field,value",
  [
    ("train.steps", -5),  # saved an untrained step 0 and reported "done"
    ("train.steps", 0),
    ("optim.lr", -1.0),  # trained to a commitment loss of 1.5e31
    ("optim.lr", float("nan")),
    ("data.image_size", 10**9),  # numpy's "array is too big"
    ("data.batch_size", 0),
    ("model.levels", 1000000),  # load_run ran for minutes
    ("model.dropout", 1.0),
    ("vq.decay", 1.5),
    ("mesh.data", 0),
  ],
)
def test_values_that_cannot_be_right_are_one_line_errors(field, value):
  config = configs.base_config()
  group, _, name = field.partition(".")
  with config.unlocked():
    config[group][name] = value
  with pytest.raises(errors.UserError) as e:
    config_checks.validate(config)
  assert f"config.{field}=" in str(e.value) and "\n" not in str(e.value)


def test_every_shipped_config_lies_in_range():
  for name in configs.list_experiments():
    for variant in ("", ":smoke"):
      try:
        config = configs.load_experiment(name + variant)
      except errors.UserError:  # no such variant
        continue
      config_checks.check_ranges(config)


def test_a_data_field_the_source_ignores_is_an_error():
  """`fashion_mnist_prior_top.py:smoke --config.data.codes_dir=DIR` trained on synthetic codes
  with exit 0; now each source-specific field set for another source is one line."""
  config = configs.load_experiment("fashion_mnist_prior_top:smoke")
  config_checks.validate(config)
  config.data.codes_dir = "/some/codes"
  with pytest.raises(errors.UserError) as e:
    config_checks.validate(config)
  message = str(e.value)
  assert "config.data.codes_dir='/some/codes' is ignored by data.name='synthetic_codes'" in message
  assert "\n" not in message
  for field, value in (("folder", "/imgs"), ("prepared_dir", "/p"), ("synthetic_examples", 9)):
    config = configs.load_experiment("fashion_mnist:smoke")
    config.data[field] = value
    with pytest.raises(errors.UserError, match=f"config.data.{field}="):
      config_checks.validate(config)
