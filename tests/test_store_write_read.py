"""Writing a token store and reading it back: what a tokenize stage produces and a trainer consumes."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from arpipe.schemas.store import StoreManifest, TokenizerRef, VocabLayout, VocabRange
from arpipe.stages.store import (
    ShardWriter,
    StoreError,
    StoreWriter,
    TokenStore,
    read_shard_info,
    write_manifest,
)

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = TokenizerRef(id="msvq-test", digest="sha256:abc")


def mixed_samples(n, vocab=4096, seed=0):
    """Images (2-D grids), a video (3-D) and multi-scale flat sequences, with labels and sources."""
    rng = np.random.default_rng(seed)
    shapes = [(4, 4), (2, 3, 3), (21,), (8, 8)]
    for i in range(n):
        shape = shapes[i % len(shapes)]
        yield dict(tokens=rng.integers(0, vocab, size=shape), key=f"class{i % 3}/img.{i}.png",
                   modality="video" if len(shape) == 3 else "image", condition=i % 3 if i % 5 else {"text": f"t{i}"},
                   source_uri=f"s3://raw/{i}.png", source_digest=f"sha256:{i:04x}")


def test_a_written_store_reads_back_every_sample_with_its_metadata(tmp_path):
    uri = str(tmp_path / "store")
    samples = list(mixed_samples(50))
    with StoreWriter(uri, vocab_size=4096, samples_per_shard=16, tokenizer=TOKENIZER,
                     vocab=VocabLayout(vocab_size=4096, ranges=[VocabRange(name="image", start=0, stop=4096)]),
                     metadata={"source_digest": "sha256:src", "rejected": 0}) as writer:
        for s in samples:
            writer.append(**s)
    store = TokenStore.open(uri)
    assert len(store) == 50 and store.dtype == "uint16" and store.shard_names == ["000000", "000001", "000002", "000003"]
    assert store.manifest.tokenizer == TOKENIZER and store.manifest.metadata == {"source_digest": "sha256:src",
                                                                                 "rejected": 0}
    for i in [0, 1, 2, 17, 49, -1]:
        expect = samples[i]
        got = store[i]
        assert got.key == expect["key"] and got.modality == expect["modality"] and got.condition == expect["condition"]
        assert got.shape == expect["tokens"].shape and np.array_equal(got.tokens, expect["tokens"])
        assert got.source_uri == expect["source_uri"] and got.source_digest == expect["source_digest"]
        assert got.tokens.dtype == np.dtype("<u2")
    batch = store.gather([49, 3, 3, 20])
    for j, i in enumerate([49, 3, 3, 20]):
        assert np.array_equal(batch[j], samples[i]["tokens"])
    assert batch.lengths.tolist() == [samples[i]["tokens"].size for i in [49, 3, 3, 20]]
    assert store.conditions([1, 5]) == [1, {"text": "t5"}]
    assert [s.key for s in store][:2] == [samples[0]["key"], samples[1]["key"]]


def test_equal_shapes_gather_into_one_array_and_torch_views_share_the_mapped_file(tmp_path):
    uri = str(tmp_path / "s")
    grids = np.arange(30 * 16).reshape(30, 4, 4) % 1000
    with StoreWriter(uri, vocab_size=1000, samples_per_shard=7) as w:
        for i, g in enumerate(grids):
            w.append(torch.from_numpy(g), key=f"k{i}", modality="image", condition=i)
    store = TokenStore.open(uri)
    order = [29, 0, 8, 7, 6, 15]
    assert np.array_equal(store.gather(order).stack(), grids[order])
    assert torch.equal(store.gather(order).torch().long().view(-1, 4, 4), torch.from_numpy(grids[order]))
    view = store.torch(8)
    assert view.dtype == torch.uint16 and view.shape == (4, 4)
    assert torch.equal(view.long(), torch.from_numpy(grids[8]))
    # zero-copy: neighbouring samples are neighbours in the one memory map of their shard
    assert store.torch(9).data_ptr() - view.data_ptr() == 16 * 2
    assert view.data_ptr() == store.tokens(8).__array_interface__["data"][0]


def test_large_vocabularies_use_uint32_and_shards_roll_by_bytes(tmp_path):
    uri = str(tmp_path / "big")
    with StoreWriter(uri, vocab_size=100_000, samples_per_shard=None, bytes_per_shard=100) as w:
        for i in range(10):
            w.append(np.full(10, 99_999 - i), key=f"k{i}", modality="image")  # 40 bytes each
    store = TokenStore.open(uri)
    assert store.dtype == "uint32" and store.np_dtype == np.dtype("<u4")
    assert [s.samples for s in store.manifest.shards] == [2, 2, 2, 2, 2]
    assert all(s.bytes <= 100 for s in store.manifest.shards)
    assert int(store[9].tokens[0]) == 99_990
    raw = np.fromfile(tmp_path / "big" / "shard-000000.bin", dtype="<u4")
    assert raw.tolist() == [99_999] * 10 + [99_998] * 10  # little-endian, contiguous, tokens only


def write_partition(uri, part, rows, fail_after=None):
    """What one Ray task of a tokenize stage does for one input partition."""
    writer = ShardWriter(uri, f"part-{part:05d}", vocab_size=512)
    try:
        for n, i in enumerate(rows):
            if fail_after is not None and n == fail_after:
                raise RuntimeError("worker lost")
            writer.append(np.array([i % 512, (i * 7) % 512]), key=f"s{i}", modality="image", condition=i % 10)
    except BaseException:
        writer.abort()
        raise
    return writer.commit()


def test_partitions_written_in_parallel_assemble_into_one_manifest_and_retries_overwrite(tmp_path):
    uri = str(tmp_path / "dist")
    parts = [range(p * 100, p * 100 + 100 - 7 * p) for p in range(4)]
    with pytest.raises(RuntimeError):
        write_partition(uri, 2, parts[2], fail_after=30)  # a crashed attempt leaves nothing under its names
    assert not list((tmp_path / "dist").glob("shard-part-00002*"))
    with ThreadPoolExecutor(4) as pool:
        infos = list(pool.map(lambda p: write_partition(uri, p, parts[p]), range(4)))
    again = write_partition(uri, 1, parts[1])  # a retried task after its first attempt had finished
    assert again == infos[1]
    assert sorted(f.name for f in (tmp_path / "dist").iterdir() if not f.name.startswith("shard-part")) == []
    manifest = write_manifest(uri, infos, vocab=512, tokenizer=TOKENIZER, metadata={"partitions": 4})
    assert isinstance(manifest, StoreManifest)
    store = TokenStore.open(uri)
    assert len(store) == sum(len(p) for p in parts) and len(list((tmp_path / "dist").glob("*.bin"))) == 4
    assert [store[i].key for i in range(len(store))] == [f"s{i}" for p in parts for i in p]
    assert store.verify() == []


def test_the_store_digest_is_content_identity(tmp_path):
    def build(name, values, **kw):
        with StoreWriter(str(tmp_path / name), vocab_size=300, samples_per_shard=4, **kw) as w:
            for i, v in enumerate(values):
                w.append(np.array([v, v]), key=f"k{i}", modality="image")
        return TokenStore.open(str(tmp_path / name)).digest

    a = build("a", range(10))
    assert build("b", range(10)) == a  # same content, other place
    assert build("c", range(10), metadata={"note": "annotated"}) == a  # free metadata is not identity
    assert build("d", [*range(9), 42]) != a
    assert build("e", range(10), tokenizer=TOKENIZER) != a


def test_a_store_pickles_to_workers_and_reads_the_same(tmp_path):
    uri = str(tmp_path / "s")
    with StoreWriter(uri, vocab_size=64) as w:
        for i in range(20):
            w.append(np.arange(i % 5 + 1) % 64, key=f"k{i}", modality="image")
    store = TokenStore.open(uri)
    copy = pickle.loads(pickle.dumps(store))
    assert copy.digest == store.digest
    assert np.array_equal(copy.gather(range(20)).tokens, store.gather(range(20)).tokens)


def test_the_manifest_schema_is_strict_and_cheap_to_import(tmp_path):
    uri = str(tmp_path / "s")
    with StoreWriter(uri, vocab_size=64) as w:
        w.append(np.arange(4), key="a", modality="image")
    data = json.loads((tmp_path / "s" / "manifest.json").read_text())
    StoreManifest.model_validate(data)
    with pytest.raises(ValueError, match="extra"):
        StoreManifest.model_validate({**data, "surprise": 1})
    with pytest.raises(ValueError, match="totals"):
        StoreManifest.model_validate({**data, "totals": {**data["totals"], "samples": 2}})
    code = "import sys, arpipe.schemas.store; bad = {'torch', 'numpy', 'ray', 'arpipe.pipeline', 'arpipe.stages'} & set(sys.modules); " \
           "print(sorted(bad)); sys.exit(bool(bad))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_an_empty_partition_still_commits_and_reads_as_zero_samples(tmp_path):
    uri = str(tmp_path / "s")
    infos = [ShardWriter(uri, "empty", vocab_size=16).commit()]
    with ShardWriter(uri, "one", vocab_size=16) as w:
        w.append([1, 2, 3], key="x", modality="image")
    infos.append(read_shard_info(uri, "one"))
    write_manifest(uri, infos, vocab=16)
    store = TokenStore.open(uri)
    assert len(store) == 1 and store[0].tokens.tolist() == [1, 2, 3] and store.verify() == []


def test_writer_misuse_is_refused_with_the_shard_and_sample_named(tmp_path):
    uri = str(tmp_path / "s")
    w = ShardWriter(uri, "p0", vocab_size=16)
    w.append([1], key="a", modality="image")
    with pytest.raises(StoreError, match=r"shard-p0\.bin sample 'a': duplicate"):
        w.append([2], key="a", modality="image")
    with pytest.raises(StoreError, match="sample 'b': tokens must be integers"):
        w.append(np.array([0.5]), key="b", modality="image")
    with pytest.raises(StoreError, match=r"sample 'c': shape \(3,\) does not hold 2 tokens"):
        w.append([1, 2], key="c", modality="image", shape=(3,))
    with pytest.raises(StoreError, match="not allowed"):
        ShardWriter(uri, "../escape", vocab_size=16)
    with pytest.raises(StoreError, match="dtype uint32 does not match vocab_size 16"):
        ShardWriter(uri, "p1", vocab_size=16, dtype="uint32")
    w.abort()
    assert list((tmp_path / "s").iterdir()) == []
