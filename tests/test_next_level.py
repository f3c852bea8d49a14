"""next_level (G3PT-style level of detail) against the octree's own levels: point clouds trained and drawn level by level.

The octree tokenizer writes a cloud as child masks, level by level (``OctreeTokenizer.level_boundaries``), each
token the mask of one occupied cell ``(level, x, y, z)`` of its level's grid (``OctreeTokenizer.positions``).
Under next_level each level is one group: a cell attends the context, every coarser level and its own level,
never a finer one; reads its parent's mask (whose bit for the cell's octant is set) at the cell's 3-D centre;
and sampling draws one level per forward. The expected masks, inputs and coordinates here are computed from
the tokenizer's levels and positions, not from arpipe's plan code. A user then runs the paradigm through
tokenize -> train -> sample -> evaluate on brain-surface clouds, and gets one clear line for a store of
another tokenizer.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import BACKGROUND_NICE, BUILD_TIMEOUT_S, arpipe, stage_lines, write
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from realdata import brain_clouds

from arpipe.pipeline.errors import UserError
from arpipe.stages.modalities import OctreeTokenizer, PointCloudReader, TokenizerError
from arpipe.stages.models import (
    ModelConfig,
    OctreePlan,
    Prompt,
    SamplingOptions,
    Transformer,
    VocabLayout,
    attention_mask,
    batch_inputs,
    generate,
    level_inputs,
    make_plan,
    pack_documents,
)
from arpipe.stages.models.vocab import BOS
from arpipe.stages.store import TokenStore

VOCAB = VocabLayout.build({"pointcloud": 256})
P = VOCAB.context_len
CODE_START = VOCAB.code_range("pointcloud")[0]


def octree_levels(tokens: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Each token's level (from the tokenizer's boundaries) and ``(level, x, y, z)`` (its positions)."""
    tok = OctreeTokenizer(depth=depth)
    bounds = tok.level_boundaries(tokens)
    level_N = np.searchsorted(bounds, np.arange(len(tokens)), side="right") - 1
    return level_N, tok.positions(tokens).numpy()


def expected_mask(levels: list[np.ndarray], L: int) -> np.ndarray:
    """The mask of documents packed in one row of ``L`` positions, each ``[context (P), its tree]``: a position
    attends its own document's context and the levels of its tree up to its own; padding only itself."""
    mask = np.eye(L, dtype=bool)
    at = 0
    for level_N in levels:
        n = P + len(level_N)
        doc = np.zeros((n, n), dtype=bool)
        doc[:, :P] = True                                       # everyone reads the context
        doc[P:, P:] = level_N[None, :] <= level_N[:, None]     # coarser levels and one's own, never a finer one
        mask[at:at + n, at:at + n] = doc
        at += n
    return mask


def cloud_strategy():
    return st.integers(1, 6).flatmap(lambda depth: st.tuples(
        arrays(np.float64, st.tuples(st.integers(1, 120), st.just(3)),
               elements=st.floats(-1, 1, allow_nan=False, width=32)), st.just(depth)))


@settings(max_examples=60, deadline=None)
@given(first=cloud_strategy(), second=cloud_strategy())
def test_masks_inputs_and_coordinates_match_the_octree_levels_exactly(first, second):
    docs, levels = [], []
    for xyz, depth in (first, second):
        tokens = OctreeTokenizer(depth=depth).encode_one(xyz)
        level_N, pos_N4 = octree_levels(tokens, depth)
        plan = OctreePlan(depth=depth, n_tokens=len(tokens)).plan_of(tokens)

        assert plan.paradigm == "next_level" and plan.n_groups == depth
        assert plan.group_bounds == OctreeTokenizer(depth=depth).level_boundaries(tokens)
        assert np.array_equal(plan.group_N.numpy(), level_N)
        # (level, cell centre): level l's integer cell q at (q + 0.5) 2^(depth-1-l) - 0.5, the finest level's units
        centre_N3 = (pos_N4[:, 1:] + 0.5) * 2.0 ** (depth - 1 - level_N[:, None]) - 0.5
        assert np.array_equal(plan.coords_NA.numpy(), np.concatenate([level_N[:, None], centre_N3], 1).astype(np.float32))
        # each cell reads its parent's mask, one level up at half the coordinates, with the cell's octant bit set
        source_N = plan.source_N.numpy()
        assert source_N[0] == -1
        parent_N = source_N[1:]
        assert np.array_equal(pos_N4[parent_N, 0], pos_N4[1:, 0] - 1)
        assert np.array_equal(pos_N4[parent_N, 1:], pos_N4[1:, 1:] // 2)
        octant_N = (pos_N4[1:, 1] & 1) << 2 | (pos_N4[1:, 2] & 1) << 1 | (pos_N4[1:, 3] & 1)
        assert ((tokens[parent_N] >> octant_N) & 1).all()

        targets_N = VOCAB.to_global("pointcloud", torch.from_numpy(tokens))
        context_P = torch.tensor(VOCAB.context("pointcloud"))
        one = batch_inputs(plan, targets_N[None], context_P[None])
        inputs_N = one.input_ids[0, P:].numpy()
        assert inputs_N[0] == BOS and np.array_equal(inputs_N[1:], tokens[parent_N] + CODE_START)
        assert np.array_equal(attention_mask(one.group_ids)[0, 0].numpy(), expected_mask([level_N], P + len(tokens)))
        docs.append((plan, targets_N, context_P))
        levels.append(level_N)

    L = sum(P + len(lv) for lv in levels) + 3   # both trees packed in one row, then padding
    row = pack_documents([docs], L)
    assert np.array_equal(attention_mask(row.group_ids, row.doc_ids)[0, 0].numpy(), expected_mask(levels, L))


def test_a_plan_is_refused_for_tokens_that_are_not_a_whole_octree():
    tokens = OctreeTokenizer(depth=3).encode_one(np.random.default_rng(0).uniform(-1, 1, (50, 3)))
    with pytest.raises(ValueError, match="do not form an octree of depth 3: level 2 is cut short"):
        OctreePlan(depth=3, n_tokens=len(tokens)).plan_of(tokens[:-3])
    with pytest.raises(ValueError, match="past the octree's depth"):
        OctreePlan(depth=2, n_tokens=len(tokens)).plan_of(tokens)
    with pytest.raises(ValueError, match="follow each octree's own levels"):
        make_plan("next_level", n_tokens=len(tokens))
    with pytest.raises(ValueError, match="not an octree tokenizer's"):
        OctreePlan.for_layout({"axes": ["t"], "variable_length": True}, 100)


# ---------------------------------------------------------------- a small model trained in-process on brain clouds

DEPTH = 4


def normalized_clouds(folder: Path, count: int, seed: int) -> list[np.ndarray]:
    """Brain-surface clouds as a user's reader gives them (normalized into the unit sphere)."""
    brain_clouds(folder, count=count, points=1024, seed=seed)
    return [s.data for s in sorted(PointCloudReader(str(folder)), key=lambda s: s.key)]


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    folder = tmp_path_factory.mktemp("brain")
    train = normalized_clouds(folder / "train", 24, seed=0)
    heldout = normalized_clouds(folder / "heldout", 6, seed=1)
    tok = OctreeTokenizer(depth=DEPTH)
    return {"tokens": tok.encode_arrays(train), "heldout_tokens": tok.encode_arrays(heldout)}


def level_model(n_tokens: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=VOCAB.vocab_size, n_layer=2, n_head=4, n_embd=64, rope_axes=4,
                                   paradigm="next_level", max_seq_len=P + n_tokens, cond_dropout=0.0))


def fit_level_model(trees: list[np.ndarray], steps: int) -> tuple[Transformer, OctreePlan]:
    """A small next_level model fitted to octree token sequences (each document laid out by its own plan)."""
    capacity = 2 * max(len(t) for t in trees)
    levels = OctreePlan(depth=DEPTH, n_tokens=capacity)
    model = level_model(capacity)
    context = torch.tensor(VOCAB.context("pointcloud"))
    docs = [(levels.plan_of(t), VOCAB.to_global("pointcloud", torch.from_numpy(t)), context) for t in trees]
    L = P + max(len(t) for t in trees)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = pack_documents([[docs[i]] for i in torch.randint(len(docs), (8,), generator=gen).tolist()], L)
        _logits, loss = model(**batch.as_kwargs())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), levels


@pytest.fixture(scope="module")
def trained(brain, single_torch_thread):
    """A small next_level model fitted to the brain clouds for 120 steps."""
    return fit_level_model(brain["tokens"], steps=120)


def heldout_nll(model: Transformer, levels: OctreePlan, trees: list[np.ndarray]) -> float:
    """Teacher-forced nats per token of the trees, as evaluate scores them (``level_inputs``)."""
    total = count = 0.0
    with torch.no_grad():
        for t in trees:
            targets = VOCAB.to_global("pointcloud", torch.from_numpy(t))[None]
            inputs = level_inputs(levels, targets, torch.tensor([VOCAB.context("pointcloud")]), CODE_START)
            logits, _ = model(inputs.input_ids, inputs.coords, inputs.group_ids)
            total += float(torch.nn.functional.cross_entropy(logits[0].double(), inputs.target_ids[0],
                                                             reduction="sum"))
            count += len(t)
    return total / count


def draw_trees(model: Transformer, levels: OctreePlan, n: int, **options) -> tuple:
    prompt = Prompt.from_vocab(VOCAB, "pointcloud", [None] * n)
    out = generate(model, levels, prompt, SamplingOptions(**options), seed=7)
    local = VOCAB.to_local("pointcloud", out.tokens)
    return out, [local[b, :int(out.lengths[b])].numpy() for b in range(n)]


def test_sampling_draws_one_level_per_forward(trained):
    model, levels = trained
    widths = []
    hook = model.register_forward_hook(lambda _m, args, _out: widths.append(int(args[0].shape[1])))
    try:
        out, [tree] = draw_trees(model, levels, 1)
    finally:
        hook.remove()
    # one forward per level: the context and the root first, then exactly the cells of each level
    bounds = OctreeTokenizer(depth=DEPTH).level_boundaries(OctreeTokenizer(depth=DEPTH).trim(tree))
    assert out.forward_passes == len(widths) == DEPTH == int(out.sample_passes[0])
    assert widths == [P + 1] + [bounds[k + 1] - bounds[k] for k in range(1, DEPTH)]

    out, trees = draw_trees(model, levels, 5)
    assert out.forward_passes == DEPTH and out.sample_passes.tolist() == [DEPTH] * 5
    assert [len(t) for t in trees] == out.lengths.tolist()


def test_cached_uncached_and_alone_or_batched_draw_the_same_trees(trained):
    """In float64, where the paths' different reduction orders cannot move a draw across a CDF boundary."""
    model, levels = trained
    model = copy.deepcopy(model).double()
    out, trees = draw_trees(model, levels, 4)
    _, uncached = draw_trees(model, levels, 4, use_cache=False)
    assert all(np.array_equal(a, b) for a, b in zip(trees, uncached))
    alone = generate(model, levels, Prompt.from_vocab(VOCAB, "pointcloud", [None]), seed=7, sample_indices=[2])
    assert np.array_equal(VOCAB.to_local("pointcloud", alone.tokens[0, :int(alone.lengths[0])]).numpy(), trees[2])


def test_guidance_runs_level_by_level_with_or_without_the_cache():
    """Class-conditional CFG ramped over the levels: the conditional and unconditional rows of a sample share its
    tree (an untrained model in float64, whose masks are near uniform: trees of every size)."""
    vocab = VocabLayout.build({"pointcloud": 256}, classes=["inner", "outer"])
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=vocab.vocab_size, n_layer=2, n_head=4, n_embd=32, rope_axes=4,
                                    paradigm="next_level", max_seq_len=P + 585)).double().eval()
    levels = OctreePlan(depth=4, n_tokens=585)   # 1 + 8 + 64 + 512: room for any tree of depth 4
    prompt = Prompt.from_vocab(vocab, "pointcloud", ["inner", "outer", "inner"])
    drawn = [generate(model, levels, prompt, SamplingOptions(cfg_scale=3.0, cfg_schedule="linear", use_cache=cache),
                      seed=1) for cache in (True, False)]
    assert all(d.forward_passes == 4 for d in drawn)
    assert torch.equal(drawn[0].lengths, drawn[1].lengths) and torch.equal(drawn[0].tokens, drawn[1].tokens)
    tok = OctreeTokenizer(depth=4)
    for b in range(3):
        tree = vocab.to_local("pointcloud", drawn[0].tokens[b, :int(drawn[0].lengths[b])]).numpy()
        if tree.min() > 0:   # a tree without an empty mask closes at the leaves
            assert len(tok.trim(tree)) == len(tree)


def test_each_drawn_level_has_the_probability_training_gives_it(trained):
    """Sampling and training use one factorization: the log-probabilities the sampler drew each tree's tokens with
    are the teacher-forced ones of the tree's own plan (masks, inputs and coordinates included)."""
    model, levels = trained
    out, trees = draw_trees(model, levels, 3)
    lo, hi = VOCAB.code_range("pointcloud")
    for b, tree in enumerate(trees):
        targets = VOCAB.to_global("pointcloud", torch.from_numpy(tree))[None]
        inputs = level_inputs(levels, targets, torch.tensor([VOCAB.context("pointcloud")]), CODE_START)
        with torch.no_grad():
            logits, _ = model(inputs.input_ids, inputs.coords, inputs.group_ids)
        logp_N = logits[0, P:, lo:hi].double().log_softmax(-1).gather(-1, torch.from_numpy(tree)[:, None]).squeeze(1)
        assert torch.allclose(logp_N, out.logprobs[b, :len(tree)], atol=1e-5)


def test_a_trained_model_scores_and_draws_brain_clouds_where_an_untrained_one_fails(brain, trained):
    """Both checks fail on noise: an untrained model (near-uniform masks) and uniform random clouds."""
    from arpipe.stages.evaluation.metrics import mmd

    model, levels = trained
    untrained = level_model(levels.n_tokens, seed=1).eval()
    # held-out NLL below the cross-entropy of the mask frequencies alone (a model that knows no structure)
    counts = np.bincount(np.concatenate(brain["tokens"]), minlength=256) + 0.5
    unigram = float(-np.log(counts / counts.sum())[np.concatenate(brain["heldout_tokens"])].mean())
    nll, noise_nll = (heldout_nll(m, levels, brain["heldout_tokens"]) for m in (model, untrained))
    assert nll < unigram <= noise_nll, (nll, unigram, noise_nll)

    # drawn clouds nearer the held-out clouds (voxelized, as evaluate decodes its reference) by Chamfer MMD than
    # halfway from the training clouds to uniform noise
    tok = OctreeTokenizer(depth=DEPTH)

    def clouds(m: Transformer) -> list[np.ndarray]:
        found = []
        for tree in draw_trees(m, levels, 8)[1]:
            try:
                found.append(tok.decode_one(tok.trim(tree)))
            except TokenizerError:   # a tree that does not close is no cloud
                continue
        return found

    reference = tok.decode_arrays(brain["heldout_tokens"])
    uniform = [np.random.default_rng(k).uniform(-0.7, 0.7, (500, 3)).astype(np.float32) for k in range(8)]
    halfway = (mmd(tok.decode_arrays(brain["tokens"][:8]), reference) + mmd(uniform, reference)) / 2
    drawn, noise = clouds(model), clouds(untrained)
    assert len(drawn) >= 6 and mmd(drawn, reference) < halfway, (len(drawn), mmd(drawn, reference), halfway)
    assert not noise or mmd(noise, reference) >= halfway


# ---------------------------------------------------------------- through the pipeline

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TINY = ("stages.data.config.clouds=10", "stages.data.config.heldout=3", "stages.data.config.points=512",
        "stages.tokenizer.fit.heldout=2", "stages.tokenizer.tokenizer.depth=3",
        "stages.train_level.steps=6", "stages.train_level.checkpoint_every=6", "stages.train_level.eval_every=6",
        "stages.train_level.global_batch=4", "stages.sample_level.num_samples=6", "stages.sample_level.batch_size=3")


def build_project(root: Path, ray_address: str) -> Path:
    """examples/point_clouds_levels.yaml with tiny budgets (octree depth 3), its next_level branch: tokenize ->
    train -> sample -> evaluate (the next_token branch is the point_clouds example's, tested with it)."""
    for name in ("point_clouds_levels.yaml", "point_clouds_steps.py"):
        shutil.copy(EXAMPLES / name, root / name)
    run = arpipe("run", "point_clouds_levels.yaml", *[a for o in TINY for a in ("-s", o)], "--until",
                 "evaluate_level", cwd=root, env={"RAY_ADDRESS": ray_address}, timeout=BUILD_TIMEOUT_S, check=True,
                 nice=BACKGROUND_NICE)
    states = {stage: seen[-1] for stage, seen in stage_lines(run.stdout).items()}
    assert states == {stage: "done" for stage in ("data", "tokenizer", "clouds", "clouds_heldout", "train_level",
                                                  "sample_level", "evaluate_level")}, run.stdout
    return root


BUILT_IN_BACKGROUND = {"next-level-example": build_project}


@pytest.fixture(scope="module")
def example(background):
    return background.result("next-level-example")


def test_the_example_trains_next_level_samples_a_level_per_forward_and_scores_it(example):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{example / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("point-clouds-levels").experiment_id

    def logged(stage: str) -> dict[str, float]:
        return client.search_runs([experiment], filter_string=f"tags.`arpipe.stage` = '{stage}'")[0].data.metrics

    assert {f"heldout/level_{k}/loss" for k in range(3)} <= set(logged("train_level"))   # each octree level's
    sample = logged("sample_level")
    assert sample["forward_passes"] == 2 * 3          # two batches of 3 samples, one forward per level of 3
    assert sample["samples"] + sample["rejects"] == 6
    assert len(list(example.glob("arpipe-runs/sample_level/*/media/pointcloud/*.ply"))) == sample["samples"]
    [found] = example.glob("arpipe-runs/evaluate_level/*/metrics/metrics.json")
    metrics = json.loads(found.read_text())["metrics"]
    assert 0 < metrics["heldout/nll_per_token"] < 2 * math.log(256), metrics
    assert metrics["heldout/tokens"] == sum(TokenStore.open(str(p)).lengths().sum()
                                            for p in example.glob("arpipe-runs/clouds_heldout/*/store"))
    assert {f"pointcloud/{m}_{d}" for m in ("mmd", "cov", "1nna") for d in ("cd", "emd")} <= set(metrics)


def test_next_level_on_a_store_of_another_tokenizer_is_one_clear_line(tmp_path):
    write(tmp_path, {"bad.yaml": """
        name: bad
        storage: ./runs
        stages:
          tok:
            kind: tokenizer
            source: {modality: image, uri: ./digits, channels: 1, size: 8}
            tokenizer: {type: patch_vq, input_shape: [1, 8, 8], patch: [2, 2], codebook_size: 16}
          digits:
            kind: tokenize
            source: {modality: image, uri: ./digits, channels: 1, size: 8}
            tokenizer: ${tok.tokenizer}
          train:
            kind: train
            data: [{store: "${digits.store}"}]
            model: {paradigm: next_level}
        """})
    run = arpipe("validate", "bad.yaml", cwd=tmp_path)
    output = run.stdout + run.stderr
    assert run.returncode == 2 and "Traceback" not in output, output
    [line] = [ln for ln in output.splitlines() if ln.strip()]
    assert "bad.yaml:" in line and "stages.train" in line
    assert "paradigm next_level predicts octree tokens level by level, but ${digits.store} holds patch_vq tokens" in line
    assert "tokenizer: {type: octree}" in line


def test_the_trainer_refuses_a_store_laid_out_otherwise_naming_it():
    """A store from elsewhere (no tokenize stage in the pipeline to read) is refused when the trainer lays it out."""
    from arpipe.stages.train.data import Documents, StoreSummary

    codec = StoreSummary(uri="s3://bucket/jpegs", modality="image", vocab_size=257,
                         layout={"axes": ["t"], "variable_length": True, "codec": "jpeg"}, tokenizer_digest=None,
                         tokenizer_uri=None, samples=3, max_tokens=900, labels=[])
    with pytest.raises(UserError) as caught:
        Documents(None, [codec], ["image"], VocabLayout.build({"image": 257}), paradigm="next_level", block_size=1,
                  n_axes=4, seq_len=902)
    assert caught.value.where == "s3://bucket/jpegs"
    assert "next_level predicts octree tokens level by level" in str(caught.value)
