"""Tests of vqjax/models/impl.py: the platform's forms chosen once at build time, the checks of
a hand-made `Impl`, and runs saved with a retired implementation field (configs.RETIRED_FIELDS)
still loading."""

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vqjax
from vqjax import configs, convert, runs
from vqjax.models import impl, registry
from vqjax.models.impl import Impl


def test_auto_resolves_to_the_forms_measured_on_each_platform():
  cpu = impl.resolve(backend="cpu")
  assert cpu == Impl(
    upconv="adjoint",
    downconv="adjoint",
    channel_multiple=0,
    causal_conv="masked",
    onehot="lookup",
    vq_stats="scatter",
    vq_distance="xla",
    vq_matmul="float32",
  )
  gpu = impl.resolve(backend="gpu", dtype=jnp.bfloat16, capability=8.0)
  assert (gpu.upconv, gpu.downconv, gpu.channel_multiple) == ("adjoint", "adjoint", 8)
  assert (gpu.causal_conv, gpu.onehot, gpu.vq_stats) == ("split", "conv", "onehot")
  assert (gpu.vq_matmul, gpu.vq_distance) == ("bf16", "xla")  # no kernel below Hopper
  tpu = impl.resolve(backend="tpu", dtype=jnp.bfloat16)
  assert (tpu.upconv, tpu.downconv, tpu.channel_multiple) == ("subpixel", "lax", 0)
  assert (tpu.causal_conv, tpu.vq_matmul, tpu.vq_distance) == ("masked", "bf16", "xla")
  # bf16 matmuls only for a bfloat16 model, and never on the CPU (float32 runs faster there).
  assert impl.resolve(backend="gpu", dtype=jnp.float32).vq_matmul == "float32"
  assert impl.resolve(backend="cpu", dtype=jnp.bfloat16).vq_matmul == "float32"


def test_pallas_search_on_hopper_with_bf16_matmuls_only(monkeypatch):
  monkeypatch.setattr(impl, "pallas_triton_available", lambda: True)
  pick = lambda **kw: impl.resolve(backend="gpu", dtype=jnp.bfloat16, **kw).vq_distance
  assert pick(capability=9.0) == "pallas"
  assert pick(capability=8.9) == "xla"
  assert pick(capability=9.0, vq_matmul="float32") == "xla"
  monkeypatch.setattr(impl, "pallas_triton_available", lambda: False)  # a JAX without Triton
  assert pick(capability=9.0) == "xla"


def test_patches_on_the_cpu_only_where_the_kernel_outnumbers_the_map():
  pick = lambda shape, backend="cpu": (
    impl.resolve(backend=backend, kernel_size=5, code_shape=shape).causal_conv
  )
  assert pick((4, 4)) == "patches"  # 25 taps, 16 pixels
  assert pick((5, 5)) == "masked" and pick((8, 8)) == "masked"
  assert pick((4, 4), "tpu") == "masked" and pick((4, 4), "gpu") == "split"


def test_named_forms_are_kept_and_bad_ones_are_clear():
  chosen = impl.resolve(
    backend="gpu",
    upconv="lax",
    downconv="lax",
    channel_multiple=0,
    causal_conv="masked",
    vq_stats="scatter",
    vq_distance="pallas",
    vq_matmul="float32",
  )
  assert (chosen.upconv, chosen.downconv, chosen.channel_multiple) == ("lax", "lax", 0)
  assert (chosen.causal_conv, chosen.vq_stats) == ("masked", "scatter")
  assert chosen.vq_distance == "pallas"  # asked for: kept
  with pytest.raises(ValueError, match="unknown upconv form 'phase'"):
    impl.resolve(upconv="phase")
  with pytest.raises(ValueError, match="unknown vq_stats form 'auto'"):
    Impl(vq_stats="auto")  # an Impl holds resolved forms only
  with pytest.raises(ValueError, match="channel_multiple"):
    Impl(channel_multiple=-1)


def test_the_built_model_carries_the_resolved_forms_of_its_config():
  config = configs.load_experiment("fashion_mnist:smoke")
  config.model.upconv_impl = "lax"
  config.vq.stats_impl = "onehot"
  model = registry.build_model(config)
  platform = impl.resolve()
  assert model.impl == dataclasses.replace(platform, upconv="lax", vq_stats="onehot")
  assert model.quantizer.get("impl") is None  # handed to the quantizer by the model itself
  config.vq.kind, config.vq.stats_impl = "gumbel", "auto"
  assert registry.build_model(config).impl.vq_stats == platform.vq_stats  # (unread: Gumbel)


def _saved_with_retired_field(directory, config, variables):
  convert.save_converted(str(directory), config, variables)
  path = directory / "config.json"
  record = json.loads(path.read_text())
  assert "relu_impl" not in record["model"]
  record["model"]["relu_impl"] = "stored"  # as every run saved before the field retired
  path.write_text(json.dumps(record))
  return record


def test_a_run_saved_with_a_retired_field_still_loads_and_computes_the_same(tmp_path):
  """A config.json of before the change (model.relu_impl="stored") loads: the field is
  dropped (configs.RETIRED_FIELDS), the model computes what it did. The trainer's checkpoint
  records go through the same rule (runs._config_from_record)."""
  config = configs.load_experiment("fashion_mnist:smoke")
  model = registry.build_model(config)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 1)), jnp.float32)
  variables = jax.jit(model.init)({"params": jax.random.key(3), "vq": jax.random.key(4)}, x)
  record = _saved_with_retired_field(tmp_path / "old", config, variables)
  loaded_config, loaded_model, loaded = vqjax.load_run(str(tmp_path / "old"))
  assert "relu_impl" not in loaded_config.model
  recon, _ = jax.jit(model.apply)(variables, x)
  again, _ = jax.jit(loaded_model.apply)(loaded, x)
  np.testing.assert_array_equal(np.asarray(recon), np.asarray(again))
  from_checkpoint = runs._config_from_record(record)
  assert "relu_impl" not in from_checkpoint.model
  assert from_checkpoint.model.channels == config.model.channels


def test_a_prior_saved_with_a_retired_field_still_loads_and_samples(tmp_path):
  from vqjax.sampling import cached, naive

  config = configs.load_experiment("fashion_mnist_prior_top:smoke")  # class-conditional
  config.prior.code_shapes = [list(s) for s in config.data.synthetic_shapes]
  model = registry.build_model(config)
  args, kwargs = registry.init_inputs(config)
  variables = jax.jit(lambda key: model.init(key, *args, **kwargs))(jax.random.key(0))
  _saved_with_retired_field(tmp_path / "prior", config, {**variables, "vq_state": {}})
  _, loaded_model, loaded = vqjax.load_run(str(tmp_path / "prior"))
  key, label = jax.random.key(5), jnp.array([3, 7], jnp.int32)
  shape = tuple(config.prior.code_shapes[0])
  codes = cached.sample(loaded_model, loaded, 2, shape, key, label=label)
  expected = naive.sample(model, variables, 2, shape, key, label=label)
  np.testing.assert_array_equal(np.asarray(codes), np.asarray(expected))


def test_the_search_falls_back_to_xla_without_pallas_triton(monkeypatch):
  # A future JAX without Pallas's Triton backend (deprecated in 0.11): "auto" keeps working.
  monkeypatch.setitem(sys.modules, "jax.experimental.pallas.triton", None)  # import fails
  assert not impl.pallas_triton_available()
  assert impl.resolve(backend="gpu", dtype=jnp.bfloat16, capability=9.0).vq_distance == "xla"


def test_a_retired_field_keeps_the_model_fingerprints_of_earlier_runs():
  """Fingerprints (recorded with code datasets, compared on re-extraction) hash a retired field
  at its old default, as runs saved before it retired did."""
  from vqjax.training.checkpoint_records import config_meta

  config = configs.load_experiment("fashion_mnist:smoke")
  as_saved = configs.load_experiment("fashion_mnist:smoke")
  with as_saved.unlocked():
    as_saved.model.relu_impl = configs.RETIRED_FIELDS["model.relu_impl"]
  sections = ("model", "vq")
  new, old = config_meta(config, sections), config_meta(as_saved, sections)
  assert new["model_fingerprint"] == old["model_fingerprint"]
  with as_saved.unlocked():
    as_saved.model.channels += 1  # a field that shapes the model still changes it
  assert config_meta(as_saved, sections)["model_fingerprint"] != new["model_fingerprint"]


def test_resuming_a_run_saved_with_a_retired_field_reports_no_config_change():
  from vqjax.training.checkpoint_records import config_changes, config_meta

  config = configs.load_experiment("fashion_mnist:smoke")
  saved = config_meta(config, ("model",))
  saved["config"]["model"]["relu_impl"] = "stored"
  assert config_changes(saved, config_meta(config, ("model",))) == []
  saved["config"]["model"]["channels"] += 1
  assert config_changes(saved, config_meta(config, ("model",)))
