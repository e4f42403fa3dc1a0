"""Python 3.10 support (tomllib fallback) and library logging conventions."""

from __future__ import annotations

import ast
import importlib
import sys
import tomllib
import types
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "gr2"


def _sources():
    return sorted(PACKAGE.rglob("*.py"))


def test_tomllib_is_imported_in_one_place_only():
    """Python 3.10 has no tomllib: every module takes it from gr2.config, which falls back to tomli."""
    offenders = []
    for path in _sources():
        if path.name == "config.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if "tomllib" in names or (isinstance(node, ast.ImportFrom) and node.module == "tomllib"):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders, f"import tomllib outside gr2.config (breaks Python 3.10): {offenders}"


def test_config_falls_back_to_tomli_below_python_311(monkeypatch, tmp_path):
    """No 3.10 interpreter here: simulate one (version_info 3.10, no tomllib module, tomli present)."""
    import gr2.config

    fake_tomli = types.ModuleType("tomli")
    fake_tomli.loads, fake_tomli.TOMLDecodeError = tomllib.loads, tomllib.TOMLDecodeError
    monkeypatch.setitem(sys.modules, "tomli", fake_tomli)
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` raises ImportError
    monkeypatch.setattr(sys, "version_info", (3, 10, 14, "final", 0))
    try:
        config = importlib.reload(gr2.config)
        assert config.tomllib is fake_tomli
        path = tmp_path / "c.toml"
        path.write_text("[rl]\nlr = 1e-6\n")
        assert config.load_toml(path) == {"rl": {"lr": 1e-6}}
    finally:
        monkeypatch.undo()
        importlib.reload(gr2.config)
    assert gr2.config.tomllib is tomllib


def test_pyproject_declares_tomli_for_python_310():
    project = tomllib.loads((PACKAGE.parents[1] / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.10"
    assert any(d.replace(" ", "").startswith("tomli") and "python_version<'3.11'" in d.replace(" ", "")
               for d in project["dependencies"])


def test_library_code_logs_instead_of_printing():
    """print() is for the CLI entry points (``main``) only; library code uses logging."""
    offenders = []
    for path in _sources():
        tree = ast.parse(path.read_text())
        allowed = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "main":
                allowed |= {id(n) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
                    and id(node) not in allowed):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders, f"print() in library code: {offenders}"
