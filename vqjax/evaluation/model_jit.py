"""`jax.jit` per model, for functions that close over a linen module.

A linen module holding dicts cannot be hashed, so `jax.jit` cannot take it as a static
argument; the function is built around the module instead and kept by the module's identity.
The few most recently used are kept, so scoring one run after another does not recompile.
"""

from collections.abc import Callable
from typing import Any

import jax

MAX_MODELS = 4


def per_model(build: Callable[[Any], Callable]) -> Callable[[Any], Callable]:
  """Decorator: `build(model)` returns a function of arrays; the decorated `get(model)` returns
  it jitted, built once per model (found by identity) among the `MAX_MODELS` last used."""
  kept: list[tuple[Any, Callable]] = []

  def get(model: Any) -> Callable:
    for i, (m, fn) in enumerate(kept):
      if m is model:
        kept.insert(0, kept.pop(i))  # the most recently used first
        return fn
    fn = jax.jit(build(model))
    kept.insert(0, (model, fn))
    del kept[MAX_MODELS:]
    return fn

  get.__doc__ = build.__doc__
  return get
