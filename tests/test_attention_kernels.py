"""Every attention kernel gives the dense mask's logits and gradients, for every paradigm, packed or not."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arpipe.stages.models import (
    ModelConfig,
    Transformer,
    VocabLayout,
    batch_inputs,
    make_plan,
    pack_documents,
)
from arpipe.stages.models.attention import Layout, flex_available, layout_for, segments_for
from arpipe.stages.models.masks import attention_mask

pytestmark = pytest.mark.usefixtures("single_torch_thread")

VOCAB = VocabLayout.build({"image": 12}, classes=range(3))
PARADIGMS = ("next_token", "next_block", "next_scale", "masked")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
TOL = 1e-5


def plan_of(paradigm: str, size: int = 0):
    if paradigm == "next_scale":
        return make_plan(paradigm, scales=[(1, 1), (2, 2), (3, 3 + size)][:2 + (size >= 0)], n_axes=4)
    return make_plan(paradigm, grid=(3, 4 + size), block_size=4 if paradigm == "next_block" else 1, n_axes=4)


def document(paradigm: str, generator: torch.Generator, size: int = 0):
    plan = plan_of(paradigm, size)
    lo, hi = VOCAB.code_range("image")
    targets_N = torch.randint(lo, hi, (plan.n_tokens,), generator=generator)
    context_P = torch.tensor(VOCAB.context("image", int(torch.randint(0, 3, (1,), generator=generator))))
    return plan, targets_N, context_P


def inputs_for(paradigm: str, packed: bool):
    """Three rows of one document each, or two rows packing three and two documents of different
    lengths followed by padding."""
    g = torch.Generator().manual_seed(0)
    if not packed:
        docs = [document(paradigm, g) for _ in range(3)]
        return batch_inputs(docs[0][0], torch.stack([d[1] for d in docs]), torch.stack([d[2] for d in docs]))
    rows = [[document(paradigm, g, s) for s in (0, 1, -1)], [document(paradigm, g, s) for s in (1, 0)]]
    return pack_documents(rows, seq_len=64)


def available_kernels(device: str) -> list[str]:
    kernels = ["auto", "sdpa"]
    return kernels + ["flex"] if flex_available(torch.device(device)) else kernels


def run(model: Transformer, kernel: str, batch, *, backward: bool):
    model.config = dataclasses.replace(model.config, attention=kernel)
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(backward):
        logits, loss = model(**batch.as_kwargs())
    if not backward:
        return logits, {}
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def tiny_model(paradigm: str, device: str) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB.vocab_size, n_layer=2, n_head=2, n_embd=32, rope_axes=4,
                         paradigm=paradigm, block_size=4 if paradigm == "next_block" else 1, init_std=0.2,
                         attention="dense")
    return Transformer(config).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("paradigm", PARADIGMS)
def test_every_kernel_matches_the_dense_mask_forward_and_backward(paradigm, packed, device):
    model = tiny_model(paradigm, device)
    batch = inputs_for(paradigm, packed).to(device)
    ref_logits, ref_grads = run(model, "dense", batch, backward=True)
    for kernel in available_kernels(device):
        logits, grads = run(model, kernel, batch, backward=True)
        torch.testing.assert_close(logits, ref_logits, atol=TOL, rtol=0, msg=f"{kernel} logits")
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], atol=TOL, rtol=0, msg=f"{kernel} grad of {name}")


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("paradigm", PARADIGMS)
def test_flex_matches_the_dense_mask_on_cpu_without_gradients(paradigm, packed):
    """torch 2.13 has no flex backward on CPU: the block mask is still checked, forward only."""
    model = tiny_model(paradigm, "cpu")
    batch = inputs_for(paradigm, packed)
    ref_logits, _ = run(model, "dense", batch, backward=False)
    with torch.no_grad():
        layout = layout_for("flex", batch.group_ids, batch.doc_ids)
        assert layout.kernel == "flex"
        logits, _ = run(model, "flex", batch, backward=False)
    torch.testing.assert_close(logits, ref_logits, atol=TOL, rtol=0)


def test_flex_training_on_cpu_falls_back_to_the_dense_mask():
    batch = inputs_for("next_block", packed=True)
    if flex_available(torch.device("cpu")):
        pytest.skip("this torch build has a CPU flex backward")
    layout = layout_for("flex", batch.group_ids, batch.doc_ids)
    assert layout.kernel == "dense"


@pytest.mark.parametrize("paradigm", PARADIGMS)
def test_sdpa_drops_the_mask_for_rows_without_documents_and_keeps_it_for_packed_ones(paradigm):
    rows = inputs_for(paradigm, packed=False)
    assert layout_for("sdpa", rows.group_ids, rows.doc_ids).mask_B1LK is None
    assert layout_for("auto", rows.group_ids, rows.doc_ids).kernel == "sdpa"
    packed = inputs_for(paradigm, packed=True)
    assert layout_for("sdpa", packed.group_ids, packed.doc_ids).kernel == "dense"
    assert layout_for("dense", rows.group_ids, rows.doc_ids).kernel == "dense"


def test_next_token_without_context_is_one_causal_call_and_a_context_gets_its_own_segment():
    plain = segments_for(torch.arange(10)[None])
    assert [(s.start, s.end, s.causal) for s in plain] == [(0, 10, True)]
    prefix = segments_for(torch.tensor([[0, 0, 0, 1, 2, 3, 4, 5]]))
    assert [(s.start, s.end, s.causal) for s in prefix] == [(0, 3, False), (3, 8, True)]


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=8), rows=st.integers(1, 3))
def test_segments_equal_the_dense_mask_for_any_non_decreasing_groups(sizes, rows):
    group_L = torch.cat([torch.full((n,), g) for g, n in enumerate(sizes)])
    group_BL = group_L.expand(rows, -1)
    segments = segments_for(group_BL)
    assert segments is not None
    g = torch.Generator().manual_seed(len(sizes))
    q, k, v = (torch.randn(rows, 2, group_L.numel(), 8, generator=g) for _ in range(3))
    got = Layout(segments=segments).attend(q, k, v)
    want = Layout(mask_B1LK=attention_mask(group_BL)).attend(q, k, v)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_a_saved_config_without_attention_loads_with_dense():
    args = ModelConfig(paradigm="next_block", block_size=4).to_dict()
    del args["attention"]
    config = ModelConfig.from_dict(args)
    assert config.attention == "dense"
    assert ModelConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="attention 'fast' is unknown"):
        ModelConfig(attention="fast").validate()
