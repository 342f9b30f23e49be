"""Helpers shared by the data tests (imported by test_data.py and test_data_tfds.py)."""

from vqjax.configs import base_config


def data_config(tmp_path, **overrides):
  c = base_config().data
  c.local_dir = str(tmp_path / "fmnist")
  c.data_dir = str(tmp_path / "cache")
  c.reader = "local"
  c.batch_size = 10
  c.eval_batch_size = 8
  for k, v in overrides.items():
    c[k] = v
  return c


def take(it, n):
  """The next n batches of an iterator."""
  return [next(it) for _ in range(n)]
