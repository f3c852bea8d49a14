"""A user's own training loop over a token store: per-sample reads, and the store as a PyTorch dataset.

The store holds real data: scikit-learn's handwritten digits, each 8x8 image's
pixel levels (0..16) as its tokens and the digit as its label. What the reader
returns is checked against the files read without it (the index through
pyarrow, the tokens with ``np.fromfile``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch.utils.data import DataLoader

from arpipe.stages.store import (
    DistributedSampler,
    Sample,
    ShardWriter,
    StoreError,
    StoreWriter,
    TokenDataset,
    TokenSamples,
    TokenStore,
    collate_samples,
    write_manifest,
)
from arpipe.stages.store.format import checksum

DIGITS = 300


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images[:DIGITS].astype(np.int64), d.target[:DIGITS].tolist()


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory, digits):
    """Every digit an 8x8 grid of tokens labelled with its class, 64 digits a shard."""
    images, labels = digits
    uri = str(tmp_path_factory.mktemp("digits") / "store")
    with StoreWriter(uri, vocab_size=17, samples_per_shard=64) as w:
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            w.append(image, key=f"digits/{label}/{i:04d}.png", modality="image", condition=label,
                     source_uri=f"sklearn://digits/{i}", source_digest=f"sha256:{i:064x}")
    return TokenStore.open(uri)


@pytest.fixture(scope="module")
def mixed_store(tmp_path_factory, digits):
    """Digits whole, cropped to their top half, or flattened, in one shard; some captioned, some unconditional."""
    images, labels = digits
    uri = str(tmp_path_factory.mktemp("mixed") / "store")
    with StoreWriter(uri, vocab_size=17, samples_per_shard=40) as w:
        for i in range(100):
            tokens = [images[i], images[i][:4], images[i].reshape(-1)][i % 3]
            w.append(tokens, key=f"d{i}", modality="image" if i % 3 else "sketch",
                     condition=None if i % 4 == 0 else ({"text": f"a {labels[i]}"} if i % 4 == 1 else labels[i]),
                     caption=f"the digit {labels[i]}" if i % 2 else None,
                     caption_tokens=[labels[i], 1, 2] if i % 2 else None, control_tokens=[i % 17] if i % 5 else None)
    return TokenStore.open(uri)


def read_without_the_reader(store: TokenStore) -> list[Sample]:
    """Every sample as the files hold it: each shard's Arrow index row and its slice of the token file."""
    samples = []
    for name in store.shard_names:
        table = pa.ipc.open_file(Path(store.uri) / f"shard-{name}.idx.arrow").read_all()
        flat = np.fromfile(Path(store.uri) / f"shard-{name}.bin", dtype=store.np_dtype)
        for row in table.to_pylist():
            tokens = flat[row["offset"]: row["offset"] + row["length"]].reshape(row["shape"])
            samples.append(Sample(
                index=len(samples), key=row["key"], modality=row["modality"], shape=tuple(row["shape"]),
                tokens=tokens, condition=None if row["condition"] is None else json.loads(row["condition"]),
                source_uri=row["source_uri"], source_digest=row["source_digest"], shard=name,
                caption=row.get("caption"),
                caption_tokens=None if row.get("caption_tokens") is None else tuple(row["caption_tokens"]),
                control_tokens=None if row.get("control_tokens") is None else tuple(row["control_tokens"])))
    return samples


def assert_same_sample(got: Sample, expect: Sample) -> None:
    for field in dataclasses.fields(Sample):
        a, b = getattr(got, field.name), getattr(expect, field.name)
        if field.name == "tokens":
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), field.name
        else:
            assert a == b and type(a) is type(b), (field.name, a, b)


@pytest.mark.parametrize("which", ["digits_store", "mixed_store"])
def test_tokens_and_samples_are_what_the_files_hold(which, request):
    store = request.getfixturevalue(which)
    expected = read_without_the_reader(store)
    assert len(store) == len(expected)
    for i, expect in enumerate(expected):
        assert_same_sample(store[i], expect)
        tokens = store.tokens(i)
        assert tokens.dtype == np.dtype("<u2") and tokens.shape == expect.shape
        assert np.array_equal(tokens, expect.tokens)
    # negative and numpy indices read the same samples; a sampler's ids are often numpy integers
    assert_same_sample(store[-1], expected[-1])
    assert_same_sample(store[np.int64(5)], expected[5])
    assert np.array_equal(store.tokens(np.int32(-2)), expected[-2].tokens)
    assert [s.key for s in store] == [s.key for s in expected]


def test_a_sample_past_either_end_is_an_index_error(digits_store):
    n = len(digits_store)
    for bad in (n, -n - 1, np.int64(n), 10**12):
        with pytest.raises(IndexError, match=rf"sample -?\d+ out of range for .*store \({n} samples\)"):
            digits_store.tokens(bad)
        with pytest.raises(IndexError, match="out of range"):
            digits_store[bad]
    with pytest.raises(IndexError):
        TokenDataset(digits_store)[n]


def test_tokens_are_views_of_the_mapped_file_that_never_write_it(digits_store, digits):
    images, _ = digits
    view = digits_store.tokens(3)
    # zero-copy: neighbours in a shard are neighbours in memory
    assert digits_store.tokens(4).__array_interface__["data"][0] - view.__array_interface__["data"][0] == 64 * 2
    view[:] = 0  # copy-on-write: this process's pages change, the file does not
    assert np.array_equal(TokenStore.open(digits_store.uri).tokens(3), images[3])
    view[:] = images[3]


def test_a_store_written_before_captions_reads_none_for_them(tmp_path, digits):
    images, labels = digits
    uri = str(tmp_path / "old")
    w = ShardWriter(uri, "000000", vocab_size=17)
    for i in range(10):
        w.append(images[i], key=f"d{i}", modality="image", condition=labels[i])
    info = w.commit()
    index = tmp_path / "old" / "shard-000000.idx.arrow"
    table = pa.ipc.open_file(index).read_all().drop_columns(["caption", "caption_tokens", "control_tokens"])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as f:
        f.write_table(table)
    data = sink.getvalue().to_pybytes()
    index.write_bytes(data)
    write_manifest(uri, [info.model_copy(update={"index_bytes": len(data), "index_checksum": checksum(data)})],
                   vocab=17)
    sample = TokenStore.open(uri)[7]
    assert sample.condition == labels[7] and np.array_equal(sample.tokens, images[7])
    assert sample.caption is None and sample.caption_tokens is None and sample.control_tokens is None


@pytest.mark.parametrize("workers", [0, 2])
def test_a_dataloader_over_the_dataset_yields_the_store_tokens_and_labels(digits_store, digits, workers):
    images, labels = digits
    loader = DataLoader(TokenDataset(digits_store), batch_size=32, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    seen = []
    for batch in loader:  # the stock collate: one shape, integer labels
        assert batch["tokens"].dtype == torch.int64 and batch["tokens"].shape[1:] == (8, 8)
        for j, i in enumerate(batch["index"].tolist()):
            assert torch.equal(batch["tokens"][j], torch.from_numpy(digits_store.tokens(i).astype(np.int64)))
            assert batch["condition"][j].item() == labels[i] and batch["key"][j] == f"digits/{labels[i]}/{i:04d}.png"
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(DIGITS)) and seen != list(range(DIGITS))


def test_the_store_dtype_stays_a_zero_copy_view_when_asked(digits_store):
    item = TokenDataset(digits_store, dtype=None)[10]
    assert item["tokens"].dtype == torch.uint16
    assert item["tokens"].data_ptr() == digits_store.tokens(10).__array_interface__["data"][0]


def test_the_iterable_dataset_covers_every_sample_once_across_two_workers(digits_store):
    loader = DataLoader(TokenSamples(digits_store, seed=1), batch_size=16, num_workers=2)
    seen = []
    for batch in loader:
        for j, i in enumerate(batch["index"].tolist()):
            assert torch.equal(batch["tokens"][j], torch.from_numpy(digits_store.tokens(i).astype(np.int64)))
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(DIGITS)) and len(loader.dataset) == DIGITS


def test_ranks_share_an_epoch_through_the_sampler(digits_store):
    ranks = [TokenSamples(digits_store, DistributedSampler(digits_store, rank=r, world_size=2, seed=4))
             for r in range(2)]
    ids = [[item["index"] for item in ds] for ds in ranks]
    assert len(ids[0]) == len(ids[1]) == DIGITS // 2 and sorted(ids[0] + ids[1]) == list(range(DIGITS))
    # the map-style dataset takes the same sampler as the DataLoader's: the same ids for rank 1
    loader = DataLoader(TokenDataset(digits_store), batch_size=50,
                        sampler=DistributedSampler(digits_store, rank=1, world_size=2, seed=4))
    assert [i for batch in loader for i in batch["index"].tolist()] == ids[1]
    with pytest.raises(StoreError, match="packs sequences of 256; use TokenBatches"):
        TokenSamples(digits_store, DistributedSampler(digits_store, seq_len=256))


def test_collate_batches_samples_of_different_shapes_and_conditions(mixed_store):
    batch = collate_samples([TokenDataset(mixed_store)[i] for i in range(4)])
    assert [tuple(t.shape) for t in batch["tokens"]] == [(8, 8), (4, 8), (64,), (8, 8)]
    assert batch["condition"][0] is None and batch["condition"][1]["text"].startswith("a ")
    assert batch["modality"] == ["sketch", "image", "image", "sketch"] and batch["index"].tolist() == [0, 1, 2, 3]
    labels = collate_samples([TokenDataset(mixed_store)[i] for i in (2, 3, 6, 7)])["condition"]
    assert labels.dtype == torch.int64 and labels.shape == (4,)


def test_a_sample_s_condition_is_its_own_a_caller_changing_it_changes_no_later_read(mixed_store):
    first = mixed_store[1]
    assert first.condition == {"text": f"a {first.caption.split()[-1]}"}
    first.condition["text"] = "changed by the caller"
    assert mixed_store[1].condition == {"text": f"a {first.caption.split()[-1]}"}
    assert mixed_store[1].condition is not mixed_store[1].condition
