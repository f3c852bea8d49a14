"""Text prompts and in-painting in the model library: one vocabulary over text and image codes, the caption
as a prefix of every paradigm's documents (packed or not), dropped whole for classifier-free guidance, and
sampling that keeps known tokens exactly wherever they stand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arpipe.stages.models import (
    NULL,
    ModelConfig,
    Prompt,
    SamplingOptions,
    Transformer,
    VocabLayout,
    batch_inputs,
    drop_conditions,
    generate,
    known_cells,
    make_plan,
    pack_documents,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")

VOCAB = VocabLayout.build({"image": 10}, classes=range(3), prompts=[("text", 20, 4)])
PLANS = {
    "next_token": (make_plan("next_token", grid=(4, 4), n_axes=3), 1),
    "next_block": (make_plan("next_block", grid=(4, 4), block_size=4, n_axes=3), 4),
    "next_scale": (make_plan("next_scale", scales=[1, 2, 4], n_axes=3), 1),
}


def tiny_model(paradigm: str, block: int) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=VOCAB.vocab_size, n_layer=2, n_head=2, n_embd=32, rope_axes=3,
                                   paradigm=paradigm, block_size=block, init_std=0.2)).double().eval()


def test_text_gets_its_own_id_range_after_the_image_codes_and_round_trips():
    lo, hi = VOCAB.prompt_range("text")
    assert (lo, hi) == (VOCAB.code_range("image")[1], VOCAB.code_range("image")[1] + 20)
    assert VOCAB.vocab_size == hi and VOCAB.context_len == 2 + 4
    assert VocabLayout.from_json(VOCAB.to_json()) == VOCAB
    assert {"name": "prompt:text", "start": lo, "stop": hi} in VOCAB.ranges()
    plain = VocabLayout.build({"image": 10}, classes=range(3))   # models without prompts: as before
    assert plain.context_len == 2 and "prompts" not in plain.to_dict()


def test_a_context_is_tag_class_then_the_caption_padded_with_null():
    lo, _hi = VOCAB.prompt_range("text")
    assert VOCAB.context("image", "1", {"text": [5, 7]}) == [VOCAB.tag("image"), VOCAB.class_token("1"),
                                                               lo + 5, lo + 7, NULL, NULL]
    assert VOCAB.context("image", None) == [VOCAB.tag("image"), NULL, NULL, NULL, NULL, NULL]
    context = torch.tensor([VOCAB.context("image", "2", {"text": [1, 2, 3, 4]})])
    assert VOCAB.unconditional(context).tolist() == [[VOCAB.tag("image")] + [NULL] * 5]
    with pytest.raises(ValueError, match="a text prompt of 5 tokens is longer than the 4 positions"):
        VOCAB.context("image", None, {"text": [1, 2, 3, 4, 5]})
    with pytest.raises(ValueError, match=r"text token ids must lie in \[0, 20\)"):
        VOCAB.context("image", None, {"text": [20]})
    with pytest.raises(ValueError, match="no prompt stream 'control'"):
        VOCAB.context("image", None, {"control": [1]})


def test_cfg_dropout_drops_the_whole_condition_of_a_document():
    contexts = [torch.tensor(VOCAB.context("image", str(i % 3), {"text": [i % 20, 3]})) for i in range(64)]
    plan = PLANS["next_token"][0]
    rows = [[(plan, torch.full((16,), VOCAB.code_range("image")[0]), c) for c in contexts[k:k + 2]]
            for k in range(0, 64, 2)]
    batch = pack_documents(rows, 2 * (16 + VOCAB.context_len))
    dropped = drop_conditions(batch.input_ids, VOCAB, 0.5, doc_ids_BL=batch.doc_ids,
                              generator=torch.Generator().manual_seed(0))
    conditions = VOCAB.is_condition(batch.input_ids)
    for r in range(len(rows)):
        for d in range(2):
            at = (batch.doc_ids[r] == d) & conditions[r]
            kept = dropped[r][at]
            assert kept.tolist() == batch.input_ids[r][at].tolist() or (kept == NULL).all()   # all or nothing
    assert 0.3 < float((dropped[conditions] == NULL).float().mean()) < 0.7


def test_prompt_positions_carry_their_order_on_the_level_axis():
    plan = PLANS["next_scale"][0]
    context = torch.tensor([VOCAB.context("image", None, {"text": [1, 2, 3]})])
    batch = batch_inputs(plan, torch.full((1, plan.n_tokens), VOCAB.code_range("image")[0]), context)
    assert batch.coords[0, :6, 0].tolist() == [0, 0, -1, -2, -3, -4]
    assert (batch.coords[0, :6, 1:] == 0).all()
    assert batch.coords[0, 6:, 0].min() >= 0   # every target sits at level >= 0, apart from the prompt


@pytest.mark.parametrize("paradigm", list(PLANS))
def test_the_caption_changes_what_is_drawn_and_cfg_runs_on_it(paradigm):
    plan, block = PLANS[paradigm]
    model = tiny_model(paradigm, block)
    prompt = Prompt.from_vocab(VOCAB, "image", [None] * 4, prompts=[{"text": [1, 2]}, {"text": [3]}] * 2)
    options = SamplingOptions(cfg_scale=3.0)
    a = generate(model, plan, prompt, options, seed=0, sample_indices=[0, 1, 0, 1])
    assert torch.equal(a.tokens[0], a.tokens[2]) and torch.equal(a.tokens[1], a.tokens[3])   # per-sample seeds
    other = Prompt.from_vocab(VOCAB, "image", [None] * 4, prompts=[{"text": [9, 9, 9]}] * 4)
    b = generate(model, plan, other, options, seed=0, sample_indices=[0, 1, 0, 1])
    assert not torch.equal(a.tokens, b.tokens)
    lo, hi = VOCAB.code_range("image")
    assert ((a.tokens >= lo) & (a.tokens < hi)).all()


@pytest.mark.parametrize("paradigm", list(PLANS))
def test_in_painting_keeps_every_known_token_and_draws_the_rest(paradigm):
    plan, block = PLANS[paradigm]
    model = tiny_model(paradigm, block)
    shapes = [[1, 1], [2, 2], [4, 4]] if paradigm == "next_scale" else [[4, 4]]
    keep = np.zeros((8, 8), dtype=bool)
    keep[:4] = True                                        # the top half known, the bottom half drawn
    known_N = known_cells(shapes, keep)
    lo, _hi = VOCAB.code_range("image")
    original = lo + torch.arange(plan.n_tokens).remainder(10).repeat(3, 1)
    known = torch.where(known_N, original, torch.full_like(original, -1))
    prompt = Prompt.from_vocab(VOCAB, "image", ["0", "1", None])
    prompt.known_BN = known
    out = generate(model, plan, prompt, SamplingOptions(cfg_scale=2.0), seed=3)
    assert torch.equal(out.tokens[:, known_N], original[:, known_N])
    assert (out.logprobs[:, known_N] == 0).all()
    assert not torch.equal(out.tokens[:, ~known_N], original[:, ~known_N])
    free = generate(model, plan, Prompt.from_vocab(VOCAB, "image", ["0", "1", None]), SamplingOptions(cfg_scale=2.0),
                    seed=3)
    assert not torch.equal(free.tokens[:, known_N], original[:, known_N])


def test_known_cells_are_the_tokens_wholly_inside_the_kept_region():
    keep = np.zeros((8, 8), dtype=bool)
    keep[:4] = True
    cells = known_cells([[1, 1], [2, 2], [4, 4], [8, 8]], keep)
    assert cells[:1].tolist() == [False]                    # the 1x1 scale covers the whole image
    assert cells[1:5].tolist() == [True, True, False, False]
    assert cells[5:21].reshape(4, 4)[:, 0].tolist() == [True, True, False, False]
    assert int(cells[21:].sum()) == 32
    with pytest.raises(ValueError, match=r"a mask of 3 axes \(2, 8, 8\) does not fit tokens on a grid of 2 axes"):
        known_cells([[4, 4]], np.ones((2, 8, 8), dtype=bool))


@pytest.mark.parametrize("paradigm", ["next_scale", "next_token"])
def test_lookahead_draws_tokens_that_agree_with_the_known_ones_after_them(paradigm):
    """The known tokens are likelier (teacher-forced, under the same model) after tokens drawn with lookahead
    than after tokens drawn blind: a token drawn before known ones is chosen to fit them."""
    plan, block = PLANS[paradigm]
    model = tiny_model(paradigm, block)
    shapes = [[1, 1], [2, 2], [4, 4]] if paradigm == "next_scale" else [[4, 4]]
    keep = np.zeros((8, 8), dtype=bool)
    keep[4:] = True                                        # the bottom half known: drawn tokens come first
    known_N = known_cells(shapes, keep)
    lo, _hi = VOCAB.code_range("image")
    original = lo + (torch.arange(plan.n_tokens) * 7).remainder(10).repeat(32, 1)
    prompt = Prompt.from_vocab(VOCAB, "image", [None] * 32)
    prompt.known_BN = torch.where(known_N, original, torch.full_like(original, -1))

    def known_loglik(options: SamplingOptions) -> float:
        out = generate(model, plan, prompt, options, seed=5)
        assert torch.equal(out.tokens[:, known_N], original[:, known_N])
        batch = batch_inputs(plan, out.tokens, prompt.context_BP)
        with torch.no_grad():
            logits, _ = model(**{**batch.as_kwargs(), "targets_BL": None})
        logp = torch.log_softmax(logits[:, prompt.context_BP.shape[1]:].double(), -1)
        picked = logp.gather(-1, out.tokens[:, :, None]).squeeze(-1)
        return float(picked[:, known_N].sum(1).mean())

    assert known_loglik(SamplingOptions(lookahead=16)) > known_loglik(SamplingOptions()) + 0.5


def test_a_stored_sample_brings_its_class_caption_and_control_into_its_context():
    from arpipe.stages.store.reader import Sample

    vocab = VocabLayout.build({"image": 10}, classes=range(3), prompts=[("text", 20, 3), ("control", 8, 2)])
    sample = Sample(index=0, key="k", modality="image", shape=(4,), tokens=np.zeros(4), condition=2,
                    source_uri=None, source_digest=None, shard="s", caption="a two", caption_tokens=(4, 5),
                    control_tokens=(1, 7))
    text, control = vocab.prompt_range("text")[0], vocab.prompt_range("control")[0]
    assert vocab.context_of("image", sample) == [vocab.tag("image"), vocab.class_token("2"), text + 4, text + 5,
                                                 NULL, control + 1, control + 7]
    plain = VocabLayout.build({"image": 10})   # a model without classes or prompts ignores them
    assert plain.context_of("image", sample) == [plain.tag("image"), NULL]
