"""Training batches: packed sequences with document boundaries, or one padded sample per sequence,
identical for any number of DataLoader workers and resumable from the state each batch carries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from arpipe.stages.store import (
    DistributedSampler,
    SequencePacker,
    StoreError,
    StoreMixture,
    StoreWriter,
    TokenStore,
    plan_sequences,
)
from arpipe.stages.store.loader import TokenBatches


@settings(max_examples=80, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), max_size=60), seq_len=st.integers(12, 40))
def test_greedy_plans_fill_sequences_in_order_and_never_cut_a_sample(lengths, seq_len):
    ends = plan_sequences(np.array(lengths, dtype=np.int64), seq_len)
    starts = [0, *ends[:-1].tolist()][: len(ends)]
    assert (ends[-1] if len(ends) else 0) == len(lengths)
    for a, b in zip(starts, ends.tolist(), strict=True):
        assert 0 < sum(lengths[a:b]) <= seq_len
        if b < len(lengths):
            assert sum(lengths[a:b]) + lengths[b] > seq_len  # greedy: the next one did not fit


@pytest.fixture(scope="module")
def ragged(tmp_path_factory):
    """Samples of 3..9 tokens (multi-scale sequences of different sizes), labelled by class."""
    uri = str(tmp_path_factory.mktemp("ragged") / "s")
    with StoreWriter(uri, vocab_size=1000, samples_per_shard=16) as w:
        for i in range(90):
            w.append(np.full(3 + i % 7, i), key=f"k{i}", modality="image", condition=i % 10)
    return TokenStore.open(uri)


def test_packed_sequences_carry_document_ids_positions_and_cu_seqlens(ragged):
    units = [[0, 1], [2], [3, 4]]  # 3+4 tokens, 5, 6+7
    batch = ragged.gather([0, 1, 2, 3, 4])
    packed = SequencePacker(14, mode="pack", pad_id=999).pack(units, batch, ragged.conditions([0, 1, 2, 3, 4]))
    assert packed.tokens.shape == (3, 14)
    assert packed.tokens[0].tolist() == [0] * 3 + [1] * 4 + [999] * 7
    assert packed.doc_ids[0].tolist() == [0] * 3 + [1] * 4 + [-1] * 7
    assert packed.position_ids[0].tolist() == [0, 1, 2, 0, 1, 2, 3] + [0] * 7
    assert packed.doc_ids[2].tolist() == [0] * 6 + [1] * 7 + [-1]
    assert packed.cu_seqlens.tolist() == [0, 3, 7, 14, 19, 28, 34, 41, 42]
    assert packed.loss_mask.sum() == 3 + 4 + 5 + 6 + 7
    assert packed.conditions == [[0, 1], [2], [3, 4]]
    padded = SequencePacker(10, mode="pad").pack([[6], [5]], ragged.gather([6, 5]))
    assert padded.tokens[0].tolist() == [6] * 9 + [0] and padded.doc_ids[1].tolist() == [0] * 8 + [-1] * 2
    with pytest.raises(StoreError, match="more than seq_len 8"):
        SequencePacker(8, mode="pad").pack([[6]], ragged.gather([6]))


def run(loader):
    return [(b["tokens"].clone(), b["state"]) for b in loader]


@pytest.mark.parametrize("layout", ["pack", "pad"])
def test_batches_are_the_same_for_any_worker_count_and_resume_from_their_state(ragged, layout):
    seq_len = 24

    def dataset(state=None):
        sampler = DistributedSampler(ragged, rank=1, world_size=2, seed=7, window=20, tail="wrap",
                                     seq_len=seq_len if layout == "pack" else None)
        if state is not None:
            sampler.load_state_dict(state)
        return TokenBatches(ragged, sampler, batch_size=3, layout=layout, seq_len=seq_len, pad_id=0)

    single = run(DataLoader(dataset(), batch_size=None, num_workers=0))
    double = run(DataLoader(dataset(), batch_size=None, num_workers=2))
    assert len(single) == len(double) > 4
    for (ta, sa), (tb, sb) in zip(single, double, strict=True):
        assert torch.equal(ta, tb) and sa == sb
    # resume in the middle (states come from the 2-worker run, which had prefetched further)
    mid = 3
    rest = run(DataLoader(dataset(double[mid][1]), batch_size=None, num_workers=0))
    assert len(rest) == len(single) - mid - 1
    for (ta, sa), (tb, sb) in zip(single[mid + 1:], rest, strict=True):
        assert torch.equal(ta, tb) and sa == sb
    assert single[-1][1]["epoch"] == 1  # the last batch's state moves on to the next epoch


def test_equal_shapes_stack_with_their_labels(tmp_path):
    uri = str(tmp_path / "grid")
    with StoreWriter(uri, vocab_size=256, samples_per_shard=10) as w:
        for i in range(25):
            w.append(np.full((2, 2), i), key=f"k{i}", modality="image", condition=i % 4)
    store = TokenStore.open(uri)
    sampler = DistributedSampler(store, seed=1, window=8)
    batches = list(TokenBatches(store, sampler, batch_size=8))
    assert [tuple(b["tokens"].shape) for b in batches] == [(8, 2, 2), (8, 2, 2), (8, 2, 2), (1, 2, 2)]
    assert batches[0]["tokens"].dtype == torch.int64
    first = batches[0]
    assert first["conditions"] == [int(i) % 4 for i in first["indices"]]
    assert torch.equal(first["tokens"][:, 0, 0], first["indices"])
    assert sorted(torch.cat([b["indices"] for b in batches]).tolist()) == list(range(25))


def test_a_weighted_mixture_of_stores_trains_in_exact_proportions_and_resumes(tmp_path):
    stores = []
    for name, n, fill in (("faces", 30, 1), ("digits", 50, 2)):
        with StoreWriter(str(tmp_path / name), vocab_size=64, samples_per_shard=16) as w:
            for i in range(n):
                w.append(np.full((2, 2), fill), key=f"{name}-{i}", modality="image", condition=name)
        stores.append(TokenStore.open(str(tmp_path / name)))
    mix = StoreMixture(stores, [0.7, 0.3], samples_per_epoch=100)

    def loader(state=None):
        sampler = DistributedSampler(mix, seed=2, window=8, tail="wrap")
        if state is not None:
            sampler.load_state_dict(state)
        return TokenBatches(mix, sampler, batch_size=10)

    batches = list(loader())
    assert len(batches) == 10
    for b in batches:  # 7:3 in every batch of 10, since the interleave period is 10
        assert b["conditions"].count("faces") == 7 and (b["tokens"][:, 0, 0] == 1).sum() == 7
    state = batches[3]["state"]
    assert state["mixture"]["cursors"] == [28, 12]  # faces wrapped into their second epoch
    rest = list(loader(state))
    assert [b["indices"].tolist() for b in rest] == [b["indices"].tolist() for b in batches[4:]]


def test_a_sample_longer_than_the_sequence_is_named_before_training_starts(ragged):
    longest = int(np.argmax(ragged.lengths()))
    with pytest.raises(StoreError, match=rf"sample {longest} has 9 tokens, more than seq_len 8; raise seq_len"):
        list(DistributedSampler(ragged, seq_len=8, window=1 << 20, shuffle=False))
