"""``compile: true``: the transformer's blocks compiled with torch.compile train and sample as eager ones do.

In-process, with a 1-layer model (regional compilation compiles ``Block.forward`` once; the train stage's
``compile`` runs through Ray Train in tests/test_tokenunify.py's pipeline).
"""

from __future__ import annotations

import pytest
import torch
from test_models_sampling import VOCAB

from arpipe.stages.models import (
    ModelConfig,
    Prompt,
    SamplingOptions,
    Transformer,
    batch_inputs,
    compile_blocks,
    compile_unavailable,
    generate,
    make_plan,
)

PLAN = make_plan("next_token", grid=(4, 4), n_axes=3)

needs_compile = pytest.mark.skipif(compile_unavailable("cpu") is not None,
                                   reason=f"torch.compile cannot run here: {compile_unavailable('cpu')}")


def model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=VOCAB.vocab_size, n_layer=1, n_head=2, n_embd=32, rope_axes=3,
                                   max_seq_len=24, init_std=0.2))


def train(m: Transformer, steps: int = 6) -> list[float]:
    lo, _hi = VOCAB.code_range("image")
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        targets = lo + torch.randint(0, 4, (8, 16), generator=g)
        context = torch.tensor([VOCAB.context("image", "1")] * 8)
        _, loss = m(**batch_inputs(PLAN, targets, context).as_kwargs())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@needs_compile
def test_compiled_blocks_train_as_eager_ones_within_float_tolerance():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, compiled = model(), model()
    assert compile_blocks(compiled) is None
    eager_losses, compiled_losses = train(eager), train(compiled)
    assert counters["stats"]["unique_graphs"] >= 1          # the blocks did compile (not a silent fallback)
    assert eager_losses[-1] < eager_losses[0]
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)


@needs_compile
def test_compiled_blocks_decode_with_the_kv_cache_as_eager_ones():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, compiled = model(3).eval(), model(3).eval()
    compile_blocks(compiled, dynamic=True)
    prompt = Prompt.from_vocab(VOCAB, "image", ["1", "2", "3"])
    options = SamplingOptions(top_k=1)                     # greedy: the same argmax, float rounding aside
    a = generate(eager, PLAN, prompt, options, seed=0)
    b = generate(compiled, PLAN, prompt, options, seed=0)
    assert counters["stats"]["unique_graphs"] >= 1
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=1e-4)


def test_where_compile_cannot_run_the_model_stays_eager_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))              # no C++ compiler on the PATH
    monkeypatch.setenv("CXX", "no-such-compiler")
    why = compile_unavailable("cpu")
    assert why == ("the CPU backend needs a C++ compiler and none was found (no-such-compiler, c++, clang++)")
    m = model()
    assert compile_blocks(m) == why
    assert all(not hasattr(b, "_compiled_call_impl") or b._compiled_call_impl is None for b in m.blocks)
    monkeypatch.undo()
    if compile_unavailable("cpu") is None:
        assert compile_blocks(model(), zero_stage=3).startswith("ZeRO-3 gathers each block's parameters")
