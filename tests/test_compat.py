"""The supported Python versions and library logging conventions."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "gr2"


def _sources():
    return sorted(PACKAGE.rglob("*.py"))


def test_python_311_is_required_everywhere():
    """One supported floor, stated once per tool: pip (requires-python), the abi3 wheel tag (pyo3's
    abi3-py311) and the locked setup (the Makefile's gate). The lock pins numpy 2.4 / pandas 3.1,
    which have no 3.10 builds, so 3.10 must not be claimed anywhere."""
    root = PACKAGE.parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"
    assert not any(d.replace(" ", "").startswith("tomli") for d in project["dependencies"])
    pyo3 = tomllib.loads((root / "Cargo.toml").read_text())["dependencies"]["pyo3"]
    assert "abi3-py311" in pyo3["features"]
    assert "sys.version_info >= (3, 11)" in (root / "Makefile").read_text()


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
