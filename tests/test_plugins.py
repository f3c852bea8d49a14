"""A plugin's story: a distribution adds a stage kind, a tokenizer and a reader through entry points.

tests/plugins/arpipe_example_plugin is the plugin docs/extending.md builds (tests/test_docs.py checks they are
the same code). It is installed with pip into a folder of this module's, which only the `arpipe` processes
started here get on PYTHONPATH: they find its entry points in the dist-info there, while the suite's venv and
this process never see it (schemas/pipeline.schema.json stays the built-in kinds' schema).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import arpipe, stage_lines, write

PLUGIN = Path(__file__).resolve().parent / "plugins" / "arpipe_example_plugin"

BROKEN = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "arpipe-broken-plugin"
        version = "0.1.0"

        [project.entry-points."arpipe.stages"]
        histogram = "arpipe_histogram.schemas:HistogramStage"

        [tool.setuptools]
        packages = ["arpipe_broken"]
    """,
    "arpipe_broken/__init__.py": '"""Its entry point names a module it does not ship."""\n',
}

PIPELINE = """
name: depth-stats
storage: ./runs
stages:
  fit:
    kind: tokenizer
    source: {modality: depth, uri: ./depth, max_depth: 1000}
    tokenizer: {type: levels, levels: 3}
    fit: {heldout: 0}
  tokenize:
    kind: tokenize
    source: {modality: depth, uri: ./depth, max_depth: 1000}
    tokenizer: ${fit.tokenizer}
    workers: 1
    progress: false
  stats:
    kind: token_stats
    store: ${tokenize.store}
    top: 2
"""


def install(source: Path, target: Path) -> dict[str, str]:
    """pip-install the plugin project at ``source`` into ``target``; the environment that makes it visible."""
    copy = target.with_name(target.name + "-src")   # pip builds inside the project folder: build a copy
    shutil.copytree(source, copy)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(copy)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH")) if p)}


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> dict[str, str]:
    return install(PLUGIN, tmp_path_factory.mktemp("plugin") / "site")


@pytest.fixture
def project(tmp_path) -> Path:
    """Six 4x4 depth maps in two folders: 'near' ones hold 0, 500 and 1000 mm, 'far' ones 0 and 500."""
    from PIL import Image

    for folder, values in (("near", 3), ("far", 2)):
        (tmp_path / "depth" / folder).mkdir(parents=True)
        for i in range(3):
            depth_mm = (np.arange(16).reshape(4, 4) % values * 500).astype(np.uint16)
            Image.fromarray(depth_mm).save(tmp_path / "depth" / folder / f"{i}.png")
    return write(tmp_path, {"pipeline.yaml": PIPELINE})


def test_schema_includes_the_installed_plugin(tmp_path, plugin):
    from arpipe.schemas.export import render

    schema = json.loads(arpipe("schema", cwd=tmp_path, env=plugin, check=True).stdout)
    stages = schema["properties"]["stages"]["additionalProperties"]["discriminator"]["mapping"]
    assert stages["token_stats"] == "#/$defs/TokenStatsStage"
    assert schema["$defs"]["TokenStatsStage"]["additionalProperties"] is False
    for stage in ("TokenizerStage", "TokenizeStage"):   # the reader's source joins every stage that takes one
        assert "depth" in schema["$defs"][stage]["properties"]["source"]["discriminator"]["mapping"]
    assert "levels" in schema["$defs"]["TokenizerStage"]["properties"]["tokenizer"]["discriminator"]["mapping"]
    # without the plugin: the built-in schema, the one checked in
    assert arpipe("schema", cwd=tmp_path, check=True).stdout == render()


def test_validate_knows_the_plugin_and_names_its_typos(project, plugin):
    ok = arpipe("validate", "pipeline.yaml", cwd=project, env=plugin, check=True)
    assert "ok: 3 stage(s) in order fit -> tokenize -> stats" in ok.stdout
    typos = {"    top: 2": ("    top: 2\n    tpo: 3", "pipeline.yaml:19:5: stages.stats.tpo: unknown field 'tpo'; "
                                                      "did you mean 'top'?"),
             "levels: 3}": ("levels: 3, lvels: 2}", "pipeline.yaml:7:42: stages.fit.tokenizer.lvels: unknown field "
                                                   "'lvels'; did you mean 'levels'?"),
             "max_depth: 1000}": ("max_dept: 1000}", "pipeline.yaml:6:45: stages.fit.source.max_dept: unknown field "
                                                     "'max_dept'; did you mean 'max_depth'?")}
    for line, (typo, error) in typos.items():
        write(project, {"pipeline.yaml": PIPELINE.replace(line, typo, 1)})
        bad = arpipe("validate", "pipeline.yaml", cwd=project, env=plugin)
        assert (bad.returncode, bad.stderr) == (2, f"arpipe: error: {error}\n")
    # without the plugin, its kind is unknown like any other
    write(project, {"pipeline.yaml": PIPELINE})
    without = arpipe("validate", "pipeline.yaml", cwd=project)
    assert without.returncode == 2
    assert "stages.stats.kind: unknown stage kind 'token_stats'" in without.stderr


def test_run_uses_the_plugin_reader_tokenizer_and_stage_kind(project, plugin):
    # RAY_ADDRESS empty: an embedded Ray, whose workers start with this PYTHONPATH (the suite's shared one
    # predates it)
    env = {**plugin, "RAY_ADDRESS": ""}
    run = arpipe("run", "pipeline.yaml", cwd=project, env=env, check=True)
    assert {name: states[-1] for name, states in stage_lines(run.stdout).items()} == \
        {"fit": "done", "tokenize": "done", "stats": "done"}
    (stats,) = (project / "runs" / "stats").glob("*/stats.json")
    # levels: 3 maps 0, 500, 1000 mm to tokens 0, 1, 2: near maps hold 6, 5, 5 of them, far ones 8, 8, 0
    assert json.loads(stats.read_text()) == {"tokens": 96, "distinct": 3, "top": {"0": 42, "1": 39}}
    again = arpipe("run", "pipeline.yaml", cwd=project, env=env, check=True)
    assert {states[-1] for states in stage_lines(again.stdout).values()} == {"cached"}


def test_a_broken_plugin_is_one_line_naming_its_entry_point(tmp_path, project, plugin):
    broken = install(write(tmp_path / "broken", BROKEN), tmp_path / "broken-site")
    env = {"PYTHONPATH": os.pathsep.join((broken["PYTHONPATH"], plugin["PYTHONPATH"]))}
    expected = ("arpipe: error: plugin arpipe-broken-plugin, entry point histogram = "
                "'arpipe_histogram.schemas:HistogramStage' in group arpipe.stages: cannot import "
                "arpipe_histogram.schemas:HistogramStage (ModuleNotFoundError: No module named 'arpipe_histogram'); "
                "fix the entry point in arpipe-broken-plugin's pyproject.toml and reinstall it, or uninstall it "
                "(pip uninstall arpipe-broken-plugin)\n")
    for command in (("validate", "pipeline.yaml"), ("schema",)):
        proc = arpipe(*command, cwd=project, env=env)
        assert (proc.returncode, proc.stderr) == (2, expected)
    # commands that need no plugin still work
    assert arpipe("--help", cwd=project, env=env).returncode == 0


def test_plugin_mistakes_are_named_before_anything_runs(monkeypatch):
    """A name arpipe has built in, an entry point to something that is not a config model, a tag that is not
    the entry point's name: each one line, from the entry points as they are declared."""
    from importlib.metadata import EntryPoint

    from arpipe.pipeline import plugins, registry
    from arpipe.pipeline.errors import UserError

    cases = {
        EntryPoint("msvq", "arpipe.schemas.tokenize:MSVQConfig", "arpipe.tokenizers"):
            "type 'msvq' is built into arpipe; give the plugin's type another name",
        EntryPoint("tiff", "arpipe.pipeline.plugins:GROUPS", "arpipe.readers"):
            "arpipe.pipeline.plugins:GROUPS is {",
        EntryPoint("deep", "arpipe.schemas.tokenize:VolumeSource", "arpipe.readers"):
            "VolumeSource.modality must be Literal['deep'], the entry point's name",
        EntryPoint("stats", "arpipe.schemas.tokenize:ImageSource", "arpipe.stages"):
            "not a config model (a subclass of arpipe.schemas.base.StageBase)",
    }
    for ep, message in cases.items():
        monkeypatch.setattr(plugins, "entry_points", lambda group, ep=ep: [ep] if group == ep.group else [])
        plugins.declared.cache_clear()
        with pytest.raises(UserError, match="^plugin an unknown distribution, entry point ") as err:
            registry.pipeline_spec()
        assert message in str(err.value) and "\n" not in str(err.value)
    plugins.declared.cache_clear()
