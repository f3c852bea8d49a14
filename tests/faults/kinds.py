"""The stage kinds under fire in the kill campaigns: one :class:`Kind` each, and what they need.

A kind is its stage YAML (one stage, in a pipeline of its own), how to read its committed
resumable units off storage, when to kill it, and what must hold at the end. To put a new
stage kind under fire, add a ``Kind`` here and list it in ``KINDS``; ``test_stage_kills.py``
picks it up. ``ARPIPE_FAULT_SEED`` replays the campaigns' kill moments.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from helpers import arpipe

from faults.harness import Kind

SEED = int(os.environ.get("ARPIPE_FAULT_SEED", "9"))


def identity(path: Path) -> tuple[int, int, int]:
    """Changes when a file is rewritten (rename gives a new inode), even with the same bytes."""
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


# ---------------------------------------------------------------------------------- python

PARTS = 60

STEPS = '''
import json, os, time


def parts(config, inputs, out_dir):
    """`parts` resumable units: a part on disk is done (written to a hidden temp name, then renamed)."""
    log = os.environ.get("ARPIPE_FAULT_LOG")
    folder = os.path.join(out_dir, "parts")
    os.makedirs(folder, exist_ok=True)
    for i in range(config["parts"]):
        path = os.path.join(folder, f"p{i:03d}.json")
        if os.path.exists(path):
            continue
        if log:
            with open(log, "a") as f:
                f.write(f"start {i} {time.time()}\\n")
        time.sleep(config["seconds"])
        tmp = os.path.join(folder, f".p{i:03d}.json.tmp")
        with open(tmp, "w") as f:
            json.dump({"part": i, "values": [i * i + k for k in range(8)]}, f)
        os.replace(tmp, path)
    return {"parts": folder, "count": config["parts"]}
'''


def python_units(out: Path) -> dict:
    return {p.name: identity(p) for p in out.glob("parts/p*.json")}


def python_cut_off(out: Path, before: dict, after: dict, since: float) -> int:
    """Parts the callable began during the attempt (its log) minus those it finished."""
    log = out.parents[2] / "work.log"
    begun = sum(1 for line in log.read_text().splitlines() if float(line.split()[2]) >= since) \
        if log.exists() else 0
    return begun - len(set(after) - set(before))


def python_final(out: Path) -> list[str]:
    names = sorted(p.name for p in out.glob("parts/*"))
    if names != [f"p{i:03d}.json" for i in range(PARTS)]:
        return [f"parts are {names[:3]}...{names[-3:]} ({len(names)}), expected p000..p{PARTS - 1:03d}"]
    bad = [i for i in range(PARTS)
           if json.loads((out / "parts" / f"p{i:03d}.json").read_text())["values"][0] != i * i]
    return [f"parts with wrong content: {bad}"] if bad else []


PYTHON = Kind(
    kind="python", stage="pystep", worker="ray::arpipe:pystep",
    block=f"""
  pystep:
    kind: python
    callable: faultsteps:parts
    config: {{{{parts: {PARTS}, seconds: 0.5}}}}
    resources: {{{{num_cpus: 0}}}}
""", files={"faultsteps.py": STEPS},
    units=python_units, wait_units=(0, 1, 2), start_window=4.0, unit_window=0.5,
    cut_off=python_cut_off, final_check=python_final, total_units=PARTS)


# ------------------------------------------------------------------------------- tokenizer

TOKENIZER = Kind(
    kind="tokenizer", stage="fit", worker="ray::arpipe:fit",
    block="""
  fit:
    kind: tokenizer
    source: {{modality: image, uri: "{digits}", channels: 1, size: 8}}
    tokenizer: {{type: msvq, scales: [1, 2, 4, 8], codebook_size: 16}}
    fit: {{max_samples: 100, heldout: 8}}
""",
    # the fit is one unit: a kill costs it whole, and nothing of it may be trusted
    units=lambda out: {}, cut_off=lambda out, before, after, since: 1, start_window=5.0,
    # the fit report holds the fit's timings
    volatile=("fit_report.json",))


# -------------------------------------------------------------------------------- tokenize

UNITS = 240   # 240 digits, 1 file per unit


def tokenize_units(out: Path) -> dict:
    return {p.name: identity(p) for p in out.glob(".arpipe/units/u*.json")}


def tokenize_resumed(output: str, before: dict) -> str | None:
    match = re.search(r"(\d+) units from .*: (\d+) reused", output)
    if match and int(match.group(2)) != len(before):
        return f"reused {match.group(2)} units, {len(before)} were committed"
    return None


def tokenize_cut_off(out: Path, before: dict, after: dict, since: float) -> int:
    """Units whose shard spool the killed attempt began and left without a unit record."""
    begun = set()
    for spool in out.glob("store/.shard-u*.tmp"):
        match = re.match(r"\.shard-u(\d{6})-", spool.name)
        if match and spool.stat().st_mtime >= since and f"u{match.group(1)}.json" not in after:
            begun.add(match.group(1))
    return len(begun)


def tokenize_final(out: Path) -> list[str]:
    """Every source image is in the store exactly once (no sample duplicated or lost)."""
    from arpipe.stages.store import TokenStore

    store = TokenStore.open(str(out / "store"))
    keys = [store[i].key for i in range(len(store))]
    source = Path(store.manifest.metadata["source_uri"])
    images = sorted(p.relative_to(source).as_posix() for p in source.rglob("*.png"))
    problems = []
    if len(keys) != len(set(keys)):
        problems.append(f"{len(keys) - len(set(keys))} samples duplicated")
    if sorted(set(keys)) != images:
        problems.append(f"samples lost or foreign: {len(set(images) - set(keys))} missing, "
                        f"{len(set(keys) - set(images))} unknown")
    return problems


TOKENIZE = Kind(
    kind="tokenize", stage="encode", worker="ray::arpipe:encode:unit",
    block="""
  encode:
    kind: tokenize
    source: {{modality: image, uri: "{digits}", channels: 1, size: 8, files_per_unit: 1}}
    tokenizer: "{tokenizer}"
    shards: {{samples_per_shard: 64}}
    workers: 1
""",
    units=tokenize_units, wait_units=(0, 1, 3, 6), start_window=3.0, unit_window=0.15,
    resumed=tokenize_resumed, cut_off=tokenize_cut_off, final_check=tokenize_final, total_units=UNITS,
    # unit records (with their encode times) are bookkeeping in .arpipe/, not output: every output file,
    # the store's manifest and shards included, must be identical
    volatile=())


# ----------------------------------------------------------------------------------- train

EVERY = 2
STEPS_TOTAL = 24


def train_units(out: Path) -> dict:
    """The latest committed checkpoint (in checkpoints, not steps), from Ray Train's own record."""
    snapshot = out / ".arpipe" / "ray" / "train" / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return {}
    return {"latest": int(latest["metrics"]["step"]) // EVERY} if latest else {}


def train_resumed(output: str, before: dict) -> str | None:
    steps = [int(s) for s in re.findall(r"resumed at step (\d+)", output)]
    expected = before.get("latest", 0) * EVERY
    if steps and steps[0] != expected:
        return f"resumed at step {steps[0]}, the latest committed checkpoint was step {expected}"
    if any(b < a for a, b in zip(steps, steps[1:])):
        return f"a later restart resumed further back: {steps}"
    return None


def train_final(out: Path) -> list[str]:
    files = sorted(p.name for p in (out / "model").iterdir())
    expected = ["config.json", "model.safetensors", "scale_inputs.safetensors", "tokenizers.json", "vocab.json"]
    return [] if files == expected else [f"model folder holds {files}"]


TRAIN = Kind(
    kind="train", stage="train", worker="RayTrainWorker", also_quiet=("TrainController",),
    block=f"""
  train:
    kind: train
    data: [{{{{store: "{{store}}"}}}}]
    model: {{{{preset: tiny, paradigm: next_scale, n_layer: 1, n_embd: 32, n_head: 2}}}}
    optimizer: {{{{lr: 0.003, warmup_steps: 2}}}}
    deepspeed: {{{{zero_stage: 1}}}}
    workers: 1
    global_batch: 8
    steps: {STEPS_TOTAL}
    checkpoint_every: {EVERY}
""",
    units=train_units, keep="latest", wait_units=(0, 0, 1, 2), start_window=12.0, unit_window=0.6,
    resumed=train_resumed, final_check=train_final, total_units=STEPS_TOTAL // EVERY)

KINDS = [PYTHON, TOKENIZER, TOKENIZE, TRAIN]
#: kinds whose stages run side by side in one pipeline (one `arpipe run` per attempt serves them all)
GROUPS = [[PYTHON, TOKENIZER, TOKENIZE], [TRAIN]]


# ------------------------------------------------------------------------------ the campaigns

PREP = """
name: fault-prep
storage: ./runs
stages:
  tok:
    kind: tokenizer
    source: {{modality: image, uri: "{digits}", channels: 1, size: 8}}
    tokenizer: {{type: msvq, scales: [1, 2, 4, 8], codebook_size: 16}}
    fit: {{max_samples: 100, heldout: 8}}
  store:
    kind: tokenize
    source: {{modality: image, uri: "{digits}", channels: 1, size: 8}}
    tokenizer: ${{tok.tokenizer}}
"""


def prepare(folder: Path, address: str, digits: Path) -> dict[str, str]:
    """A tokenizer artifact and a token store, made once, for the tokenize and train campaigns."""
    folder.mkdir(parents=True)
    (folder / "prep.yaml").write_text(PREP.format(digits=digits))
    arpipe("run", "prep.yaml", cwd=folder, env={"RAY_ADDRESS": address}, timeout=600, check=True)
    return {"tokenizer": str(next(folder.glob("runs/tok/*/tokenizer"))),
            "store": str(next(folder.glob("runs/store/*/store")))}
