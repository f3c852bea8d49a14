"""Attention follows each paradigm exactly; packed documents never see each other; RoPE is relative."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arpipe.stages.models import (
    ModelConfig,
    Transformer,
    VocabLayout,
    apply_rope,
    attention_mask,
    batch_inputs,
    cached_attention_mask,
    make_plan,
    pack_documents,
    rope_angles,
    rope_sections,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")

VOCAB = VocabLayout.build({"image": 12}, classes=range(3))
P = 2  # context tokens per document: tag, class


@st.composite
def documents(draw, paradigm: str):
    """A document as (plan, the target's group under the paradigm's own definition)."""
    if paradigm == "next_scale":
        sides = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
        scales = [(s, s + 1) for s in sorted(sides)]
        plan = make_plan(paradigm, scales=scales, n_axes=3)
        group = [k for k, s in enumerate(scales) for _ in range(s[0] * s[1])]
    elif paradigm == "next_block":
        block = draw(st.integers(1, 4))
        grid = (draw(st.integers(1, 3)), draw(st.integers(1, 4)))
        plan = make_plan(paradigm, grid=grid, block_size=block, n_axes=3)
        group = [t // block for t in range(grid[0] * grid[1])]
    else:
        n = draw(st.integers(1, 9))
        plan = make_plan(paradigm, n_tokens=n, n_axes=3)
        group = list(range(n))
    return plan, group


def reference_allowed(docs_per_row: list[list[list[int]]], seq_len: int) -> torch.Tensor:
    """The paradigm's rule written out token by token: same document; context sees context; a target sees
    the context and every target whose group (token, block or scale) is not later than its own."""
    allowed = torch.zeros(len(docs_per_row), seq_len, seq_len, dtype=torch.bool)
    for r, docs in enumerate(docs_per_row):
        spans, at = [], 0
        for group in docs:
            spans.append((at, group))
            at += P + len(group)
        for start, group in spans:
            n = P + len(group)
            for a in range(n):
                for b in range(n):
                    if b < P:
                        ok = True
                    elif a < P:
                        ok = False
                    else:
                        ok = group[b - P] <= group[a - P]
                    allowed[r, start + a, start + b] = ok
        for k in range(at, seq_len):
            allowed[r, k, k] = True  # padding sees itself only
    return allowed


@settings(max_examples=60, deadline=None)
@given(st.data(), st.sampled_from(["next_token", "next_block", "next_scale"]))
def test_mask_matches_each_paradigms_definition(data, paradigm):
    rows = data.draw(st.lists(st.lists(documents(paradigm), min_size=1, max_size=3), min_size=1, max_size=3))
    seq_len = max(sum(P + p.n_tokens for p, _ in docs) for docs in rows) + data.draw(st.integers(0, 3))
    packed = pack_documents(
        [[(plan, torch.randint(0, 12, (plan.n_tokens,)) + VOCAB.codes_start,
           torch.tensor(VOCAB.context("image", 1))) for plan, _ in docs] for docs in rows], seq_len)
    got = attention_mask(packed.group_ids, packed.doc_ids)[:, 0]
    want = reference_allowed([[g for _, g in docs] for docs in rows], seq_len)
    assert torch.equal(got, want)


@settings(max_examples=40, deadline=None)
@given(st.data(), st.sampled_from(["next_token", "next_block", "next_scale"]))
def test_cached_chunks_see_exactly_what_the_full_sequence_sees(data, paradigm):
    """A chunk written at a row's own offset in the KV cache gets the rows of the full mask, stale slots hidden."""
    rows = data.draw(st.lists(documents(paradigm), min_size=1, max_size=4))
    seqs = [batch_inputs(p, torch.zeros(1, p.n_tokens, dtype=torch.long), torch.zeros(1, P, dtype=torch.long))
            for p, _ in rows]
    L = max(s.group_ids.shape[1] for s in seqs)
    groups = torch.stack([torch.cat([s.group_ids[0], torch.full((L - s.group_ids.shape[1],), 10**6)]) for s in seqs])
    full = attention_mask(groups)[:, 0]
    starts = torch.tensor([data.draw(st.integers(0, s.group_ids.shape[1] - 1)) for s in seqs])
    Q = data.draw(st.integers(1, 4))
    n_keys = int(starts.max()) + Q
    groups_padded = torch.cat([groups, torch.full((len(rows), n_keys), 10**6)], 1)
    chunk_groups = torch.stack([groups_padded[r, s:s + Q] for r, s in enumerate(starts.tolist())])
    got = cached_attention_mask(chunk_groups, starts, n_keys)[:, 0]
    for r, s in enumerate(starts.tolist()):
        for q in range(Q):
            i = s + q
            if i >= seqs[r].group_ids.shape[1]:  # padding or slack beyond this row's document: no query
                continue
            keys = torch.arange(min(n_keys, L))
            want = full[r, i, :len(keys)] & (keys < s + Q)  # later slots are stale: hidden
            assert torch.equal(got[r, q, :len(keys)], want), (r, q)
            assert not got[r, q, L:].any()


def _tiny(paradigm: str, block: int = 1) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB.vocab_size, n_layer=2, n_head=2, n_embd=32, rope_axes=3,
                         paradigm=paradigm, block_size=block)
    return Transformer(config).double().eval()


def test_no_position_sees_its_own_group_or_later():
    """Changing the tokens of group g and after never changes the predictions for group g (no leak),
    while changing an earlier group does: training and sampling share this factorization."""
    cases = [("next_token", make_plan("next_token", grid=(3, 3), n_axes=3), 1),
             ("next_block", make_plan("next_block", grid=(3, 4), block_size=4, n_axes=3), 4),
             ("next_scale", make_plan("next_scale", scales=[1, 2, 3], n_axes=3), 1)]
    for paradigm, plan, block in cases:
        model = _tiny(paradigm, block)
        ctx = torch.tensor([VOCAB.context("image", 0)])
        targets = torch.randint(0, 12, (1, plan.n_tokens)) + VOCAB.codes_start
        base = model(**batch_inputs(plan, targets, ctx).as_kwargs())[0]
        bounds = plan.group_bounds
        for g in range(plan.n_groups):
            lo, hi = bounds[g], bounds[g + 1]
            later = targets.clone()
            later[:, lo:] = (later[:, lo:] - VOCAB.codes_start + 5) % 12 + VOCAB.codes_start
            out = model(**batch_inputs(plan, later, ctx).as_kwargs())[0]
            assert torch.allclose(out[:, P + lo:P + hi], base[:, P + lo:P + hi], atol=1e-12), (paradigm, g)
            if g:
                earlier = targets.clone()
                earlier[:, :lo] = (earlier[:, :lo] - VOCAB.codes_start + 5) % 12 + VOCAB.codes_start
                out = model(**batch_inputs(plan, earlier, ctx).as_kwargs())[0]
                assert not torch.allclose(out[:, P + lo:P + hi], base[:, P + lo:P + hi]), (paradigm, g)


def test_packed_documents_do_not_attend_across_documents():
    model = _tiny("next_scale")
    plan_a = make_plan("next_scale", scales=[1, 2], n_axes=3)
    plan_b = make_plan("next_scale", scales=[1, 2, 3], n_axes=3)
    a = torch.randint(0, 12, (plan_a.n_tokens,)) + VOCAB.codes_start
    b = torch.randint(0, 12, (plan_b.n_tokens,)) + VOCAB.codes_start
    ca, cb = torch.tensor(VOCAB.context("image", 0)), torch.tensor(VOCAB.context("image", 2))
    seq_len = 2 * P + plan_a.n_tokens + plan_b.n_tokens + 3
    packed = pack_documents([[(plan_a, a, ca), (plan_b, b, cb)]], seq_len)
    b_at = slice(P + plan_a.n_tokens, 2 * P + plan_a.n_tokens + plan_b.n_tokens)
    base = model(**packed.as_kwargs())[0][:, b_at]
    perturbed = pack_documents([[(plan_a, (a - VOCAB.codes_start + 7) % 12 + VOCAB.codes_start,
                                  torch.tensor(VOCAB.context("image", 1))), (plan_b, b, cb)]], seq_len)
    assert torch.equal(model(**perturbed.as_kwargs())[0][:, b_at], base)
    # and B alone in its own row predicts the same: coordinates, not row offsets, place tokens
    alone = model(**batch_inputs(plan_b, b[None], cb[None]).as_kwargs())[0]
    assert torch.allclose(alone, base, atol=1e-12)
    # the packed loss covers both documents' targets and nothing else
    assert int((packed.target_ids != -100).sum()) == plan_a.n_tokens + plan_b.n_tokens


def test_rope_depends_on_coordinate_differences_per_axis():
    torch.manual_seed(0)
    D, A = 24, 3
    q, k = torch.randn(1, 1, 1, D, dtype=torch.float64), torch.randn(1, 1, 1, D, dtype=torch.float64)

    def score(cq, ck):
        aq = rope_angles(torch.tensor([[cq]], dtype=torch.float64), D, 100.0)
        ak = rope_angles(torch.tensor([[ck]], dtype=torch.float64), D, 100.0)
        return (apply_rope(q, aq) * apply_rope(k, ak)).sum()

    base = score([1.0, 2.0, 3.0], [0.0, 5.0, 1.5])
    assert torch.allclose(score([4.0, -1.0, 3.5], [3.0, 2.0, 2.0]), base)  # same differences
    assert not torch.allclose(score([1.0, 2.0, 3.0], [0.0, 5.0, 2.5]), base)
    # each axis rotates only its own section of the head
    sections = rope_sections(D, A)
    assert sections == [4, 4, 4]
    x = torch.randn(1, 1, 1, D, dtype=torch.float64)
    moved = apply_rope(x, rope_angles(torch.tensor([[[0.0, 3.0, 0.0]]], dtype=torch.float64), D, 100.0))
    changed = (moved != x).flatten().nonzero().flatten()
    assert changed.min() >= 2 * sections[0] and changed.max() < 2 * (sections[0] + sections[1])
