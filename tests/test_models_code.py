"""Collaborative decoding (CoDe): a drafter draws a next-scale pyramid's first scales, a refiner the rest.

In-process on tiny untrained models: the handover is where the passes say it is, a refiner that is the drafter
draws the drafter's own tokens, each model samples under its own guidance, and wrong pairings are refused.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_models_sampling import VOCAB, logp_of, tiny_model
from test_sample_evaluate import build_project

from arpipe.stages.models import (
    ModelConfig,
    Prompt,
    SamplingOptions,
    ScaleInput,
    Transformer,
    VocabLayout,
    generate,
    make_plan,
)

pytestmark = [pytest.mark.usefixtures("single_torch_thread"),
              pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")]   # the project's feature net

SCALES = [1, 2, 3, 4]
PLAN = make_plan("next_scale", scales=SCALES, n_axes=3)
BOUNDS = PLAN.group_bounds   # [0, 1, 5, 14, 30]
LABELS = [0, 1, 2, 3, None, 1]
GUIDED = dict(cfg_scale=2.5, cfg_schedule="linear", top_k=6, top_p=0.9, temperature=0.8)


def var_plan_and_model(seed: int = 0, n_embd: int = 32) -> tuple:
    """A next_scale plan fed VAR's accumulated input (a random codebook of the image codes) and a model for it."""
    from arpipe.stages.modalities import MultiScaleVQ

    msvq = MultiScaleVQ(input_shape=(1, 8, 8), patch=(2, 2), scales=[1, 2, 4], codebook_size=10)
    codebook_KD = torch.randn(10, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    si = ScaleInput(codebook_KD, msvq.next_scale_input_mix().double(), VOCAB.code_range("image")[0])
    plan = make_plan("next_scale", scales=[1, 2, 4], n_axes=3).with_scale_input(si)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=VOCAB.vocab_size, n_layer=2, n_head=2, n_embd=n_embd, rope_axes=3,
                                    paradigm="next_scale", feature_dim=4, init_std=0.2)).double().eval()
    return plan, model


def scale_model(seed: int = 0, n_embd: int = 32) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=VOCAB.vocab_size, n_layer=2, n_head=2, n_embd=n_embd, rope_axes=3,
                                   paradigm="next_scale", init_std=0.2)).double().eval()


def record_groups(model: Transformer, calls: list[list[int]]):
    """A hook keeping the group ids (0: context, g + 1: scale g) of the positions each forward pass runs."""
    return model.register_forward_hook(lambda _m, args, _out: calls.append(args[2][0].tolist()))


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("handover", [1, 2, 3])
def test_the_drafter_draws_the_first_scales_and_the_refiner_the_rest(handover, use_cache):
    drafter, refiner = scale_model(0, 48), scale_model(1, 32)
    drafted, refined = [], []
    hooks = [record_groups(drafter, drafted), record_groups(refiner, refined)]
    try:
        out = generate(drafter, PLAN, Prompt.from_vocab(VOCAB, "image", LABELS), SamplingOptions(use_cache=use_cache),
                       seed=3, refiner=refiner, handover=handover)
    finally:
        for hook in hooks:
            hook.remove()
    # a pass predicts the tokens of its last scale; the drafter's scales are 0..handover-1
    assert [max(ids) - 1 for ids in drafted] == list(range(handover))
    assert [max(ids) - 1 for ids in refined] == list(range(handover, len(SCALES)))
    # the refiner's first pass reads the context and every drafted token (its KV cache starts empty)
    P = len(Prompt.from_vocab(VOCAB, "image", [0]).context_BP[0])
    assert refined[0] == [0] * P + PLAN.group_N[:BOUNDS[handover + 1]].add(1).tolist()
    if use_cache:   # then only its own scale each pass
        assert all(set(ids) == {g + 1} for g, ids in zip(range(handover + 1, len(SCALES)), refined[1:]))
    assert out.forward_passes == len(SCALES) and out.refiner_passes == len(SCALES) - handover
    assert out.sample_passes.tolist() == [len(SCALES)] * len(LABELS)
    lo, hi = VOCAB.code_range("image")
    assert ((out.tokens >= lo) & (out.tokens < hi)).all()


@pytest.mark.parametrize("opts", [{}, GUIDED], ids=["plain", "cfg"])
@pytest.mark.parametrize("var_input", [False, True], ids=["parent-token", "var-input"])
def test_a_refiner_that_is_the_drafter_draws_the_drafters_own_tokens(opts, var_input):
    """The same per-sample generators run on across the handover and the guidance keeps its place in the schedule:
    handing over to the same module, or to a copy of it, changes no token."""
    plan, model = var_plan_and_model() if var_input else (PLAN, scale_model())
    prompt = Prompt.from_vocab(VOCAB, "image", LABELS)
    for use_cache in (True, False):
        options = SamplingOptions(use_cache=use_cache, **opts)
        alone = generate(model, plan, prompt, options, seed=7)
        for refiner in (model, copy.deepcopy(model)):
            for handover in range(1, plan.n_groups):
                code = generate(model, plan, prompt, options, seed=7, refiner=refiner, handover=handover)
                assert torch.equal(code.tokens, alone.tokens)
                assert torch.allclose(code.logprobs, alone.logprobs, atol=1e-10)
                assert code.forward_passes == alone.forward_passes == plan.n_groups
                assert code.refiner_passes == plan.n_groups - handover
                assert torch.equal(code.sample_passes, alone.sample_passes)


def test_the_refiner_samples_its_scales_under_its_own_guidance():
    """Drafter unguided, refiner guided 3.0 on VAR's linear ramp: the drafted scales are the drafter's own draws,
    and each refined token's log-probability is the refiner's, guided at its scale's place in the whole ramp."""
    drafter, refiner = scale_model(0, 48), scale_model(1, 32)
    prompt = Prompt.from_vocab(VOCAB, "image", [0, 1, 2, 3, 0, 1])
    handover, cut = 2, BOUNDS[2]
    drafter_opts, refiner_opts = SamplingOptions(), SamplingOptions(cfg_scale=3.0, cfg_schedule="linear")
    code = generate(drafter, PLAN, prompt, drafter_opts, seed=2, refiner=refiner, handover=handover,
                    refiner_options=refiner_opts)
    alone = generate(drafter, PLAN, prompt, drafter_opts, seed=2)
    assert torch.equal(code.tokens[:, :cut], alone.tokens[:, :cut])
    assert not torch.equal(code.tokens[:, cut:], alone.tokens[:, cut:])
    assert torch.allclose(code.logprobs[:, :cut], logp_of(drafter, PLAN, code.tokens, prompt.context_BP)[:, :cut],
                          atol=1e-10)
    for g in range(handover, len(SCALES)):
        scale = refiner_opts.guidance(g, len(SCALES) - 1)   # 1 + 2 g / 3: the position counts every scale
        want = logp_of(refiner, PLAN, code.tokens, prompt.context_BP, prompt.uncond_BP, scale)
        assert torch.allclose(code.logprobs[:, BOUNDS[g]:BOUNDS[g + 1]], want[:, BOUNDS[g]:BOUNDS[g + 1]],
                              atol=1e-10)
    # the refiner's options default to the drafter's
    same = generate(drafter, PLAN, prompt, refiner_opts, seed=2, refiner=refiner, handover=handover)
    assert torch.equal(same.tokens, generate(drafter, PLAN, prompt, refiner_opts, seed=2, refiner=refiner,
                                             handover=handover, refiner_options=refiner_opts).tokens)


def test_prefixes_and_in_painting_go_on_through_the_handover():
    drafter, refiner = scale_model(0, 48), scale_model(1, 32)
    prefix = torch.randint(0, 10, (3, BOUNDS[3]), generator=torch.Generator().manual_seed(0))
    prompt = Prompt.from_vocab(VOCAB, "image", [0, 1, 2], prefix_local_BM=prefix)
    out = generate(drafter, PLAN, prompt, seed=1, refiner=refiner, handover=2)   # the prefix covers the handover
    assert torch.equal(VOCAB.to_local("image", out.tokens[:, :BOUNDS[3]]), prefix)
    assert out.forward_passes == out.refiner_passes == 1

    known_N = torch.zeros(PLAN.n_tokens, dtype=torch.bool)
    known_N[BOUNDS[2]:BOUNDS[2] + 4] = known_N[BOUNDS[3]:BOUNDS[3] + 6] = True   # in both models' scales
    originals = VOCAB.to_global("image", torch.randint(0, 10, (3, PLAN.n_tokens)))
    prompt = Prompt.from_vocab(VOCAB, "image", [0, 1, 2])
    prompt.known_BN = torch.where(known_N, originals, torch.full_like(originals, -1))
    out = generate(drafter, PLAN, prompt, SamplingOptions(lookahead=3), seed=1, refiner=refiner, handover=2)
    assert torch.equal(out.tokens[:, known_N], originals[:, known_N])
    assert out.refiner_passes == 2 + 3   # two scales, and three candidates of the first judged on the known ones


def test_wrong_pairings_are_refused_with_one_clear_error():
    drafter = scale_model()
    prompt = Prompt.from_vocab(VOCAB, "image", [0])
    cases = [
        (dict(refiner=drafter, handover=0), r"handover 0 is not .*give 1\.\.3 for this plan of 4 scales"),
        (dict(refiner=drafter, handover=4), r"handover 4 is not"),
        (dict(refiner=drafter), r"handover None is not"),
        (dict(handover=2), r"apply to a refiner \(CoDe\); pass refiner= too"),
        (dict(refiner=var_plan_and_model()[1], handover=2), r"feature_dim 0 vs 4"),
        (dict(refiner=tiny_model("next_token"), handover=2), r"paradigm next_scale vs next_token"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            generate(drafter, PLAN, prompt, seed=0, **kwargs)
    other = Transformer(ModelConfig(vocab_size=VOCAB.vocab_size + 4, n_layer=1, n_head=2, n_embd=16, rope_axes=3,
                                    paradigm="next_scale")).eval()
    with pytest.raises(ValueError, match=f"vocab_size {VOCAB.vocab_size} vs {VOCAB.vocab_size + 4}"):
        generate(drafter, PLAN, prompt, refiner=other.double(), handover=1)
    token_plan = make_plan("next_token", grid=(3, 4), n_axes=3)
    with pytest.raises(ValueError, match="draws the last scales of a next_scale plan; this plan is next_token"):
        generate(tiny_model("next_token"), token_plan, prompt, refiner=tiny_model("next_token"), handover=2)


def model_folder(root: Path, *, paradigm: str = "next_scale", vocab: VocabLayout = VOCAB,
                 tokenizer: str = "sha256:" + "a" * 64) -> str:
    """A model folder as a train stage writes it (untrained weights), its image tokens from ``tokenizer``."""
    from arpipe.stages.models.io import save_model

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=vocab.vocab_size, n_layer=1, n_head=2, n_embd=16, rope_axes=3,
                                    paradigm=paradigm))
    folder = save_model(root, model, vocab=vocab)
    (folder / "tokenizers.json").write_text(json.dumps({"image": {
        "modality": "image", "tokenizer_uri": str(root / "tokenizer"), "tokenizer_digest": tokenizer,
        "layout": {"scales": [[1, 1], [2, 2], [3, 3]]}, "store": None}}))
    return str(folder)


@pytest.mark.parametrize(("drafter", "refiner", "message"), [
    (dict(paradigm="next_token"), {},
     "stages.code.refiner: a refiner (CoDe) draws the last scales of a next_scale model; this model is next_token"),
    ({}, dict(vocab=VocabLayout.build({"image": 10}, classes=range(3))),
     "the model ${train.model} and the refiner ${train_small.model} do not read the same tokens (modalities "
     "image (10 codes), volume (6 codes) vs image (10 codes); classes 4 (0, 1, 2, 3) vs 3 (0, 1, 2))"),
    ({}, dict(tokenizer="sha256:" + "b" * 64),
     "do not read the same tokens (image tokenizer sha256:aaaaaaaaaaaa vs sha256:bbbbbbbbbbbb)"),
    ({}, dict(paradigm="next_token"), "do not read the same tokens (paradigm next_scale vs next_token)"),
], ids=["next_token-model", "vocabulary", "tokenizer", "next_token-refiner"])
def test_the_sample_stage_refuses_a_refiner_that_does_not_read_the_models_tokens(tmp_path, drafter, refiner,
                                                                                 message):
    """Checked on the driver when the stage starts, before any actor: one line naming both models and what
    differs (the YAML names them by their train stages)."""
    from arpipe.pipeline.errors import UserError
    from arpipe.pipeline.stage import StageContext
    from arpipe.schemas.sample import SampleStage as SampleSpec
    from arpipe.stages.sample import SampleStage

    large, small = model_folder(tmp_path / "large", **drafter), model_folder(tmp_path / "small", **refiner)
    spec = SampleSpec(kind="sample", model=large, refiner={"model": small, "handover": 1}, num_samples=2)
    ctx = StageContext(name="code", kind="sample", fingerprint="0" * 64, out_uri=str(tmp_path / "out"),
                       work_dir=tmp_path / "out", pipeline_dir=tmp_path,
                       inputs={"train.model": large, "train_small.model": small})
    with pytest.raises(UserError) as err:
        SampleStage(spec, ctx).run()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_refiner_with_speculative_jacobi_decoding_is_refused_by_the_config():
    from pydantic import ValidationError

    from arpipe.schemas.sample import SampleStage as SampleSpec

    for extra in (dict(decoder="sjd"), dict(decoder="sjd", relaxed={"k": 2, "delta": 0.1})):
        with pytest.raises(ValidationError, match="refiner .CoDe. hands a next_scale model's last scales to a "
                                                  "second model, one pass per scale; speculative Jacobi decoding .decoder: sjd"):
            SampleSpec(kind="sample", model="m", refiner={"model": "r", "handover": 2}, **extra)


VALIDATE = """
name: code
storage: ./runs
stages:
  tok:
    kind: tokenizer
    source: {modality: image, uri: ./data, channels: 1, size: 8}
    tokenizer: {type: msvq, scales: [1, 2, 4, 8], codebook_size: 32}
  digits:
    kind: tokenize
    source: {modality: image, uri: ./data, channels: 1, size: 8}
    tokenizer: ${tok.tokenizer}
  other:
    kind: tokenize
    source: {modality: image, uri: ./other, channels: 1, size: 8}
    tokenizer: ${tok.tokenizer}
  train:
    kind: train
    data: [{store: "${digits.store}"}]
    model: {preset: tiny, paradigm: next_scale}
  train_small:
    kind: train
    data: [{store: "SMALL_DATA"}]
    model: {preset: tiny, paradigm: next_scale, n_layer: 1, n_embd: 32, n_head: 2}
  code:
    kind: sample
    model: ${train.model}
    refiner: {model: "${train_small.model}", handover: 3}
"""


def test_validate_refuses_a_refiner_trained_on_other_token_stores(tmp_path):
    from helpers import arpipe, write

    write(tmp_path, {"same.yaml": VALIDATE.replace("SMALL_DATA", "${digits.store}"),
                     "other.yaml": VALIDATE.replace("SMALL_DATA", "${other.store}")})
    arpipe("validate", "same.yaml", cwd=tmp_path, check=True)
    run = arpipe("validate", "other.yaml", cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    [line] = run.stderr.strip().splitlines()
    assert ("other.yaml:25:5: stages.code: refiner.model: the refiner's train stage 'train_small' trains on ${other.store} but the "
            "model's 'train' on ${digits.store}; CoDe's two models read the same tokens: train 'train_small' on "
            "the data of 'train'") in line


CODE_STAGES = """
  train_small:
    kind: train
    data: [{store: "${digits.store}"}]
    model: {preset: tiny, paradigm: next_scale, n_layer: 1, n_embd: 32, n_head: 2}
    optimizer: {lr: 0.003, warmup_steps: 5}
    deepspeed: {zero_stage: 0}
    global_batch: 32
    steps: 30
  code:
    kind: sample
    model: ${train.model}
    refiner: {model: "${train_small.model}", handover: 3, cfg_scale: 1.5}
    num_samples: 16
    samples_per_shard: 16
    cfg_scale: 2.0
    cfg_schedule: linear
  code_bad:
    kind: sample
    model: ${train.model}
    refiner: {model: "${train_small.model}", handover: 4}
    num_samples: 2
"""


#: the digits project of tests/test_sample_evaluate.py (its model trained for 600 steps, width 96), built once
BUILT_IN_BACKGROUND = {"digits-project": build_project}


def test_code_in_a_pipeline_hands_the_last_scale_of_the_digits_model_to_a_small_one(background, ray_cluster):
    """The digits model (width 96) draws scales 1-3 of 8x8 digits, a model of width 32 trained alongside on the
    same store draws the 8x8 scale: the large model's scales are exactly those it draws alone (the sample stage
    of the project), the store says who drew what, and a handover past the last scale fails in one line."""
    from helpers import arpipe, stage_lines, write
    from helpers import committed_output as out

    from arpipe.stages.store import TokenStore

    project = background.result("digits-project")
    write(project, {"code.yaml": (project / "digits.yaml").read_text() + CODE_STAGES})
    run = arpipe("run", "code.yaml", "--only", "train_small,code,code_bad", cwd=project,
                 env={"RAY_ADDRESS": ray_cluster})
    states = stage_lines(run.stdout)
    assert states["train_small"][-1] == states["code"][-1] == "done", run.stdout + run.stderr
    assert run.returncode == 2 and states["code_bad"][-1] == "failed"
    [line] = [ln for ln in (run.stdout + run.stderr).splitlines() if ln.split()[:2] == ["code_bad", "failed"]]
    assert "refiner.handover: handover 4 leaves the refiner nothing to draw: the image samples have 4 scales" in line
    assert "the refiner ${train_small.model} draws from scale 4 on" in run.stdout

    code = TokenStore.open(str(out(project, "code") / "samples"))
    alone = TokenStore.open(str(out(project, "sample") / "samples"))
    meta = code.manifest.metadata
    assert meta["refiner"]["handover"] == 3 and meta["refiner"]["model"].endswith("/model")
    assert meta["refiner"]["model"] != meta["model"] and meta["sampling"]["refiner"]["cfg_scale"] == 1.5
    drafted = 1 + 4 + 16
    tokens = [s.tokens.reshape(-1) for s in code]
    same = [a.tokens.reshape(-1) for a in list(alone)[:16]]
    assert len(tokens) == 16 and all(np.array_equal(t[:drafted], a[:drafted]) for t, a in zip(tokens, same))
    assert any(not np.array_equal(t[drafted:], a[drafted:]) for t, a in zip(tokens, same))
    record = json.loads((out(project, "code") / ".arpipe" / "units" / "image-0000.json").read_text())
    assert record["detail"] == {"forward_passes": 4, "refiner_passes": 1}
