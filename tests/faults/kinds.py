"""The stage kinds under fire in the kill campaigns: one :class:`Kind` each, and what they need.

A kind is its stage YAML (one stage, in a pipeline of its own), how to read its committed
resumable units off storage, when to kill it, and what must hold at the end. To put a new
stage kind under fire, add a ``Kind`` here and list it in ``KINDS``; ``test_stage_kills.py``
picks it up. ``ARPIPE_FAULT_SEED`` replays the campaigns' kill moments.

Every campaign kills each of its kinds ``CI_KILLS`` times in `make test` (the first kills of the
seeded sequence) and ``FULL_KILLS`` times behind the ``full`` marker (`make test-full`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from helpers import BACKGROUND_NICE, arpipe

from faults.harness import PATIENCE, Kind

SEED = int(os.environ.get("ARPIPE_FAULT_SEED", "9"))
#: kills of every kind: the seeded subset in CI, the full campaign behind `pytest -m full`
CI_KILLS, FULL_KILLS = 2, 10


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
    """Every part there once, with its content."""
    names = sorted(p.name for p in out.glob("parts/*"))
    if names != [f"p{i:03d}.json" for i in range(PARTS)]:
        return [f"parts are {names[:3]}...{names[-3:]} ({len(names)}), expected p000..p{PARTS - 1:03d}"]
    bad = [i for i in range(PARTS)
           if json.loads((out / "parts" / f"p{i:03d}.json").read_text())["values"][0] != i * i]
    return [f"parts with wrong content: {bad}"] if bad else []


PYTHON = Kind(
    kind="python", stage="pystep", worker="ray::arpipe:pystep",
    unit=f"a part file the callable writes (temp name, then rename); {PARTS} parts of 0.5 s",
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

def whole_fit(out: Path, before: dict, after: dict, since: float) -> int:
    """The fit is one unit: a kill costs it whole, and nothing of it may be trusted."""
    return 1


TOKENIZER = Kind(
    kind="tokenizer", stage="fit", worker="ray::arpipe:fit", unit="the whole fit (MSVQ, 100 digits)",
    block="""
  fit:
    kind: tokenizer
    source: {{modality: image, uri: "{digits}", channels: 1, size: 8}}
    tokenizer: {{type: msvq, scales: [1, 2, 4, 8], codebook_size: 16}}
    fit: {{max_samples: 100, heldout: 8}}
""",
    units=lambda out: {}, cut_off=whole_fit, start_window=5.0,
    # the fit report holds the fit's timings
    volatile=("fit_report.json",))


# -------------------------------------------------------------------------------- tokenize

UNITS = 240   # 240 digits, 1 file per unit


def unit_records(out: Path) -> dict:
    """Committed units of a sharded stage (tokenize, sample, evaluate): their records in the control folder."""
    return {p.name: identity(p) for p in out.glob(".arpipe/units/*.json")}


def reused_all(pattern: str, at_least: bool = False) -> Callable[[str, dict], str | None]:
    """The run's line ``pattern`` (group 1: units reused) names every unit committed before it (``at_least``:
    the line comes after the work, so a retried task counts its own first try's units too)."""
    def check(output: str, before: dict) -> str | None:
        match = re.search(pattern, output)
        if match and (int(match.group(1)) < len(before) if at_least else int(match.group(1)) != len(before)):
            return f"reused {match.group(1)} units, {len(before)} were committed"
        return None
    check.__doc__ = (f"the run says it reused {'at least ' if at_least else ''}every unit committed before it "
                     f"(`{pattern}`)")
    return check


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
    unit=f"a reader unit (1 image) and its store shard; {UNITS} units",
    block="""
  encode:
    kind: tokenize
    source: {{modality: image, uri: "{digits}", channels: 1, size: 8, files_per_unit: 1}}
    tokenizer: "{tokenizer}"
    shards: {{samples_per_shard: 64}}
    workers: 1
""",
    units=unit_records, wait_units=(0, 1, 3, 6), start_window=3.0, unit_window=0.15,
    resumed=reused_all(r"\d+ units from .*: (\d+) reused"), cut_off=tokenize_cut_off, final_check=tokenize_final, total_units=UNITS,
    # unit records (with their encode times) are bookkeeping in .arpipe/, not output: every output file,
    # the store's manifest and shards included, must be identical
    volatile=())


# ----------------------------------------------------------------------------------- train

EVERY = 2
STEPS_TOTAL = 24
#: the suite's tiny model, trained on one worker (a train stage block's lines, for str.format)
TINY_TRAIN = """    model: {{preset: tiny, paradigm: next_scale, n_layer: 1, n_embd: 32, n_head: 2}}
    optimizer: {{lr: 0.003, warmup_steps: 2}}
    workers: 1
    global_batch: 8
"""


def train_units(out: Path) -> dict:
    """The latest committed checkpoint (in checkpoints, not steps), from Ray Train's own record."""
    snapshot = out / ".arpipe" / "ray" / "train" / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return {}
    return {"latest": int(latest["metrics"]["step"]) // EVERY} if latest else {}


def train_resumed(output: str, before: dict) -> str | None:
    """`resumed at step N`: N is the latest committed checkpoint's step, and never goes back."""
    steps = [int(s) for s in re.findall(r"resumed at step (\d+)", output)]
    expected = before.get("latest", 0) * EVERY
    if steps and steps[0] != expected:
        return f"resumed at step {steps[0]}, the latest committed checkpoint was step {expected}"
    if any(b < a for a, b in zip(steps, steps[1:])):
        return f"a later restart resumed further back: {steps}"
    return None


def train_final(out: Path) -> list[str]:
    """The model folder holds exactly its files and its tokenizer copies, the EMA of the weights among them (the
    weights and their EMA bitwise equal to the reference's: every output file is compared)."""
    files = sorted(p.name for p in (out / "model").iterdir())
    expected = ["config.json", "ema.safetensors", "model.safetensors", "scale_inputs.safetensors", "tokenizers",
                "tokenizers.json", "vocab.json"]
    return [] if files == expected else [f"model folder holds {files}"]


TRAIN = Kind(
    kind="train", stage="train", worker="RayTrainWorker", also_quiet=("TrainController",),
    unit=f"a Ray Train checkpoint every {EVERY} steps; {STEPS_TOTAL} steps (DeepSpeed ZeRO-1, an EMA every 3)",
    block=f"""
  train:
    kind: train
    data: [{{{{store: "{{store}}"}}}}]
{TINY_TRAIN}    deepspeed: {{{{zero_stage: 1}}}}
    ema: {{{{decay: 0.9, every: 3}}}}
    steps: {STEPS_TOTAL}
    checkpoint_every: {EVERY}
""",
    units=train_units, keep="latest", wait_units=(0, 0, 1, 2), start_window=12.0, unit_window=0.6,
    resumed=train_resumed, final_check=train_final, total_units=STEPS_TOTAL // EVERY)

# ---------------------------------------------------------------------------------- sample

SAMPLES, PER_SHARD = 192, 3   # 64 shards of 3 digits: work left for the final run's worker kill after the kills


def sample_cut_off(out: Path, before: dict, after: dict, since: float) -> int:
    """Shards whose media the killed attempt began writing and left without a unit record."""
    begun = {f"image-{int(p.stem.rsplit('-', 1)[1]) // PER_SHARD:04d}.json"
             for p in out.glob("media/image/image-*.png") if p.stat().st_mtime >= since}
    return len(begun - set(after))


def sample_final(out: Path) -> list[str]:
    """Every seed index drawn exactly once, in order, each with its PNG."""
    from arpipe.stages.store import TokenStore

    keys = [TokenStore.open(str(out / "samples"))[i].key for i in range(SAMPLES)]
    media = sorted(p.stem for p in out.glob("media/image/*.png"))
    expected = [f"image-{i:06d}" for i in range(SAMPLES)]
    return [f"{what} are {got[:3]}...{got[-3:]} ({len(got)})" for what, got in (("samples", keys), ("media", media))
            if got != expected]


SAMPLE = Kind(
    kind="sample", stage="draw", worker="ray::SampleWorker", needs_model=True,
    unit=f"a sample shard ({PER_SHARD} samples: store shard, PNGs, then its record); {SAMPLES // PER_SHARD} shards",
    block=f"""
  draw:
    kind: sample
    model: "{{model}}"
    num_samples: {SAMPLES}
    samples_per_shard: {PER_SHARD}
    batch_size: {PER_SHARD}
    progress: false
""",
    units=unit_records, wait_units=(0, 1, 4, 8), start_window=6.0, unit_window=0.3,
    resumed=reused_all(r"samples in \d+ shards \((\d+) reused\)"), cut_off=sample_cut_off,
    final_check=sample_final, total_units=SAMPLES // PER_SHARD)


# -------------------------------------------------------------------------------- evaluate

EVAL_SAMPLES, UNIT_SAMPLES = 96, 16   # per set: NLL units of the held-out set, score units of the samples and reference
EVAL_UNITS = 3 * EVAL_SAMPLES // UNIT_SAMPLES


def evaluate_cut_off(out: Path, before: dict, after: dict, since: float) -> int:
    """Score units whose arrays the killed attempt wrote and left without a unit record (the driver commits the
    actors' units one at a time, so at most one is ever half written)."""
    begun = {p.with_suffix(".json").name for p in out.glob(".arpipe/units/score-*.npz") if p.stat().st_mtime >= since}
    return len(begun - set(after))


def evaluate_final(out: Path) -> list[str]:
    """metrics.json holds the held-out bits per token and the intensity gap (scores equal the reference's)."""
    metrics = json.loads((out / "metrics" / "metrics.json").read_text())["metrics"]
    wanted = ("heldout/bits_per_token", "image/intensity_mean_gap")
    return [f"metrics.json has no {name}" for name in wanted if metrics.get(name) is None]


EVALUATE = Kind(
    kind="evaluate", stage="score", worker="ray::EvaluateWorker", needs_model=True,
    unit=f"a score or NLL chunk of {UNIT_SAMPLES} samples (arrays or values, then its record); {EVAL_UNITS} units",
    block=f"""
  score:
    kind: evaluate
    samples: "{{samples}}"
    reference: "{{store}}"
    model: "{{model}}"
    max_samples: {EVAL_SAMPLES}
    samples_per_unit: {UNIT_SAMPLES}
    batch_size: 8
""",
    units=unit_records, wait_units=(0, 1, 3, 6, 10), start_window=6.0, unit_window=0.2,
    # the line comes at the end: in the final run, after its killed worker's retry
    resumed=reused_all(r"\] \d+ units \((\d+) reused\)", at_least=True),
    cut_off=evaluate_cut_off, final_check=evaluate_final, total_units=EVAL_UNITS, final_from_scratch=True)

KINDS = [PYTHON, TOKENIZER, TOKENIZE, TRAIN, SAMPLE, EVALUATE]
#: kinds whose stages run side by side in one pipeline (one `arpipe run` per attempt serves them all)
GROUPS = [[PYTHON, TOKENIZER, TOKENIZE], [TRAIN], [SAMPLE, EVALUATE]]


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


#: the suite's one small trained digits model: the sample and evaluate campaigns draw from it, and
#: ``tests/test_checkpoint_faults.py`` damages copies of its project (ZeRO-1, so the optimizer state is a
#: partition file of its own; checkpoints at steps 4 and 8, both kept)
MODEL_PIPELINE, MODEL_EXPERIMENT = "prep-model.yaml", "fault-prep-model"
PREP_MODEL = """
name: fault-prep-model
storage: ./runs
stages:
  train:
    kind: train
    data: [{{store: "{store}"}}]
{tiny}    deepspeed: {{zero_stage: 1}}
    steps: 8
    checkpoint_every: 4
  samples:
    kind: sample
    model: ${{train.model}}
    num_samples: 96
    samples_per_shard: 96
    batch_size: 48
    media: {{}}
"""


def prepare(folder: Path, address: str, digits: Path) -> dict[str, str]:
    """A tokenizer artifact and a token store, made once, for the tokenize and train campaigns."""
    folder.mkdir(parents=True)
    (folder / "prep.yaml").write_text(PREP.format(digits=digits))
    arpipe("run", "prep.yaml", cwd=folder, env={"RAY_ADDRESS": address}, timeout=PATIENCE, check=True,
           nice=BACKGROUND_NICE)
    return {"tokenizer": str(next(folder.glob("runs/tok/*/tokenizer"))),
            "store": str(next(folder.glob("runs/store/*/store")))}


def prepare_model(folder: Path, address: str, store: str) -> dict[str, str]:
    """A tiny model trained on the store (8 steps) and 96 samples drawn from it, made once, after :func:`prepare`,
    while the other campaigns run: ``model`` (its folder), ``samples`` (a store) and ``project`` (the folder
    whose ``MODEL_PIPELINE`` trained it)."""
    (folder / MODEL_PIPELINE).write_text(PREP_MODEL.format(store=store, tiny=TINY_TRAIN.format()))
    arpipe("run", MODEL_PIPELINE, cwd=folder, env={"RAY_ADDRESS": address}, timeout=PATIENCE, check=True,
           nice=BACKGROUND_NICE)
    return {"model": str(next(folder.glob("runs/train/*/model"))),
            "samples": str(next(folder.glob("runs/samples/*/samples"))), "project": str(folder)}
