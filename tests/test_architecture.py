"""The shape of the Python package, read from its source with ``ast`` (nothing is imported).

* **No import cycle** among gr2's modules. Every ``import`` / ``from ... import`` statement counts,
  wherever it stands: at module level, inside a function or method (a deferred import still runs
  the imported module, and a cycle through one is a cycle all the same), and under ``if
  TYPE_CHECKING:``. An edge goes to the module a statement names: ``from gr2.train import sft``
  -> ``gr2.train.sft``; ``from gr2.rewards import verify_rewards`` -> ``gr2.rewards``; ``from gr2
  import SidIndex`` -> ``gr2`` (the package's ``__init__``). The parent packages Python imports on
  the way (``gr2``, ``gr2.train``) are not edges: a package ``__init__`` that re-exports its
  submodules would otherwise be a "cycle" with each of them. The native module ``gr2._gr2`` (its
  stub ``_gr2.pyi``) is a leaf.
* **Size**: a module over :data:`MAX_LINES` lines says why at its top: one of its first
  :data:`REASON_WITHIN` lines starts with ``# size:`` followed by the reason (e.g. ``# size: one
  decoder loop per decoding mode; they share the scorer and the result type``). A docstring does
  not count: the reason is for the reader deciding whether to split the module, not for the API
  docs.
* **Two layers**: the pipeline (:data:`PIPELINE`: the registry, the runner and one module per stage)
  sits over the library (every other module), which never imports it -- not at module level, not in
  a function, not under ``TYPE_CHECKING``, not by name through ``importlib.import_module``. Only the
  entry point (:data:`ENTRY_POINTS`, the ``gr2`` command) imports both.
* **The library knows no run directory**: no library function takes a ``run_dir`` -- it takes the
  loaded objects, and the stage modules (:mod:`gr2.pipeline.inputs` for what several share) read
  them from the run directory -- except the documented public artifact readers of
  :data:`RUN_DIR_READERS`, each of which reads one artifact a user asks for by its run directory.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "gr2"
MAX_LINES = 500
REASON_WITHIN = 3
PIPELINE = "gr2.pipeline"
ENTRY_POINTS = frozenset({"gr2.cli"})
# public API that reads one artifact of a run by its documented path (README, gr2.data docstring,
# `gr2 encode --run-dir`): (module, function or Class.method)
RUN_DIR_READERS = frozenset({
    ("gr2.data.catalog", "_load"), ("gr2.data.catalog", "load_items"), ("gr2.data.catalog", "load_sequences"),
    ("gr2.data.catalog", "load_stats"), ("gr2.data.catalog", "ItemCatalog.from_run_dir"),
    ("gr2.rq_parquet", "RQVAETransform.from_run_dir"), ("gr2.rq_parquet", "catalog_keys"),
})


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted name -> file of every module of the package (``.pyi`` stubs of native modules too)."""
    out = {}
    for path in sorted(root.rglob("*.py*")):
        if path.suffix == ".pyi" and path.with_suffix(".py").exists() or path.suffix not in (".py", ".pyi"):
            continue
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _owner(name: str, known: dict[str, Path]) -> str | None:
    """The gr2 module a dotted name lives in (itself, or its nearest enclosing module)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(known: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the gr2 modules its import statements name (module docstring)."""
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        package = name if path.stem == "__init__" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
            for target in targets:
                if target.split(".")[0] == "gr2" and (owner := _owner(target, known)) not in (None, name):
                    edges.add(owner)
        graph[name] = edges
    return graph


def in_pipeline(name: str) -> bool:
    return name == PIPELINE or name.startswith(PIPELINE + ".")


def dynamic_imports(path: Path) -> set[str]:
    """The module names a file imports by string: ``importlib.import_module("...")`` and
    ``__import__("...")`` with a literal name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__"):
                found.add(node.args[0].value)
    return found


def layering_violations(known: dict[str, Path]) -> list[str]:
    """``library module -> pipeline module`` for every import of the pipeline from outside it (the
    entry points excepted), static (:func:`import_graph`) or by name (:func:`dynamic_imports`)."""
    graph = import_graph(known)
    found = []
    for name, path in known.items():
        if in_pipeline(name) or name in ENTRY_POINTS:
            continue
        targets = graph[name] | {t for t in dynamic_imports(path) if t.split(".")[0] == "gr2"}
        found.extend(f"{name} -> {target}" for target in sorted(targets) if in_pipeline(target))
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle_among_gr2_modules():
    found = cycles(import_graph(modules()))
    assert not found, "import cycles (module-level and function-level imports): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_the_library_never_imports_the_pipeline():
    known = modules()
    assert PIPELINE in known, "gr2.pipeline is a package (the registry, the runner, one module per stage)"
    found = layering_violations(known)
    assert not found, ("library modules that import the pipeline (module-level, function-level, TYPE_CHECKING "
                       "or importlib): " + "; ".join(found) + ". Move the run-directory code into the stage's "
                       "gr2.pipeline module, or the pure part down into the library.")


def run_dir_functions(known: dict[str, Path]) -> set[tuple[str, str]]:
    """(module, function or Class.method) of every library function with a ``run_dir`` parameter."""
    found = set()
    for name, path in known.items():
        if in_pipeline(name) or name in ENTRY_POINTS or path.suffix != ".py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        owners = {id(f): f"{node.name}." for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
                  for f in node.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                params = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                if any(a.arg == "run_dir" for a in params):
                    found.add((name, owners.get(id(node), "") + node.name))
    return found


def test_the_library_takes_objects_not_run_directories():
    extra = run_dir_functions(modules()) - RUN_DIR_READERS
    assert not extra, ("library functions that take a run_dir (the pipeline's business): "
                       + ", ".join(f"{m}.{f}" for m, f in sorted(extra)) + ". Take the loaded objects and read "
                       "them in the stage's gr2.pipeline module (gr2.pipeline.inputs for shared readers).")


def test_the_run_dir_check_sees_functions_and_methods(tmp_path):
    root = tmp_path / "gr2"
    (root / "pipeline").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "pipeline" / "__init__.py").write_text("def run(run_dir): pass\n")
    (root / "lib.py").write_text("def f(x, *, run_dir=None): pass\nclass C:\n    def load(self, run_dir): pass\n")
    assert run_dir_functions(modules(root)) == {("gr2.lib", "f"), ("gr2.lib", "C.load")}


def test_every_stage_runner_lives_in_the_pipeline():
    """The registry names one gr2.pipeline module per stage, and the runner of ``gr2 run`` is there too."""
    registry = (PACKAGE / "pipeline" / "registry.py").read_text()
    stage_modules = [node.args[1].value for node in ast.walk(ast.parse(registry))
                     if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Stage"
                     and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)]
    assert len(stage_modules) == 10 and all(in_pipeline(m) for m in stage_modules), stage_modules
    known = modules()
    assert all(m in known for m in stage_modules) and "gr2.pipeline.run" in known and "gr2.pipeline.report" in known


def test_every_module_over_the_size_limit_states_why():
    unexplained = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        if len(lines) > MAX_LINES and not any(line.startswith("# size:") and line[7:].strip()
                                              for line in lines[:REASON_WITHIN]):
            unexplained.append(f"{path.relative_to(PACKAGE.parent)} ({len(lines)} lines)")
    assert not unexplained, (f"modules over {MAX_LINES} lines without a '# size: <reason>' line among their first "
                             f"{REASON_WITHIN}: split them by concern or say why not: " + ", ".join(unexplained))


@pytest.mark.parametrize("source, expect", [
    ({"a": "from gr2 import b\n", "b": "def f():\n    from gr2.a import x\n"}, [["gr2.a", "gr2.b"]]),
    ({"a": "import gr2.b\n", "b": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n"},
     [["gr2.a", "gr2.b"]]),
    ({"a": "from gr2.b import thing\n", "b": "from gr2 import _gr2\n"}, []),
    ({"a": "from .b import thing\n", "b": "import os\n", "c": "from gr2 import a, b\n"}, []),
])
def test_the_cycle_check_sees_function_level_and_relative_imports(tmp_path, source, expect):
    """The checker itself, on small packages: a cycle closed by a function-level or a
    TYPE_CHECKING import is found, a native leaf and a plain DAG are not cycles."""
    root = tmp_path / "gr2"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "_gr2.pyi").write_text("")
    for name, text in source.items():
        (root / f"{name}.py").write_text(text)
    assert cycles(import_graph(modules(root))) == expect



@pytest.mark.parametrize("source, expect", [
    ({"lib": "def f():\n    from gr2.pipeline import run\n"}, ["gr2.lib -> gr2.pipeline.run"]),
    ({"lib": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import gr2.pipeline\n"}, ["gr2.lib -> gr2.pipeline"]),
    ({"lib": "from gr2 import pipeline\n"}, ["gr2.lib -> gr2.pipeline"]),
    ({"lib": "import importlib\nimportlib.import_module('gr2.pipeline.run')\n"}, ["gr2.lib -> gr2.pipeline.run"]),
    ({"lib": "from .pipeline.run import x\n"}, ["gr2.lib -> gr2.pipeline.run"]),
    ({"cli": "from gr2.pipeline import run\n", "lib": "import os\n"}, []),
])
def test_the_layer_check_sees_every_kind_of_import(tmp_path, source, expect):
    """The checker itself, on a small package: a library module that imports the pipeline in a
    function, under TYPE_CHECKING, through ``from gr2 import``, by name or relatively is found; the
    entry point may import it; the pipeline may import the library."""
    root = tmp_path / "gr2"
    (root / "pipeline").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "pipeline" / "__init__.py").write_text("")
    (root / "pipeline" / "run.py").write_text("from gr2 import lib\nx = 1\n")
    (root / "lib.py").write_text("")
    for name, text in source.items():
        (root / f"{name}.py").write_text(text)
    assert layering_violations(modules(root)) == expect
