"""Every code folder is declared in pyproject.toml, so `pip install .` (not only -e) ships it."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_python_package_folder_is_declared():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = {Path(path) for path in config["package-dir"].values()}
    assert set(config["packages"]) == set(config["package-dir"])
    found = {init.parent.relative_to(ROOT) for top in ("api", "cli", "experiments", "sparsity", "data")
             for init in (ROOT / top).rglob("__init__.py")}
    assert found == declared, f"undeclared: {sorted(map(str, found - declared))}"
