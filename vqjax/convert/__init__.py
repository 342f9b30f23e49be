"""Import weights trained elsewhere and store them in vqjax's own format.

A converted model is a directory:
  config.json  `vqjax.configs.base_config()` with the model.*, vq.* and data.channels fields
               of the imported model (`ConfigDict.to_json()`);
  run.json     its run id (training/identity.py), new at each conversion;
  variables/   an Orbax `StandardCheckpointer` checkpoint of {"params", "vq_state"}.
`save_converted` writes one and `load_converted` reads it back. Converters live one per
source in this package (`rosinality.py`); `python -m vqjax.convert --help` lists commands.
"""

import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from vqjax import paths
from vqjax.config_checks import read_config
from vqjax.convert.rosinality import convert_vqvae2, load_vqvae2
from vqjax.models import registry
from vqjax.training import identity

# read_config lives with the config checks (vqjax/config_checks.py): `vqjax.load_run` reads a
# converted directory without importing the converters.
__all__ = ["convert_vqvae2", "load_converted", "load_vqvae2", "read_config", "save_converted"]

CONFIG_FILE = "config.json"
VARIABLES_DIR = "variables"


def save_converted(
  out_dir: str, config: ml_collections.ConfigDict, variables: Any, force: bool = False
) -> None:
  """Writes OUT_DIR/config.json and the OUT_DIR/variables Orbax checkpoint.

  Args:
    out_dir: the directory to write (created if needed).
    config: the config of the model the variables belong to.
    variables: {"params": ..., "vq_state": ...}.
    force: overwrite an existing OUT_DIR/variables.
  """
  out_dir = paths.absolute(out_dir)
  target = os.path.join(out_dir, VARIABLES_DIR)
  if epath.Path(target).exists() and not force:
    raise FileExistsError(f"{target} already exists; pass force=True (--force) to overwrite")
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  with epath.Path(out_dir, CONFIG_FILE).open("w") as f:
    f.write(config.to_json(indent=2) + "\n")
  # New weights, a new identity (training/identity.py), even over an older conversion.
  if epath.Path(out_dir, identity.RUN_FILE).exists():
    epath.Path(out_dir, identity.RUN_FILE).unlink()
  identity.ensure_run_id(out_dir)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(
    target, {"params": variables["params"], "vq_state": variables["vq_state"]}, force=force
  )
  checkpointer.wait_until_finished()
  checkpointer.close()


def load_converted(out_dir: str):
  """Reads a directory written by `save_converted` (e.g. by `python -m vqjax.convert`).

  Args:
    out_dir: the directory holding config.json and variables/.

  Returns:
    (config, model, variables): the model is `registry.build_model(config)`; variables are
    {"params", "vq_state"} jax arrays on the default device.
  """
  out_dir = paths.absolute(out_dir)
  config_path = os.path.join(out_dir, CONFIG_FILE)
  target = os.path.join(out_dir, VARIABLES_DIR)
  for path in (config_path, target):
    if not epath.Path(path).exists():
      raise FileNotFoundError(f"{path} not found: {out_dir} is not a converted model directory")
  config = read_config(config_path)
  model = registry.build_model(config)
  size = registry.total_stride(config)
  x = jax.numpy.zeros((1, size, size, config.data.channels), jax.numpy.float32)
  abstract = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract
  )
  checkpointer = ocp.StandardCheckpointer()
  try:
    variables = checkpointer.restore(target, abstract)
  finally:
    checkpointer.close()
  return config, model, dict(variables)
