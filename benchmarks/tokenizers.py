"""Tokenizer benchmark: encode throughput on one core, the nearest-code search against its physical
bound, and reconstruction quality at equal token count, measured side by side in one run.

    .venv/bin/python benchmarks/tokenizers.py [--vqvae-seconds 120] [--quick]

1. Throughput: ``encode`` of a batch of 32x32 RGB tiles (astronaut, coffee, chelsea) per tokenizer,
   and octree encoding of brain-surface clouds, with ``torch.set_num_threads(1)``.
2. Search: for patch_vq and msvq, the time of their nearest-code search (``codebook.nearest_code``)
   and of the whole encode, against a pure ``torch.cdist(...).argmin(1)`` of the same shapes. That
   pure search is the bound an encode can reach; the goal is encode >= 0.7 of it.
3. Quality: PSNR/SSIM on held-out lfw faces (32x32 gray) at 64 tokens per image and 128 codes:
   patch_vq, two msvq layouts, and vqvae trained briefly (400 steps) and for a few minutes.

Prints the tables, ratios last, and writes benchmarks/results/tokenizers.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from arpipe.stages.modalities import (  # noqa: E402
    VQVAE,
    MultiScaleVQ,
    OctreeTokenizer,
    PatchVQ,
    codebook_usage,
    psnr,
    ssim,
)
from arpipe.stages.modalities.codebook import nearest_code  # noqa: E402

HIDDEN = 32  # vqvae width: what trains in minutes on a CPU core
CODES = 128  # codebook of the quality table: 150 faces x 64 patches leave 75 vectors per code


def interleaved(calls: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median seconds per call, the calls taking turns (one warm-up round first)."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for r in range(repeat + 1):
        for k, fn in calls.items():
            start = time.perf_counter()
            fn()
            if r:
                times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def row(name: str, tok, batch: int, seconds: float) -> dict:
    return {"tokenizer": name, "input": "32x32 RGB", "batch": batch, "tokens_per_sample": tok.tokens_per_sample,
            "vocab": tok.vocab_size, "seconds": seconds, "samples_per_s": batch / seconds,
            "tokens_per_s": batch * tok.tokens_per_sample / seconds}


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds of ``repeat`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ------------------------------------------------------------------------ data


def photo_tiles() -> torch.Tensor:
    from skimage import data as skdata
    from skimage.transform import resize

    tiles = []
    for img in (skdata.astronaut(), skdata.coffee(), skdata.chelsea()):
        small = resize(img, (256, 256), anti_aliasing=True).astype(np.float32)
        tiles += [small[y:y + 32, x:x + 32].transpose(2, 0, 1) for y in range(0, 256, 32) for x in range(0, 256, 32)]
    return torch.from_numpy(np.stack(tiles))  # 192 tiles


def faces() -> tuple[torch.Tensor, torch.Tensor]:
    from skimage import data as skdata
    from skimage.transform import resize

    lfw = skdata.lfw_subset()
    x = np.stack([resize(a, (32, 32), anti_aliasing=True) for a in lfw]).astype(np.float32)[:, None]
    order = np.random.default_rng(0).permutation(len(x))
    return torch.from_numpy(x[order[:150]]), torch.from_numpy(x[order[150:]])


def brain_clouds(n_clouds: int, points: int) -> list[np.ndarray]:
    from nilearn.datasets import load_mni152_template
    from skimage.measure import marching_cubes

    vol = load_mni152_template(resolution=2).get_fdata().astype(np.float32)
    verts, faces_, _, _ = marching_cubes(vol, level=0.3, spacing=(2.0, 2.0, 2.0))
    tri = verts[faces_]
    area = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    rng = np.random.default_rng(0)
    clouds = []
    for _ in range(n_clouds):
        pick = rng.choice(len(faces_), points, p=area / area.sum())
        r1, r2 = np.sqrt(rng.random((points, 1))), rng.random((points, 1))
        pts = (1 - r1) * tri[pick, 0] + r1 * (1 - r2) * tri[pick, 1] + r1 * r2 * tri[pick, 2]
        center = (pts.min(0) + pts.max(0)) / 2
        pts = pts - center
        clouds.append((pts / np.linalg.norm(pts, axis=1).max()).astype(np.float32))
    return clouds


# ------------------------------------------------------------------ sections


def throughput(repeat: int, batch: int) -> tuple[list[dict], list[dict]]:
    tiles = photo_tiles()
    x = tiles.repeat((batch + len(tiles) - 1) // len(tiles), 1, 1, 1)[:batch].contiguous()
    shape = (3, 32, 32)
    toks = {
        "patch_vq": PatchVQ(input_shape=shape, patch=(4, 4), codebook_size=512, fit_iters=30).fit(tiles),
        "msvq": MultiScaleVQ(input_shape=shape, patch=(4, 4), scales=[1, 2, 3, 4, 6, 8], codebook_size=512,
                             fit_iters=30, fit_rounds=2).fit(tiles),
        # encode speed does not depend on how long it trained: a couple of steps set up the codebook
        "vqvae": VQVAE(input_shape=shape, downsample=4, codebook_size=512, hidden=HIDDEN, code_dim=16,
                       device="cpu").fit(tiles, steps=2, batch_size=64),
    }
    g = torch.Generator().manual_seed(0)
    rows, search = [], []
    for name, tok in toks.items():
        if name == "vqvae":
            t = timed(lambda tok=tok: tok.encode(x), repeat)
            rows.append(row(name, tok, batch, t))
            continue
        # the same shapes as the encode's searches: ours (addmm, no sqrt) and the plain cdist+argmin
        # bound, timed interleaved with the encode so that load changes on the machine hit all three
        codebook, code_sq = tok.codebook_KD, tok.code_sq_K
        sizes = [tok.tokens_per_sample] if name == "patch_vq" else [int(np.prod(s)) for s in tok.scales]
        inputs = [torch.randn(batch * n, codebook.shape[1], generator=g) for n in sizes]
        calls = {
            "encode": lambda tok=tok: tok.encode(x),
            "search": lambda c=codebook, c2=code_sq, zs=inputs: [nearest_code(z, c, c2) for z in zs],
            "bound": lambda c=codebook, zs=inputs: [torch.cdist(z, c).argmin(1) for z in zs],
        }
        times = interleaved(calls, repeat)
        rows.append(row(name, tok, batch, times["encode"]))
        search.append({"tokenizer": name, "search_shapes": [[batch * n, codebook.shape[1], codebook.shape[0]] for n in sizes],
                       "encode_s": times["encode"], "search_s": times["search"], "cdist_argmin_s": times["bound"],
                       "search_share_of_encode": times["search"] / times["encode"],
                       "search_vs_cdist_argmin": times["bound"] / times["search"],
                       "encode_vs_bound": times["bound"] / times["encode"]})
    clouds = brain_clouds(8, 4000)
    octree = OctreeTokenizer(depth=8)
    t = timed(lambda: octree.encode_arrays(clouds), repeat)
    n_tokens = sum(len(a) for a in octree.encode_arrays(clouds))
    rows.append({"tokenizer": "octree", "input": "4000-point brain cloud, depth 8", "batch": len(clouds),
                 "tokens_per_sample": round(n_tokens / len(clouds)), "vocab": 256, "seconds": t,
                 "samples_per_s": len(clouds) / t, "tokens_per_s": n_tokens / t})
    return rows, search


def quality(vqvae_seconds: float, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    train, test = faces()
    shape = (1, 32, 32)

    def measure(name: str, tok, note: str) -> dict:
        idx = tok.encode(test)
        recon = tok.decode(idx)
        return {"tokenizer": name, "config": note, "tokens_per_sample": tok.tokens_per_sample, "vocab": tok.vocab_size,
                "psnr": float(psnr(recon, test).mean()), "ssim": float(ssim(recon, test).mean()),
                **{f"code_{k}": v for k, v in codebook_usage(idx, tok.vocab_size).items()},
                "fit_s": getattr(tok, "_fit_s", None)}

    def fit(tok, **kw):
        start = time.perf_counter()
        tok.fit(train, **kw)
        tok._fit_s = round(time.perf_counter() - start, 1)
        return tok

    rows = [
        measure("patch_vq", fit(PatchVQ(input_shape=shape, patch=(4, 4), codebook_size=CODES)), "4x4 patches"),
        measure("msvq", fit(MultiScaleVQ(input_shape=shape, patch=(4, 4), scales=[1, 2, 3, 5, 5], codebook_size=CODES)),
                "4x4 patches, scales 1,2,3,5,5"),
        measure("msvq", fit(MultiScaleVQ(input_shape=shape, patch=(8, 8), scales=[4, 4, 4, 4], codebook_size=CODES)),
                "8x8 patches, scales 4,4,4,4"),
        measure("vqvae", fit(VQVAE(input_shape=shape, downsample=4, codebook_size=CODES, hidden=HIDDEN, code_dim=16,
                                   device="cpu"), steps=400, batch_size=32), "brief: 400 steps"),
    ]
    long = VQVAE(input_shape=shape, downsample=4, codebook_size=CODES, hidden=HIDDEN, code_dim=16, device="cpu")
    fit(long, steps=100_000, batch_size=32, time_limit_s=vqvae_seconds)
    rows.append(measure("vqvae", long, f"few minutes: {long.fit_info['steps']} steps"))
    return rows


# ---------------------------------------------------------------------- report


def table(rows: list[dict], cols: list[tuple[str, str, str]], scale: dict[str, float] | None = None) -> str:
    head = " | ".join(cols_title for _, cols_title, _ in cols)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for key, title, fmt in cols:
            v = r.get(key)
            if v is not None and scale and key in scale:
                v = v * scale[key]
            cells.append(f"{(format(v, fmt) if v is not None else '-'):>{len(title)}}")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vqvae-seconds", type=float, default=150.0, help="training time of the 'few minutes' vqvae")
    ap.add_argument("--train-threads", type=int, default=1,
                    help="torch threads for the quality section (1 stays fast on a shared, busy machine)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny repeats, 10 s of vqvae training")
    args = ap.parse_args()
    repeat, batch = (2, 64) if args.quick else (5, 256)
    start = time.perf_counter()

    torch.set_num_threads(1)
    speed, search = throughput(repeat, batch)
    print(f"\nEncode throughput, one core (torch threads = {torch.get_num_threads()}):")
    print(table(speed, [("tokenizer", "tokenizer    ", ""), ("input", "input                          ", ""),
                        ("batch", "batch", "d"), ("tokens_per_sample", "tokens/sample", "d"),
                        ("samples_per_s", "samples/s", ",.0f"), ("tokens_per_s", "tokens/s", ",.0f")]))
    print("\nNearest-code search (same shapes; bound = torch.cdist + argmin):")
    print(table(search, [("tokenizer", "tokenizer", ""), ("encode_s", "encode ms", ".1f"),
                         ("search_s", "our search ms", ".1f"), ("cdist_argmin_s", "cdist+argmin ms", ".1f"),
                         ("search_share_of_encode", "search share of encode", ".2f")],
                scale={"encode_s": 1e3, "search_s": 1e3, "cdist_argmin_s": 1e3}))

    vq_seconds = 10.0 if args.quick else args.vqvae_seconds
    rows = quality(vq_seconds, args.train_threads)
    print(f"\nReconstruction on 50 held-out lfw faces (32x32 gray), 64 tokens/image, {CODES} codes "
          f"(training with {args.train_threads} threads):")
    print(table(rows, [("tokenizer", "tokenizer", ""), ("config", "config                         ", ""),
                       ("tokens_per_sample", "tokens", "d"), ("psnr", "PSNR dB", ".2f"), ("ssim", " SSIM", ".3f"),
                       ("code_used", "codes used", ".2f"), ("code_perplexity", "perplexity", ".1f"),
                       ("fit_s", "fit s", ".1f")]))

    pvq = next(r for r in rows if r["tokenizer"] == "patch_vq")
    brief = rows[3]
    longer = rows[4]
    ratios = {
        **{f"{r['tokenizer']}_encode_vs_cdist_bound": r["encode_vs_bound"] for r in search},
        **{f"{r['tokenizer']}_search_vs_cdist_argmin": r["search_vs_cdist_argmin"] for r in search},
        "vqvae_brief_minus_patch_vq_psnr_db": brief["psnr"] - pvq["psnr"],
        "vqvae_few_minutes_minus_patch_vq_psnr_db": longer["psnr"] - pvq["psnr"],
        "best_msvq_minus_patch_vq_psnr_db": max(r["psnr"] for r in rows if r["tokenizer"] == "msvq") - pvq["psnr"],
    }
    print("\nRatios (goal: encode >= 0.7 of the cdist+argmin bound):")
    for k, v in ratios.items():
        print(f"  {k:45s} {v:8.2f}")
    out = ROOT / "benchmarks" / "results" / "tokenizers.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"throughput": speed, "search": search, "quality": rows, "ratios": ratios,
                               "seconds": round(time.perf_counter() - start, 1)}, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(ROOT)} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
