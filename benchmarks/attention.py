"""Attention kernels against the dense mask: forward + backward of a small Transformer, every paradigm.

For L = 680 (VAR's 256px pyramid plus the 2 context tokens, about) and L = 2048, and each paradigm
(next_token, next_block with blocks of 16, next_scale over a VAR-like pyramid, masked), times one
forward + backward of a 2-layer, 4-head, 128-wide Transformer on one row under each attention
setting the device can train with (CPU: ``dense`` and ``sdpa``, which is what ``auto`` picks there;
torch 2.13 has no flex backward on CPU. CUDA: ``flex`` too). Each timing is the best of 3,
alternating the settings, on one torch thread (``ARPIPE_BENCH_THREADS`` to change).

Memory: on CUDA ``torch.cuda.max_memory_allocated`` of one step. On CPU torch has no allocator
statistics, so each setting runs one step in a fresh child process and reports its peak resident
set size (``VmHWM``, reset just before the step) minus the resident set size just before the step (model and inputs built),
plus the bytes of the mask tensor the setting builds (0 when it needs none).

Prints a table, then the ratios; writes benchmarks/results/attention.json.

    .venv/bin/python benchmarks/attention.py [--lengths 680,2048] [--device cpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from arpipe.stages.models import ModelConfig, Transformer, batch_inputs, make_plan  # noqa: E402
from arpipe.stages.models.attention import flex_available, layout_for  # noqa: E402

PARADIGMS = ("next_token", "next_block", "next_scale", "masked")
CONTEXT = 2  # tag and class
BLOCK = 16
#: VAR's 256px pyramid (680 tokens) and one extended to 2035 tokens
SCALES = {680: [1, 2, 3, 4, 5, 6, 8, 10, 13, 16], 2048: [1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 17, 21, 25]}


def setup(paradigm: str, length: int, device: str):
    """A model and one row of ``length`` positions (next_scale: the nearest pyramid) of ``paradigm``."""
    torch.manual_seed(0)
    if paradigm == "next_scale":
        plan = make_plan(paradigm, scales=SCALES[length], n_axes=4)
    else:
        plan = make_plan(paradigm, n_tokens=length - CONTEXT, block_size=BLOCK if paradigm == "next_block" else 1,
                         n_axes=4)
    config = ModelConfig(vocab_size=1024, n_layer=2, n_head=4, n_embd=128, max_seq_len=4096, paradigm=paradigm,
                         block_size=BLOCK if paradigm == "next_block" else 1, rope_axes=4)
    model = Transformer(config).to(device)
    targets = torch.randint(8, 1024, (1, plan.n_tokens))
    batch = batch_inputs(plan, targets, torch.tensor([[3, 4]])).to(device)
    return model, batch


def step(model: Transformer, batch, kernel: str) -> None:
    model.config = dataclasses.replace(model.config, attention=kernel)
    model.zero_grad(set_to_none=True)
    _, loss = model(**batch.as_kwargs())
    loss.backward()
    if batch.input_ids.is_cuda:
        torch.cuda.synchronize()


def mask_bytes(batch, kernel: str) -> int:
    layout = layout_for(kernel, batch.group_ids, batch.doc_ids)
    return layout.mask_B1LK.nbytes if layout.mask_B1LK is not None else 0


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    with open("/proc/self/status") as f:
        kib = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    return int(kib) * 1024


def child_peak(paradigm: str, length: int, kernel: str) -> int:
    """Peak resident bytes one CPU step adds, measured in a fresh process (VmHWM reset just before the step)."""
    code = (f"import sys; sys.argv = ['x', '--child', '{paradigm},{length},{kernel}']; "
            f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import attention; attention.main()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def run_child(spec: str) -> None:
    paradigm, length, kernel = spec.split(",")
    model, batch = setup(paradigm, int(length), "cpu")
    before = resident_bytes()
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak (VmHWM) to the current RSS
        f.write("5")
    step(model, batch, kernel)
    print(peak_resident_bytes() - before)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="680,2048")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    # One thread by default: on a shared two-core machine OpenMP threads spin against other processes.
    torch.set_num_threads(int(os.environ.get("ARPIPE_BENCH_THREADS", "1")))
    if args.child:
        run_child(args.child)
        return
    device = args.device
    kernels = ["dense", "sdpa"] + (["flex"] if flex_available(torch.device(device)) else [])
    rows: list[dict] = []
    for length in (int(n) for n in args.lengths.split(",")):
        for paradigm in PARADIGMS:
            model, batch = setup(paradigm, length, device)
            print(f"{paradigm} L={batch.input_ids.shape[1]}", file=sys.stderr, flush=True)
            step(model, batch, "dense")  # warm up
            times: dict[str, list[float]] = {k: [] for k in kernels}
            for _ in range(args.repeats):
                for kernel in kernels:  # interleaved so background load hits every setting alike
                    t = time.perf_counter()
                    step(model, batch, kernel)
                    times[kernel].append(time.perf_counter() - t)
            for kernel in kernels:
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    step(model, batch, kernel)
                    peak = torch.cuda.max_memory_allocated()
                else:
                    peak = child_peak(paradigm, length, kernel)
                used = layout_for(kernel, batch.group_ids, batch.doc_ids).kernel if kernel != "flex" else "flex"
                rows.append({"paradigm": paradigm, "length": int(batch.input_ids.shape[1]), "setting": kernel,
                             "runs": used, "wall_s": min(times[kernel]), "mask_bytes": mask_bytes(batch, kernel),
                             "peak_bytes": peak})
    ratios: dict[str, float] = {}
    for r in rows:
        if r["setting"] != "dense":
            dense = next(d for d in rows if d["setting"] == "dense" and d["paradigm"] == r["paradigm"]
                         and d["length"] == r["length"])
            ratios[f"{r['paradigm']}_{r['length']}_{r['setting']}_speedup"] = dense["wall_s"] / r["wall_s"]
            ratios[f"{r['paradigm']}_{r['length']}_{r['setting']}_peak_ratio"] = r["peak_bytes"] / max(
                dense["peak_bytes"], 1)
    context = {"device": device, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
               "load_average_1m": os.getloadavg()[0],
               "memory": "cuda max_memory_allocated" if device == "cuda" else
                         "peak RSS (VmHWM, reset) of a fresh process during one step minus RSS before it"}
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "attention.json").write_text(json.dumps({"rows": rows, "ratios": ratios, **context}, indent=1))
    print(f"device {device}, torch {torch.__version__}, threads {context['torch_threads']}, "
          f"load average {context['load_average_1m']:.1f}; memory: {context['memory']}")
    print(f"{'paradigm':<11} {'L':>5} {'setting':<6} {'runs':<6} {'wall s':>8} {'mask MiB':>9} {'peak MiB':>9}")
    for r in rows:
        print(f"{r['paradigm']:<11} {r['length']:>5} {r['setting']:<6} {r['runs']:<6} {r['wall_s']:>8.3f} "
              f"{r['mask_bytes'] / 2**20:>9.1f} {r['peak_bytes'] / 2**20:>9.1f}")
    for key, value in ratios.items():
        if key.endswith("_speedup"):
            name = key.removesuffix("_speedup")
            goal = " (goal >= 1.5x)" if name.startswith("next_token_") and "_20" in name else ""
            print(f"{name} vs dense: {value:.2f}x faster{goal}, peak memory "
                  f"{ratios[name + '_peak_ratio']:.2f}x")


if __name__ == "__main__":
    main()
