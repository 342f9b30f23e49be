"""Quantizers and models found by name: a new one is one file plus one experiment config.

`config.vq.kind` and `config.model.name` hold either a built-in short name ("vq", "gumbel";
"vqvae", "vqvae2", "pixelcnn", "pixelsnail", "classifier": built by models/registry.py), a name
registered from Python (`register_quantizer` / `register_model`), or an import path,
"package.module:Name" (the object `Name` of that module) or "package.module" (the module
itself), imported with importlib when first asked for, as big_vision finds its models.

A plugin (a class or a Python module) provides:
  from_config(config) -> dict   its constructor keyword arguments, read from the config and
                                checked (one-line `errors.UserError`s); a quantizer gets
                                `config.vq`, a model the full config. Its own settings live in
                                the free-form `config.vq.options` / `config.model.options`.
  the Flax module class         the plugin itself when it is a class, else its `Module`.
The built-in-only flat fields (vq.beta, model.levels, ...) are ignored for a plugin, so
`config_checks.validate` refuses them changed, as for a built-in that ignores them.

Contracts (see models/registry.py for the autoencoders' and models/quantizer.py for details):
  quantizer  Module(**kwargs, dtype=..., param_dtype=...); kwargs include num_codes and
             code_dim; `__call__(z [..., code_dim], train) -> (z_q, aux)` with aux "indices"
             (int32 [...]), "latent_loss", "commitment" (float32 scalars), "counts" (int32
             [num_codes]), "perplexity", "usage", "top_share" (models/quantizer.py
             usage_metrics); `lookup(indices) -> [..., code_dim]`. Random numbers come from the
             "vq" rng; state other than parameters lives in the "vq_state" collection.
  model      Module(**kwargs, dtype=..., param_dtype=...) following the contract of the task
             that trains it (`config.task`): models/registry.py for an autoencoder; a prior is
             called as PixelCNN / PixelSNAIL are, `(codes [B, h, w] int32, condition=...,
             label=..., train=...) -> logits [B, h, w, num_codes]` (vqjax/models/prior.py); a
             prior class that sets `decode_mode = True` and implements that file's decode mode
             is sampled by the cached sampler, any other by the full-recompute one.

This module sits with the config schema (the lowest layer): it imports nothing of vqjax's but
the errors, and only what a user names.
"""

import importlib
from typing import Any

from vqjax import errors

# Handled by models/registry.py (kept here so that the config layer knows them without it).
BUILTIN_QUANTIZERS = ("vq", "gumbel")
BUILTIN_MODELS = ("vqvae", "vqvae2", "pixelcnn", "pixelsnail", "classifier")

_REGISTERED: dict[str, dict[str, Any]] = {"quantizer": {}, "model": {}}
_FIELDS = {"quantizer": "config.vq.kind", "model": "config.model.name"}
_BUILTIN = {"quantizer": BUILTIN_QUANTIZERS, "model": BUILTIN_MODELS}


def _register(what: str, name: str, plugin: Any) -> None:
  if not isinstance(name, str) or not name or name in _BUILTIN[what] or ":" in name:
    raise errors.UserError(
      f"cannot register a {what} as {name!r}: use a new short name (the built-ins are "
      f"{', '.join(_BUILTIN[what])})"
    )
  _check_plugin(what, name, plugin)
  _REGISTERED[what][name] = plugin


def register_quantizer(name: str, plugin: Any) -> None:
  """Makes `config.vq.kind=name` build `plugin` (a class or module, see the docstring).
  Registering a name again replaces it."""
  _register("quantizer", name, plugin)


def register_model(name: str, plugin: Any) -> None:
  """Makes `config.model.name=name` build `plugin` (a class or module, see the docstring).
  Registering a name again replaces it."""
  _register("model", name, plugin)


def is_builtin(what: str, name: str) -> bool:
  """Whether `name` is one of the built-in quantizer kinds / model names."""
  return name in _BUILTIN[what]


def module_class(plugin: Any) -> Any:
  """The Flax module class of a plugin: the plugin itself if it is a class, else `Module`."""
  return plugin if isinstance(plugin, type) else plugin.Module


def _check_plugin(what: str, name: str, plugin: Any) -> None:
  missing = [
    attr
    for attr in ("from_config",) + (() if isinstance(plugin, type) else ("Module",))
    if not callable(getattr(plugin, attr, None))
  ]
  if missing:
    raise errors.UserError(
      f"{_FIELDS[what]}={name!r} has no {' and no '.join(missing)}: a {what} plugin is a class "
      "with from_config(config), or a module with from_config(config) and Module"
    )


def find(what: str, name: str) -> Any:
  """The plugin `name` names: a registered one, else the import path's object.

  Args:
    what: "quantizer" or "model".
    name: a registered short name, "package.module:Name" or "package.module" (not a built-in:
      those are models/registry.py's).

  Returns:
    The class or module.

  Raises:
    errors.UserError: one line naming the field, for an unknown short name, a module that
      cannot be imported, a missing attribute or an object without `from_config`.
  """
  field = _FIELDS[what]
  if name in _REGISTERED[what]:
    return _REGISTERED[what][name]
  known = ", ".join(list(_BUILTIN[what]) + sorted(_REGISTERED[what]))
  if not isinstance(name, str) or not name or (":" not in name and "." not in name):
    raise errors.UserError(
      f"{field}={name!r} is not one of {known}, nor a name given to register_{what}, nor an "
      "import path 'package.module:Name'"
    )
  module_name, _, attr = name.partition(":")
  try:
    module = importlib.import_module(module_name)
  except Exception as e:  # noqa: BLE001 - any failure of a user's module is the user's to fix
    raise errors.UserError(
      f"{field}={name!r}: cannot import {module_name!r}: {type(e).__name__}: {e}"
    ) from None
  plugin = module
  if attr:
    plugin = getattr(module, attr, None)
    if plugin is None:
      raise errors.UserError(f"{field}={name!r}: module {module_name!r} has no {attr!r}")
  _check_plugin(what, name, plugin)
  return plugin


def kwargs_from_config(what: str, name: str, config: Any) -> dict:
  """`find(what, name).from_config(config)`, checked to be a dict (the constructor kwargs)."""
  kwargs = find(what, name).from_config(config)
  if not isinstance(kwargs, dict):
    raise errors.UserError(
      f"{_FIELDS[what]}={name!r}: from_config returned a {type(kwargs).__name__}, not a dict "
      "of constructor arguments"
    )
  return kwargs
