#!/usr/bin/env python3
"""Run every benchmark of the issues, one after another, then print one table: each ratio, its goal, its anchor.

    benchmarks/run_all                    # all of them: tens of minutes on 2 cores
    benchmarks/run_all --only sample      # a subset (repeatable or comma-separated)
    benchmarks/run_all --quick            # smoke settings where a script has them: not comparable, and
                                          # they replace that benchmark's result file (marked quick)
    benchmarks/run_all --report           # run nothing: rebuild the table from the results on disk

Each benchmark script writes ``benchmarks/results/<name>.json``; this script
adds ``<name>.run.json`` (its arguments, exit code and time), combines them
into ``benchmarks/results/all.json`` and regenerates ``docs/benchmarks.md``
from that file. The goals are the issues'; a result file that is missing shows
as "not run". Exit code 1 when a benchmark that was run failed.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"


@dataclass(frozen=True)
class Ratio:
    key: tuple[str, ...]        # where the value is in the result JSON; a "ratios" key may carry a " (goal ...)" suffix
    name: str
    anchor: str                 # what it is measured against
    goal: tuple[str, float] | None = None   # (">=" | "<=" | ">" | "<", bound); None: report only
    unit: str = ""
    scale: float = 1.0


@dataclass(frozen=True)
class Benchmark:
    name: str
    script: str
    result: str                 # file name in benchmarks/results/
    issue: int
    ratios: tuple[Ratio, ...]
    quick: tuple[str, ...] = ()  # arguments for --quick
    table: tuple[tuple[str, str], ...] = ()  # (key, title) columns of the result's "rows", shown on the page


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("core_overhead", "core_overhead.py", "core_overhead.json", 2, (
        Ratio(("per_stage_overhead_marginal_ms",), "per-stage overhead (20 stages vs 1)",
              "a 1-stage run (Ray and MLflow start-up cancel out)", ("<=", 50), " ms"),
        Ratio(("per_stage_overhead_beyond_ray_start_ms",), "per-stage overhead beyond Ray start-up",
              "20 functions in one process, plus Ray start-up", None, " ms"),
        Ratio(("noop_rerun_s",), "no-op rerun of 20 cached stages", "absolute wall time", ("<=", 1.5), " s"),
        Ratio(("noop_arpipe_over_dvc",), "no-op rerun of 3 cached stages / dvc repro (#15)",
              "dvc repro of 3 cached stages, same machine, same run", ("<=", 1.0)),
        Ratio(("noop_3_stages_lineage_delivered_s",), "cached run's lineage in MLflow after the command (#15)",
              "absolute wall time after the command returns", ("<=", 10), " s"),
    )),
    Benchmark("store_read", "store_read.py", "store_read.json", 3, (
        Ratio(("ratios", "sequential / raw"), "sequential read / raw", "raw np.fromfile of the same bytes",
              (">=", 0.8)),
        Ratio(("ratios", "shuffled / raw"), "shuffled batched read / raw", "raw np.fromfile of the same bytes",
              (">=", 0.5)),
        Ratio(("ratios", "shuffled / webdataset"), "shuffled read / webdataset",
              "stock webdataset on the exported tars", (">=", 5), "x"),
        Ratio(("ratios", "shuffled / npy files"), "shuffled read / .npy files",
              "one .npy per sample (LlamaGen's layout)", (">=", 10), "x"),
        Ratio(("ratios", "s3 shuffled / local shuffled"), "S3 shuffled / local shuffled",
              "the same read from local disk"),
        Ratio(("index_manifest_bytes_per_million_samples",), "index + manifest per million samples",
              "absolute size", None, " MiB", 1 / 2**20),
        Ratio(("ratios", "tokens(i) / litdata sequential"), "per-sample tokens(i), store order / LitData (#22)",
              "LitData StreamingDataset[i], same 20,000 x 680 uint16", (">=", 2), "x"),
        Ratio(("ratios", "tokens(i) shuffled / litdata shuffled"), "per-sample tokens(i), shuffled / LitData (#22)",
              "LitData StreamingDataset[i] in the same random order", (">=", 50), "x"),
        Ratio(("ratios", "store[i] / litdata sequential"), "per-sample store[i] (a Sample) / LitData (#22)",
              "LitData StreamingDataset[i], store order", (">=", 1), "x"),
        Ratio(("ratios", "TokenDataset DataLoader / litdata's, 2 workers"), "DataLoader(TokenDataset), 2 workers "
              "/ LitData's (#22)", "LitData StreamingDataLoader, 2 workers"),
    ), ("--samples", "50000", "--wds-samples", "10000", "--npy-samples", "5000", "--repeats", "2")),
    Benchmark("tokenizers", "tokenizers.py", "tokenizers.json", 4, (
        Ratio(("ratios", "patch_vq_encode_vs_cdist_bound"), "patch_vq encode / search bound",
              "torch.cdist + argmin of the same shapes", (">=", 0.7)),
        Ratio(("ratios", "msvq_encode_vs_cdist_bound"), "msvq encode / search bound",
              "torch.cdist + argmin of the same shapes", (">=", 0.7)),
        Ratio(("ratios", "patch_vq_search_vs_cdist_argmin"), "patch_vq code search / search bound",
              "torch.cdist + argmin of the same shapes"),
        Ratio(("ratios", "msvq_search_vs_cdist_argmin"), "msvq code search / search bound",
              "torch.cdist + argmin of the same shapes"),
        Ratio(("ratios", "vqvae_few_minutes_minus_patch_vq_psnr_db"), "vqvae (few minutes) PSNR - patch_vq",
              "patch_vq at the same token count", (">", 0), " dB"),
        Ratio(("ratios", "vqvae_brief_minus_patch_vq_psnr_db"), "vqvae (400 steps) PSNR - patch_vq",
              "patch_vq at the same token count", None, " dB"),
        Ratio(("ratios", "best_msvq_minus_patch_vq_psnr_db"), "best msvq PSNR - patch_vq",
              "patch_vq at the same token count", None, " dB"),
    ), ("--quick",)),
    Benchmark("tokenize", "tokenize_stage.py", "tokenize.json", 5, (
        Ratio(("ratios", "2_workers_over_1"), "images/s, 2 workers / 1", "1 worker", (">=", 1.7)),
        Ratio(("ratios", "stage_1_worker_over_bare_loop"), "stage (1 worker) / bare loop",
              "the same read + encode in a bare Python loop", (">=", 0.85)),
        Ratio(("ratios", "peak_rss_10x_over_1x"), "peak RSS, 10x data / 1x", "the same run on 1x the data",
              ("<=", 1.2)),
    ), ("--images", "400")),
    Benchmark("train", "train.py", "train.json", 6, (
        Ratio(("ratios", "stage_1_worker_over_plain"), "tokens/s, stage (1 worker) / plain loop",
              "a plain PyTorch loop: same model, batch, optimizer", (">=", 0.85)),
        Ratio(("ratios", "2_workers_over_1"), "tokens/s, 2 workers / 1", "1 worker"),
    )),
    Benchmark("sample", "sample.py", "sample.json", 7, (
        Ratio(("ratios", "kv_cache_speedup"), "KV cache speed-up, 256 tokens", "no-cache decoding",
              (">=", 5), "x"),
        Ratio(("ratios", "sjd_passes_ratio_batch_b48"), "SJD forward passes / plain, 48 samples",
              "plain sampling", ("<=", 0.67)),
        Ratio(("ratios", "sjd_passes_ratio_per_sample_b48"), "SJD passes per sample / plain, 48 samples",
              "plain sampling", ("<=", 0.67)),
        Ratio(("ratios", "sjd_passes_ratio_batch_b1"), "SJD forward passes / plain, 1 sample",
              "plain sampling", ("<=", 0.67)),
        Ratio(("ratios", "sjd_passes_ratio_per_sample_b1"), "SJD passes per sample / plain, 1 sample",
              "plain sampling", ("<=", 0.67)),
        Ratio(("ratios", "sjd_wall_ratio_b48"), "SJD wall time / plain, 48 samples", "plain sampling"),
        Ratio(("ratios", "sjd_wall_ratio_b1"), "SJD wall time / plain, 1 sample", "plain sampling"),
        Ratio(("ratios", "actors_2_vs_1_throughput"), "sample stage, 2 actors / 1", "1 actor", None, "x"),
        Ratio(("ratios", "digits_final_loss"), "SJD test model's final loss (context)",
              "its training data", None, " nats"),
        Ratio(("ratios", "code_wall_ratio"), "CoDe wall time / large model alone (small draws 8x8), 100 digits",
              "the large next_scale model alone", ("<=", 0.6)),
        Ratio(("ratios", "code_cas"), "CAS of CoDe's samples (small draws 8x8)", "the large model alone: "
              "code_cas_large in sample.json"),
        Ratio(("ratios", "masked_passes_ratio_64"), "masked forward passes / next_token, 64 tokens (8 steps)",
              "next_token with a KV cache", ("<=", 0.125)),
        Ratio(("ratios", "masked_passes_ratio_256"), "masked forward passes / next_token, 256 tokens (16 steps)",
              "next_token with a KV cache", ("<=", 0.125)),
        Ratio(("ratios", "masked_wall_ratio_64"), "masked wall time / next_token, 64 tokens",
              "next_token with a KV cache"),
        Ratio(("ratios", "masked_wall_ratio_256"), "masked wall time / next_token, 256 tokens",
              "next_token with a KV cache"),
    )),
    Benchmark("fidelity", "fidelity.py", "fidelity.json", 14, (
        *(Ratio(("ratios", f"cas {row}"), f"CAS, {label}", "chance: 0.10 (10 classes)", (">=", 0.85))
          for row, label in (("next_scale", "next_scale (VAR's accumulated input)"), ("next_token", "next_token"),
                             ("next_block", "next_block"), ("masked", "masked (MaskGIT, 8 steps)"))),
        *(Ratio(("ratios", f"training minutes {row}"), f"training wall time, {row}", "absolute, 2 cores",
                ("<=", 6.0), " min") for row in ("next_scale", "next_token", "next_block", "masked")),
        Ratio(("ratios", "cas masked / next_scale"), "CAS masked / next_scale, same preset and steps",
              "next_scale", (">=", 0.9)),
        Ratio(("ratios", "noise cas"), "CAS of pure noise (control)", "chance: 0.10", ("<=", 0.2)),
        Ratio(("ratios", "shuffled-label cas"), "CAS of the best samples under shuffled labels (control)",
              "chance: 0.10", ("<=", 0.2)),
    ), ("--quick",), table=(("row", "paradigm"), ("tokenizer", "tokenizer"), ("steps", "steps"),
                            ("train_seconds", "training s"), ("heldout_nll_per_token", "held-out NLL/token"),
                            ("cas", "CAS"), ("contact_sheet", "contact sheet"))),
    Benchmark("text_conditioning", "text_conditioning.py", "text_conditioning.json", 17, (
        Ratio(("ratios", "text_over_class"), "training tokens/s, captions / class labels",
              "class-conditioned training on the same images", (">=", 0.85)),
    )),
    Benchmark("codec", "codec.py", "codec.json", 21, (
        Ratio(("ratios", "codec_q25_over_msvq_encode_images_per_s"), "codec (JPEG q25) / msvq encode images/s",
              "msvq on the same 32x32 digits, one thread", None, "x"),
        Ratio(("ratios", "codec_q25_over_msvq_tokens_per_image"), "codec (JPEG q25) / msvq tokens per image",
              "msvq's 85 tokens (scales 1, 2, 4, 8)", None, "x"),
        Ratio(("ratios", "codec_q25_header_share"), "share of a JPEG's tokens that are its constant header",
              "the codec's own mean length"),
    ), ("--images", "300", "--repeats", "2")),
    Benchmark("attention", "attention.py", "attention.json", 22, (
        Ratio(("ratios", "next_token_2048_sdpa_speedup"), "attention sdpa / dense, next_token L 2048, fwd+bwd",
              "the dense boolean mask, CPU", (">=", 1.5), "x"),
        Ratio(("ratios", "next_token_2048_sdpa_peak_ratio"), "attention sdpa / dense peak memory, next_token L 2048",
              "the dense boolean mask, CPU"),
        Ratio(("ratios", "next_scale_2037_sdpa_speedup"), "attention sdpa / dense, next_scale L 2037, fwd+bwd",
              "the dense boolean mask, CPU", None, "x"),
        Ratio(("ratios", "next_token_680_sdpa_speedup"), "attention sdpa / dense, next_token L 680, fwd+bwd",
              "the dense boolean mask, CPU", None, "x"),
    )),
    Benchmark("tokenunify", "tokenunify.py", "tokenunify.json", 21, (
        Ratio(("ratios", "mixed / next-token held-out NLL"), "TokenUnify's mixture: held-out next-token NLL",
              "next-token training alone, equal steps (MNI152 crops)", None, "x"),
    ), ("--steps", "60")),
    Benchmark("next_level", "next_level.py", "next_level.json", 21, (
        Ratio(("ratios", "next_level / next_token held-out NLL"), "next_level (octree levels): held-out NLL",
              "next_token on the same octree tokens, equal steps (brain clouds)", None, "x"),
        Ratio(("ratios", "next_level / next_token 1-NNA's distance from 0.5 (CD)"),
              "next_level: samples' 1-NNA (Chamfer) distance from the ideal 0.5", "next_token's samples", None, "x"),
        Ratio(("ratios", "next_level / next_token forward passes"), "next_level: sampling forward passes",
              "next_token's, same samples and batches", None, "x"),
    ), ("--steps", "20", "--samples", "8")),
    Benchmark("compile", "compile.py", "compile.json", 22, (
        Ratio(("ratios", "eager / compiled step time"), "compile: true, training step speed-up",
              "eager blocks, tiny preset on CPU", None, "x"),
    ), ("--steps", "5")),
    Benchmark("evaluate_sharded", "evaluate_sharded.py", "evaluate_sharded.json", 22, (
        Ratio(("ratios", "2 actors / 1 speed-up"), "evaluate stage, 2 actors / 1 (4,000 digits per set)",
              "1 actor, same machine and run", (">=", 1.6), "x"),
        Ratio(("ratios", "driver peak RSS, all / a quarter of the samples"),
              "evaluate driver peak RSS, 4,000 / 1,000 samples per set", "1,000 samples", ("<=", 1.2), "x"),
    ), ("--samples", "1000", "--repeats", "1")),
    Benchmark("s3_volume_read", "s3_volume_read.py", "s3_volume_read.json", 22, (
        Ratio(("ratios", "ranged bytes / region stored bytes"), "S3 volume unit read: bytes transferred / region bytes",
              "the compressed chunks the unit's region covers", ("<=", 2), "x"),
        Ratio(("ratios", "download bytes / region stored bytes"), "S3 volume unit read before: whole-store download "
              "/ region bytes", "the compressed chunks the unit's region covers", None, "x"),
    )),
    Benchmark("group_by_length", "group_by_length.py", "group_by_length.json", 22, (
        Ratio(("ratios", "group_by_length / padded samples/s"), "group_by_length: true, training samples/s "
              "(digits of 30 and 130 tokens)", "rows padded to seq_len: same store, model, seed and steps",
              None, "x"),
    ), ("--steps", "20", "--repeats", "1")),
)


# ------------------------------------------------------------------------------ reading results


def _lookup(data: Any, key: tuple[str, ...]) -> tuple[float | None, str | None]:
    """(value, the JSON key it was found under); a ratio key may end in " (goal ...)" in the file."""
    node = data
    for part in key:
        if not isinstance(node, dict):
            return None, None
        match = part if part in node else next((k for k in node if k.startswith(part + " (")), None)
        if match is None:
            return None, None
        node, found = node[match], match
    return (float(node), found) if isinstance(node, (int, float)) else (None, None)


def goal_text(ratio: Ratio) -> str:
    if ratio.goal is None:
        return "report"
    op, bound = ratio.goal
    return f"{op} {bound:g}{ratio.unit}"


def verdict(ratio: Ratio, value: float | None) -> str:
    if value is None:
        return "not run"
    if ratio.goal is None:
        return "report"
    op, bound = ratio.goal
    met = {">=": value >= bound, "<=": value <= bound, ">": value > bound, "<": value < bound}[op]
    return "pass" if met else "miss"


def value_text(ratio: Ratio, value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}{ratio.unit}"


def _mtime(path: Path) -> str | None:
    if not path.exists():
        return None
    return dt.datetime.fromtimestamp(path.stat().st_mtime).isoformat(timespec="seconds")


def _run_record(results: Path, bench: Benchmark) -> dict[str, Any] | None:
    path = results / (Path(bench.result).stem + ".run.json")
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def combine(results: Path = RESULTS) -> dict[str, Any]:
    """all.json: every benchmark's status and every ratio's value, goal, anchor and verdict."""
    benchmarks, rows = [], []
    for bench in BENCHMARKS:
        path = results / bench.result
        run = _run_record(results, bench)
        if run is not None and path.exists() and path.stat().st_mtime > run.get("finished", 0) + 1:
            run = None  # the script ran on its own after run_all did: the record is about an older result
        try:
            data = json.loads(path.read_text())
            status = "ok"
        except FileNotFoundError:
            data, status = None, "not run"
        except json.JSONDecodeError as err:
            data, status = None, f"unreadable ({err.msg})"
        if run is not None and run.get("returncode") not in (0, None) and \
                (data is None or run.get("finished", 0) >= path.stat().st_mtime):
            data, status = None, f"failed (exit {run['returncode']})"
        if data is not None and run is not None and run.get("quick"):
            status = "ok (quick settings)"
        benchmarks.append({"name": bench.name, "issue": bench.issue, "script": f"benchmarks/{bench.script}",
                           "result": f"benchmarks/results/{bench.result}", "status": status,
                           "measured": _mtime(path) if data is not None else None, "run": run})
        known = set()
        for ratio in bench.ratios:
            value, found = _lookup(data, ratio.key) if data is not None else (None, None)
            if found is not None:
                known.add(found)
            value = value * ratio.scale if value is not None else None
            if data is None:
                state = "not run" if status == "not run" else "failed"
            else:  # "missing": the result file predates this ratio
                state = verdict(ratio, value) if value is not None else "missing"
            rows.append({"issue": bench.issue, "benchmark": bench.name, "ratio": ratio.name, "value": value,
                         "unit": ratio.unit.strip(), "shown": value_text(ratio, value), "goal": goal_text(ratio),
                         "anchor": ratio.anchor, "verdict": state, "key": list(ratio.key)})
        # a ratio a script reports that this table does not know yet is shown, not dropped
        extra = data.get("ratios", {}) if isinstance(data, dict) else {}
        for key, value in extra.items():
            if key not in known and isinstance(value, (int, float)):
                rows.append({"issue": bench.issue, "benchmark": bench.name, "ratio": key, "value": float(value),
                             "unit": "", "shown": f"{value:.3g}", "goal": "report", "anchor": "(see the script)",
                             "verdict": "report", "key": ["ratios", key]})
    return {"generated": dt.datetime.now().isoformat(timespec="seconds"),
            "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "benchmarks": benchmarks, "rows": rows}


# ------------------------------------------------------------------------------------- output


COLUMNS = (("issue", "issue"), ("benchmark", "benchmark"), ("ratio", "ratio"), ("shown", "measured"),
           ("goal", "goal"), ("anchor", "anchor"), ("verdict", "result"))


def table(combined: dict[str, Any]) -> str:
    rows = [[str(row[key]) for key, _ in COLUMNS] for row in combined["rows"]]
    header = [title for _, title in COLUMNS]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines) + "\n" + summary(combined)


def summary(combined: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for row in combined["rows"]:
        counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
    order = ("pass", "miss", "report", "not run", "missing", "failed")
    return ", ".join(f"{counts[k]} {k}" for k in order if counts.get(k))


def _docstring(script: Path) -> str:
    try:
        doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    except (OSError, SyntaxError):
        return ""
    # the usage line (an indented command) says how to run it alone; the table above says what came out
    return "\n".join(line for line in doc.splitlines() if not line.startswith("    .venv/"))


def _md(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def render_docs(combined: dict[str, Any]) -> str:
    host = combined["host"]
    out = [
        "# Benchmarks",
        "",
        "<!-- generated by `benchmarks/run_all` from benchmarks/results/all.json; do not edit -->",
        "",
        "Each benchmark measures arpipe side by side with an anchor (a plain loop, a stock library, the",
        "same work done another way) in one run on one machine, and reports the ratio. The goals are the",
        "issues'. Regenerate this page with `benchmarks/run_all` (runs everything, tens of minutes),",
        "`benchmarks/run_all --only NAME`, or `benchmarks/run_all --report` (from the results on disk).",
        "",
        f"Machine of the last report: {host['cpus']} CPUs, {host['platform']}, Python {host['python']}; "
        f"report of {combined['generated']}.",
        "",
        "| issue | benchmark | ratio | measured | goal | anchor | result |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in combined["rows"]:
        result = f"**{row['verdict']}**" if row["verdict"] == "miss" else row["verdict"]
        out.append(f"| #{row['issue']} | [{row['benchmark']}](#{row['benchmark']}) | {_md(row['ratio'])} | "
                   f"{_md(row['shown'])} | {_md(row['goal'])} | {_md(row['anchor'])} | {result} |")
    out += ["", summary(combined) + ".", ""]
    for bench, info in zip(BENCHMARKS, combined["benchmarks"]):
        out += [f"## {bench.name}", ""]
        when = f"measured {info['measured']}" if info["measured"] else "no result on disk"
        run = info["run"] or {}
        args = " ".join(run.get("args", [])) if run else ""
        line = f"Issue #{bench.issue} · [`benchmarks/{bench.script}`](../benchmarks/{bench.script}) · {info['status']}"
        line += f" · {when}" + (f" · arguments `{args}`" if args else "")
        if run.get("seconds") is not None:
            line += f" · took {run['seconds']:.0f} s"
        out += [line, ""]
        doc = _docstring(ROOT / "benchmarks" / bench.script)
        if doc:
            out += [doc.replace("``", "`"), ""]
        out += _result_table(bench, info)
    return "\n".join(out).rstrip() + "\n"


def _result_table(bench: Benchmark, info: dict[str, Any]) -> list[str]:
    """The rows a benchmark reports (its result's ``rows``) as a table; a ``.png`` cell is shown as a picture."""
    if not bench.table or info["status"] == "not run" or info["measured"] is None:
        return []
    try:
        rows = json.loads((ROOT / info["result"]).read_text()).get("rows", [])
    except (OSError, json.JSONDecodeError):
        return []

    def cell(value: Any) -> str:
        if isinstance(value, str) and value.endswith(".png"):
            return f"![{Path(value).stem}](../{value})"
        if isinstance(value, float):
            return f"{value:.3g}"
        return _md("—" if value is None else value)

    out = ["| " + " | ".join(title for _, title in bench.table) + " |",
           "| " + " | ".join("---" for _ in bench.table) + " |"]
    out += ["| " + " | ".join(cell(row.get(key)) for key, _ in bench.table) + " |" for row in rows]
    return out + [""]


# --------------------------------------------------------------------------------------- running


def run_one(bench: Benchmark, results: Path, quick: bool) -> dict[str, Any]:
    args = list(bench.quick) if quick else []
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    started = time.time()
    print(f"\n=== {bench.name} (issue {bench.issue}): benchmarks/{bench.script} {' '.join(args)}".rstrip(),
          flush=True)
    try:
        code = subprocess.run([sys.executable, str(ROOT / "benchmarks" / bench.script), *args], cwd=ROOT,
                              env=env).returncode
    except KeyboardInterrupt:
        code = 130
    record = {"args": args, "quick": quick, "returncode": code, "started": started, "finished": time.time(),
              "seconds": time.time() - started, "python": sys.executable}
    results.mkdir(parents=True, exist_ok=True)
    (results / (Path(bench.result).stem + ".run.json")).write_text(json.dumps(record, indent=1) + "\n")
    status = "done" if code == 0 else f"FAILED (exit {code})"
    print(f"=== {bench.name}: {status} in {record['seconds']:.0f} s", flush=True)
    return record


def select(names: list[str]) -> list[Benchmark]:
    wanted = [n.strip() for value in names for n in value.split(",") if n.strip()]
    aliases = {alias: b for b in BENCHMARKS for alias in (b.name, Path(b.script).stem, Path(b.result).stem)}
    unknown = [n for n in wanted if n not in aliases]
    if unknown:
        raise SystemExit(f"run_all: unknown benchmark {', '.join(unknown)}; "
                         f"choose from {', '.join(b.name for b in BENCHMARKS)}")
    chosen = {aliases[n].name for n in wanted}
    return [b for b in BENCHMARKS if not wanted or b.name in chosen]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/run_all", description=__doc__.split("\n")[0])
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run these benchmarks only (repeatable or comma-separated): "
                         + ", ".join(b.name for b in BENCHMARKS))
    ap.add_argument("--report", action="store_true", help="run nothing; rebuild the table, all.json and the docs")
    ap.add_argument("--quick", action="store_true",
                    help="smoke settings where a script has them; overwrites its result file (marked quick)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of the result files")
    ap.add_argument("--docs", type=Path, default=DOCS, help="page to regenerate (default: docs/benchmarks.md)")
    ap.add_argument("--no-docs", action="store_true", help="do not regenerate the page")
    args = ap.parse_args(argv)
    failed = []
    if not args.report:
        for bench in select(args.only):
            if run_one(bench, args.results, args.quick)["returncode"] != 0:
                failed.append(bench.name)
    else:
        select(args.only)  # still refuse unknown names
    combined = combine(args.results)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "all.json").write_text(json.dumps(combined, indent=1) + "\n")
    print()
    print(table(combined))
    print(f"wrote {_shown(args.results / 'all.json')}", end="")
    if not args.no_docs:
        args.docs.write_text(render_docs(combined))
        print(f" and {_shown(args.docs)}", end="")
    print()
    if failed:
        print(f"run_all: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
