"""Token store read throughput, side by side with the alternatives, on the same data in one run.

Measures, in tokens per second (higher is better):

- raw:         ``np.fromfile`` of every shard's bytes, whole or in 4096-sample chunks, whichever is faster
- sequential:  ``TokenStore.iter_batches`` over samples in store order
- shuffled:    one epoch of the sampler's order, gathered 256 samples a batch
- webdataset:  stock ``webdataset.WebDataset`` iterating the store's export (decoding .npy)
- npy files:   one ``.npy`` per sample read with ``np.load`` in shuffled order (LlamaGen's layout)
- s3 shuffled: the shuffled epoch from the same store on a local SeaweedFS S3 server

Per sample (issue 22), on its own store of ``--item-samples`` x ``--item-tokens``
(20,000 x 680 uint16 by default), what a user's own ``torch.utils.data.Dataset`` calls:

- ``TokenStore.tokens(i)`` in store order and in a random permutation, ``store[i]`` (a whole ``Sample``)
  in store order, against LitData's ``StreamingDataset[i]`` over the same arrays (written with its
  ``BinaryWriter``, 64 MB chunks; shuffled on a prefix of the permutation: it is slow)
- a ``DataLoader`` over ``TokenDataset`` (batch 256, random order) and over ``TokenSamples``,
  with 0 and 2 workers (persistent, timed after a first epoch)

Slow baselines (webdataset, npy files) run on a prefix of the same samples;
each local measurement is the best of ``--repeats`` runs (the machine is shared).
The ratio lines come last; everything is also written to
``benchmarks/results/store_read.json`` (``--per-sample-only``: just the per-sample
part, to ``store_read_per_sample.json``).

    .venv/bin/python benchmarks/store_read.py [--samples 500000] [--tokens 256] [--per-sample-only]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout
sys.path.insert(0, str(ROOT / "tests"))  # the S3 test server

from arpipe.stages.store import (  # noqa: E402
    DistributedSampler,
    ShardWriter,
    StoreWriter,
    TokenDataset,
    TokenSamples,
    TokenStore,
    write_manifest,
)
from arpipe.stages.store.export import export_webdataset  # noqa: E402

BATCH = 256


def progress(msg: str, _t0: list[float] = [time.perf_counter()]) -> None:  # noqa: B006 - a clock shared by calls
    print(f"[{time.perf_counter() - _t0[0]:6.1f} s] {msg}", file=sys.stderr, flush=True)


def rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else float("inf")


def best(fn, repeats: int) -> float:
    return max(fn(r) for r in range(repeats))


def write_store(uri: str, data: np.ndarray, vocab: int, per_shard: int) -> None:
    side = int(np.sqrt(data.shape[1]))
    shape = (side, side) if side * side == data.shape[1] else (data.shape[1],)
    with StoreWriter(uri, vocab_size=vocab, samples_per_shard=per_shard) as w:
        for i, row in enumerate(data):
            w.append(row.reshape(shape), key=f"img-{i:08d}", modality="image", condition=int(i % 1000))


def write_store_parallel_s3(uri: str, data: np.ndarray, vocab: int, per_shard: int) -> None:
    """The same content on S3, written the distributed way (one writer per partition)."""
    from concurrent.futures import ThreadPoolExecutor

    side = int(np.sqrt(data.shape[1]))
    shape = (side, side) if side * side == data.shape[1] else (data.shape[1],)

    def part(p: int):
        w = ShardWriter(uri, f"{p:06d}", vocab_size=vocab)
        for i in range(p * per_shard, min(len(data), (p + 1) * per_shard)):
            w.append(data[i].reshape(shape), key=f"img-{i:08d}", modality="image", condition=int(i % 1000))
        return w.commit()

    with ThreadPoolExecutor(4) as pool:
        infos = list(pool.map(part, range(-(-len(data) // per_shard))))
    write_manifest(uri, infos, vocab=vocab)


def per_sample(work: Path, args) -> tuple[dict, dict]:
    """Per-sample reads of arpipe and LitData on the same arrays, then DataLoaders over the adapters."""
    import torch
    from litdata import StreamingDataLoader, StreamingDataset
    from litdata.streaming.writer import BinaryWriter

    N, L = args.item_samples, args.item_tokens
    data = np.random.default_rng(2).integers(0, args.vocab, size=(N, L), dtype=np.uint16)
    progress(f"per-sample reads: writing {N} x {L} for arpipe and LitData")
    uri = str(work / "items")
    write_store(uri, data, args.vocab, args.per_shard)
    store = TokenStore.open(uri)
    lit_dir = work / "litdata"
    lit_dir.mkdir()
    writer = BinaryWriter(str(lit_dir), chunk_bytes="64MB")
    for i, row in enumerate(data):
        writer[i] = row
    writer.done()
    writer.merge()
    lit = StreamingDataset(str(lit_dir))
    assert len(lit) == len(store) == N
    for i in (0, N // 2, N - 1):
        assert np.array_equal(lit[i], data[i]) and np.array_equal(store.tokens(i), data[i])

    seq = list(range(N))
    perm = np.random.default_rng(3).permutation(N).tolist()
    reads = {
        "tokens(i) sequential": (store.tokens, seq),
        "tokens(i) shuffled": (store.tokens, perm),
        "store[i] sequential": (lambda i: store[i].tokens, seq),
        "litdata sequential": (lit.__getitem__, seq),
        "litdata shuffled": (lit.__getitem__, perm[: args.litdata_shuffled]),
    }

    def read(fn, order) -> float:
        t = time.perf_counter()
        n = 0
        for i in order:
            n += fn(i).size
        return rate(n, time.perf_counter() - t)

    for fn, order in reads.values():  # warm the page cache and every lazy structure once
        read(fn, order[:2000])
    runs: dict[str, list[float]] = {name: [] for name in reads}
    for _ in range(args.repeats):  # interleaved, so that background load hits every measurement alike
        for name, (fn, order) in reads.items():
            runs[name].append(read(fn, order))
    rates = {name: max(v) for name, v in runs.items()}

    progress("per-sample reads: DataLoaders")
    loaders = {  # made one at a time: persistent workers live as long as their loader
        "TokenDataset": lambda w: torch.utils.data.DataLoader(
            TokenDataset(store), batch_size=256, shuffle=True, num_workers=w, persistent_workers=w > 0,
            generator=torch.Generator().manual_seed(0)),
        "TokenSamples": lambda w: torch.utils.data.DataLoader(
            TokenSamples(store), batch_size=256, num_workers=w, persistent_workers=w > 0),
        "litdata": lambda w: StreamingDataLoader(
            StreamingDataset(str(lit_dir), shuffle=True), batch_size=256, num_workers=w, persistent_workers=w > 0),
    }
    for workers in (0, 2):
        for name, make in loaders.items():
            loader, best_rate = make(workers), 0.0
            for epoch in range(1 + args.repeats):  # the first epoch starts the workers: not timed
                t = time.perf_counter()
                n = sum((batch if name == "litdata" else batch["tokens"]).numel() for batch in loader)
                assert n == N * L
                if epoch:
                    best_rate = max(best_rate, rate(n, time.perf_counter() - t))
            rates[f"{name} DataLoader, {workers} workers"] = best_rate
            del loader
    ratios = {f"TokenDataset DataLoader / litdata's, {w} workers (report)":
              rates[f"TokenDataset DataLoader, {w} workers"] / rates[f"litdata DataLoader, {w} workers"] for w in (0, 2)}
    ratios.update({  # the goals, printed last
        "tokens(i) / litdata sequential (goal >= 2)": rates["tokens(i) sequential"] / rates["litdata sequential"],
        "tokens(i) shuffled / litdata shuffled (goal >= 50)": rates["tokens(i) shuffled"] / rates["litdata shuffled"],
        "store[i] / litdata sequential (goal >= 1)": rates["store[i] sequential"] / rates["litdata sequential"],
    })
    return {"samples": N, "tokens_per_sample": L, "tokens_per_s": rates, "tokens_per_s_runs": runs}, ratios


def print_per_sample(items: dict, ratios: dict) -> None:
    print(f"per sample: {items['samples']} samples x {items['tokens_per_sample']} tokens (uint16), warm page cache")
    print(f"{'read':<40}{'Mtokens/s':>12}")
    for name, value in items["tokens_per_s"].items():
        print(f"{name:<40}{value / 1e6:>12.1f}")
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=500_000)
    ap.add_argument("--tokens", type=int, default=256, help="tokens per sample (256 = a 16x16 code grid)")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--per-shard", type=int, default=65536)
    ap.add_argument("--window", type=int, default=65536, help="sampler shuffle window (the default)")
    ap.add_argument("--wds-samples", type=int, default=150_000, help="prefix read through webdataset")
    ap.add_argument("--npy-samples", type=int, default=40_000, help="prefix written as one .npy per sample")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--item-samples", type=int, default=20_000, help="samples of the per-sample comparison")
    ap.add_argument("--item-tokens", type=int, default=680, help="tokens per sample of the per-sample comparison")
    ap.add_argument("--litdata-shuffled", type=int, default=2_000,
                    help="prefix of the permutation LitData reads shuffled (about 1 ms a sample)")
    ap.add_argument("--per-sample-only", action="store_true", help="only the per-sample comparison (issue 22)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="store-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    if args.per_sample_only:
        items, ratios = per_sample(work, args)
        (out / "store_read_per_sample.json").write_text(json.dumps(
            {"config": vars(args), "per_sample": items, "ratios": ratios}, indent=2))
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        print_per_sample(items, ratios)
        return
    results: dict = {"config": vars(args) | {"batch": BATCH}}
    N, L = args.samples, args.tokens
    data = np.random.default_rng(0).integers(0, args.vocab, size=(N, L), dtype=np.uint16)
    total = N * L
    t0 = time.perf_counter()

    uri = str(work / "store")
    progress(f"writing {N} samples to {uri}")
    t = time.perf_counter()
    write_store(uri, data, args.vocab, args.per_shard)
    results["write_s"] = time.perf_counter() - t
    store = TokenStore.open(uri)
    bins = [os.path.join(uri, f"shard-{n}.bin") for n in store.shard_names]
    sampler = DistributedSampler(store, seed=0, window=args.window)
    order = sampler.order

    def raw(_r):
        """The faster of whole-file reads and reads in the sequential batch size: the stricter ceiling."""
        t = time.perf_counter()
        n = sum(np.fromfile(b, dtype="<u2").size for b in bins)
        whole = rate(n, time.perf_counter() - t)
        t = time.perf_counter()
        n = 0
        for b in bins:
            with open(b, "rb") as f:
                while (chunk := np.fromfile(f, dtype="<u2", count=4096 * L)).size:
                    n += chunk.size
        return max(whole, rate(n, time.perf_counter() - t))

    def sequential(_r):
        t = time.perf_counter()
        n = sum(b.tokens.size for b in store.iter_batches(np.arange(N), 4096))
        return rate(n, time.perf_counter() - t)

    def shuffled(r, source=store):
        t = time.perf_counter()
        n = sum(b.tokens.size for b in source.iter_batches(order.epoch(r), BATCH))
        return rate(n, time.perf_counter() - t)

    progress("local reads")
    # interleave repeats so that background load hits every measurement alike
    runs: dict[str, list[float]] = {"raw": [], "sequential": [], "shuffled": []}
    for r in range(args.repeats):
        runs["raw"].append(raw(r))
        runs["sequential"].append(sequential(r))
        runs["shuffled"].append(shuffled(r))
    local = {k: max(v) for k, v in runs.items()}

    # stock webdataset over the export of the same store (first shards, --wds-samples samples)
    import webdataset as wds

    progress("webdataset export and read")
    wds_store = str(work / "wds-src")
    write_store(wds_store, data[: args.wds_samples], args.vocab, args.per_shard)
    tars = export_webdataset(TokenStore.open(wds_store), str(work / "wds"))
    t = time.perf_counter()
    n = 0
    for rec in wds.WebDataset(tars, shardshuffle=False).decode():
        n += rec["npy"].size
    local["webdataset"] = rate(n, time.perf_counter() - t)
    assert n == args.wds_samples * L

    # one .npy per sample, read in a shuffled order as LlamaGen's dataset does
    progress(".npy per sample")
    npy_dir = work / "npy"
    npy_dir.mkdir(exist_ok=True)
    M = args.npy_samples
    for i in range(M):
        np.save(npy_dir / f"{i}.npy", data[i])
    perm = np.random.default_rng(1).permutation(M)
    t = time.perf_counter()
    n = sum(np.load(npy_dir / f"{i}.npy").size for i in perm.tolist())
    local["npy_files"] = rate(n, time.perf_counter() - t)

    items, item_ratios = per_sample(work, args)

    s3 = {}
    if not args.no_s3:
        from s3server import S3Server

        progress("S3 write and read")
        server = S3Server(work / "s3").start()
        try:
            os.environ.update(server.env)
            bucket = server.make_bucket("bench")
            s3_uri = f"{bucket}/store"
            t = time.perf_counter()
            write_store_parallel_s3(s3_uri, data, args.vocab, args.per_shard)
            s3["write_s"] = time.perf_counter() - t
            remote = TokenStore.open(s3_uri)
            assert remote.digest == store.digest
            s3["shuffled"] = shuffled(0, remote)
            s3["block_fetches"] = remote.cache.fetches
            remote.close()
        finally:
            server.stop()

    meta_bytes = store.manifest.totals.index_bytes + os.path.getsize(os.path.join(uri, "manifest.json"))
    results.update({
        "tokens": total, "samples": N, "shards": store.manifest.totals.shards,
        "tokens_per_s": local, "tokens_per_s_runs": runs, "s3": s3, "per_sample": items,
        "index_manifest_bytes_per_million_samples": meta_bytes / N * 1e6,
        "elapsed_s": time.perf_counter() - t0,
    })
    ratios = {
        "sequential / raw (goal >= 0.8)": local["sequential"] / local["raw"],
        "shuffled / raw (goal >= 0.5)": local["shuffled"] / local["raw"],
        "shuffled / webdataset (goal >= 5)": local["shuffled"] / local["webdataset"],
        "shuffled / npy files (goal >= 10)": local["shuffled"] / local["npy_files"],
    }
    if s3:
        ratios["s3 shuffled / local shuffled (report)"] = s3["shuffled"] / local["shuffled"]
    ratios.update(item_ratios)
    results["ratios"] = ratios

    (out / "store_read.json").write_text(json.dumps(results, indent=2))
    if not args.workdir:
        progress("cleaning up")
        shutil.rmtree(work, ignore_errors=True)
    progress("done")

    print(f"store: {N} samples x {L} tokens (uint16), {store.manifest.totals.shards} shards, "
          f"{total * 2 / 2**20:.0f} MiB; batch {BATCH}, window {args.window}")
    print(f"{'read':<28}{'Mtokens/s':>12}")
    rows = [("raw np.fromfile", local["raw"]), ("store sequential", local["sequential"]),
            ("store shuffled", local["shuffled"]), (f"webdataset ({args.wds_samples} samples)", local["webdataset"]),
            (f".npy per sample ({M} samples)", local["npy_files"])]
    if s3:
        rows.append(("s3 store shuffled", s3["shuffled"]))
    for name, value in rows:
        print(f"{name:<28}{value / 1e6:>12.1f}")
    print(f"index + manifest bytes per million samples: {results['index_manifest_bytes_per_million_samples'] / 2**20:.1f} MiB")
    print(f"elapsed: {results['elapsed_s']:.0f} s")
    print_per_sample(items, {})
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")


if __name__ == "__main__":
    main()
