"""Device mesh, parameter and batch shardings, and multi-host helpers.

One 2-D mesh with axes ("data", "fsdp") serves every stage. Batches are split over both axes
(every device sees a different slice of the global batch); parameters are either replicated
or, when large enough, split along one dimension over "fsdp" (ZeRO-3 style: XLA inserts the
all-gathers and reduce-scatters). Code everywhere else works with global `jax.Array`s and
never calls psum, pmap or shard_map for data parallelism.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vqjax import errors

AXES = ("data", "fsdp")
# The batch dimension is split over both axes: fsdp devices hold different examples too.
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int]:
  """Resolves (data, fsdp) sizes from `config.mesh`, where one of them may be -1.

  Args:
    mesh_config: `config.mesh` with integer `data` and `fsdp`.
    num_devices: devices available to the mesh.

  Returns:
    (data, fsdp) with data * fsdp == num_devices.
  """
  data, fsdp = int(mesh_config.data), int(mesh_config.fsdp)
  if data == -1 and fsdp == -1:
    raise errors.UserError("config.mesh: only one of data and fsdp may be -1")
  if data == -1:
    if num_devices % fsdp:
      raise errors.UserError(f"config.mesh.fsdp={fsdp} does not divide the {num_devices} devices")
    data = num_devices // fsdp
  elif fsdp == -1:
    if num_devices % data:
      raise errors.UserError(f"config.mesh.data={data} does not divide the {num_devices} devices")
    fsdp = num_devices // data
  if data * fsdp != num_devices or data < 1 or fsdp < 1:
    raise errors.UserError(
      f"config.mesh data={data} x fsdp={fsdp} does not match the {num_devices} devices "
      "(set one axis to -1 to use all devices)"
    )
  return data, fsdp


def make_mesh(
  mesh_config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """Builds the ("data", "fsdp") mesh over `devices` (default: all devices of all processes).

  Args:
    mesh_config: `config.mesh`.
    devices: an explicit device list, e.g. a subset in tests; None = `jax.devices()`.

  Returns:
    A `Mesh` with Auto axis types, so XLA propagates shardings inside jitted functions.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int) -> P:
  """The FSDP rule: split the largest dimension divisible by the fsdp size, else replicate.

  Args:
    shape: the parameter's shape.
    fsdp_size: number of devices on the "fsdp" axis.
    min_size: parameters with fewer elements stay replicated (gathering them costs more
      than the memory they take).

  Returns:
    A PartitionSpec for the parameter.
  """
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  # Largest dimension first; ties go to the later (usually output-feature) dimension.
  order = sorted(range(len(shape)), key=lambda i: (shape[i], i), reverse=True)
  for i in order:
    if shape[i] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[i] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh, min_size: int) -> Any:
  """Shardings for a train state: FSDP rule for every array leaf (step counters replicate).

  Args:
    abstract_state: a pytree of `jax.ShapeDtypeStruct` (from `jax.eval_shape`).
    mesh: the ("data", "fsdp") mesh.
    min_size: `config.mesh.fsdp_min_size`.

  Returns:
    A pytree of `NamedSharding` with the structure of `abstract_state`.
  """
  fsdp_size = mesh.shape["fsdp"]
  return jax.tree.map(
    lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp_size, min_size)), abstract_state
  )


def replicated(mesh: Mesh) -> NamedSharding:
  """A sharding that keeps a full copy on every device (scalars, metrics, rng keys)."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch: leading (example) dimension split over every mesh axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


def create_sharded_state(
  init_fn: Callable[..., Any], mesh: Mesh, min_size: int, *args: Any
) -> tuple[Any, Any]:
  """Creates a state directly in its final sharding (never materialised on one device).

  Args:
    init_fn: a pure function `*args -> state` (traced twice: shapes, then the real init).
    mesh: the mesh.
    min_size: `config.mesh.fsdp_min_size`.
    *args: arguments of `init_fn` (rng keys, example batches).

  Returns:
    (state, shardings), the state a pytree of global `jax.Array`s.
  """
  shardings = state_shardings(jax.eval_shape(init_fn, *args), mesh, min_size)
  return init_sharded(init_fn, shardings, *args), shardings


def init_sharded(init_fn: Callable[..., Any], shardings: Any, *args: Any) -> Any:
  """Runs `init_fn(*args)` compiled to write each leaf straight into its sharding."""
  return jax.jit(init_fn, out_shardings=shardings)(*args)


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's local batch into global arrays split over the batch axes.

  Args:
    batch: host-local numpy arrays whose leading dimension is this process's share.
    mesh: the mesh.

  Returns:
    Global arrays of leading size local_batch * process_count.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  """Fails early, with the numbers, if the batch does not split over the mesh."""
  n = mesh.devices.size
  if global_batch_size % n:
    raise errors.UserError(
      f"config.data.batch_size={global_batch_size} is not divisible by the {n} devices of "
      f"the mesh {dict(mesh.shape)}"
    )


def to_host(tree: Any) -> Any:
  """Pulls replicated (or fully addressable) arrays to host numpy, one transfer per leaf."""
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def all_finite(tree: Any) -> jax.Array:
  """True when every floating leaf of `tree` is finite (reduced on device)."""
  leaves = [
    jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
