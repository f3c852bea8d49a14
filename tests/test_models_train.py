"""Training smoke: a tiny next_scale model overfits a small batch; checkpointing changes no numbers."""

from __future__ import annotations

import pytest
import torch

from arpipe.stages.models import (
    ModelConfig,
    Transformer,
    VocabLayout,
    batch_inputs,
    drop_conditions,
    make_plan,
    pack_documents,
    preset,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_tiny_next_scale_model_overfits_a_small_batch():
    vocab = VocabLayout.build({"image": 16}, classes=range(4))
    config = preset("tiny", vocab_size=vocab.vocab_size, paradigm="next_scale", n_layer=2, n_embd=64,
                    rope_axes=3).validate()
    torch.manual_seed(0)
    model = Transformer(config)
    plan = make_plan("next_scale", scales=[1, 2, 4], n_axes=config.rope_axes)
    codes = torch.randint(0, 16, (4, plan.n_tokens))
    context = torch.tensor([vocab.context("image", y) for y in range(4)])
    batch = batch_inputs(plan, vocab.to_global("image", codes), context)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(120):
        _, loss = model(**batch.as_kwargs())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 2.0  # about ln(vocab) at the start
    assert losses[-1] < 0.2 * losses[0], f"loss went {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_packed_training_step_with_condition_dropout_and_checkpointing():
    """The train stage's step: packed documents of two layouts, CFG dropout, activation checkpointing."""
    vocab = VocabLayout.build({"image": 16, "volume": 8}, classes=range(3))
    image_plan = make_plan("next_scale", scales=[1, 2, 3], n_axes=4)
    volume_plan = make_plan("next_scale", scales=[(1, 1, 1), (2, 2, 2)], n_axes=4)
    docs = [[(image_plan, vocab.to_global("image", torch.randint(0, 16, (14,))),
              torch.tensor(vocab.context("image", 1))),
             (volume_plan, vocab.to_global("volume", torch.randint(0, 8, (9,))),
              torch.tensor(vocab.context("volume", 2)))],
            [(image_plan, vocab.to_global("image", torch.randint(0, 16, (14,))),
              torch.tensor(vocab.context("image", 0)))]]
    batch = pack_documents(docs, seq_len=32)
    batch.input_ids = drop_conditions(batch.input_ids, vocab, 0.5, doc_ids_BL=batch.doc_ids,
                                      generator=torch.Generator().manual_seed(1))
    grads = {}
    for flag in (False, True):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=vocab.vocab_size, n_layer=2, n_head=2, n_embd=32,
                                        paradigm="next_scale", checkpointing=flag)).double().train()
        _, loss = model(**batch.as_kwargs())
        loss.backward()
        grads[flag] = (loss.item(), [p.grad.clone() for p in model.parameters()])
    assert grads[False][0] == pytest.approx(grads[True][0], abs=1e-12)
    for g0, g1 in zip(grads[False][1], grads[True][1], strict=True):
        assert torch.allclose(g0, g1, atol=1e-12)
