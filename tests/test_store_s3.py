"""The same store on a real S3 server (SeaweedFS): written by parallel tasks, read with ranged GETs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from arpipe.pipeline.storage import S3Storage, storage_for
from arpipe.stages.store import (
    DistributedSampler,
    ShardWriter,
    StoreError,
    StoreWriter,
    TokenStore,
    write_manifest,
)


def fill(writer, n=300, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        side = 4 if i % 7 else 2
        writer.append(rng.integers(0, 70_000, size=(side, side)), key=f"img-{i}", modality="image",
                      condition=int(i % 10), source_uri=f"s3://raw/{i}.jpg")


@pytest.fixture
def twin_stores(tmp_path, s3_bucket):
    """One content written twice: to a local folder and to S3 (uint32 tokens, several shards)."""
    local, remote = str(tmp_path / "local"), f"{s3_bucket}/stores/a"
    for uri in (local, remote):
        with StoreWriter(uri, vocab_size=70_000, samples_per_shard=64) as w:
            fill(w)
    return TokenStore.open(local), TokenStore.open(remote, block_bytes=4096, cache_bytes=64 * 4096)


def test_an_s3_store_reads_exactly_like_its_local_twin_without_listing_the_bucket(twin_stores, monkeypatch):
    local, remote = twin_stores
    monkeypatch.setattr(S3Storage, "list", lambda self, prefix: pytest.fail(f"reader listed {prefix}"))
    remote = TokenStore.open(remote.uri, block_bytes=4096, cache_bytes=64 * 4096)
    assert remote.digest == local.digest  # content identity does not depend on where the store lives
    assert len(remote) == len(local) == 300 and remote.dtype == "uint32"
    for i in [0, 7, 63, 64, 299]:
        a, b = local[i], remote[i]
        assert (a.key, a.shape, a.condition, a.source_uri) == (b.key, b.shape, b.condition, b.source_uri)
        assert np.array_equal(a.tokens, b.tokens)
    idx = np.random.default_rng(1).permutation(300)[:100]
    la, rb = local.gather(idx), remote.gather(idx)
    assert np.array_equal(la.tokens, rb.tokens) and la.shapes == rb.shapes


def test_shuffled_epochs_stream_from_s3_through_the_block_cache(twin_stores):
    local, remote = twin_stores
    sampler = DistributedSampler(remote, world_size=2, rank=1, seed=3, window=32)
    order = np.fromiter(sampler, dtype=np.int64)
    got = list(remote.iter_batches(order, batch_size=16))
    want = [local.gather(order[i: i + 16]) for i in range(0, len(order), 16)]
    assert all(np.array_equal(g.tokens, w.tokens) and np.array_equal(g.offsets, w.offsets) for g, w in zip(got, want,
                                                                                                        strict=True))
    blocks = sum(-(-s.bytes // 4096) for s in remote.manifest.shards)
    assert remote.cache.fetches <= blocks  # windowed order + read-ahead: each block fetched once


def test_partitions_written_in_parallel_to_s3_commit_with_one_manifest(s3_bucket):
    uri = f"{s3_bucket}/dist"

    def task(p):
        w = ShardWriter(uri, f"part-{p:03d}", vocab_size=1024)
        for i in range(p * 10, p * 10 + 10):
            w.append(np.array([i, i + 1, i + 2]), key=f"k{i}", modality="image")
        return w.commit()

    with ThreadPoolExecutor(3) as pool:
        infos = list(pool.map(task, range(5)))
    assert task(2) == infos[2]  # a retry overwrites its own objects
    names = sorted(e.relpath for e in storage_for(uri).list(uri))
    assert names == sorted(f"shard-part-{p:03d}.{ext}" for p in range(5) for ext in ("bin", "idx.arrow", "json"))
    write_manifest(uri, infos, vocab=1024)
    store = TokenStore.open(uri)
    assert [store[i].tokens.tolist() for i in (0, 49)] == [[0, 1, 2], [49, 50, 51]]
    assert store.verify() == []


def test_damaged_s3_shards_are_named(twin_stores):
    _local, remote = twin_stores
    storage = storage_for(remote.uri)
    bad = f"{remote.uri}/shard-000003.bin"
    data = bytearray(storage.read_bytes(bad))
    data[0] ^= 1
    storage.write_bytes(bad, bytes(data))
    problems = TokenStore.open(remote.uri).verify()
    assert [p.where for p in problems] == [bad]
    assert str(problems[0]).startswith(f"{bad}: shard '000003': token checksum mismatch")
    storage.write_bytes(bad, bytes(data[:100]))
    store = TokenStore.open(remote.uri)  # opening S3 costs no per-shard requests; the first touch checks
    with pytest.raises(StoreError, match=r"shard-000003\.bin is truncated: 100 bytes, the manifest says"):
        store[3 * 64]
