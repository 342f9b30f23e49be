"""The README is the front door: at most 200 lines, every link and path it (and docs/) names
exists, no internet host is named, and its Python snippets run, against a tiny stage-1 run
trained here in place of the quickstart's and fake idx files in place of Debian's."""

import glob
import gzip
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS.md")
TEST_COMMAND = "pip install -e '.[test]' && python -m pytest -n 2 --dist loadfile"
# What the README's snippets read, and what the test puts there instead.
QUICKSTART_RUN = "workdirs/quickstart/stage1"
DEBIAN_FMNIST = "/usr/share/datasets/fashion-mnist"


def _read(path: str) -> str:
  with open(path) as f:
    return f.read()


def python_blocks(text: str) -> list[str]:
  return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def _prose(text: str) -> str:
  """The text without its fenced blocks (so inline code spans pair up)."""
  return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def test_readme_is_a_short_front_page_with_the_ci_test_command():
  text = _read(README)
  assert len(text.splitlines()) <= 200
  assert TEST_COMMAND in text  # CI runs the README's test command (.ci/run)
  assert TEST_COMMAND in _read(os.path.join(ROOT, ".ci", "run"))
  assert len(python_blocks(text)) >= 1


@pytest.mark.parametrize("page", [README, *DOCS], ids=os.path.basename)
def test_every_link_and_path_a_page_names_exists(page):
  text = _read(page)
  here = os.path.dirname(page)
  links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
  missing = [t for t in links if not os.path.exists(os.path.join(here, t))]
  spans = re.findall(r"`([^`\n]+)`", _prose(text))
  paths = [
    s
    for s in spans
    if re.fullmatch(r"(vqjax|experiments|benchmarks|notebooks|docs|tests)/[\w./*-]*", s)
  ]
  missing += [p for p in paths if not glob.glob(os.path.join(ROOT, p))]
  # `python -m vqjax.train`, and the first column of the README's table of programs.
  modules = set(re.findall(r"python -m vqjax\.([a-z_]+)", text))
  modules |= set(re.findall(r"^\| `([a-z_]+)` \|", text, re.M))
  missing += [
    f"vqjax.{m}"
    for m in sorted(modules)
    if not (
      os.path.isfile(os.path.join(ROOT, "vqjax", f"{m}.py"))
      or os.path.isfile(os.path.join(ROOT, "vqjax", m, "__main__.py"))
    )
  ]
  assert not missing, f"{os.path.basename(page)} names what does not exist: {missing}"


def test_the_readme_links_every_docs_page():
  linked = {
    os.path.normpath(os.path.join(ROOT, t)) for t in re.findall(r"\]\(([^)]+)\)", _read(README))
  }
  assert [p for p in DOCS if p not in linked] == []
  assert DOCS, "docs/ has no pages"


@pytest.mark.parametrize("page", [README, *DOCS, RESULTS], ids=os.path.basename)
def test_no_page_names_an_internet_host(page):
  hosts = re.findall(r"https?://\S+|www\.\S+|\b[\w-]+\.(?:com|org|io|net|dev)\b", _read(page))
  assert hosts == []


def test_results_cites_every_stored_result_file():
  stored = {
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "benchmarks", "results", "*"))
  }
  cited = set(re.findall(r"benchmarks/results/[\w.-]+\.jsonl", _read(RESULTS)))
  assert stored == cited


# --- the snippets, run ---------------------------------------------------------------------------


def _idx(array: np.ndarray) -> bytes:
  """A uint8 array as an idx file: magic 0 0 8 ndim, then big-endian dimensions."""
  header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
  return header + array.tobytes()


def _fake_fashion_mnist(path: str) -> None:
  """Debian-like idx .gz files of random 28x28 images (enough for the smoke config)."""
  os.makedirs(path)
  rng = np.random.default_rng(0)
  for prefix, n in (("train", 64), ("t10k", 16)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
      with gzip.open(os.path.join(path, f"{prefix}-{kind}-ubyte.gz"), "wb") as f:
        f.write(_idx(array))


def _env() -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _run(args: list[str], cwd: str, timeout: int = 600) -> subprocess.CompletedProcess:
  out = subprocess.run(
    args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout, check=False
  )
  assert out.returncode == 0, (
    f"{args}: rc {out.returncode}\n{out.stdout[-2000:]}{out.stderr[-4000:]}"
  )
  return out


# Printed after a snippet: the shapes of the arrays it made, for the test to check.
_SHAPES = """
import json as _json
print("SHAPES", _json.dumps({
  k: [list(a.shape) for a in v] if isinstance(v, tuple) else list(v.shape)
  for k, v in dict(globals()).items()
  if k in ("images", "codes", "recon")
}))
"""


@pytest.mark.slow
def test_readme_snippets_run_on_a_trained_stage1(tmp_path):
  fmnist = str(tmp_path / "fmnist")
  _fake_fashion_mnist(fmnist)
  run = str(tmp_path / "quickstart" / "stage1")
  _run(
    [
      sys.executable,
      "-m",
      "vqjax.train",
      "--config=experiments/fashion_mnist.py:smoke",
      f"--workdir={run}",
      f"--config.data.local_dir={fmnist}",
      f"--config.data.data_dir={tmp_path / 'cache'}",
    ],
    cwd=ROOT,
  )
  blocks = python_blocks(_read(README))
  assert any(QUICKSTART_RUN in b for b in blocks), "the snippet should read the quickstart's run"
  for i, block in enumerate(blocks):
    code = block.replace(QUICKSTART_RUN, run).replace(DEBIAN_FMNIST, fmnist)
    script = tmp_path / f"readme_{i}.py"
    script.write_text(code + _SHAPES)
    out = _run([sys.executable, str(script)], cwd=str(tmp_path)).stdout
    if QUICKSTART_RUN in block:
      mse = float(re.search(r"reconstruction MSE (\S+)", out).group(1))
      assert 0 <= mse < 4  # images and reconstructions in [-1, 1]-ish
      shapes = json.loads(out.split("SHAPES", 1)[1])
      assert shapes == {
        "images": [8, 32, 32, 1],
        "codes": [[8, 4, 4], [8, 8, 8]],
        "recon": [8, 32, 32, 1],
      }


@pytest.mark.slow
def test_docs_snippets_run(tmp_path):
  blocks = [(p, b) for p in DOCS for b in python_blocks(_read(p))]
  assert blocks
  for i, (page, block) in enumerate(blocks):
    assert "workdirs/" not in block, f"{page}: a docs snippet should need no trained run"
    script = tmp_path / f"docs_{i}.py"
    script.write_text(block)
    _run([sys.executable, str(script)], cwd=str(tmp_path))
