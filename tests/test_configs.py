"""Tests of vqjax/configs.py (experiment loading, variants) and of the config-level
helpers of vqjax/models/registry.py (total_stride)."""

import os

import ml_collections
import pytest

from vqjax import config_checks, configs, errors
from vqjax.models import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(
  f[:-3] for f in os.listdir(os.path.join(ROOT, "experiments")) if f.endswith(".py")
)


# --- loading experiments ------------------------------------------------------------------------


def test_lists_the_repository_experiments():
  assert configs.list_experiments() == EXPERIMENTS
  assert "fashion_mnist" in EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_and_its_smoke_variant_load_and_validate(name):
  full = configs.load_experiment(name)
  smoke = configs.load_experiment(f"experiments/{name}.py:smoke")
  for config in (full, smoke):
    config_checks.validate(config)
    # Locked like the CLI's config: an unknown field is an error, not a new key.
    with pytest.raises(AttributeError):
      config.optim.lrr = 1.0
  # The smoke variant is what shrink_for_smoke makes of the full config (plus at most the
  # model-specific strides), and it must fit its 32x32 images.
  assert smoke.train.steps == 1 and smoke.data.reader == "local"
  assert full.to_dict() != smoke.to_dict()
  if full.task == "classifier":
    assert smoke.data.name == "fashion_mnist"
    return
  if full.task == "prior":  # priors: smoke runs on synthetic codes, no stage-1 model
    assert smoke.data.name == "synthetic_codes" and full.data.name == "codes"
    assert 0 <= smoke.prior.level < len(smoke.data.synthetic_shapes)
    return
  assert smoke.data.image_size % registry.total_stride(smoke) == 0
  assert full.data.image_size % registry.total_stride(full) == 0


def test_spellings_of_the_same_experiment_agree():
  want = configs.load_experiment("fashion_mnist:smoke").to_dict()
  path = os.path.join(ROOT, "experiments", "fashion_mnist.py")
  for spec in ("fashion_mnist.py:smoke", "experiments/fashion_mnist.py:smoke", path + ":smoke"):
    assert configs.load_experiment(spec).to_dict() == want


def test_a_missing_experiment_names_the_available_ones():
  for spec in ("nope", "experiments/nope.py:smoke", "fashion_mnst.py"):
    with pytest.raises(errors.UserError) as e:
      configs.load_experiment(spec)
    message = str(e.value)
    assert spec.split(":")[0] in message and "\n" not in message
    assert all(name in message for name in EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_an_unknown_variant_names_the_known_ones(name):
  with pytest.raises(errors.UserError, match=rf"{name}: unknown variant 'smok'.*smoke"):
    configs.load_experiment(f"{name}:smok")


def test_apply_variant():
  calls = []
  c = configs.base_config()
  assert configs.apply_variant(c, None, {"a": calls.append}) is c and not calls
  assert configs.apply_variant(c, "a", {"a": calls.append}) is c and calls == [c]
  with pytest.raises(errors.UserError, match="'c'; known variants: a, b"):
    configs.apply_variant(c, "c", {"b": calls.append, "a": calls.append})


def test_field_summary_has_every_field_and_default():
  text = configs.summarize_fields()
  base = configs.base_config()
  for group, fields in base.items():
    if isinstance(fields, ml_collections.ConfigDict):
      for field, value in fields.items():
        assert f"{group}.{field}={value!r}" in text
    else:
      assert f"{group}={fields!r}" in text


# --- total_stride -------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "model,expected",
  [
    (dict(name="vqvae", downsample=2), 4),
    (dict(name="vqvae", downsample=3), 8),
    (dict(name="vqvae2", levels=2, first_stride=4, level_stride=2), 8),  # 256 -> 64 -> 32
    (dict(name="vqvae2", levels=2, first_stride=2, level_stride=2), 4),
    (dict(name="vqvae2", levels=3, first_stride=8, level_stride=2), 32),  # 1024 -> 128, 64, 32
    (dict(name="vqvae2", levels=3, first_stride=2, level_stride=4), 32),
  ],
)
def test_total_stride(model, expected):
  config = configs.base_config()
  config.model.update(model)
  assert registry.total_stride(config) == expected


def test_total_stride_of_an_unknown_model_is_a_user_error():
  config = configs.base_config()
  config.model.name = "vqgan"
  with pytest.raises(errors.UserError, match="'vqgan'.*vqvae, vqvae2"):
    registry.total_stride(config)


def test_a_config_file_with_a_syntax_error_is_one_line(tmp_path):
  path = tmp_path / "broken.py"
  path.write_text("import ml_collections\n\n\ndef get_config(:\n  return None\n")
  with pytest.raises(errors.UserError) as e:
    configs.load_experiment(str(path))
  message = str(e.value)
  assert message.startswith(f"{path}:4: SyntaxError") and "\n" not in message
  path.write_text("def get_config():\n  x = 1\n    return x\n")
  with pytest.raises(errors.UserError, match=r"broken.py:3: IndentationError"):
    configs.load_experiment(str(path))


@pytest.mark.slow
@pytest.mark.parametrize("program", ["train", "pipeline"])
def test_the_programs_name_a_config_syntax_error_in_one_line(tmp_path, program):
  import subprocess
  import sys

  path = tmp_path / "broken.py"
  path.write_text("def get_config(:\n  pass\n")
  for form in (["--config", str(path)], [f"--config={path}"]):
    cmd = [sys.executable, "-m", f"vqjax.{program}", *form, "--workdir", str(tmp_path / "w")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"vqjax.{program}: {path}:1: SyntaxError: invalid syntax"], lines
