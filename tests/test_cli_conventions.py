"""The CLI as people and scripts meet it: a version, a help page written for people, help on every option,
--debug anywhere on the line, --json that validates against the documented schemas, shell completion.
(`status --json` of a finished run: tests/test_pipeline_run.py; `jobs list|status --json`:
tests/test_cluster_jobs.py; `store info --json`: tests/test_store_cli.py.)"""

from __future__ import annotations

import argparse
import os
import re

import jsonschema
import pytest
from helpers import arpipe, json_output, write

from arpipe import __version__
from arpipe.pipeline.cli import build_parser

PIPELINE = """
name: conventions
storage: ./runs
stages:
  make:
    kind: python
    callable: steps:make
    config: {n: 3}
  total:
    kind: python
    callable: steps:total
    inputs: {numbers: "${make.numbers}"}
"""
STEPS = """
def make(config, inputs, out_dir):
    return {"numbers": list(range(config["n"]))}

def total(config, inputs, out_dir):
    return {"total": sum(inputs["numbers"])}
"""


@pytest.fixture
def project(tmp_path):
    return write(tmp_path, {"pipeline.yaml": PIPELINE, "steps.py": STEPS})


def test_version_and_a_help_page_written_for_people(tmp_path):
    version = arpipe("--version", cwd=tmp_path, check=True)
    assert version.stdout.strip() == f"arpipe {__version__}"
    page = arpipe("--help", cwd=tmp_path, check=True).stdout
    assert page.startswith("usage: arpipe")
    assert "Finished stages are skipped" in page and "examples:\n  arpipe validate pipeline.yaml" in page
    assert "``" not in page and ":mod:" not in page   # no raw docstring markup


def _actions(parser: argparse.ArgumentParser, path: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _actions(child, f"{path} {name}")
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield path, action


def test_every_option_of_every_command_has_help():
    actions = list(_actions(build_parser(whole=True), "arpipe"))
    paths = {path for path, _action in actions}
    assert {"arpipe ui", "arpipe jobs list", "arpipe store info", "arpipe model register", "arpipe submit"} <= paths
    missing = [f"{path} {'/'.join(a.option_strings) or a.dest}" for path, a in actions if not (a.help or "").strip()]
    assert missing == []


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_is_taken_anywhere_on_the_line(project, where):
    (project / "pipeline.yaml").write_text(PIPELINE.replace("steps:total", "no_such_module:total"))
    args = ["--debug", "validate", "pipeline.yaml"] if where == "before" else ["validate", "pipeline.yaml", "--debug"]
    proc = arpipe(*args, cwd=project)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "arpipe: validate took" in proc.stderr
    plain = arpipe("validate", "pipeline.yaml", cwd=project)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and len(plain.stderr.strip().splitlines()) == 1


def test_debug_after_an_external_command_reaches_it(tmp_path):
    proc = arpipe("store", "info", str(tmp_path / "nope"), "--debug", cwd=tmp_path)
    assert proc.returncode == 2 and "no manifest.json" in proc.stderr and "took" in proc.stderr


def test_validate_plan_and_status_print_json_that_matches_their_schemas(project):
    valid = json_output("validate", arpipe("validate", "pipeline.yaml", "--json", cwd=project, check=True).stdout)
    assert valid == {"schema_version": 1, "pipeline": str(project / "pipeline.yaml"), "name": "conventions",
                     "ok": True, "stages": ["make", "total"]}

    plan = json_output("plan", arpipe("plan", "pipeline.yaml", "--json", cwd=project, check=True).stdout)
    rows = {row["stage"]: row for row in plan["stages"]}
    assert rows["make"]["action"] == "run" and re.fullmatch(r"[0-9a-f]{16,}", rows["make"]["fingerprint"])
    assert rows["total"]["kind"] == "python" and rows["total"]["fingerprint"] is None   # upstream not built

    status = json_output("status", arpipe("status", "pipeline.yaml", "--json", cwd=project, check=True).stdout)
    assert [(r["stage"], r["state"], r["duration_s"], r["mlflow_run_id"]) for r in status["stages"]] == [
        ("make", "pending", None, None), ("total", "pending", None, None)]


def test_the_schemas_refuse_what_the_contract_rules_out(project):
    """The schema check can fail: a renamed field, a "-" for a missing value or an unknown action is refused."""
    text = arpipe("plan", "pipeline.yaml", "--json", cwd=project, check=True).stdout
    for broken in (text.replace('"why"', '"reason"'), text.replace('"fingerprint": null', '"fingerprint": 7'),
                   text.replace('"action": "run"', '"action": "maybe"')):
        with pytest.raises(jsonschema.ValidationError):
            json_output("plan", broken)


def test_shell_completion_offers_commands_and_the_external_commands_flags(tmp_path):
    def complete(line: str) -> list[str]:
        out = tmp_path / "completions"
        arpipe(cwd=tmp_path, check=True, env={"_ARGCOMPLETE": "1", "COMP_LINE": line, "COMP_POINT": str(len(line)),
                                              "_ARGCOMPLETE_STDOUT_FILENAME": str(out), "_ARGCOMPLETE_IFS": "\n"})
        return sorted(c.strip() for c in out.read_text().splitlines())

    assert complete("arpipe st") == ["status", "store"]
    assert complete("arpipe jobs list --j") == ["--json"]
    assert "--only" in complete("arpipe run pipeline.yaml --o")
    assert os.environ.get("_ARGCOMPLETE") is None
