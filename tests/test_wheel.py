"""The built wheel installs outside the source tree and serves (issue 14.4).

``maturin build`` makes the abi3 wheel (and ``maturin sdist`` the source archive, as `make wheel`
does); the wheel goes into a fresh virtual environment in a temporary folder, and that
environment's interpreter -- not the source tree -- runs the README's serving example against a
small run folder, ``gr2 --help`` and a preset listing. The fresh environment installs gr2 with
``--no-deps`` and reaches torch/transformers/numpy through a ``.pth`` line pointing at this
interpreter's site-packages: the test checks what the wheel ships (extension, presets,
``py.typed``, ``_gr2.pyi``, console script), not PyPI's resolver, and needs no network.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from _readme import serving_example, tiny_run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _maturin() -> str:
    exe = shutil.which("maturin", path=str(Path(sys.executable).parent)) or shutil.which("maturin")
    if exe is None:
        pytest.fail("maturin is not installed in the test environment (make setup installs it)")
    return exe


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([_maturin(), "build", "--release", "--quiet", "--out", str(out)], cwd=ROOT, check=True)
    subprocess.run([_maturin(), "sdist", "--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    wheels = sorted(out.glob("gr2-*.whl"))
    assert len(wheels) == 1 and "abi3" in wheels[0].name, [w.name for w in out.iterdir()]
    assert list(out.glob("gr2-*.tar.gz")), "maturin sdist wrote no source archive"
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    env = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    py = env / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # dependencies from this interpreter's environment (a plain path line: its .pth files, among
    # them the editable gr2 of the source tree, are NOT processed)
    (site / "_gr2_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    return env


def _run(env: Path, *args: str, cwd: Path) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(list(args), cwd=cwd, env={**clean, "PATH": f"{env / 'bin'}:{clean['PATH']}"},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for required in ("gr2/py.typed", "gr2/_gr2.pyi", "gr2/presets/demo.toml", "gr2/cli.py"):
        assert required in names, f"{required} missing from {wheel.name}"
    assert any(re.fullmatch(r"gr2/_gr2\.abi3\.so", n) for n in names), "no abi3 extension in the wheel"


def test_installed_wheel_runs_outside_the_tree(venv, tmp_path):
    py = str(venv / "bin" / "python")
    where = _run(venv, py, "-c", "import gr2, gr2._gr2 as ext; print(gr2.__file__); print(ext.__file__)", cwd=tmp_path)
    assert all(str(venv) in line for line in where.split()), f"gr2 imported from outside the fresh venv: {where}"
    assert "usage: gr2" in _run(venv, "gr2", "--help", cwd=tmp_path)
    presets = _run(venv, py, "-c", "from importlib.resources import files; "
                   "print(sorted(p.name for p in files('gr2').joinpath('presets').iterdir()))", cwd=tmp_path)
    assert "demo.toml" in presets and "paper.toml" in presets


def test_readme_serving_example_from_the_wheel(venv, tmp_path):
    run_dir = tmp_path / "runs" / "demo"
    tiny_run(run_dir)
    script = tmp_path / "serve.py"
    script.write_text(serving_example())
    out = _run(venv, str(venv / "bin" / "python"), str(script), cwd=tmp_path).splitlines()
    items = [int(x) for x in re.findall(r"\d+", out[0])]
    assert sorted(items) == [1, 7, 49, 99, 120, 180, 257, 300, 404, 500], out
