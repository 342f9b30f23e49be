"""Tests of vqjax/training/checkpoint.py and its records and checks (checkpoint_records.py,
checkpoint_integrity.py): restore onto another mesh (8 -> 4 devices), keep-N that never deletes
the last good step, damaged steps skipped with the file named, the data iterator state, and a
one-line error for a checkpoint of a different model."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vqjax import configs, errors
from vqjax.training import checkpoint, checkpoint_integrity, sharding, tasks, weights
from vqjax.training.checkpoint_records import config_changes, config_meta


class TinyAE(nn.Module):
  """A minimal model with the registry contract: one conv, an EMA code histogram, one conv."""

  features: int = 16
  num_codes: int = 8

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Conv(self.features, (3, 3))(x)
    codebook = self.param("codebook", nn.initializers.normal(1.0), (self.num_codes, self.features))
    ema = self.variable("vq_state", "ema_counts", jnp.zeros, (self.num_codes,))
    d = jnp.sum(jnp.square(h[..., None, :] - codebook), -1)
    idx = jnp.argmin(d, -1)
    counts = jnp.zeros(self.num_codes).at[idx.ravel()].add(1.0)
    if train:
      ema.value = 0.9 * ema.value + 0.1 * counts
    q = codebook[idx]
    zq = h + jax.lax.stop_gradient(q - h)
    recon = nn.Conv(x.shape[-1], (3, 3))(zq)
    mse = jnp.mean(jnp.square(recon - x))
    latent = jnp.mean(jnp.square(h - jax.lax.stop_gradient(q))) + jnp.mean(
      jnp.square(jax.lax.stop_gradient(h) - q)
    )
    p = counts / counts.sum()
    aux = {
      "loss": mse + latent,
      "mse": mse,
      "latent_loss": latent,
      "level0/perplexity": jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(p), 0.0))),
      "level0/usage": jnp.mean(counts > 0),
      "level0/top_share": jnp.max(p),
      "level0/counts": counts.astype(jnp.int32),
    }
    return recon, aux

  def encode_to_indices(self, x):
    h = nn.Conv(self.features, (3, 3), name="Conv_0")(x)
    codebook = self.param("codebook", nn.initializers.normal(1.0), (self.num_codes, self.features))
    return (jnp.argmin(jnp.sum(jnp.square(h[..., None, :] - codebook), -1), -1),)


def _config(features=16):
  c = configs.base_config()
  c.model.channels = features
  c.mesh.fsdp_min_size = 64
  return c


def _state(mesh, features=16, seed=0):
  task = tasks.AutoencoderTask(_config(features), model=TinyAE(features=features))
  init = lambda key: task.init(key, {"image": jnp.zeros((1, 8, 8, 1))})
  state, sh = sharding.create_sharded_state(init, mesh, 64, jax.random.key(seed))
  return task, state, sh


def _mesh(data, fsdp, devices=None):
  cfg = ml_collections.ConfigDict({"data": data, "fsdp": fsdp})
  return sharding.make_mesh(cfg, devices)


def test_save_on_8_devices_restore_on_4(tmp_path):
  mesh8 = _mesh(1, 8)
  _, state, _ = _state(mesh8)
  assert any("fsdp" in tuple(x.sharding.spec) for x in jax.tree.leaves(state.params))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=2)
  meta = config_meta(_config())
  ckpt.save(5, state, {"epoch": 0, "step": 5}, meta)
  ckpt.close()

  mesh4 = _mesh(2, 2, jax.devices()[:4])
  _, fresh, sh4 = _state(mesh4, seed=1)
  target = checkpoint.abstract_with_shardings(
    jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fresh), sh4
  )
  restored, data_state = checkpoint.Checkpointer(str(tmp_path / "ckpt")).restore(target)
  assert data_state == {"epoch": 0, "step": 5}
  leaves = zip(jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(sh4), strict=True)
  for a, b, s in leaves:
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding == s
    assert {d.id for d in a.sharding.device_set} <= {d.id for d in jax.devices()[:4]}
  assert type(restored) is tasks.TrainState


def test_keep_n_and_latest(tmp_path):
  mesh = _mesh(8, 1)
  _, state, _ = _state(mesh)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"), keep=2, async_save=True)
  meta = config_meta(_config())
  for step in (1, 2, 3, 4):
    ckpt.save(step, state, {"step": step}, meta)
  ckpt.wait()
  assert ckpt.all_steps() == [3, 4]
  assert ckpt.latest_step() == 4
  ckpt.close()


def test_keep_n_never_deletes_the_last_good_step_and_skips_bad_ones(tmp_path):
  mesh = _mesh(8, 1)
  _, state, _ = _state(mesh)
  meta = config_meta(_config())
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"), keep=2, async_save=False)
  ckpt.save(1, state, {}, meta)
  ckpt.mark_good([1])
  for step in (2, 3, 4):  # saved after a divergence began: never confirmed
    ckpt.save(step, state, {}, meta)
  assert ckpt.all_steps() == [1, 3, 4]  # keep-2 plus the last good one
  ckpt.mark_bad([3, 4])
  assert ckpt.latest_step() == 1
  assert ckpt.last_good_step() == 1
  ckpt.close()
  # The record survives a restart: a new Checkpointer resumes from the good step.
  again = checkpoint.Checkpointer(str(tmp_path / "c"), keep=2)
  assert again.latest_step() == 1 and again.bad_steps() == [3, 4]
  again.close()


def _with_data_record(tmp_path, step, record):
  """Rewrites step `step`'s data record (as a run on other processes would have saved it) and
  its checksums, so the step is intact."""
  with open(tmp_path / "c" / str(step) / "data" / "metadata", "w") as f:
    json.dump(record, f)
  checkpoint_integrity.write_checksums(str(tmp_path / "c"), step)


def test_data_positions_saved_on_other_process_counts(tmp_path):
  _, target, meta = _saved_run(tmp_path, steps=(1,))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"))
  # This process's own on as many processes (one here) as saved it.
  assert ckpt.restore(target, step=1, meta=meta)[1] == {"step": 1}
  # Saved on two hosts at one position: every process of this run continues from it.
  position = {"grain": {"next_index": 9}, "batch_size": 10}
  _with_data_record(tmp_path, 1, {"process_count": 2, "states": [position, position]})
  assert ckpt.restore(target, step=1, meta=meta)[1] == position
  # Two positions (per-host iterators that disagree): no single one to continue from.
  other = {"grain": {"next_index": 8}, "batch_size": 10}
  _with_data_record(tmp_path, 1, {"process_count": 2, "states": [position, other]})
  assert ckpt.restore(target, step=1, meta=meta)[1] is None


def _saved_run(tmp_path, steps=(1, 2)):
  mesh = _mesh(8, 1)
  _, state, sh = _state(mesh)
  meta = config_meta(_config())
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"), keep=5, async_save=False)
  for step in steps:
    ckpt.save(
      step,
      jax.tree.map(lambda x, s=step: x + s if x.dtype.kind == "f" else x, state),
      {"step": step},
      meta,
    )
  ckpt.close()
  target = checkpoint.abstract_with_shardings(
    jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state), sh
  )
  return state, target, meta


def _truncate_data_files(step_dir):
  files = [
    os.path.join(r, f)
    for r, _, fs in os.walk(os.path.join(step_dir, "state"))
    for f in fs
    if os.sep + "d" + os.sep in os.path.join(r, f)
  ]
  assert files
  for victim in files:  # as a copy cut short leaves them
    with open(victim, "r+b") as f:
      f.truncate(os.path.getsize(victim) // 2)


def _flip_bytes_in_largest_array_file(step_dir):
  """200 bytes inverted in the middle of the largest array file, its size kept: before
  checksums, such weights could stay finite and evaluate with exit 0 at 7x the MSE."""
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
  victim = max(files, key=os.path.getsize)
  size = os.path.getsize(victim)
  start = max(0, size // 2 - 100)
  with open(victim, "r+b") as f:
    f.seek(start)
    data = f.read(200)
    f.seek(start)
    f.write(bytes(b ^ 0xFF for b in data))
  assert os.path.getsize(victim) == size


def test_every_step_records_its_checksums(tmp_path):
  """The record lists every file of the step with the size and CRC-32 that zlib (not the
  code under test) gives for it."""
  import json
  import zlib

  _saved_run(tmp_path, steps=(1,))
  root = tmp_path / "c" / "1"
  with open(root / checkpoint_integrity.CHECKSUM_FILE) as f:
    record = json.load(f)["crc32"]
  on_disk = sorted(
    os.path.relpath(os.path.join(r, f), root)
    for r, _, fs in os.walk(root)
    for f in fs
    if f != checkpoint_integrity.CHECKSUM_FILE
  )
  assert sorted(record) == on_disk and any(p.startswith("state") for p in on_disk)
  for rel, (size, crc) in record.items():
    data = (root / rel).read_bytes()
    assert size == len(data) and crc == zlib.crc32(data)
  assert checkpoint_integrity.verify_checksums(str(tmp_path / "c"), 1)


def test_a_step_without_checksums_is_read_with_a_warning(tmp_path, caplog):
  _, target, meta = _saved_run(tmp_path, steps=(1,))
  os.remove(tmp_path / "c" / "1" / checkpoint_integrity.CHECKSUM_FILE)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"))
  with caplog.at_level("WARNING"):
    _, _, step = ckpt.restore_newest_intact(target, meta=meta)
  ckpt.close()
  assert step == 1 and any("no checksum record" in r.getMessage() for r in caplog.records)


def test_a_damaged_step_without_checksums_is_named_in_plain_words(tmp_path):
  """Without the checksum record, a truncated array file is found only by the read, and the
  error is TensorStore's: shortened to one line, without its pointer to the details (which
  prints as a bound method)."""
  _, target, meta = _saved_run(tmp_path, steps=(1,))
  os.remove(tmp_path / "c" / "1" / checkpoint_integrity.CHECKSUM_FILE)
  data = [p for p in (tmp_path / "c" / "1").rglob("*") if p.is_file() and "/d/" in str(p)]
  assert data, sorted((tmp_path / "c" / "1").rglob("*"))
  for path in data:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"))
  with pytest.raises(errors.CheckpointDamagedError, match="checkpoint step 1 .*is damaged") as e:
    ckpt.restore_newest_intact(target, meta=meta)
  ckpt.close()
  message = str(e.value)
  assert (
    "\n" not in message and "bound method" not in message and "TensorStore details" not in (message)
  )


def test_a_tensorstore_message_loses_its_pointer_to_the_details():
  text = (
    "DATA_LOSS: Error reading \"params\" in OCDBT database\n  [source locations='x.cc:1'] See "
    "full TensorStore details: <bound method PyCapsule.details of ValueError(...)>"
  )
  assert checkpoint_integrity.short_message(ValueError(text)) == (
    "DATA_LOSS: Error reading \"params\" in OCDBT database [source locations='x.cc:1']"
  )
  assert checkpoint_integrity.short_message(ValueError("")) == "ValueError"


def test_weights_that_are_not_finite_are_refused(tmp_path, caplog):
  """A step saved with a NaN in its weights (checksums intact) is damaged: the previous
  step is read instead, and alone it is one line naming the array."""
  mesh = _mesh(8, 1)
  _, state, sh = _state(mesh)
  meta = config_meta(_config())
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"), keep=5, async_save=False)
  ckpt.save(1, state, {"step": 1}, meta)
  poisoned = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
  ckpt.save(2, poisoned, {"step": 2}, meta)
  ckpt.close()
  target = checkpoint.abstract_with_shardings(
    jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state), sh
  )
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"))
  with pytest.raises(errors.CheckpointDamagedError, match="not finite") as e:
    ckpt.restore(target, step=2, meta=meta)
  assert "\n" not in str(e.value) and "params" in str(e.value)
  with caplog.at_level("WARNING"):
    _, _, step = ckpt.restore_newest_intact(target, meta=meta)
  ckpt.close()
  assert step == 1
  loaded = weights.restore_weights(str(tmp_path / "c"), target)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(loaded))
  with pytest.raises(errors.CheckpointDamagedError, match="not finite"):
    weights.restore_weights(str(tmp_path / "c"), target, step=2)


@pytest.mark.usefixtures("damaged_checkpoint_reads")
@pytest.mark.parametrize("damage", ["metadata", "manifest", "data", "commit", "flip"])
def test_damaged_latest_step_is_named_and_the_previous_one_restored(tmp_path, damage, caplog):
  state, target, meta = _saved_run(tmp_path)
  step_dir = str(tmp_path / "c" / "2")
  if damage == "metadata":
    os.remove(os.path.join(step_dir, "state", "_METADATA"))
  elif damage == "manifest":
    path = os.path.join(step_dir, "state", "manifest.ocdbt")
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  elif damage == "data":
    _truncate_data_files(step_dir)
  elif damage == "flip":
    _flip_bytes_in_largest_array_file(step_dir)
  else:
    os.remove(os.path.join(step_dir, "_CHECKPOINT_METADATA"))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"))
  if damage != "commit":  # without its commit record Orbax no longer lists the step at all
    with pytest.raises(errors.CheckpointDamagedError) as e:
      ckpt.restore(target, step=2, meta=meta)
    msg = str(e.value)
    assert "step 2" in msg and "\n" not in msg and len(msg) < 400
    if damage == "metadata":
      assert "state/_METADATA is missing" in msg
    if damage == "flip":
      assert "changed since it was saved" in msg
  restored, data_state, step = ckpt.restore_newest_intact(target, meta=meta)
  assert step == 1 and data_state == {"step": 1}
  expected = jax.tree.map(lambda x: x + 1 if x.dtype.kind == "f" else x, state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ckpt.close()
  # Weights only (ckpt.init_from, load_run): the same fallback, and one line for the step itself.
  loaded = weights.restore_weights(str(tmp_path / "c"), target)
  for a, b in zip(
    jax.tree.leaves(loaded),
    jax.tree.leaves({"params": expected.params, "model_state": expected.model_state}),
    strict=True,
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  if damage != "commit":
    with pytest.raises(errors.CheckpointDamagedError, match="step 2") as e:
      weights.restore_weights(str(tmp_path / "c"), target, step=2)
    assert "\n" not in str(e.value)


def test_every_step_damaged_is_one_clear_error(tmp_path):
  _, target, meta = _saved_run(tmp_path, steps=(1,))
  os.remove(str(tmp_path / "c" / "1" / "state" / "_METADATA"))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"))
  with pytest.raises(errors.CheckpointDamagedError, match="no intact checkpoint.*step 1"):
    ckpt.restore_newest_intact(target, meta=meta)
  ckpt.close()


def test_config_changes_lists_every_difference():
  a, b = _config(), _config()
  b.vq.beta = 5.0
  b.optim.lr = 1e-2
  changes = config_changes(config_meta(a), config_meta(b))
  assert changes == ["optim.lr: 0.0003 -> 0.01", "vq.beta: 0.25 -> 5.0"]


def test_fingerprint_covers_the_task_sections_only():
  a, b = _config(), _config()
  b.optim.lr = 1.0
  assert config_meta(a)["model_fingerprint"] == config_meta(b)["model_fingerprint"]
  b.vq.num_codes = 7
  assert config_meta(a)["model_fingerprint"] != config_meta(b)["model_fingerprint"]
  # A task that declares other sections is fingerprinted on those.
  assert (
    config_meta(a, ("task", "model"))["model_fingerprint"]
    == config_meta(b, ("task", "model"))["model_fingerprint"]
  )


def test_other_model_gives_one_line_error(tmp_path):
  mesh = _mesh(8, 1)
  _, state, _ = _state(mesh, features=16)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"))
  ckpt.save(1, state, {}, config_meta(_config(16)))
  ckpt.close()
  _, other, sh = _state(mesh, features=8)
  target = checkpoint.abstract_with_shardings(
    jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), other), sh
  )
  with pytest.raises(errors.CheckpointMismatchError) as e:
    checkpoint.Checkpointer(str(tmp_path / "c")).restore(target, meta=config_meta(_config(8)))
  msg = str(e.value)
  assert "\n" not in msg
  assert "shape (16,) in the checkpoint but (8,) in this model" in msg or "has shape" in msg
  assert "model.channels: 16 -> 8" in msg


def test_describe_mismatch_names_missing_and_extra_arrays():
  a = {"params": {"w": np.zeros((2, 3)), "b": np.zeros(3)}}
  b = {"params": {"w": np.zeros((2, 3)), "c": np.zeros(3)}}
  msg = checkpoint.describe_mismatch(a, b)
  assert "only in the checkpoint (e.g. params.b)" in msg
  assert "only in this model (e.g. params.c)" in msg
  assert checkpoint.describe_mismatch(a, a) is None
  assert "params.w has shape (2, 3) in the checkpoint but (3, 2)" in checkpoint.describe_mismatch(
    a, {"params": {"w": np.zeros((3, 2)), "b": np.zeros(3)}}
  )


def test_resolve_directory(tmp_path):
  (tmp_path / "checkpoints").mkdir()
  assert checkpoint.resolve_directory(str(tmp_path)) == str(tmp_path / "checkpoints")
  sub = str(tmp_path / "checkpoints")
  assert checkpoint.resolve_directory(sub) == sub


def test_restore_weights_reads_params_and_model_state_only(tmp_path):
  mesh = _mesh(8, 1)
  _, state, _ = _state(mesh, seed=0)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
  ckpt.save(7, state, {}, config_meta(_config()))
  ckpt.close()
  # A different optimiser (AdamW + clipping: another opt_state tree) still takes the weights.
  config = _config()
  config.optim.name, config.optim.weight_decay, config.optim.grad_clip = "adamw", 0.1, 1.0
  task = tasks.AutoencoderTask(config, model=TinyAE())
  abstract = jax.eval_shape(
    lambda k: task.init(k, {"image": jnp.zeros((1, 8, 8, 1))}), jax.random.key(0)
  )
  sh = sharding.state_shardings(abstract, mesh, 64)
  target = checkpoint.abstract_with_shardings(abstract, sh)
  loaded = weights.restore_weights(str(tmp_path), target)
  assert set(loaded) == {"params", "model_state"}
  expected = {"params": state.params, "model_state": state.model_state}
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _, small, sh8 = _state(mesh, features=8)
  abstract8 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), small)
  with pytest.raises(errors.CheckpointMismatchError, match="does not fit this model: .*shape"):
    weights.restore_weights(str(tmp_path), checkpoint.abstract_with_shardings(abstract8, sh8))


def test_a_failed_background_save_is_one_line_naming_its_step(tmp_path, monkeypatch):
  """A save that fails in Orbax's background thread (here: the disk full when it commits)
  surfaces at the next save or wait as one CheckpointSaveError naming that step and the step a
  resume would use; the failed step is not recorded as good."""
  import errno
  import shutil

  state, _, meta = _saved_run(tmp_path, steps=(1,))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"), keep=5)
  ckpt.save(2, state, {"step": 2}, meta)
  ckpt.wait()
  ckpt.mark_good([1, 2])
  ckpt.save(3, state, {"step": 3}, meta)
  ckpt.mark_good([3])  # judged good by its window before the failure shows
  real_wait = ckpt._manager.wait_until_finished

  def full_disk():
    real_wait()
    shutil.rmtree(tmp_path / "c" / "3")  # as if its commit had never happened
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(ckpt._manager, "wait_until_finished", full_disk)
  with pytest.raises(errors.CheckpointSaveError) as e:
    ckpt.save(4, state, {"step": 4}, meta)
  assert str(e.value) == (
    f"could not write checkpoint step 3 in {tmp_path / 'c'}: [Errno 28] No space left on "
    "device; a resume continues from step 2"
  )
  assert 3 not in ckpt._health["good"]
  # The trainer's window may confirm the step after the failure shows: still not recorded.
  ckpt.mark_good([3])
  assert 3 not in ckpt._health["good"]
  monkeypatch.setattr(ckpt._manager, "wait_until_finished", real_wait)
  ckpt.close()
  import json

  with open(tmp_path / "c" / "health.json") as f:
    assert 3 not in json.load(f)["good"]


def test_a_health_record_that_cannot_be_written_leaves_no_temporary_file(tmp_path, monkeypatch):
  import errno

  from etils import epath

  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"), keep=5)
  path_type = type(epath.Path(str(tmp_path)))
  write_text = path_type.write_text

  def full_disk(self, text, *args, **kwargs):  # the first byte written, then the disk is full
    write_text(self, text[:1], *args, **kwargs)
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(path_type, "write_text", full_disk)
  with pytest.raises(OSError, match="No space"):
    ckpt.mark_bad([7])
  monkeypatch.undo()
  ckpt.close()
  assert not [f for f in os.listdir(tmp_path / "c") if f.endswith(".tmp")]


def test_provenance_fields_and_empty_options_do_not_change_the_fingerprint():
  """A code dataset records its stage-1 model's fingerprint: fields added later that shape
  nothing (a prior's stage-1 record, plugin options left empty) must not make the same model
  "another model" after an upgrade. The hash is re-derived here from the fields that do."""
  import hashlib
  import json

  config = configs.load_experiment("fashion_mnist_prior_top:smoke")
  sections = ("task", "model", "vq", "prior")
  full = json.loads(config.to_json_best_effort())
  shaping = {}
  for k in sections:
    g = full[k]
    if isinstance(g, dict):
      g = {
        f: v
        for f, v in g.items()
        if f not in ("stage1", "stage1_run_id", "stage1_step") and not (f == "options" and not v)
      }
    shaping[k] = g
  shaping["channels"] = full["data"]["channels"]
  # A field since retired is hashed at the default it had (configs.RETIRED_FIELDS): the
  # fingerprints of runs saved before stay the same.
  shaping["model"]["relu_impl"] = "auto"
  expected = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]
  assert config_meta(config, sections)["model_fingerprint"] == expected
  config.prior.update(stage1="/elsewhere", stage1_run_id="abc", stage1_step=7)
  assert config_meta(config, sections)["model_fingerprint"] == expected
  config.model.channels += 1  # a shaping field does change it
  assert config_meta(config, sections)["model_fingerprint"] != expected
