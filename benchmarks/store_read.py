"""Token store read throughput, side by side with the alternatives, on the same data in one run.

Measures, in tokens per second (higher is better):

- raw:         ``np.fromfile`` of every shard's bytes, whole or in 4096-sample chunks, whichever is faster
- sequential:  ``TokenStore.iter_batches`` over samples in store order
- shuffled:    one epoch of the sampler's order, gathered 256 samples a batch
- webdataset:  stock ``webdataset.WebDataset`` iterating the store's export (decoding .npy)
- npy files:   one ``.npy`` per sample read with ``np.load`` in shuffled order (LlamaGen's layout)
- s3 shuffled: the shuffled epoch from the same store on a local SeaweedFS S3 server

Slow baselines (webdataset, npy files) run on a prefix of the same samples;
each local measurement is the best of ``--repeats`` runs (the machine is shared).
The ratio lines come last; everything is also written to
``benchmarks/results/store_read.json``.

    .venv/bin/python benchmarks/store_read.py [--samples 500000] [--tokens 256]
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

from arpipe.stages.store import DistributedSampler, ShardWriter, StoreWriter, TokenStore, write_manifest  # noqa: E402
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
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="store-bench-"))
    work.mkdir(parents=True, exist_ok=True)
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
        "tokens_per_s": local, "tokens_per_s_runs": runs, "s3": s3,
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
    results["ratios"] = ratios

    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
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
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")


if __name__ == "__main__":
    main()
