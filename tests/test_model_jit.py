"""vqjax/evaluation/model_jit.py: one jitted function per model, found by identity, the last few
kept."""

import numpy as np

from vqjax.evaluation import model_jit


class _Unhashable:
  __hash__ = None  # like a linen module holding dicts

  def __init__(self, scale):
    self.scale = scale


def _counting_builder():
  """A `per_model` function scaling by the model's scale, and the list of models it built for."""
  built = []

  @model_jit.per_model
  def scaled(model):
    built.append(model)
    return lambda x: x * model.scale

  return scaled, built


def test_built_once_per_model_and_the_oldest_dropped():
  scaled, built = _counting_builder()

  a, b = _Unhashable(2.0), _Unhashable(3.0)
  assert float(scaled(a)(np.float32(1.5))) == 3.0
  assert float(scaled(b)(np.float32(1.5))) == 4.5
  assert scaled(a) is scaled(a) and built == [a, b]
  # An equal but distinct model is another model.
  twin = _Unhashable(2.0)
  scaled(twin)
  assert built == [a, b, twin]
  others = [_Unhashable(float(i)) for i in range(model_jit.MAX_MODELS)]
  for m in others:
    scaled(m)
  scaled(a)  # pushed out by the MAX_MODELS newer ones: built again
  assert built[-1] is a and len(built) == 3 + model_jit.MAX_MODELS + 1


def test_a_model_in_use_stays_while_newer_ones_come():
  scaled, built = _counting_builder()

  a = _Unhashable(2.0)
  scaled(a)
  for i in range(2 * model_jit.MAX_MODELS):
    scaled(_Unhashable(float(i)))
    scaled(a)  # used again after each newcomer: never the least recently used
  assert built.count(a) == 1
