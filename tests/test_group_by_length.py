"""`group_by_length: true`: a store of 16x16 and 32x32 images trains in batches of similar length.

The story: one store mixes short and long documents (30, 62 and 130 tokens).
Without packing every row used to be padded to seq_len. With
``group_by_length`` the order is cut into Hugging Face's megabatches, each
sorted by length, so a micro-batch holds documents of one size and is padded
only to its longest: fewer positions, the same loss, and a checkpoint still
resumes at exactly the next sample.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arpipe.pipeline.config import load_pipeline
from arpipe.pipeline.errors import UserError
from arpipe.pipeline.fingerprint import explain_change, fingerprint, fingerprint_doc
from arpipe.schemas.train import TrainStage
from arpipe.stages.models import ModelConfig, Transformer
from arpipe.stages.store import (
    DistributedSampler,
    LengthGroupedOrder,
    ShuffledOrder,
    StoreError,
    StoreWriter,
    TokenStore,
    megabatch_size,
)
from arpipe.stages.train.data import (
    PAD_TO_MULTIPLE_OF,
    Documents,
    build_vocab,
    default_seq_len,
    summarize_store,
)

SIZES = (30, 62, 130)   # tokens of a sample: three image sizes in one store
SAMPLES = 100
WORKERS, MICRO = 2, 2   # a global batch of 4


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("mixed") / "store")
    rng = np.random.default_rng(0)
    with StoreWriter(uri, vocab_size=64, samples_per_shard=16) as w:
        for i in range(SAMPLES):
            n = SIZES[rng.integers(len(SIZES))]
            w.append(rng.integers(0, 64, n), key=f"img{i}", modality="image", condition=str(i % 2))
    return uri


def grouped_order(store: TokenStore, seed: int = 3) -> tuple[ShuffledOrder, LengthGroupedOrder]:
    base = ShuffledOrder(store.shard_sizes, store.digest, seed=seed, window=16)
    return base, LengthGroupedOrder(base, store.lengths(), megabatch_size(len(store), WORKERS * MICRO))


def lockstep_micro_batches(order) -> list[list[int]]:
    """The micro-batches two workers train on in one epoch, step by step."""
    streams = [list(DistributedSampler(order, rank=r, world_size=WORKERS, tail="wrap")) for r in range(WORKERS)]
    return [s[k: k + MICRO] for k in range(0, len(streams[0]), MICRO) for s in streams]


def test_each_megabatch_of_the_shuffled_order_is_sorted_longest_first(store_uri):
    store = TokenStore.open(store_uri)
    lengths = store.lengths()
    base, grouped = grouped_order(store)
    m = grouped.megabatch
    assert m == 24 and SAMPLES % m   # 6 global batches (HF's cap keeps 4 megabatches), and a short last one
    assert grouped.digest != base.digest
    assert grouped.digest != LengthGroupedOrder(base, lengths, 2 * m).digest
    for epoch in range(3):
        ids, before = grouped.epoch(epoch), base.epoch(epoch)
        assert sorted(ids.tolist()) == list(range(SAMPLES))
        assert ids.tolist() != before.tolist()
        for lo in range(0, SAMPLES, m):
            run = ids[lo: lo + m]
            assert sorted(run.tolist()) == sorted(before[lo: lo + m].tolist())   # nothing moves across megabatches
            assert np.all(np.diff(lengths[run]) <= 0)
            # stable: documents of one length keep the shuffled order
            assert run.tolist() == sorted(before[lo: lo + m].tolist(), key=lambda i: -lengths[i])
    assert grouped.epoch(0).tolist() != grouped.epoch(1).tolist()
    rng = np.random.default_rng(1)
    for _ in range(50):
        epoch, a, b = int(rng.integers(0, 3)), int(rng.integers(-5, SAMPLES + 5)), int(rng.integers(-5, SAMPLES + 5))
        fresh = grouped_order(store)[1]   # computes only the megabatches the slice touches
        assert fresh.slice(epoch, a, b).tolist() == grouped.epoch(epoch)[max(a, 0): max(b, 0)].tolist()


def test_a_sampler_resumed_mid_epoch_yields_exactly_the_rest(store_uri):
    store = TokenStore.open(store_uri)
    seen, state = [], None
    sampler = DistributedSampler(grouped_order(store)[1], rank=1, world_size=WORKERS, tail="wrap")
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for k, i in enumerate(sampler):
            seen.append((epoch, i))
            if epoch == 1 and k == 17:
                state = sampler.state_dict()
    assert state == {**state, "epoch": 1, "samples_consumed": 36}
    resumed = DistributedSampler(grouped_order(store)[1], rank=1, world_size=WORKERS, tail="wrap")
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    assert [(1, i) for i in resumed] == seen[SAMPLES // WORKERS + 18:]
    plain = DistributedSampler(grouped_order(store)[0], rank=1, world_size=WORKERS, tail="wrap")
    with pytest.raises(StoreError, match="another store, seed, window or mixture"):
        plain.load_state_dict(state)   # a checkpoint never resumes in the other order


def tiny_model(vocab_size: int) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32, init_std=0.2,
                                   max_seq_len=256)).double().eval()


def test_micro_batches_are_padded_to_their_longest_document_with_the_same_loss(store_uri):
    store = TokenStore.open(store_uri)
    summaries = [summarize_store(store_uri)]
    vocab, names = build_vocab(summaries)
    seq_len = default_seq_len(summaries, vocab)
    assert seq_len == vocab.context_len + max(SIZES)

    def documents(group_by_length: bool) -> Documents:
        return Documents(store, summaries, names, vocab, paradigm="next_token", block_size=1, n_axes=4,
                         seq_len=seq_len, group_by_length=group_by_length)

    full, grouped = documents(False), documents(True)
    base, order = grouped_order(store)
    batches = lockstep_micro_batches(order)
    widths = [grouped.rows(units).input_ids.shape[1] for units in batches]
    lengths = full.lengths()
    assert widths == [min(seq_len, -(-int(lengths[units].max()) // PAD_TO_MULTIPLE_OF) * PAD_TO_MULTIPLE_OF)
                      for units in batches]
    assert {full.rows(units).input_ids.shape[1] for units in batches} == {seq_len}
    # sorted megabatches, not only shorter padding: a shuffled micro-batch is as long as its longest document
    unsorted = sum(grouped.rows(units).input_ids.shape[1] for units in lockstep_micro_batches(base))
    assert unsorted < seq_len * len(batches)
    assert sum(widths) < 0.9 * unsorted

    model = tiny_model(vocab.vocab_size)
    short = [units for units, width in zip(batches, widths) if width < seq_len]
    assert len(short) >= 5
    with torch.no_grad():
        for units in short[:: max(1, len(short) // 5)]:
            cut, padded = grouped.rows(units), full.rows(units)
            logits_cut, loss_cut = model(**cut.as_kwargs())
            logits_padded, loss_padded = model(**padded.as_kwargs())
            assert (padded.target_ids[:, cut.input_ids.shape[1]:] == -100).all()
            assert abs(float(loss_cut) - float(loss_padded)) < 1e-6
            assert torch.allclose(logits_cut, logits_padded[:, : cut.input_ids.shape[1]], atol=1e-9)


PIPELINE = """name: mixed
stages:
  train:
    kind: train
    data: [{{store: ./store}}]
    steps: 10
{extra}"""


def test_group_by_length_with_packing_is_refused_in_one_line_naming_both(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE.format(extra="    packing: true\n    group_by_length: true\n"))
    with pytest.raises(UserError) as err:
        load_pipeline(path)
    [line] = err.value.render().splitlines()
    assert "p.yaml:" in line and "stages.train" in line, line
    assert "group_by_length" in line and "packing" in line and "drop one of them" in line, line


def test_group_by_length_is_part_of_the_stage_fingerprint(tmp_path):
    path = tmp_path / "p.yaml"

    def doc(extra: str) -> dict:
        path.write_text(PIPELINE.format(extra=extra))
        spec = load_pipeline(path).spec.stages["train"]
        return fingerprint_doc("train", spec.model_dump(mode="json"), TrainStage.runtime_fields, {}, "1", None)

    plain, grouped = doc(""), doc("    group_by_length: true\n")
    assert fingerprint(plain) != fingerprint(grouped)
    assert "group_by_length false -> true" in explain_change(plain, grouped)
