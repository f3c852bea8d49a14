"""Interop: a store exported as WebDataset tars reads back, with stock webdataset, as the same tokens."""

from __future__ import annotations

import numpy as np
import webdataset as wds

from arpipe.stages.store import StoreWriter, TokenStore
from arpipe.stages.store.export import export_webdataset


def test_stock_webdataset_reads_the_export_with_identical_tokens(tmp_path):
    uri = str(tmp_path / "store")
    rng = np.random.default_rng(0)
    with StoreWriter(uri, vocab_size=70_000, samples_per_shard=25) as w:
        for i in range(60):
            shape = [(4, 4), (3, 2, 2), (10,)][i % 3]
            w.append(rng.integers(0, 70_000, size=shape), key=f"dir.{i}/img.{i}.png", modality="image",
                     condition={"label": i % 5} if i % 2 else i % 5, source_uri=f"file:///d/{i}.png")
    store = TokenStore.open(uri)
    tars = export_webdataset(store, str(tmp_path / "wds"))
    assert [t.rsplit("/", 1)[-1] for t in tars] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]

    dataset = wds.WebDataset(tars, shardshuffle=False).decode()
    seen = 0
    for rec in dataset:
        meta = rec["json"]
        sample = store[meta["index"]]
        assert rec["__key__"] == f"{meta['index']:09d}"
        assert rec["npy"].dtype == np.dtype("<u4") and rec["npy"].shape == sample.shape
        assert np.array_equal(rec["npy"], sample.tokens)
        assert (meta["key"], meta["condition"], meta["source_uri"]) == (sample.key, sample.condition, sample.source_uri)
        seen += 1
    assert seen == len(store)


def test_exporting_twice_gives_the_same_bytes(tmp_path):
    uri = str(tmp_path / "store")
    with StoreWriter(uri, vocab_size=100) as w:
        for i in range(5):
            w.append(np.arange(4) + i, key=f"k{i}", modality="image")
    store = TokenStore.open(uri)
    a = export_webdataset(store, str(tmp_path / "a"))
    b = export_webdataset(store, str(tmp_path / "b"))
    assert [open(x, "rb").read() for x in a] == [open(x, "rb").read() for x in b]
