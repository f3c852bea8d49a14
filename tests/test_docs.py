"""The docs a user reads: generated pages are current, links lead somewhere, the extending examples run,
and `benchmarks/run_all` turns result files into one table."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tools/ is not an installed package

from tools import errors_doc  # noqa: E402
from tools.gen_docs import GENERATED  # noqa: E402

DOCS = ROOT / "docs"
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


# ------------------------------------------------------------------------------ generated pages


@pytest.mark.parametrize("page", sorted(GENERATED))
def test_generated_page_is_current(page):
    path = ROOT / page
    assert path.exists(), f"missing: run `python -m tools.gen_docs` and commit {page}"
    assert path.read_text() == GENERATED[page](), f"stale: run `python -m tools.gen_docs` and commit {page}"


def test_reference_names_every_kind_and_field():
    from arpipe.schemas.pipeline import stage_kinds

    text = (DOCS / "reference.md").read_text()
    for kind, model in stage_kinds().items():
        assert f"\n### {kind}\n" in text
        section = text.split(f"\n### {kind}\n", 1)[1].split("\n### ", 1)[0]
        for name in model.model_fields:
            assert f"| `{name}` |" in section, f"{kind}.{name} missing from reference.md"


def test_cli_page_has_every_command():
    from arpipe.pipeline.cli import build_parser

    text = (DOCS / "cli.md").read_text()
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name in commands:
        assert f"\n## arpipe {name}\n" in text
    for sub in ("store info", "store export", "jobs logs", "submit"):
        assert f"arpipe {sub}\n" in text


def test_troubleshooting_lists_errors_with_their_fixes():
    sites = errors_doc.scan()
    assert len(sites) > 200
    text = (DOCS / "troubleshooting.md").read_text()
    rows = {
        "pipeline file not found": "check the path",
        "unknown stage kind &lt;kind>": "known kinds: &lt;kinds>",
        "value error, offload_params needs zero_stage: 3": "see `arpipe schema`",
        "model: invalid model config: n_head (&lt;n_head>) does not divide n_embd": "choose n_embd a multiple",
        "the Ray token file is empty": "ray get-auth-token",
    }
    for message, fix in rows.items():
        line = next((ln for ln in text.splitlines() if ln.startswith(f"| {message}")), None)
        assert line is not None, message
        assert fix in line.rsplit("|", 2)[-2], line
    # a wrapper that only re-raises a message it was given is not a message of its own
    assert "| &lt;what> |" not in text


# ------------------------------------------------------------------------------------- links


def _slug(heading: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        slug = _slug(line.lstrip("#"))
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    return LINK.findall(text)


def test_relative_links_point_to_files_and_headings():
    pages = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]
    broken = []
    for page in pages:
        for target in _links(page):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_docs_index_lists_every_page():
    index = (DOCS / "README.md").read_text()
    missing = [p.name for p in DOCS.glob("*.md") if p.name != "README.md" and f"]({p.name})" not in index]
    assert not missing, f"add to docs/README.md: {missing}"


# ----------------------------------------------------------------------- extending.md, as written


PLUGIN = ROOT / "tests" / "plugins" / "arpipe_example_plugin"


def _blocks() -> dict[str, list[str]]:
    """The code blocks of extending.md that start with a `# path` (or `# path, continued`) comment, by path,
    without that comment."""
    found: dict[str, list[str]] = {}
    text = (DOCS / "extending.md").read_text()
    for code in re.findall(r"^```(?:python|toml)\n# (.*?)\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
        label, body = code
        found.setdefault(label.removesuffix(", continued"), []).append(body)
    return found


def test_extending_shows_the_example_plugin_as_it_is():
    """The plugin tests/test_plugins.py installs is the code extending.md shows, file by file (a file shown in
    parts is its parts, in order, two blank lines apart)."""
    blocks = _blocks()
    files = sorted(str(p.relative_to(PLUGIN)) for p in PLUGIN.rglob("*")
                   if p.suffix in (".py", ".toml") and "__pycache__" not in p.parts and p.name != "__init__.py")
    assert sorted(blocks) == files
    for name in files:
        assert "\n\n".join(blocks[name]) == (PLUGIN / name).read_text(), f"extending.md differs from {name}"


@pytest.fixture
def example_plugin(monkeypatch):
    """The example plugin importable from its source folder (its entry points are tests/test_plugins.py's)."""
    monkeypatch.syspath_prepend(str(PLUGIN))
    yield importlib.import_module("arpipe_example_plugin")
    for name in [m for m in sys.modules if m.split(".")[0] == "arpipe_example_plugin"]:
        del sys.modules[name]


def test_extending_stage_kind_runs_and_resumes_by_shard(tmp_path, example_plugin):
    from arpipe_example_plugin import schemas, token_stats

    from arpipe.pipeline.stage import StageContext
    from arpipe.stages.store import StoreWriter

    store = tmp_path / "store"
    with StoreWriter(str(store), vocab_size=16, samples_per_shard=4) as w:
        for i in range(10):
            w.append(np.array([i % 3, 5, 5]), key=f"s{i}", modality="image")
    spec = schemas.TokenStatsStage.model_validate({"kind": "token_stats", "store": str(store), "top": 2})
    out = tmp_path / "out"
    ctx = StageContext(name="stats", kind="token_stats", fingerprint="f" * 64, out_uri=str(out), work_dir=out,
                       pipeline_dir=tmp_path)
    out.mkdir()
    outputs = token_stats.TokenStatsStage(spec, ctx).run()
    assert outputs["stats"].path == "stats.json"
    stats = json.loads((out / "stats.json").read_text())
    assert stats == {"tokens": 30, "distinct": 4, "top": {"5": 20, "0": 4}}
    units = sorted(p.name for p in (out / ".arpipe" / "units").iterdir())
    assert units == ["000000.npy", "000001.npy", "000002.npy"]
    # a rerun reuses the committed units: a unit doctored on disk shows it was not recounted
    np.save(out / ".arpipe" / "units" / "000000.npy", np.zeros(16, dtype=np.int64))
    token_stats.TokenStatsStage(spec, ctx).run()
    assert json.loads((out / "stats.json").read_text())["tokens"] == 30 - 12


def test_extending_tokenizer_round_trips_through_its_artifact(tmp_path, monkeypatch, example_plugin):
    from arpipe_example_plugin import levels, schemas

    from arpipe.stages.modalities import base

    # what the entry point does for an installed plugin: load_tokenizer finds the class by the artifact's type
    monkeypatch.setitem(base.TOKENIZER_TYPES, "levels", schemas.LevelsConfig.implementation)
    args = schemas.LevelsConfig(type="levels", levels=4).constructor_args((1, 6, 5))
    tok = levels.LevelTokenizer(**args, modality="image")
    x = np.random.default_rng(0).random((3, 1, 6, 5)).astype(np.float32)
    tokens = tok.encode_arrays(list(x))
    assert [t.shape for t in tokens] == [(30,)] * 3 and max(int(t.max()) for t in tokens) <= 3
    assert np.abs(np.stack(tok.decode_arrays(tokens)) - x).max() <= 1 / 6 + 1e-6
    assert tok.positions().shape == (30, 2)
    digest = tok.save(str(tmp_path / "tok"))
    again = base.load_tokenizer(str(tmp_path / "tok"))
    assert type(again).__name__ == "LevelTokenizer" and again.digest == digest
    assert all((a == b).all() for a, b in zip(again.encode_arrays(list(x)), tokens))


def test_extending_reader_reads_units_and_rejects_bad_files(tmp_path, example_plugin):
    from arpipe_example_plugin import depth, schemas
    from PIL import Image

    from arpipe.stages.modalities import SampleError

    (tmp_path / "near").mkdir()
    values = np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000
    Image.fromarray(values).save(tmp_path / "near" / "a.png")
    (tmp_path / "near" / "broken.png").write_bytes(b"not a png")
    source = schemas.DepthSource(modality="depth", uri=str(tmp_path), max_depth=11000)
    reader = depth.DepthReader(source.uri, **source.reader_options())
    units = reader.units()
    assert [u.key for u in units] == ["near/a.png", "near/broken.png"]
    (sample,) = reader.read(units[0])
    assert sample.data.shape == (1, 3, 4) and sample.label == "near" and sample.data.max() == 1.0
    assert sample.data[0, 0, 1] == pytest.approx(1000 / 11000)
    with pytest.raises(SampleError, match="cannot decode PNG"):
        list(reader.read(units[1]))


# -------------------------------------------------------------------------------- run_all


def _run_all(monkeypatch):
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "run_all", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_run_all_report_from_result_files(tmp_path, monkeypatch, capsys):
    run_all = _run_all(monkeypatch)
    results = tmp_path / "results"
    results.mkdir()
    (results / "sample.json").write_text(json.dumps({"ratios": {
        "kv_cache_speedup": 12.5, "sjd_passes_ratio_batch_b48": 0.8, "a_new_ratio": 2.0}}))
    (results / "store_read.json").write_text(json.dumps({"ratios": {"shuffled / raw (goal >= 0.5)": 0.6}}))
    docs = tmp_path / "benchmarks.md"
    assert run_all.main(["--report", "--results", str(results), "--docs", str(docs)]) == 0
    table = capsys.readouterr().out
    header = table.strip().splitlines()[0].split()
    assert header == ["issue", "benchmark", "ratio", "measured", "goal", "anchor", "result"]
    rows = {r["ratio"]: r for r in json.loads((results / "all.json").read_text())["rows"]}
    kv = rows["KV cache speed-up, 256 tokens"]
    assert (kv["shown"], kv["goal"], kv["anchor"], kv["verdict"]) == ("12.5x", ">= 5x", "no-cache decoding", "pass")
    assert rows["SJD forward passes / plain, 48 samples"]["verdict"] == "miss"
    assert rows["SJD wall time / plain, 1 sample"]["verdict"] == "missing"        # not in this result file
    assert rows["shuffled batched read / raw"]["verdict"] == "pass"               # key carries "(goal ...)"
    assert rows["a_new_ratio"]["verdict"] == "report"                             # shown, not dropped
    assert rows["per-stage overhead (20 stages vs 1)"]["verdict"] == "not run"    # no core_overhead.json
    page = docs.read_text()
    assert "| #7 | [sample](#sample) | KV cache speed-up, 256 tokens | 12.5x | >= 5x | no-cache decoding | pass |" in page
    assert "**miss**" in page and "not run" in page


def test_run_all_runs_a_benchmark_and_records_a_failure(tmp_path, monkeypatch, capsys):
    run_all = _run_all(monkeypatch)
    results = tmp_path / "results"
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text(textwrap.dedent(f"""
        import json, sys
        json.dump({{"ratios": {{"speed": 6.0}}}}, open({str(results / 'good.json')!r}, "w"))
        print("measured")
    """))
    bad.write_text("raise SystemExit(3)\n")
    ratio = run_all.Ratio(("ratios", "speed"), "speed", "a plain loop", (">=", 5), "x")
    monkeypatch.setattr(run_all, "BENCHMARKS", (
        run_all.Benchmark("good", str(good), "good.json", 1, (ratio,)),
        run_all.Benchmark("bad", str(bad), "bad.json", 1, (ratio,)),
    ))
    results.mkdir()
    assert run_all.main(["--results", str(results), "--no-docs"]) == 1
    out = capsys.readouterr()
    assert "measured" in out.out and "run_all: failed: bad" in out.err
    rows = json.loads((results / "all.json").read_text())["rows"]
    assert [(r["benchmark"], r["verdict"]) for r in rows] == [("good", "pass"), ("bad", "failed")]
    assert json.loads((results / "bad.run.json").read_text())["returncode"] == 3
    assert run_all.main(["--report", "--only", "good", "--results", str(results), "--no-docs"]) == 0
    with pytest.raises(SystemExit, match="unknown benchmark nope"):
        run_all.main(["--only", "nope", "--results", str(results), "--no-docs"])
