"""Distributed sampling: every sample once per epoch, equal work per rank, exact resume, exact mixtures.

A trainer on W ranks consumes in lockstep: step after step, each rank takes
its next ``b`` units. These properties are checked for random stores (shard
sizes), shuffle windows, world sizes 1-8 and all tail policies.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arpipe.stages.store import (
    DistributedSampler,
    MixtureOrder,
    ShuffledOrder,
    StoreError,
    StoreWriter,
    TokenStore,
)

SETTINGS = settings(max_examples=60, deadline=None)

shard_sizes = st.lists(st.integers(0, 40), min_size=1, max_size=6).filter(lambda s: sum(s) > 0)


def order_of(sizes, seed=0, window=16, digest="sha256:test"):
    return ShuffledOrder(sizes, digest, seed=seed, window=window)


def samplers(order, world_size, **kw):
    return [DistributedSampler(order, rank=r, world_size=world_size, **kw) for r in range(world_size)]


def lockstep(streams, per_step=1):
    """The global consumption sequence of ranks taking ``per_step`` units each per step."""
    out = []
    n = len(streams[0])
    for k0 in range(0, n, per_step):
        for s in streams:
            out.extend(s[k0: k0 + per_step])
    return out


def flat(units):
    return [i for u in units for i in (u if isinstance(u, list) else [u])]


@SETTINGS
@given(sizes=shard_sizes, window=st.integers(1, 64), world=st.integers(1, 8), seed=st.integers(0, 2**32),
       epoch=st.integers(0, 3))
def test_one_epoch_over_all_ranks_serves_every_sample_once_but_the_recorded_tail(sizes, window, world, seed, epoch):
    order = order_of(sizes, seed, window)
    ranks = samplers(order, world, seed=seed, tail="drop")
    for s in ranks:
        s.set_epoch(epoch)
    plan, dropped = ranks[0].plan, ranks[0].dropped_ids().tolist()
    streams = [list(s) for s in ranks]
    n = sum(sizes)
    assert {len(s) for s in streams} == {n // world} == {plan.per_rank}
    served = lockstep(streams)
    assert served == order.epoch(epoch)[: n // world * world].tolist()  # one contiguous run of the global order
    assert plan.dropped == len(dropped) == n % world
    assert sorted(served + dropped) == list(range(n))
    assert all(s.state_dict() == ranks[0].state_dict() for s in ranks)
    assert ranks[0].state_dict()["epoch"] == epoch + 1 and ranks[0].state_dict()["samples_consumed"] == 0


@SETTINGS
@given(sizes=shard_sizes, world=st.integers(1, 8), tail=st.sampled_from(["pad", "wrap"]))
def test_pad_and_wrap_give_every_rank_the_same_count_and_record_the_extra(sizes, world, tail):
    order = order_of(sizes)
    ranks = samplers(order, world, tail=tail)
    plan = ranks[0].plan
    streams = [list(s) for s in ranks]
    n = sum(sizes)
    per = -(-n // world)
    assert {len(s) for s in streams} == {per}
    served = lockstep(streams)
    extra = per * world - n
    assert served[:n] == order.epoch(0).tolist()
    if tail == "pad":
        assert plan.padded == extra
        assert served[n:] == [order.epoch(0)[q % n] for q in range(extra)]
        assert ranks[0].state_dict()["epoch"] == 1 and ranks[0].state_dict()["samples_consumed"] == 0
    else:
        assert plan.borrowed == extra
        follow = np.concatenate([order.epoch(e) for e in range(1, 2 * per * world // n + 3)]).tolist()
        assert served[n:] == follow[:extra]
        # the next epoch starts after what it lent, so nothing is seen twice across the boundary
        nxt = lockstep([list(s) for s in ranks])
        assert served[n:] + nxt == follow[: extra + len(nxt)]


@SETTINGS
@given(sizes=shard_sizes, world=st.integers(1, 8), tail=st.sampled_from(["drop", "pad", "wrap"]),
       cut=st.floats(0, 1), seq_len=st.none() | st.integers(8, 40), data=st.data())
def test_resuming_from_any_state_yields_exactly_the_rest(sizes, world, tail, cut, seq_len, data):
    order = order_of(sizes)
    lengths = np.asarray(data.draw(st.lists(st.integers(1, 8), min_size=sum(sizes), max_size=sum(sizes))))
    kw = {"tail": tail, "seq_len": seq_len, "lengths": lengths}
    full = [list(s) for s in samplers(order, world, **kw)]
    stop = int(cut * len(full[0]))
    ranks = samplers(order, world, **kw)
    iters = [iter(s) for s in ranks]
    for it in iters:
        for _ in range(stop):
            next(it)
    states = [s.state_dict() for s in ranks]
    assert all(st_ == states[0] for st_ in states)
    resumed = samplers(order, world, **kw)
    for s in resumed:
        s.load_state_dict(states[0])
        s.set_epoch(states[0]["epoch"])  # the usual loop calls this; it must keep the position
    rest = [list(s) for s in resumed]
    if stop == len(full[0]) > 0:  # the pass was complete: the state points into a later epoch
        assert states[0]["epoch"] >= 1
    else:
        assert [f[stop:] for f in full] == rest


@SETTINGS
@given(sizes=shard_sizes, batch=st.sampled_from([8, 12, 24]), w1=st.sampled_from([1, 2, 4]),
       w2=st.sampled_from([1, 2, 3, 4, 6, 8]), steps=st.integers(0, 6), seed=st.integers(0, 99))
def test_a_different_world_size_with_the_same_global_batch_resumes_exactly(sizes, batch, w1, w2, steps, seed):
    if batch % w1 or batch % w2:
        return
    order = order_of(sizes, seed)
    first = samplers(order, w1, tail="drop")
    per1 = batch // w1
    steps = min(steps, len(first[0]) // per1)
    iters = [iter(s) for s in first]
    taken = [[next(it) for _ in range(steps * per1)] for it in iters]
    state = first[0].state_dict()
    if state["epoch"] == 1:  # the whole epoch fit in these steps
        assert state["samples_consumed"] == 0 and sum(map(len, taken)) == sum(sizes) // batch * batch
        return
    assert state["samples_consumed"] == steps * batch
    second = samplers(order, w2, tail="drop")
    for s in second:
        s.load_state_dict(state)
    assert second[0].plan.dropped == (sum(sizes) - steps * batch) % w2
    rest = [list(s) for s in second]
    served = lockstep(taken) + lockstep(rest)
    assert len(set(served)) == len(served)  # nothing repeated
    assert served == order.epoch(0)[: len(served)].tolist()  # nothing skipped
    assert sum(sizes) - len(served) < w2  # only the tail is left, and it is recorded
    # every global step, before and after the change, is one contiguous run of the order
    steps2 = lockstep(rest, batch // w2)
    for k in range(0, len(steps2), batch):
        block = order.epoch(0)[steps * batch + k: steps * batch + k + batch]
        assert sorted(steps2[k: k + batch]) == sorted(block[: len(steps2[k: k + batch])].tolist())


@SETTINGS
@given(comp_sizes=st.lists(shard_sizes, min_size=1, max_size=4), data=st.data(), world=st.integers(1, 4),
       cut=st.integers(0, 60))
def test_a_mixture_keeps_its_proportions_exactly_over_a_resume(comp_sizes, data, world, cut):
    weights = data.draw(st.lists(st.integers(1, 5), min_size=len(comp_sizes), max_size=len(comp_sizes)))
    comps = [order_of(s, digest=f"sha256:c{i}") for i, s in enumerate(comp_sizes)]
    mix = MixtureOrder(comps, weights, samples_per_epoch=sum(weights) * 7)
    period = sum(mix.weights)  # the weights in lowest terms
    assert np.array(mix.weights) * (sum(weights) // period) == pytest.approx(weights)
    full = lockstep([list(s) + list(s) for s in samplers(mix, world, tail="wrap")])  # two mixture epochs
    comp_of = np.searchsorted(mix.offsets, full, side="right") - 1
    for p0 in range(0, len(full) - period + 1, period):
        assert np.bincount(comp_of[p0: p0 + period], minlength=len(weights)).tolist() == mix.weights
    # each component is read in its own epoch order, epoch after epoch
    for c, comp in enumerate(comps):
        ids = np.asarray(full)[comp_of == c] - mix.offsets[c]
        expect = np.concatenate([comp.epoch(e) for e in range(len(ids) // len(comp) + 1)])[: len(ids)]
        assert ids.tolist() == expect.tolist()
    ranks = samplers(mix, world, tail="wrap")
    iters = [iter(s) for s in ranks]
    steps = min(cut, len(ranks[0]))
    for it in iters:
        for _ in range(steps):
            next(it)
    state = ranks[0].state_dict()
    assert state["mixture"]["cursors"] == mix.cursors(steps * world)
    resumed = samplers(mix, world, tail="wrap")
    for s in resumed:
        s.load_state_dict(state)
    rest = lockstep([list(s) + list(s) for s in resumed])
    assert rest[: len(full) - steps * world] == full[steps * world:]


def test_the_order_is_a_pure_function_of_seed_epoch_and_store_digest():
    a = order_of([30, 0, 17, 5], seed=3, window=8)
    b = order_of([30, 0, 17, 5], seed=3, window=8)
    assert a.epoch(2).tolist() == b.epoch(2).tolist()
    assert a.epoch(0).tolist() != a.epoch(1).tolist()
    assert a.epoch(0).tolist() != order_of([30, 0, 17, 5], seed=4, window=8).epoch(0).tolist()
    assert a.epoch(0).tolist() != order_of([30, 0, 17, 5], seed=3, window=8, digest="sha256:other").epoch(0).tolist()
    assert sorted(a.epoch(0).tolist()) == list(range(52))
    assert a.slice(1, 5, 29).tolist() == a.epoch(1)[5:29].tolist()


def test_windows_bound_how_far_a_sample_moves():
    order = ShuffledOrder([1000], "sha256:x", window=100, shuffle=True)
    ids = order.epoch(0)
    for w in range(10):
        assert sorted(ids[w * 100: (w + 1) * 100].tolist()) == list(range(w * 100, (w + 1) * 100))


def test_a_state_from_other_data_or_settings_is_refused():
    sampler = DistributedSampler(order_of([10, 10]))
    other = DistributedSampler(order_of([10, 10], seed=1))
    with pytest.raises(StoreError, match="another store"):
        sampler.load_state_dict(other.state_dict())
    packed = DistributedSampler(order_of([10, 10]), seq_len=4, lengths=np.ones(20, np.int64))
    with pytest.raises(StoreError, match="seq_len"):
        sampler.load_state_dict(packed.state_dict())


def test_a_real_store_is_sampled_by_its_digest_and_resumes_inside_the_usual_epoch_loop(tmp_path):
    with StoreWriter(str(tmp_path / "s"), vocab_size=256, samples_per_shard=7) as w:
        for i in range(40):
            w.append(np.full(3, i % 256), key=f"k{i}", modality="image")
    store = TokenStore.open(str(tmp_path / "s"))
    sampler = DistributedSampler(store, world_size=2, rank=1, seed=5, window=8)
    seen = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for k, i in enumerate(sampler):
            seen.append((epoch, i))
            if epoch == 1 and k == 6:
                state = sampler.state_dict()
    resumed = DistributedSampler(store, world_size=2, rank=1, seed=5, window=8)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    assert [(1, i) for i in resumed] == seen[20 + 7:]
