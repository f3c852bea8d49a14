"""The masked paradigm against MaskGIT's definition: the training masks, the decoding schedule, confidence order.

MaskGIT (Chang et al., CVPR 2022): training masks ``ceil(cos(pi r / 2) N)`` tokens of each sample for
``r ~ U[0, 1)``; decoding step ``t`` of ``T`` keeps the draws of all but the
``max(1, min(unknown - 1, floor(N cos(pi/2 (t + 1) / T))))`` least confident masked positions, and the last step
keeps them all. The expected figures here are computed from those formulas, not from arpipe's code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_models_sampling import VOCAB

from arpipe.stages.models import (
    MASK,
    MaskedDecoding,
    ModelConfig,
    Prompt,
    SamplingOptions,
    Transformer,
    VocabLayout,
    batch_inputs,
    draw,
    drop_conditions,
    generate,
    generate_masked,
    make_plan,
    mask_for_training,
    pack_documents,
    process_logits,
    sample_generator,
)

GRID = (4, 4)
N = 16


def masked_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=VOCAB.vocab_size, n_layer=2, n_head=4, n_embd=32, rope_axes=3,
                                   paradigm="masked", max_seq_len=40, init_std=0.3)).double().eval()


def masked_counts(model, plan, prompt, options, decoding) -> list[int]:
    """Masked target positions seen by each forward pass (the model's inputs, through a hook)."""
    seen = []
    P = prompt.context_BP.shape[1]
    hook = model.tok_emb.register_forward_hook(lambda _m, args, _out: seen.append(
        int((args[0][0, P:] == MASK).sum())))
    try:
        generate_masked(model, plan, prompt, options, decoding, seed=3)
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize("steps", [1, 4, 8, 12])
def test_each_step_leaves_masked_what_the_cosine_schedule_says(steps):
    plan = make_plan("masked", grid=(8, 8), n_axes=3)
    model = Transformer(ModelConfig(vocab_size=VOCAB.vocab_size, n_layer=1, n_head=2, n_embd=16, rope_axes=3,
                                    paradigm="masked", max_seq_len=70)).eval()
    prompt = Prompt.from_vocab(VOCAB, "image", ["1"])
    seen = masked_counts(model, plan, prompt, SamplingOptions(), MaskedDecoding(steps=steps))
    expected, unknown = [64], 64
    for t in range(steps - 1):
        unknown = max(1, min(unknown - 1, math.floor(64 * math.cos(math.pi / 2 * (t + 1) / steps))))
        expected.append(unknown)
    assert seen == expected
    fixed = [a - b for a, b in zip(seen, seen[1:] + [0])]
    assert sum(fixed) == 64 and min(fixed) >= 1
    if steps == 8:   # MaskGIT's 8 steps over 64 tokens: few at first, most at the end
        assert seen == [64, 62, 59, 53, 45, 35, 24, 12]


def test_with_one_token_a_step_it_is_sequential_decoding_in_confidence_order():
    """steps = N and the linear schedule fix one token a step; without choice noise the token kept is the draw
    the model is most confident of, which is decoding one token at a time in that order."""
    model, plan = masked_model(), make_plan("masked", grid=GRID, n_axes=3)
    prompt = Prompt.from_vocab(VOCAB, "image", ["2", "3", None])
    options = SamplingOptions(temperature=1.0, cfg_scale=1.5)
    out = generate_masked(model, plan, prompt, options, MaskedDecoding(steps=N, schedule="linear",
                                                                       choice_temperature=0.0), seed=7)
    assert out.forward_passes == N
    P = prompt.context_BP.shape[1]
    for b in range(3):   # the reference: one forward a step, the most confident of the step's draws is kept
        gen = sample_generator(7, b)
        tokens = torch.full((N,), MASK, dtype=torch.long)
        order = []
        for _ in range(N):
            rows = torch.stack([torch.cat([prompt.context_BP[b], tokens]), torch.cat([prompt.uncond_BP[b], tokens])])
            plan_inputs = batch_inputs(plan, tokens[None].repeat(2, 1), rows[:, :P])
            logits, _ = model(rows, plan_inputs.coords, plan_inputs.group_ids)
            cond, uncond = logits[0, P:].double(), logits[1, P:].double()
            probs = process_logits(uncond + 1.5 * (cond - uncond), options, prompt.allowed)
            drawn = draw(probs, gen)
            torch.rand(N, generator=gen, dtype=torch.float64)   # the step's choice noise (here weighted 0)
            confidence = probs.gather(-1, drawn[:, None]).squeeze(-1)
            confidence[tokens != MASK] = -1
            best = int(confidence.argmax())
            tokens[best] = drawn[best]
            order.append(best)
        assert torch.equal(out.tokens[b], tokens)
        assert sorted(order) == list(range(N))


def test_a_samples_tokens_do_not_depend_on_its_batch_and_known_tokens_stay():
    model, plan = masked_model(), make_plan("masked", grid=GRID, n_axes=3)
    options, decoding = SamplingOptions(cfg_scale=2.0, cfg_schedule="linear", top_k=3), MaskedDecoding(steps=5)
    together = generate_masked(model, plan, Prompt.from_vocab(VOCAB, "image", ["1", "0", "3"]), options,
                               decoding, seed=11)
    alone = generate_masked(model, plan, Prompt.from_vocab(VOCAB, "image", ["3"]), options, decoding, seed=11,
                            sample_indices=[2])
    assert torch.equal(together.tokens[2], alone.tokens[0])
    assert together.forward_passes == 5
    # generate() decodes a masked plan the same way, with MaskGIT's default steps
    assert torch.equal(generate(model, plan, Prompt.from_vocab(VOCAB, "image", ["1"]), options, seed=11).tokens,
                       generate_masked(model, plan, Prompt.from_vocab(VOCAB, "image", ["1"]), options,
                                       MaskedDecoding(), seed=11).tokens)
    prompt = Prompt.from_vocab(VOCAB, "image", ["3", "3"])
    lo, hi = VOCAB.code_range("image")
    known = torch.full((2, N), -1)
    known[:, ::3] = torch.arange(lo, hi)[:6] if hi - lo >= 6 else lo
    prompt.known_BN = known
    done = generate_masked(model, plan, prompt, options, decoding, seed=1)
    assert torch.equal(done.tokens[:, ::3], known[:, ::3])
    assert bool(((done.tokens >= lo) & (done.tokens < hi)).all())
    assert bool((done.logprobs[:, ::3] == 0).all()) and bool((done.logprobs[:, 1::3] < 0).all())


def test_training_masks_a_cosine_share_of_each_document_and_scores_only_it():
    plan = make_plan("masked", grid=(8, 8), n_axes=3)
    lo, _hi = VOCAB.code_range("image")
    g = torch.Generator().manual_seed(0)
    targets = lo + torch.randint(0, 4, (400, 64), generator=g)
    context = torch.tensor([VOCAB.context("image", "1")] * 400)
    plain = batch_inputs(plan, targets, context)
    assert torch.equal(plain.input_ids[:, 2:], targets)   # unmasked, a position's input is its own token
    gen = torch.Generator().manual_seed(5)
    masked = mask_for_training(plain, gen)
    hidden = masked.input_ids[:, 2:] == MASK
    scored = masked.target_ids[:, 2:] != -100
    assert torch.equal(hidden, scored)
    assert torch.equal(masked.input_ids[:, 2:][~hidden], targets[~hidden])
    assert torch.equal(masked.target_ids[:, 2:][scored], targets[scored])
    assert torch.equal(masked.input_ids[:, :2], plain.input_ids[:, :2])
    # the count rule, replayed from the same generator: r first, then the permutation
    replay = torch.Generator().manual_seed(5)
    for row in range(400):
        r = float(torch.rand((), generator=replay, dtype=torch.float64))
        k = max(1, math.ceil(math.cos(math.pi * r / 2) * 64))
        chosen = torch.randperm(64, generator=replay)[:k]
        assert int(hidden[row].sum()) == k and bool(hidden[row, chosen].all())
    # and its law: P(masked <= m) = P(cos(pi r / 2) <= m / 64) = 1 - (2 / pi) acos(m / 64) for r uniform
    counts = hidden.sum(1).numpy()
    m = np.arange(1, 65)
    observed = (counts[:, None] <= m[None, :]).mean(0)
    law = 1 - 2 / np.pi * np.arccos(m / 64)
    assert np.max(np.abs(observed - law)) < 0.08   # KS distance; 0.08 is p < 0.01 at 400 rows
    assert abs(counts.mean() / 64 - 2 / np.pi) < 0.04   # E[cos(pi r / 2)] = 2 / pi


def test_packed_documents_are_masked_each_on_its_own():
    plan = make_plan("masked", grid=GRID, n_axes=3)
    lo, _hi = VOCAB.code_range("image")
    docs = [(plan, lo + torch.arange(N) % 4, torch.tensor(VOCAB.context("image", "1"))) for _ in range(3)]
    packed = pack_documents([docs], seq_len=3 * (N + 2))
    masked = mask_for_training(packed, torch.Generator().manual_seed(2))
    for d in range(3):
        in_doc = (packed.doc_ids[0] == d) & (packed.target_ids[0] != -100)
        assert int((masked.input_ids[0][in_doc] == MASK).sum()) >= 1
    # bidirectional inside a document, never across documents
    from arpipe.stages.models import attention_mask

    allowed = attention_mask(packed.group_ids, packed.doc_ids)[0, 0]
    assert bool(allowed[2, N + 1]) and not bool(allowed[2, N + 4])


def test_a_masked_model_learns_the_masked_tokens():
    """A few steps of MaskGIT training on a fixed pattern: the loss on the masked positions falls far below
    chance, and the unmasked inputs are never scored (the loss of a model that copies its inputs is not 0)."""
    plan = make_plan("masked", grid=GRID, n_axes=3)
    lo, _hi = VOCAB.code_range("image")
    targets = (lo + (torch.arange(N) // 4) % 4).repeat(32, 1)
    context = torch.tensor([VOCAB.context("image", "1")] * 32)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=VOCAB.vocab_size, n_layer=2, n_head=4, n_embd=32, rope_axes=3,
                                    paradigm="masked", max_seq_len=40))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        _, loss = model(**mask_for_training(batch_inputs(plan, targets, context), gen).as_kwargs())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 2.0 and np.mean(losses[-10:]) < 0.3
    out = generate_masked(model.eval(), plan, Prompt.from_vocab(VOCAB, "image", ["1"] * 4), SamplingOptions(),
                          MaskedDecoding(steps=4), seed=0)
    assert float((out.tokens == targets[:4]).double().mean()) > 0.9


def test_a_masked_model_follows_a_text_prompt_and_a_control_stream_in_its_context():
    """Prompt streams (text, control) sit in the context the masked group attends: a model trained on four
    patterns, the text token choosing the pattern and the control token how far it is rolled, draws what the
    pair asks for in 4 parallel steps, with and without CFG; under other rows' conditions the same draws miss."""
    vocab = VocabLayout.build({"image": 4}, classes=range(2), prompts=[("text", 4, 1), ("control", 4, 1)])
    plan = make_plan("masked", grid=GRID, n_axes=3)
    g = torch.Generator().manual_seed(0)
    patterns = torch.randint(0, 4, (4, N), generator=g)

    def batch(n):
        word, roll = torch.randint(0, 4, (n,), generator=g), torch.randint(0, 4, (n,), generator=g)
        image = torch.stack([patterns[w].roll(4 * int(r)) for w, r in zip(word, roll)])
        context = torch.tensor([vocab.context("image", None, {"text": [int(w)], "control": [int(r)]})
                                for w, r in zip(word, roll)])
        return vocab.to_global("image", image), context

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=vocab.vocab_size, n_layer=2, n_head=4, n_embd=64, rope_axes=3,
                                    paradigm="masked", max_seq_len=4 + N))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        targets, context = batch(32)
        inputs = batch_inputs(plan, targets, context)
        inputs.input_ids = drop_conditions(inputs.input_ids, vocab, 0.1, generator=g)
        _, loss = model(**mask_for_training(inputs, g).as_kwargs())
        opt.zero_grad()
        loss.backward()
        opt.step()
    targets, context = batch(24)
    prompt = Prompt(context, vocab.unconditional(context), allowed=vocab.code_range("image"))
    for options in (SamplingOptions(), SamplingOptions(cfg_scale=2.0)):
        out = generate_masked(model.eval(), plan, prompt, options, MaskedDecoding(steps=4), seed=0)
        assert float((out.tokens == targets).double().mean()) > 0.9
        other = torch.stack([targets[(i + 1) % 24] for i in range(24)])
        same = (other == targets).all(1)   # rows whose neighbour asked for the same image
        assert float((out.tokens[~same] == other[~same]).double().mean()) < 0.6


def test_masked_decoding_settings_are_checked():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        MaskedDecoding(steps=0)
    with pytest.raises(ValueError, match="schedule 'square' is unknown"):
        MaskedDecoding(schedule="square")
    with pytest.raises(ValueError, match="generate_masked decodes masked plans"):
        generate_masked(masked_model(), make_plan("next_token", grid=GRID, n_axes=3),
                        Prompt.from_vocab(VOCAB, "image", ["1"]))
