"""Tests of profiling from the trainer (`config.log.profile_steps`, `training/host.Profiler`) and
of the named scopes that make a trace read by model phase."""

import glob
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from vqjax import configs, errors
from vqjax.models.hierarchy import VQVAE2
from vqjax.training import host, tasks, trainer


def traces(directory: str) -> list[str]:
  return glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)


class TinyPrior(nn.Module):
  """A prior of one embedding table: the loop, not the model, is what these tests run."""

  num_codes: int

  @nn.compact
  def __call__(self, codes, condition=None, label=None, train=False):
    del condition, label, train
    return nn.Embed(self.num_codes, self.num_codes)(codes)


@pytest.fixture
def fast_compile():
  """Compiles without most XLA optimisations: these programs run once or twice."""
  saved = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", saved)


def run(config, workdir: str) -> dict:
  task = tasks.PriorTask(config, TinyPrior(config.vq.num_codes))
  return trainer.train_and_evaluate(config, workdir, task=task)


@pytest.mark.parametrize("window, traced", [((1, 2), True), ((), False)])
def test_a_run_writes_a_trace_of_the_profiled_steps_only(tmp_path, fast_compile, window, traced):
  config = configs.load_experiment("pixelsnail_top_imagenet:smoke")
  config.train.steps = 2
  config.log.profile_steps = window
  assert run(config, str(tmp_path))["step"] == 2
  files = traces(str(tmp_path / "profile"))
  assert len(files) == (1 if traced else 0), files
  if traced:
    # The traced step carries its step annotation (the profile plugin's step marker).
    with open(files[0], "rb") as f:
      assert b"step_num" in f.read()


@pytest.mark.parametrize(
  "steps", [(2, 1), (1, 1), (0, 3), (-1, 1), (1,), (1, 2, 3), (1.0, 2), (True, 2), (1, "2")]
)
def test_malformed_or_out_of_range_profile_steps_fail_in_one_line_before_the_run(tmp_path, steps):
  config = configs.load_experiment("pixelsnail_top_imagenet:smoke")
  config.train.steps = 2
  config.log.profile_steps = steps
  workdir = tmp_path / "run"
  with pytest.raises(errors.UserError, match="config.log.profile_steps") as e:
    trainer.train_and_evaluate(config, str(workdir))
  assert "\n" not in str(e.value)
  assert not workdir.exists()  # nothing set up, nothing compiled


def test_profile_window_accepts_the_valid_forms():
  assert host.profile_window((), 5) is None
  assert host.profile_window(None, 5) is None
  assert host.profile_window((0, 5), 5) == (0, 5)
  assert host.profile_window([2, 3], 5) == (2, 3)


def test_profiler_traces_exactly_its_window_and_skips_a_passed_one(tmp_path):
  x = jnp.ones(4)
  profiler = host.Profiler((1, 3), 5, str(tmp_path / "a"))
  with profiler:
    profiler.before_step(0)
    assert not profiler.tracing
    profiler.after_step(1, x)
    profiler.before_step(1)
    assert profiler.tracing
    with profiler.annotate(1):
      y = x + 1
    profiler.after_step(2, y)
    assert profiler.tracing  # step 3 is still to come
    profiler.before_step(2)
    profiler.after_step(3, y)
    assert not profiler.tracing
    profiler.before_step(3)  # once the window is done, never again
    assert not profiler.tracing
  assert len(traces(str(tmp_path / "a"))) == 1

  resumed = host.Profiler((1, 3), 5, str(tmp_path / "b"))
  with resumed:
    resumed.before_step(4)  # a run resumed past the window
    assert not resumed.tracing
  assert not (tmp_path / "b").exists()

  stopped = host.Profiler((0, 5), 5, str(tmp_path / "c"))
  with stopped:  # a run that stops inside the window still closes its trace
    stopped.before_step(0)
    assert stopped.tracing
  assert not stopped.tracing
  assert len(traces(str(tmp_path / "c"))) == 1


def test_the_train_step_names_the_quantizer_and_level_phases():
  model = VQVAE2(
    channels=8,
    res_channels=4,
    num_res_blocks=1,
    quantizer=dict(num_codes=8, code_dim=4, restart_after=2),
  )
  x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  rngs = {"params": jax.random.key(0), "vq": jax.random.key(1)}
  variables = jax.eval_shape(lambda x: model.init(rngs, x), x)  # shapes are all lowering needs

  def step(variables, x):
    (_, aux), updates = model.apply(
      variables, x, train=True, rngs={"vq": jax.random.key(2)}, mutable=["vq_state"]
    )
    return aux["loss"], updates  # the statistics only feed the updated state

  text = jax.jit(step).lower(variables, x).as_text(debug_info=True)
  for scope in (
    "level0",
    "level1",
    "vq_data_init",
    "vq_distances_argmin",
    "vq_statistics",
    "vq_restarts",
    "depth_to_space",
  ):
    assert f"/{scope}/" in text, scope
