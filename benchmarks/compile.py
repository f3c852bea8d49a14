"""``compile: true`` against eager: training step time of the ``tiny`` preset on CPU (issue 22, item 2).

One process, the same model (the ``tiny`` preset: 4 layers, 128 wide, 1024 codes) and batches (8 rows of a
next_token plan of ``--length`` tokens), AdamW. Each side first runs ``--warmup`` steps (for the compiled
model these include compilation, timed separately), then ``--steps`` timed steps; the median step time is
reported. The losses of both sides are printed too (equal within float rounding). The ratio line comes last;
results also go to ``benchmarks/results/compile.json``.

    .venv/bin/python benchmarks/compile.py [--length 256] [--steps 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from arpipe.stages.models import (  # noqa: E402
    Transformer,
    VocabLayout,
    batch_inputs,
    compile_blocks,
    compile_unavailable,
    make_plan,
    preset,
)


def run(compiled: bool, args) -> dict:
    vocab = VocabLayout.build({"image": 1000}, classes=range(10))
    config = preset("tiny", vocab_size=vocab.vocab_size, max_seq_len=args.length + 8, rope_axes=3)
    torch.manual_seed(0)
    model = Transformer(config)
    started = time.perf_counter()
    if compiled:
        why = compile_blocks(model)
        if why is not None:
            raise SystemExit(f"torch.compile cannot run here: {why}")
    plan = make_plan("next_token", grid=(1, args.length), n_axes=3)
    lo, _hi = vocab.code_range("image")
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        targets = lo + torch.randint(0, 1000, (8, args.length), generator=g)
        context = torch.tensor([vocab.context("image", str(k % 10)) for k in range(8)])
        t0 = time.perf_counter()
        _, loss = model(**batch_inputs(plan, targets, context).as_kwargs())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 0:
            first = time.perf_counter() - started
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return {"median_step_s": statistics.median(times), "first_step_s": first, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if (why := compile_unavailable("cpu")) is not None:
        raise SystemExit(f"torch.compile cannot run here: {why}")
    eager, compiled = run(False, args), run(True, args)
    worst = max(abs(a - b) / abs(a) for a, b in zip(eager["losses"], compiled["losses"]))
    for name, row in (("eager", eager), ("compiled", compiled)):
        print(f"{name:9s} median step {row['median_step_s'] * 1000:.1f} ms, first step (with compilation) "
              f"{row['first_step_s']:.1f} s, last loss {row['losses'][-1]:.5f}")
    print(f"largest relative loss difference over {len(eager['losses'])} steps: {worst:.2e}")
    out = ROOT / "benchmarks" / "results" / "compile.json"
    out.parent.mkdir(exist_ok=True)
    speedup = eager["median_step_s"] / compiled["median_step_s"]
    out.write_text(json.dumps({"args": vars(args), "eager": eager, "compiled": compiled,
                               "ratios": {"eager / compiled step time": speedup}}, indent=2))
    print(f"training step time, eager / compiled: {speedup:.2f}x")


if __name__ == "__main__":
    main()
