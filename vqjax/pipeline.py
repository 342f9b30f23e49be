"""The whole VQ-VAE-2 pipeline in one command: stage 1 -> codes -> priors -> samples -> evaluation.

  python -m vqjax.pipeline --workdir workdirs/quickstart
  python -m vqjax.pipeline --workdir DIR [--config experiments/pipelines/fashion_mnist.py[:smoke]]
      [--config.stage1.train.steps=1200]

The config (experiments/pipelines/) holds one full run config per trained stage (`stage1`,
`prior_top`, `prior_bottom`, `classifier`) and the `sample` / `evaluate` settings. Each stage
writes its own directory under the workdir:

  stage1/  codes/  prior_top/  prior_bottom/  classifier/    runs of `python -m vqjax.train` /
                                                             `vqjax.extract_codes`
  samples/  samples_rejection/                               `python -m vqjax.sample` outputs
  samples_eval/                                              unfiltered samples for the numbers
  plots/                                                     reconstructions, code usage,
                                                             temperature and threshold curves
  report.json  report.md                                     every number, with stage times

A stage whose output is complete is skipped (training runs say they are finished, a finished
code shard is kept, a sample directory whose settings.json matches is reused, an evaluation of
the same checkpoints, samples and settings is read back from report.json), so after an
interruption the same command goes on where it stopped, and a finished pipeline run again only
reprints its report. A skipped stage keeps the time recorded when it ran (report.json is
written after every stage). The priors are trained on the codes
extracted here, with the stage-1 run's codebook size; changing a stage's config after it ran
is caught by that stage (a training run logs the differences from its checkpoint).
"""

import json
import os
import signal
import sys
import time
from typing import Any

import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from vqjax import _cli, config_checks, configs, errors, links, paths

# The library, and JAX with it, is imported inside the functions that use it, so that --help
# and flag errors answer at once (JAX alone takes seconds to import).

DEFAULT_CONFIG = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  "experiments",
  "pipelines",
  "fashion_mnist.py",
)
STAGES = (
  "stage1",
  "codes",
  "prior_top",
  "prior_bottom",
  "classifier",
  "features",
  "samples",
  "evaluate",
)


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program)."""
  config_flags.DEFINE_config_file(
    "config",
    None,
    "Pipeline config: experiments/pipelines/X.py[:smoke] (default: the Fashion-MNIST one).",
    lock_config=True,
  )
  flags.DEFINE_string("workdir", None, "Directory for every stage's outputs.")
  flags.DEFINE_bool("verbose", False, "Show the traceback of user errors too.")


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing where a bad config file, variant or override is one line; without
  --config, the Fashion-MNIST pipeline."""
  argv = list(argv)
  specs = [a.partition("=")[2] for a in argv if a.startswith(("--config=", "-config="))]
  if not specs and not any(a in ("--config", "-config") for a in argv):
    argv.insert(1, f"--config={DEFAULT_CONFIG}")
  try:
    # Each --config (either form) loaded once first: a missing file, unknown variant or syntax
    # error is one line here, not config_flags' traceback.
    return flags.FLAGS(configs.resolve_config_argv(argv))
  except errors.UserError as e:
    raise SystemExit(f"vqjax.pipeline: {e}") from None
  except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
    detail = str(e)
    if len(detail) > 1 and detail[0] in "'\"" and detail[-1] == detail[0]:  # a repr'd message
      detail = detail[1:-1]
    detail = " ".join(detail.split())
    overrides = " ".join(a for a in argv if a.startswith("--config."))
    raise SystemExit(
      f"vqjax.pipeline: bad config or flag: {detail}" + (f" (in {overrides})" if overrides else "")
    ) from None


def prior_config(config: Any, codes_dir: str, num_codes: int) -> Any:
  """A prior's run config pointed at the pipeline's code dataset.

  Args:
    config: the prior experiment's config (its data section may name another code dataset or
      synthetic codes, e.g. in its `:smoke` variant).
    codes_dir: the code dataset written by the pipeline's extraction.
    num_codes: the stage-1 codebook size.

  Returns:
    A copy with `data` reading `codes_dir` (train / test splits) and `vq.num_codes` set.
  """
  c = config.copy_and_resolve_references()
  defaults = configs.base_config().data
  c.data.update(
    name="codes",
    codes_dir=paths.absolute(codes_dir),
    reader="local",
    train_split="train",
    eval_split="test",
    synthetic_shapes=defaults.synthetic_shapes,
    synthetic_num_codes=defaults.synthetic_num_codes,
    synthetic_examples=defaults.synthetic_examples,
  )
  c.vq.num_codes = num_codes
  return c


def _same_samples(out: str, wanted: dict) -> bool:
  """Whether `out` holds finished samples drawn with the `wanted` settings."""
  path = os.path.join(out, "settings.json")
  if not (epath.Path(path).exists() and epath.Path(out, "images.npz").exists()):
    return False
  try:
    with epath.Path(path).open() as f:
      done = json.load(f)
  except (OSError, ValueError):
    return False
  return all(done.get(k) == v for k, v in wanted.items())


class Pipeline:
  """The stages of one pipeline workdir; `run()` runs the missing ones in order.

  Attributes:
    config: the pipeline config.
    workdir: its absolute output directory.
    report: the numbers and stage times gathered so far.
  """

  def __init__(self, config: Any, workdir: str):
    self.config = config
    self.workdir = paths.absolute(workdir)
    self.report: dict[str, Any] = {"stages": {}}
    self.previous = self._read_report()  # what an earlier run of this workdir recorded
    self.features = ""  # the evaluation network's run, once the features stage has run
    self._complete = False  # set by a stage that found its output already there

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  def _read_report(self) -> dict[str, Any]:
    try:
      with epath.Path(self.path("report.json")).open() as f:
        report = json.load(f)
    except (OSError, ValueError):
      return {}
    return report if isinstance(report, dict) else {}

  def _stage(self, name: str, fn, *args, **kwargs) -> Any:
    logging.info("pipeline: stage %s", name)
    t0 = time.perf_counter()
    self._complete = False
    out = fn(*args, **kwargs)
    seconds = time.perf_counter() - t0
    recorded = self.previous.get("stages", {}).get(name)
    if self._complete and recorded is not None:
      self.report["stages"][name] = recorded
      logging.info("pipeline: stage %s was complete (it took %.1f s when it ran)", name, recorded)
    else:
      self.report["stages"][name] = round(seconds, 1)
      logging.info("pipeline: stage %s done in %.1f s", name, seconds)
    self.write()  # an interrupted pipeline keeps the numbers and times of the stages it ran
    return out

  def _train(self, name: str, config: Any) -> dict[str, float]:
    from vqjax import runs
    from vqjax.training import trainer

    trainer.setup_compilation_cache(config.log.compilation_cache)  # "" = off
    result = trainer.train_and_evaluate(config, self.path(name), make_task=runs.make_task)
    self._complete = "first_step_s" not in result  # no step ran: it had finished
    if "stopped" in result:
      signum = int(result["stopped"])
      raise errors.Stopped(
        f"stage {name} stopped at step {int(result['step'])} of {config.train.steps} "
        f"({signal.Signals(signum).name if signum else 'stop request'}), checkpoint saved; "
        "run the same command to resume",
        signum,
      )
    return {k: v for k, v in result.items() if k.startswith("eval/") or k == "step"}

  def _sample(self, name: str, num: int, classifier: str = "", **overrides) -> dict:
    from vqjax import sample

    s = self.config.sample
    kwargs = dict(
      num=num,
      seed=s.seed,
      temperature=s.temperature,
      top_k=s.top_k,
      top_p=s.top_p,
      classifier=classifier,
      threshold=s.threshold,
      min_acceptance=s.min_acceptance,
    )
    kwargs.update(overrides)
    out = self.path(name)
    wanted = {k: kwargs[k] for k in ("seed", "temperature", "top_k", "top_p")}
    # Drawn from the same checkpoints: a prior (or the classifier) trained on since makes them
    # stale, as does another count or rejection budget (minimum acceptance rate).
    wanted.update(requested=num, steps=self._latest_steps(classifier))
    if classifier:
      wanted.update(
        classifier=links.record(classifier, out),
        threshold=kwargs["threshold"],
        min_acceptance=kwargs["min_acceptance"],
      )
    if _same_samples(out, wanted):
      logging.info("pipeline: %s already drawn with these settings", out)
      self._complete = True
      with epath.Path(out, "settings.json").open() as f:
        return json.load(f)
    priors = [self.path("prior_top"), self.path("prior_bottom")]
    return sample.run(priors, out, stage1=self.path("stage1"), **kwargs)

  def _latest_steps(self, classifier: str) -> dict[str, Any]:
    """The newest usable checkpoint step of each run the samples come from (as settings.json
    records the steps sampled from)."""
    steps = {
      "stage1": _latest_step(self.path("stage1")),
      "priors": [_latest_step(self.path("prior_top")), _latest_step(self.path("prior_bottom"))],
    }
    if classifier:
      steps["classifier"] = _latest_step(classifier)
    return steps

  def _codes(self) -> dict:
    """The code dataset of the stage-1 run (complete when it was extracted from the stage-1
    run's newest checkpoint: the extraction then only checks its shards)."""
    from vqjax import extract_codes
    from vqjax.data import codes

    try:
      recorded = codes.read_metadata(self.path("codes"))["stage1"].get("step")
    except (errors.UserError, KeyError, TypeError):
      recorded = None
    self._complete = recorded is not None and recorded == _latest_step(self.path("stage1"))
    return extract_codes.extract(self.path("stage1"), self.path("codes"))

  def _features(self) -> dict[str, Any]:
    """The evaluation network: the one vqjax ships for the dataset, else trained once and
    cached across pipelines, unless the config names a directory (trained there)."""
    from vqjax.evaluation import feature_network

    c = self.config
    workdir = c.evaluate.features_dir
    if not workdir and feature_network.has_packaged(c.stage1.data.name):
      self.features = ""  # the judges default to the shipped network
      self._complete = True
      return feature_network.packaged_record(c.stage1.data.name)
    if workdir and not (paths.is_remote(workdir) or os.path.isabs(workdir)):
      workdir = self.path(workdir)
    before = feature_network.read_record(workdir or feature_network.default_dir(c.stage1.data.name))
    record = feature_network.ensure(c.stage1.data.name, workdir, c.features)
    self._complete = before == record
    self.features = record["run"]
    return record

  def _evaluation_inputs(self) -> dict[str, Any]:
    """What the evaluation's numbers depend on: the runs' checkpoint steps, the sample sets'
    settings, the evaluation network and the evaluate / sample settings (JSON-comparable)."""
    r, c = self.report, self.config
    features = dict(r.get("features") or {})
    if features.get("run"):  # named as report.json names it: relative inside a workdir that moves
      features["run"] = links.record(features["run"], self.path("report.json"))
    inputs = {
      "steps": self._latest_steps(self.path("classifier")),
      "samples_eval": r.get("samples_eval"),
      "samples_rejection_eval": r.get("samples_rejection_eval"),
      "features": features,
      "evaluate": c.evaluate.to_dict(),
      "sample": c.sample.to_dict(),
    }
    return json.loads(json.dumps(inputs, sort_keys=True, default=str))

  def _evaluate(self) -> dict[str, Any]:
    """The numbers and plots of report.md; read back from the previous report when nothing
    they depend on changed (`_evaluation_inputs`)."""
    from vqjax import evaluate

    inputs = self._evaluation_inputs()
    previous = self.previous.get("evaluation")
    if previous and _same_json(self.previous.get("evaluation_inputs"), inputs):
      logging.info("pipeline: evaluation already done with these checkpoints and samples")
      self.report["evaluation_inputs"] = inputs
      self._complete = True
      return previous

    e, s = self.config.evaluate, self.config.sample
    classifier, features = self.path("classifier"), self.features
    plots = self.path("plots")
    epath.Path(plots).mkdir(parents=True, exist_ok=True)
    parts = _Parts("evaluate", 5)
    parts.next("stage-1 reconstructions and code usage")
    out: dict[str, Any] = {"stage1": evaluate.evaluate(self.path("stage1"))}
    out["plots"] = evaluate.stage1_plots(self.path("stage1"), plots)
    parts.next("sample quality of the unfiltered samples")
    out["samples"] = evaluate.evaluate_samples(
      self.path("samples_eval"), features, max_real=e.max_real
    )
    parts.next("sample quality of the samples kept by rejection")
    out["samples_rejection"] = evaluate.evaluate_samples(
      self.path("samples_rejection_eval"), features, max_real=e.max_real
    )
    parts.next("the rejection-threshold trade-off")
    thresholds = sorted(set(list(e.thresholds) + [s.threshold]))
    out["thresholds"] = evaluate.threshold_tradeoff(
      self.path("samples_eval"),
      classifier,
      thresholds,
      os.path.join(plots, "threshold_tradeoff.png"),
      max_real=e.max_real,
      features=features,
    )
    out["plots"]["threshold_tradeoff"] = os.path.join(plots, "threshold_tradeoff.png")
    parts.next(f"the temperature trade-off ({len(e.temperatures)} temperatures)")
    out["temperatures"] = evaluate.temperature_tradeoff(
      [self.path("prior_top"), self.path("prior_bottom")],
      features,
      list(e.temperatures),
      e.temperature_samples,
      os.path.join(plots, "temperature_tradeoff.png"),
      seed=s.seed,
      stage1=self.path("stage1"),
      max_real=e.max_real,
    )
    out["plots"]["temperature_tradeoff"] = os.path.join(plots, "temperature_tradeoff.png")
    parts.done()
    self.report["evaluation_inputs"] = inputs
    return out

  def _unigram(self, level: int) -> dict[str, float]:
    """Held-out bits per code of the unigram baseline of one level, and of the uniform one."""
    from vqjax.data import codes
    from vqjax.evaluation import metrics

    k = int(self.config.stage1.vq.num_codes)
    train, test = (codes.level_counts(self.path("codes"), s, level, k) for s in ("train", "test"))
    return {
      "unigram_bits_per_code": metrics.unigram_bits_per_code(train, test),
      "uniform_bits_per_code": float(np.log2(k)),
      "codes_used": int((train > 0).sum()),
    }

  def run(self) -> dict[str, Any]:
    """Runs every stage not yet complete; returns the report (also written to disk)."""
    c = self.config
    epath.Path(self.workdir).mkdir(parents=True, exist_ok=True)
    for name in ("stage1", "prior_top", "prior_bottom", "classifier"):
      config_checks.validate(c[name])
    r = self.report
    r["stage1"] = self._stage("stage1", self._train, "stage1", c.stage1)
    self._stage("codes", self._codes)
    num_codes = c.stage1.vq.num_codes
    for level, name in enumerate(("prior_top", "prior_bottom")):
      config = prior_config(c[name], self.path("codes"), num_codes)
      r[name] = self._stage(name, self._train, name, config)
      r[name].update(self._unigram(level))
    r["classifier"] = self._stage("classifier", self._train, "classifier", c.classifier)
    r["features"] = self._stage("features", self._features)
    r["samples"] = self._stage("samples", self._sample, "samples", c.sample.num)
    r["samples_rejection"] = self._stage(
      "samples_rejection",
      self._sample,
      "samples_rejection",
      c.sample.num,
      classifier=self.path("classifier"),
    )
    r["samples_eval"] = self._stage(
      "samples_eval", self._sample, "samples_eval", c.evaluate.num_samples
    )
    # As many kept samples as unfiltered ones, so the two sets compare at the same size.
    r["samples_rejection_eval"] = self._stage(
      "samples_rejection_eval",
      self._sample,
      "samples_rejection_eval",
      c.evaluate.num_samples,
      classifier=self.path("classifier"),
    )
    r["evaluation"] = self._stage("evaluate", self._evaluate)
    # The stages' times as recorded when each ran: a re-run that skipped them keeps the total.
    r["seconds"] = round(sum(r["stages"].values()), 1)
    self.write()
    return r

  def write(self) -> None:
    """Writes report.json and the short report.md table."""
    with epath.Path(self.path("report.json")).open("w") as f:
      json.dump(self.report, f, indent=2, sort_keys=True, default=float)
    with epath.Path(self.path("report.md")).open("w") as f:
      f.write(summary(self.report))


def _same_json(a: Any, b: Any) -> bool:
  """Equal as JSON (NaN equals NaN)."""
  return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _latest_step(run: str) -> int | None:
  """The newest usable checkpoint step of a run (None without one)."""
  from vqjax.training import checkpoint

  ckpt = checkpoint.Checkpointer(checkpoint.resolve_directory(run), read_only=True)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


class _Parts:
  """Progress lines of a stage made of several parts, one as each starts ("evaluate 2/6:
  ... (41 s so far)"), so a long stage is never silent."""

  def __init__(self, stage: str, total: int):
    self.stage, self.total, self.count = stage, total, 0
    self.t0 = time.perf_counter()

  def next(self, what: str) -> None:
    self.count += 1
    logging.info(
      "pipeline: %s %d/%d: %s (%.0f s so far)",
      self.stage,
      self.count,
      self.total,
      what,
      time.perf_counter() - self.t0,
    )

  def done(self) -> None:
    logging.info("pipeline: %s: all %d parts done", self.stage, self.total)


def _fmt(value: Any) -> str:
  return f"{value:.4g}" if isinstance(value, int | float) else str(value)


# The sample-quality statistics of report.md, each with its held-out references.
_QUALITY = ("frechet_distance", "precision", "recall", "classification_accuracy_score")


def _quality_rows(label: str, ev: dict[str, Any]) -> list[tuple[str, str, Any]]:
  """One sample set's rows: each statistic, then the same of as many held-out real images and
  of those images blurred, so a reader sees where the samples stand."""
  n = ev.get("num_samples")
  rows = []
  for key in _QUALITY:
    if key not in ev:
      continue
    rows.append((f"{label} ({n:.0f})" if n else label, key, ev[key]))
    for ref in ("real_images", "blurred_images"):
      if f"{ref}/{key}" in ev:
        what = "held-out real images" if ref == "real_images" else "the same images blurred"
        rows.append((f"  {what} ({ev.get('reference_count', n):.0f})", key, ev[f"{ref}/{key}"]))
  for key in ("fd_ratio_to_blurred", "inception_score"):
    if key in ev:
      rows.append((label, key, ev[key]))
  if "class_share_min" in ev:
    rows.append(
      (
        label,
        "class shares (min / max)",
        f"{ev['class_share_min']:.3f} / {ev['class_share_max']:.3f}",
      )
    )
  return rows


def summary(report: dict[str, Any]) -> str:
  """The report's headline numbers as a Markdown table."""
  ev = report.get("evaluation", {})
  rows = []
  st1 = ev.get("stage1", {})
  for key in ("mse", "psnr", "ssim", "top/perplexity", "bottom/perplexity"):
    if key in st1:
      rows.append(("stage 1", key, st1[key]))
  for name in ("prior_top", "prior_bottom"):
    prior = report.get(name, {})
    if "eval/bits_per_code" in prior:
      rows.append((name, "bits per code (test)", prior["eval/bits_per_code"]))
    for key, what in (("unigram_bits_per_code", "unigram"), ("uniform_bits_per_code", "uniform")):
      if key in prior:
        rows.append((name, f"  bits per code of the {what} baseline", prior[key]))
  if "eval/accuracy" in report.get("classifier", {}):
    rows.append(("rejection classifier", "accuracy (test)", report["classifier"]["eval/accuracy"]))
  features = report.get("features", {})
  if "accuracy" in features:
    rows.append(("evaluation network", "accuracy (test)", features["accuracy"]))
  rows += _quality_rows("samples", ev.get("samples", {}))
  rejection = ev.get("samples_rejection", {})
  rows += _quality_rows("samples kept by rejection", rejection)
  drawn = (report.get("samples_rejection_eval") or {}).get("rejection") or {}
  if "acceptance_rate" in drawn:
    rows.append(
      (
        "samples kept by rejection",
        "acceptance rate (kept / generated)",
        f"{drawn['acceptance_rate']:.3f} ({drawn.get('accepted', '?')} of "
        f"{drawn.get('generated', '?')} generated passed)",
      )
    )
  lines = ["| stage | metric | value |", "| --- | --- | ---: |"]
  lines += [f"| {a} | {b} | {_fmt(v)} |" for a, b, v in rows]
  if features:
    lines += [
      "",
      f"Sample statistics are in the feature space of the evaluation network "
      f"{features.get('run')} (step {features.get('step')}), against the real test images.",
    ]
  times = report.get("stages", {})
  lines += ["", "| stage | seconds |", "| --- | ---: |"]
  lines += [f"| {k} | {v:.0f} |" for k, v in times.items()]
  if "seconds" in report:
    lines.append(f"| total | {report['seconds']:.0f} |")
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS.workdir:
    raise SystemExit("vqjax.pipeline: --workdir is required")
  _cli.setup(tune_malloc=True)  # before JAX creates its CPU backend
  with errors.one_line("vqjax.pipeline", flags.FLAGS.verbose):
    pipe = Pipeline(flags.FLAGS.config, flags.FLAGS.workdir)
    report = pipe.run()
  print(summary(report))
  print(
    f"outputs in {pipe.workdir}: samples/samples.png, samples_rejection/samples.png, plots/, "
    "report.md",
    file=sys.stderr,
  )


if __name__ == "__main__":
  define_flags()
  _cli.run(main, flags_parser=parse_flags)
