"""Prints the requirements of `make test-ray`'s environment (.venv-ray), one per line, for
`make lock-ray` to resolve: pyproject's `ray` and `test` extras, maturin, and only those of gr2's
own dependencies that the encode path (gr2.ray -> gr2.rq_parquet) imports. torch, transformers
etc. stay out: the Ray tests encode .npy codebooks, and gr2 is installed with --no-deps there."""

import re
import tomllib
from pathlib import Path

# what `import gr2, gr2.rq_parquet` loads (checked: no torch/transformers/datasets in sys.modules)
ENCODE_PATH_DEPS = ("numpy", "pyarrow", "tqdm")


def main() -> None:
    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    core = [r for r in project["dependencies"] if re.match(r"[A-Za-z0-9_.-]+", r).group() in ENCODE_PATH_DEPS]
    for requirement in extras["ray"] + extras["test"] + core + ["maturin>=1.9,<2"]:
        print(requirement)


if __name__ == "__main__":
    main()
