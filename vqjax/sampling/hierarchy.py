"""Hierarchical ancestral sampling: the top codes, then each finer level conditioned on the
coarser ones, then the stage-1 decoder.

  gen = Generator.from_runs("workdirs/fashion_mnist", ["workdirs/prior_top",
                                                       "workdirs/prior_bottom"])
  images, codes = gen.generate(64, jax.random.key(0), labels=None, temperature=1.0)

A prior with a decode mode (PixelSNAIL, Gated PixelCNN) samples incrementally (`cached.py`);
any other re-runs the whole network per position (`naive.py`). Both give the same samples for
the same key.
"""

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from vqjax import errors, links, paths, runs
from vqjax.data import codes
from vqjax.sampling import sampler_for
from vqjax.training import checkpoint, identity


@dataclasses.dataclass
class Generator:
  """A stage-1 model and one prior per code level, coarsest first.

  Attributes:
    stage1: (config, model, variables) of the autoencoder.
    priors: (config, model, variables) of each level's prior, level 0 (top) first.
  """

  stage1: tuple
  priors: list
  # The checkpoint step each run was read at ({"stage1": s, "priors": [top, ...]}; None for a
  # converted model), recorded with samples so they can be told stale when a run trains on.
  steps: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def from_runs(cls, stage1: str, priors: list[str], allow_mismatch: bool = False) -> "Generator":
    """Loads the runs (`vqjax.load_run`) and checks they belong together.

    A prior trained on extracted codes records the stage-1 run they came from (its run id and
    checkpoint step, `config.prior.stage1_run_id` / `stage1_step`). The stage-1 weights are read
    at that step (not the newest, if the run trained on), and a stage-1 run or a prior that
    does not belong to the chain is refused (`chain_problem`).

    Args:
      stage1: the autoencoder's workdir (or converted directory).
      priors: the priors' workdirs, in any order (each knows its level).
      allow_mismatch: use runs that do not belong together anyway (a warning, not an error).

    Raises:
      errors.UserError: a run of another kind (`check_run`; told from its config.json before
        any weights are read), or runs that do not belong together.
    """
    named = [(stage1, "autoencoder", "stage1")] + [(p, "prior", "priors") for p in priors]
    for path, task, option in named:
      check_run(path, task, option)  # from config.json: before any weights are read
    loaded = [runs.load_run_with_step(path) for path, _, _ in named]
    for (path, task, option), (config, *_) in zip(named, loaded, strict=True):
      check_run(path, task, option, config.task)  # a run without config.json
    recorded = {
      (c.prior.stage1_run_id, c.prior.stage1_step) for c, *_ in loaded[1:] if c.prior.stage1_run_id
    }
    if len(recorded) == 1:
      run_id, step = next(iter(recorded))
      same_run = identity.read_run_id(stage1) == run_id
      if same_run and step >= 0 and loaded[0][3] is not None and loaded[0][3] != step:
        try:  # the step the codes came from, though the run trained on
          loaded[0] = runs.load_run_with_step(stage1, step=step)
        except errors.UserError:
          pass  # no longer on disk: chain_problem names it
    problem = chain_problem(stage1, loaded[0][3], list(zip(priors, (r[0] for r in loaded[1:]))))
    if problem and not allow_mismatch:
      raise errors.UserError(f"{problem}; pass --allow_mismatch to use them together anyway")
    if problem:
      logging.warning("%s (--allow_mismatch)", problem)
    ordered = sorted(loaded[1:], key=lambda r: r[0].prior.level)
    steps = {"stage1": loaded[0][3], "priors": [r[3] for r in ordered]}
    return cls(loaded[0][:3], [r[:3] for r in ordered], steps)

  def __post_init__(self):
    config, model, variables = self.stage1
    data = config.data
    image = jnp.zeros((1, data.image_size, data.image_size, data.channels), jnp.float32)
    shapes = jax.eval_shape(
      lambda v, x: model.apply(v, x, method="encode_to_indices"), variables, image
    )
    self.level_shapes = [tuple(s.shape[1:]) for s in shapes]
    levels = [p[0].prior.level for p in self.priors]
    if levels != list(range(len(self.level_shapes))):
      raise errors.UserError(
        f"the stage-1 model has {len(self.level_shapes)} code level(s), the priors model "
        f"levels {levels}: give one prior per level (0 = top)"
      )
    for (pconfig, _, _), shape in zip(self.priors, self.level_shapes, strict=True):
      level = pconfig.prior.level
      if pconfig.vq.num_codes != config.vq.num_codes:
        raise errors.UserError(
          f"the level-{level} prior models {pconfig.vq.num_codes} codes, the stage-1 model "
          f"has {config.vq.num_codes}"
        )
      got = tuple(pconfig.prior.code_shapes[level])
      if got != shape:
        raise errors.UserError(
          f"the level-{level} prior models {got[0]}x{got[1]} code maps, the stage-1 model "
          f"makes {shape[0]}x{shape[1]}: they come from different stage-1 runs"
        )

  @property
  def class_conditional(self) -> bool:
    return any(p[0].prior.class_conditional for p in self.priors)

  def sample_codes(
    self,
    num: int,
    rng: jax.Array,
    labels: Any = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    example_offset: int = 0,
  ) -> list[jax.Array]:
    """Code maps of every level, coarsest first, each int32 [num, h, w]."""
    if self.class_conditional and labels is None:
      raise errors.UserError("the priors are class-conditional: give labels (--label)")
    maps: list[jax.Array] = []
    for level, (pconfig, model, variables) in enumerate(self.priors):
      sampler = sampler_for(model)
      label = jnp.asarray(labels, jnp.int32) if pconfig.prior.class_conditional else None
      maps.append(
        sampler.sample(
          model,
          variables,
          num,
          self.level_shapes[level],
          jax.random.fold_in(rng, level),
          condition=tuple(maps) or None,
          label=label,
          temperature=temperature,
          top_k=top_k,
          top_p=top_p,
          example_offset=example_offset,
        )
      )
    return maps

  def decode(self, maps: list[jax.Array]) -> jax.Array:
    """Images in [-1, 1] from code maps of every level."""
    _, model, variables = self.stage1
    images = model.apply(variables, tuple(maps), method="decode_from_indices")
    return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)

  def generate(self, num: int, rng: jax.Array, labels: Any = None, **settings) -> tuple:
    """(images [num, H, W, C] in [-1, 1], code maps coarsest first)."""
    maps = self.sample_codes(num, rng, labels, **settings)
    return self.decode(maps), maps


# The kinds of run (config.task) as messages name them.
_KINDS = {"autoencoder": "a stage-1 autoencoder", "prior": "a prior", "classifier": "a classifier"}


def run_task(workdir: str) -> str | None:
  """The task of the run in `workdir` (its config.task: "autoencoder", "prior", "classifier"),
  read from its config.json alone, without loading any weights.

  Args:
    workdir: a trainer workdir, its checkpoints/ directory, or a `vqjax.convert` output.

  Returns:
    The task, or None when there is no readable config.json (`vqjax.load_run` then says what
    is wrong, or reads the config from the checkpoint).
  """
  path = paths.absolute(workdir)
  places = [path]
  if os.path.basename(path) == checkpoint.CHECKPOINT_SUBDIR:
    places.append(os.path.dirname(path))  # a trainer workdir's checkpoints/ directory
  for place in places:
    try:
      with epath.Path(place, "config.json").open() as f:
        task = json.load(f).get("task")
    except (OSError, ValueError, AttributeError):
      continue
    if isinstance(task, str):
      return task
  return None


def check_run(workdir: str, expected: str, option: str, task: str | None = None) -> None:
  """UserError unless `workdir` is a run of the task `expected`, as `vqjax.evaluate` checks
  a classifier run (config.task).

  Args:
    workdir: the run's directory.
    expected: "autoencoder", "prior" or "classifier".
    option: what names the run in the message (the CLI option or the argument).
    task: the run's config.task when it is loaded; None = read its config.json (`run_task`;
      a run without one passes).
  """
  task = run_task(workdir) if task is None else task
  if task is not None and task != expected:
    raise errors.UserError(
      f"{option}: {workdir} is not {_KINDS[expected]} run (its task is {task!r})"
    )


def labels_for(num: int, label: int | None, num_classes: int) -> np.ndarray | None:
  """`num` labels: all `label`, or (label=None) cycling through the classes."""
  if num_classes <= 0:
    return None
  if label is None:
    return np.arange(num, dtype=np.int32) % num_classes
  if not 0 <= label < num_classes:
    raise errors.UserError(f"label {label} is not in [0, {num_classes})")
  return np.full((num,), label, np.int32)


def chain_problem(stage1: str, stage1_step: int | None, priors: list[tuple[str, Any]]) -> str:
  """Why the stage-1 run (read at `stage1_step`) and the priors (path, config) do not belong
  together, or "" when they do (or record nothing to check: priors trained before vqjax
  recorded run ids, or on synthetic codes)."""
  recorded = [(path, c.prior.stage1_run_id, c.prior.stage1_step) for path, c in priors]
  recorded = [r for r in recorded if r[1]]
  if not recorded:
    return ""
  if len({(run_id, step) for _, run_id, step in recorded}) > 1:
    named = ", ".join(f"{path} (run {run_id[:8]}, step {step})" for path, run_id, step in recorded)
    return f"the priors were trained on codes of different stage-1 runs: {named}"
  path, run_id, step = recorded[0]
  actual = identity.read_run_id(stage1)
  if actual != run_id:
    return (
      f"{path} was trained on codes of the stage-1 run {run_id[:8]} (step {step}), but "
      f"{stage1} is {f'run {actual[:8]}' if actual else 'a run without a recorded id'}"
    )
  if step >= 0 and stage1_step is not None and stage1_step != step:
    return (
      f"{path} was trained on codes of {stage1} at step {step}, which is no longer on disk "
      f"(its weights were read at step {stage1_step})"
    )
  return ""


def stage1_of(prior_workdir: str) -> str:
  """The stage-1 run a prior's codes came from: recorded in its config (`config.prior.stage1`)
  when it was trained, else (a prior trained before vqjax recorded it) in its code dataset."""
  config, _, _ = runs.load_run(prior_workdir)
  if config.prior.stage1:
    return config.prior.stage1
  if config.data.name != "codes":
    raise errors.UserError(f"{prior_workdir} was not trained on extracted codes: set --stage1")
  recorded = codes.read_metadata(config.data.codes_dir)["stage1"]["workdir"]
  return links.resolve(recorded, config.data.codes_dir)
