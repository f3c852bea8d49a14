"""arpipe's import layers hold: the real ``lint-imports`` checks pyproject's contracts on the installed layout.

A maintainer adds an import; these tests tell them, with import-linter's own chain of imports, when it
crosses a layer (docs/concepts.md, "Layers"). grimp builds its graph by walking a package's folder, and
arpipe's subpackages live in other folders of the checkout (pyproject's ``package-dir`` maps
``arpipe.pipeline`` to ``pipeline/``), so the tests first lay the sources out as an install would:
``<tmp>/arpipe/pipeline/...``, ``<tmp>/arpipe/stages/...``, and run ``lint-imports`` there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:   # Python 3.10: import-linter depends on tomli there
    import tomli as tomllib

from arpipe.pipeline.registry import KINDS

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _config() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]


def _contract(contract_id: str) -> dict:
    return next(c for c in _config()["importlinter"]["contracts"] if c["id"] == contract_id)


def installed_layout(dest: Path) -> Path:
    """Copy every package's ``.py`` files to where ``pip install`` puts them, following
    ``[tool.setuptools] packages`` and ``package-dir`` (the longest mapped prefix wins)."""
    setuptools = _config()["setuptools"]
    package_dir: dict[str, str] = setuptools["package-dir"]
    for package in setuptools["packages"]:
        parts = package.split(".")
        mapped = next(".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in package_dir)
        source = REPO / package_dir[mapped] / Path(*parts[len(mapped.split(".")):])
        target = dest / Path(*parts)
        target.mkdir(parents=True, exist_ok=True)
        for file in source.glob("*.py"):
            shutil.copy2(file, target / file.name)
    return dest


def lint_imports(root: Path, *args: str) -> subprocess.CompletedProcess:
    """The real ``lint-imports`` on pyproject's contracts, importing arpipe from ``root`` only."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), str(PYPROJECT), "--no-cache", "--no-logo", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    return installed_layout(tmp_path_factory.mktemp("installed"))


CONTRACTS = [c["id"] for c in _config()["importlinter"]["contracts"]]


@pytest.mark.parametrize("contract", CONTRACTS)
def test_the_installed_layout_keeps_the_layer_contract(layout, contract):
    """One test per contract (``lint-imports --contract <id>``), so a failure names the layer it broke."""
    result = lint_imports(layout, "--contract", contract)
    assert result.returncode == 0, f"lint-imports found imports across layers:\n{result.stdout}\n{result.stderr}"
    assert "1 kept, 0 broken" in result.stdout, result.stdout


def test_the_graph_is_arpipe_as_installed_not_the_bare_facade(layout):
    """grimp must see the mapped subpackages, else every contract holds vacuously."""
    result = lint_imports(layout, "--verbose")
    analyzed = next(line for line in result.stdout.splitlines() if line.startswith("Analyzed"))
    files = int(analyzed.split()[1])
    py_files = sum(1 for p in layout.rglob("*.py"))
    assert files == py_files and files > 50, analyzed


def test_imports_across_layers_are_refused_with_their_lines(tmp_path):
    """The contracts can fail: a domain library importing a stage kind and the runner, a stage kind
    importing another, the orchestrator importing a kind and the schemas importing the pipeline are each
    named with their line, and lint-imports exits non-zero."""
    root = installed_layout(tmp_path / "installed")
    (root / "arpipe" / "stages" / "models" / "shortcut.py").write_text(
        '"""A helper that should have lived in a library."""\n\n'
        "from arpipe.pipeline.runner import Runner\n"
        "from arpipe.stages.sample import SampleStage\n")
    (root / "arpipe" / "schemas" / "shortcut.py").write_text(
        '"""The schemas reaching up."""\n\nfrom arpipe.pipeline.errors import UserError\n')
    (root / "arpipe" / "pipeline" / "shortcut.py").write_text(
        '"""The orchestrator importing a kind instead of naming it in the registry."""\n\n'
        "from arpipe.stages.sample import SampleStage\n")
    kind = root / "arpipe" / "stages" / "python.py"
    line = len(kind.read_text().splitlines()) + 1
    kind.write_text(kind.read_text() + "from arpipe.stages.evaluate import Scores  # noqa\n")
    result = lint_imports(root)
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert "arpipe.stages.models.shortcut -> arpipe.pipeline.runner (l.3)" in out
    assert "arpipe.stages.models.shortcut -> arpipe.stages.sample (l.4)" in out
    assert "arpipe.schemas.shortcut -> arpipe.pipeline.errors (l.3)" in out
    assert "arpipe.pipeline.shortcut -> arpipe.stages.sample (l.3)" in out
    assert f"arpipe.stages.python -> arpipe.stages.evaluate (l.{line})" in out


def _stage_children() -> set[str]:
    """Modules and packages directly under stages/, as arpipe.stages.<name>."""
    stages = REPO / "stages"
    names = {p.stem for p in stages.glob("*.py") if p.stem != "__init__"}
    names |= {p.name for p in stages.iterdir() if (p / "__init__.py").exists()}
    return {f"arpipe.stages.{n}" for n in names}


def test_every_module_under_stages_is_a_stage_kind_or_a_domain_library():
    """A new file under stages/ (or a new registered kind) cannot slip past the contracts: it is either a
    stage kind, independent of the others, or a domain library that imports none of them."""
    kinds = set(_contract("kinds-independent")["modules"])
    libraries = set(_contract("domain-libraries")["source_modules"])
    registered = {target.partition(":")[0] for target in KINDS.values()}
    assert registered <= kinds, f"registered kinds missing from the kinds-independent contract: {registered - kinds}"
    assert not kinds & libraries
    unlisted = _stage_children() - kinds - libraries
    assert not unlisted, (f"{sorted(unlisted)} under stages/ are in no layer contract: add each to "
                          "pyproject's kinds-independent, stage-layers and domain-libraries contracts")
    gone = (kinds | libraries) - _stage_children()
    assert not gone, f"contracts name modules that no longer exist: {sorted(gone)}"
    # the other contracts name the same kinds and libraries
    forbidden = set(_contract("domain-libraries")["forbidden_modules"])
    assert kinds <= forbidden, f"domain libraries may import these kinds: {kinds - forbidden}"
    kind_layer, library_layer = _contract("stage-layers")["layers"]
    assert {f"arpipe.stages.{n.strip()}" for n in kind_layer.split(":")} == kinds
    assert {f"arpipe.stages.{n.strip()}" for n in library_layer.split(":")} == libraries
