"""What arpipe imports is what it declares: every third-party module its sources import is a dependency in
pyproject.toml, and every module the shipped examples import is a dependency or in the `examples` extra,
which the Docker image installs (tests/test_cluster_configs.py checks the image installs both), so
examples/quickstart.yaml runs on a cluster node built from it."""

from __future__ import annotations

import ast
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml with tomllib")
ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
PACKAGE_FOLDERS = ("arpipe", "pipeline", "stages", "schemas", "cluster")


def declared(*extras: str) -> set[str]:
    requirements = PROJECT["dependencies"] + [r for e in extras for r in PROJECT["optional-dependencies"][e]]
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def third_party_imports(files: list[Path]) -> dict[str, set[str]]:
    """Top-level module -> the files importing it, of every import that is neither stdlib nor arpipe."""
    found: dict[str, set[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("arpipe", "__future__"):
                    where = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
                    found.setdefault(top, set()).add(where)
    return found


def undeclared(imports: dict[str, set[str]], allowed: set[str]) -> list[str]:
    """'module (files): distribution' for each import no allowed distribution provides."""
    providers = packages_distributions()
    missing = []
    for module, files in sorted(imports.items()):
        dists = {canonicalize_name(d) for d in providers.get(module, [])}
        if not dists & allowed:
            missing.append(f"{module} ({', '.join(sorted(files)[:2])}): from {sorted(dists) or 'nothing installed'}")
    return missing


def test_every_third_party_import_of_arpipe_is_a_declared_dependency():
    files = [f for folder in PACKAGE_FOLDERS for f in (ROOT / folder).rglob("*.py")]
    imports = third_party_imports(files)
    assert {"torch", "ray", "deepspeed", "mlflow", "matplotlib"} <= set(imports)   # the scan sees real imports
    assert undeclared(imports, declared()) == []


def test_every_import_of_the_examples_is_installable_from_the_images_dependencies():
    imports = third_party_imports(sorted((ROOT / "examples").glob("*.py")))
    assert {"sklearn", "nilearn"} <= set(imports)
    assert undeclared(imports, declared("examples")) == []
    assert undeclared(imports, declared()) != [], "the examples' data packages are the extra's, not arpipe's"


def test_the_scan_names_an_import_nobody_declared(tmp_path):
    """The check can fail: a module importing a package outside the declared set is named with its file."""
    module = tmp_path / "steps.py"
    module.write_text("import yaml\nimport hypothesis\n")
    assert undeclared(third_party_imports([module]), declared()) == [
        "hypothesis (steps.py): from ['hypothesis']"]


def test_the_license_is_an_spdx_expression():
    """PEP 639's form: the old table makes setuptools print a deprecation banner on every install."""
    assert PROJECT["license"] == "Apache-2.0"
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    setuptools = next(Requirement(r) for r in build if Requirement(r).name == "setuptools")
    assert not setuptools.specifier.contains("76.9")   # SPDX strings need setuptools >= 77
