"""The import graph of vqjax/ points one way: each module imports only from its own layer or
below, models and data never import each other, and no files import each other in a cycle.

The layers, lowest first (issue 22):
  L0  the config schema and its checks, the errors, the plugin look-up, file checksums, paths
      and how runs record each other: `vqjax.configs`, `vqjax.config_checks`, `vqjax.errors`,
      `vqjax.plugins`, `vqjax.checksums`, `vqjax.paths`, `vqjax.links`;
  L1  `vqjax.models.*` and `vqjax.data.*` (independent of each other);
  L2  `vqjax.training.*`;
  L3  loading runs, sampling, evaluation and the converters: `vqjax.runs`, `vqjax.sampling.*`,
      `vqjax.evaluation.*`, `vqjax.convert` (its library modules);
  L4  the programs: `python -m vqjax.X` for each CLI, `vqjax/convert/__main__.py`, their shared
      start-up (`vqjax/_cli.py`) and the package's front door (`vqjax/__init__.py`, which
      re-exports `load_run` and the CLI set-up lazily; Python runs it before any submodule, but
      a module importing it by name would reach the top layer).

The graph is read with `ast` from the files, so imports inside functions count as much as those
at the top, and so does `importlib.import_module("vqjax....")` with a literal name.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vqjax")

# Module name (or package, covering its modules) -> layer. The longest matching prefix wins.
LAYERS = {
  "vqjax.configs": 0,
  "vqjax.config_checks": 0,
  "vqjax.errors": 0,
  "vqjax.plugins": 0,
  "vqjax.checksums": 0,
  "vqjax.links": 0,
  "vqjax.paths": 0,
  "vqjax.models": 1,
  "vqjax.data": 1,
  "vqjax.training": 2,
  "vqjax.runs": 3,
  "vqjax.sampling": 3,
  "vqjax.evaluation": 3,
  "vqjax.convert": 3,
  "vqjax": 4,  # the package's __init__ only: every other module is named here
  "vqjax._cli": 4,
  "vqjax.train": 4,
  "vqjax.pipeline": 4,
  "vqjax.extract_codes": 4,
  "vqjax.sample": 4,
  "vqjax.evaluate": 4,
  "vqjax.features": 4,
  "vqjax.anomaly": 4,
  "vqjax.anomaly_runs": 4,
  "vqjax.prepare": 4,
  "vqjax.convert.__main__": 4,
}
# Groups of one layer that must not import each other.
INDEPENDENT = (("vqjax.models", "vqjax.data"),)


def module_files(root: str = ROOT) -> dict[str, str]:
  """{dotted module name: path} of every .py file under `root` (a package is its __init__)."""
  base = os.path.dirname(root)
  out = {}
  for directory, _, files in os.walk(root):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(directory, name)
      dotted = os.path.relpath(path, base)[: -len(".py")].replace(os.sep, ".")
      out[dotted.removesuffix(".__init__")] = path
  return out


def _target(name: str, modules: dict[str, str]) -> str | None:
  """The file an imported dotted name lands in: the longest prefix that is a module."""
  while name and name not in modules:
    name = name.rpartition(".")[0]
  return name or None


def imports_of(module: str, source: str, modules: dict[str, str], is_package: bool) -> dict:
  """{imported vqjax module: [line numbers]} of one file, wherever the import statement is."""
  package = module if is_package else module.rpartition(".")[0]
  found: dict[str, list[int]] = {}

  def add(name: str, line: int) -> None:
    target = _target(name, modules)
    if target is not None and target != module:
      found.setdefault(target, []).append(line)

  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split(".")[0] == "vqjax":
          add(alias.name, node.lineno)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: from the package, `level - 1` packages up
        parts = package.split(".")
        parts = parts[: len(parts) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      if base.split(".")[0] != "vqjax":
        continue
      for alias in node.names:
        # `from vqjax.data import codes` imports the module vqjax.data.codes; `from vqjax.errors
        # import UserError` the module vqjax.errors.
        full = f"{base}.{alias.name}"
        add(full if full in modules else base, node.lineno)
    elif isinstance(node, ast.Call) and _imported_by_name(node):
      add(_imported_by_name(node), node.lineno)
  return found


def _imported_by_name(call: ast.Call) -> str | None:
  """The module of `importlib.import_module("vqjax....")` or `__import__("vqjax....")`."""
  func = call.func
  name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
  if name not in ("import_module", "__import__") or not call.args:
    return None
  arg = call.args[0]
  if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
    return arg.value if arg.value.split(".")[0] == "vqjax" else None
  return None


def import_graph(root: str = ROOT) -> tuple[dict[str, dict[str, list[int]]], dict[str, str]]:
  """({module: {imported module: [lines]}}, {module: path}) over every file under `root`."""
  modules = module_files(root)
  graph = {}
  for module, path in modules.items():
    with open(path) as f:
      source = f.read()
    graph[module] = imports_of(module, source, modules, path.endswith("__init__.py"))
  return graph, modules


def layer_of(module: str) -> int | None:
  """The layer of a module: its longest prefix in LAYERS ("vqjax" itself only for __init__)."""
  if module == "vqjax":
    return LAYERS["vqjax"]
  name = module
  while name and name != "vqjax":
    if name in LAYERS:
      return LAYERS[name]
    name = name.rpartition(".")[0]
  return None


def _group(module: str, groups: tuple[str, ...]) -> str | None:
  return next((g for g in groups if module == g or module.startswith(g + ".")), None)


def cycles(graph: dict[str, dict]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan), each sorted."""
  index, low, on_stack, stack, out = {}, {}, set(), [], []
  counter = [0]

  def visit(v: str) -> None:
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, {}):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return sorted(out)


@pytest.fixture(scope="module")
def graph():
  return import_graph()


def _where(modules: dict[str, str], module: str, lines: list[int]) -> str:
  path = os.path.relpath(modules[module], os.path.dirname(ROOT))
  return f"{path}:{','.join(map(str, sorted(set(lines))))}"


def test_the_reader_sees_imports_at_the_top_inside_functions_and_by_name():
  modules = dict.fromkeys(["vqjax.a", "vqjax.b", "vqjax.c", "vqjax.d", "vqjax.p", "vqjax.p.e"])
  source = (
    "import importlib\n"
    "from vqjax import a\n"
    "def f():\n"
    "  from vqjax.b import thing\n"
    "  import vqjax.c.sub\n"
    "  return importlib.import_module('vqjax.d')\n"
    "class K:\n"
    "  def g(self):\n"
    "    from .e import x\n"
  )
  found = imports_of("vqjax.p", source, modules, is_package=True)
  assert found == {
    "vqjax.a": [2],
    "vqjax.b": [4],
    "vqjax.c": [5],
    "vqjax.d": [6],
    "vqjax.p.e": [9],
  }
  assert cycles({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}, "d": {"a": []}}) == [
    ["a", "b", "c"]
  ]


def test_every_module_has_a_layer(graph):
  _, modules = graph
  unplaced = sorted(m for m in modules if layer_of(m) is None)
  assert not unplaced, f"modules without a layer (add them to LAYERS): {unplaced}"


def test_no_module_imports_from_a_layer_above_its_own(graph):
  edges, modules = graph
  upward = [
    f"{_where(modules, m, lines)} (L{layer_of(m)}) imports {t} (L{layer_of(t)})"
    for m, targets in sorted(edges.items())
    for t, lines in sorted(targets.items())
    if layer_of(t) > layer_of(m)
  ]
  assert not upward, "imports from a higher layer:\n  " + "\n  ".join(upward)


@pytest.mark.parametrize("groups", INDEPENDENT, ids=lambda g: " / ".join(g))
def test_independent_groups_never_import_each_other(graph, groups):
  edges, modules = graph
  crossing = [
    f"{_where(modules, m, lines)} imports {t}"
    for m, targets in sorted(edges.items())
    for t, lines in sorted(targets.items())
    if _group(m, groups) and _group(t, groups) and _group(m, groups) != _group(t, groups)
  ]
  assert not crossing, f"{' and '.join(groups)} import each other:\n  " + "\n  ".join(crossing)


def test_no_import_cycle_between_files(graph):
  edges, modules = graph
  found = cycles(edges)
  described = []
  for component in found:
    inside = [
      f"{_where(modules, m, lines)} -> {t}"
      for m in component
      for t, lines in sorted(edges[m].items())
      if t in component
    ]
    described.append(" <-> ".join(component) + ":\n    " + "\n    ".join(inside))
  assert not found, "import cycles:\n  " + "\n  ".join(described)
