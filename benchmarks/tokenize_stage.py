"""Tokenize-stage throughput and memory (issue 5), measured side by side in one run.

(Named tokenize_stage.py: a script called tokenize.py would shadow the standard library module.)

Data: scikit-learn's digits upsampled to 32x32 PNGs (N copies of the 1797, with
a varying pixel shift so files differ), msvq tokenizer (scales 1,2,4,8,16).
- images/s with 2 workers / 1 worker on the 10x data (goal >= 1.7 on 2 cores);
- the stage with 1 worker / the same read + encode in a bare Python loop, one
  thread, imports included on both sides, on the 10x data (goal >= 0.85, i.e. overhead <= 15%);
- peak RSS of the whole run (driver + Ray workers) with 10x the data / with 1x (goal <= 1.2).
Stage time is the stage's own duration from its outputs.json (Ray start-up excluded).
Prints the ratios last; writes benchmarks/results/tokenize.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

PIPELINE = """
name: bench
storage: ./runs
stages:
  tok:
    kind: tokenizer
    source: {{modality: image, uri: {fit_data}, channels: 1, size: 32}}
    tokenizer: {{type: msvq, scales: [1, 2, 4, 8, 16], codebook_size: 256, fit_iters: 20}}
    fit: {{max_samples: 500, heldout: 16}}
  tokenize:
    kind: tokenize
    source: {{modality: image, uri: {data}, channels: 1, size: 32, files_per_unit: 128}}
    tokenizer: ${{tok.tokenizer}}
    workers: {workers}
    progress: false
"""


def make_images(folder: Path, count: int) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        base = digits.images[i % len(digits.images)] * (255 / 16)
        big = np.kron(base, np.ones((4, 4)))
        big = np.roll(big, shift=(i // len(digits.images)) % 3, axis=1)
        sub = folder / str(digits.target[i % len(digits.target)])
        sub.mkdir(exist_ok=True)
        Image.fromarray(big.astype(np.uint8)).save(sub / f"{i:06d}.png")
    return folder


def peak_rss_of_tree(proc: subprocess.Popen, stop: threading.Event, out: dict) -> None:
    root = psutil.Process(proc.pid)
    peak = 0
    while not stop.is_set():
        try:
            procs = [root, *root.children(recursive=True)]
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, total)
        except psutil.Error:
            pass
        time.sleep(0.05)
    out["peak_rss"] = peak


def run_stage(folder: Path, data: Path, fit_data: Path, workers: int) -> dict:
    (folder / "pipeline.yaml").write_text(PIPELINE.format(data=data, fit_data=fit_data, workers=workers))
    stop, measured = threading.Event(), {}
    proc = subprocess.Popen([sys.executable, "-m", "arpipe.pipeline.cli", "run", "pipeline.yaml"], cwd=folder,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watcher = threading.Thread(target=peak_rss_of_tree, args=(proc, stop, measured))
    watcher.start()
    output, _ = proc.communicate()
    stop.set()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(output)
    record = json.loads(next(folder.glob("runs/tokenize/*/outputs.json")).read_text())
    manifest = json.loads(next(folder.glob("runs/tokenize/*/store/manifest.json")).read_text())
    seconds = record["finished"] - record["started"]
    return {"seconds": seconds, "samples": manifest["totals"]["samples"],
            "images_per_s": manifest["totals"]["samples"] / seconds, "peak_rss": measured["peak_rss"]}


BARE_LOOP = """
import sys, time
start = time.perf_counter()
import torch
from arpipe.stages.modalities import load_tokenizer, open_reader
torch.set_num_threads(1)
tok = load_tokenizer(sys.argv[2])
reader = open_reader("image", sys.argv[1], channels=1, size=32, files_per_unit=128)
count, batch = 0, []
for unit in reader.units():
    for sample in reader.read(unit):
        batch.append(sample.data)
        if len(batch) == 64:
            count += len(tok.encode_arrays(batch))
            batch = []
if batch:
    count += len(tok.encode_arrays(batch))
print(count, time.perf_counter() - start)
"""


def bare_loop(data: Path, tokenizer_dir: Path) -> dict:
    """The same read + encode as a plain script would do it: one process, one thread, imports included
    (a stage's Ray worker pays the same imports)."""
    out = subprocess.run([sys.executable, "-c", BARE_LOOP, str(data), str(tokenizer_dir)], capture_output=True,
                         text=True, check=True).stdout.split()
    count, seconds = int(out[0]), float(out[1])
    return {"seconds": seconds, "samples": count, "images_per_s": count / seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=4000, help="the 1x data size")
    args = parser.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one_x = make_images(tmp / "data1x", args.images)
        ten_x = make_images(tmp / "data10x", args.images * 10)
        for name, data, workers in (("1x_2workers", one_x, 2), ("10x_1worker", ten_x, 1),
                                    ("10x_2workers", ten_x, 2)):
            folder = tmp / name
            folder.mkdir()
            results[name] = run_stage(folder, data, one_x, workers)
            print(name, results[name], flush=True)
        results["bare_loop"] = bare_loop(ten_x, next((tmp / "10x_1worker").glob("runs/tok/*/tokenizer")))
        print("bare_loop", results["bare_loop"], flush=True)
    ratios = {
        "2_workers_over_1": results["10x_2workers"]["images_per_s"] / results["10x_1worker"]["images_per_s"],
        "stage_1_worker_over_bare_loop": results["10x_1worker"]["images_per_s"] / results["bare_loop"]["images_per_s"],
        "peak_rss_10x_over_1x": results["10x_2workers"]["peak_rss"] / results["1x_2workers"]["peak_rss"],
    }
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "tokenize.json").write_text(json.dumps({"results": results, "ratios": ratios}, indent=1))
    for name, r in results.items():
        rss = f", peak RSS {r['peak_rss'] / 2**20:.0f} MiB" if "peak_rss" in r else ""
        print(f"{name:<14} {r['samples']:>7} images in {r['seconds']:6.1f} s = {r['images_per_s']:7.0f} images/s{rss}")
    print(f"images/s 2 workers / 1 worker: {ratios['2_workers_over_1']:.2f} (goal >= 1.7)")
    print(f"stage 1 worker / bare loop: {ratios['stage_1_worker_over_bare_loop']:.2f} (goal >= 0.85)")
    print(f"peak RSS 10x data / 1x: {ratios['peak_rss_10x_over_1x']:.2f} (goal <= 1.2)")


if __name__ == "__main__":
    main()
