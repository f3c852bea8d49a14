"""TokenUnify's mixed objective (``objective:`` of a train stage) against its definition.

Each document of a batch is trained under one of three objectives: random-token prediction (a share of its
tokens hidden, predicted from all the others), next-token prediction, next-all-token prediction (every token
after a cut at once, from the tokens before it). The checks here read what the model is given and what it is
scored on, and what its predictions can depend on, with scikit-learn's digits (8x8, 4 grey levels) as tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_models_sampling import VOCAB

from arpipe.stages.models import (
    MASK,
    ModelConfig,
    ObjectiveMix,
    Transformer,
    batch_inputs,
    make_plan,
    mix_objectives,
    pack_documents,
)

PLAN = make_plan("next_token", grid=(8, 8), n_axes=3)


def digit_tokens(count: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` real digits as 64 tokens of 4 grey levels each, and their class contexts."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    lo, _hi = VOCAB.code_range("image")
    levels = np.minimum(digits.images[start:start + count] / 16 * 4, 3).astype(np.int64).reshape(count, 64)
    context = torch.tensor([VOCAB.context("image", str(int(y) % 4)) for y in digits.target[start:start + count]])
    return lo + torch.from_numpy(levels), context


def objective_of(before, after, b: int, pos: torch.Tensor) -> str:
    """Which objective a document was given, read from what the model now sees and is scored on."""
    if len(pos) > 1 and bool((after.group_ids[b, pos] == after.group_ids[b, pos[0]]).all()):
        return "random_token"
    if torch.equal(after.input_ids[b, pos], before.input_ids[b, pos]) and \
            torch.equal(after.target_ids[b, pos], before.target_ids[b, pos]):
        return "next_token"
    return "next_all"


def documents(inputs) -> list[tuple[int, torch.Tensor]]:
    docs = inputs.doc_ids if inputs.doc_ids is not None else torch.zeros_like(inputs.target_ids)
    found = []
    for b in range(inputs.target_ids.shape[0]):
        scored = inputs.target_ids[b] != -100
        for d in torch.unique(docs[b][scored]).tolist():
            found.append((b, torch.nonzero(scored & (docs[b] == d)).squeeze(1)))
    return found


@pytest.mark.parametrize("packed", [False, True])
def test_every_batch_gives_each_objective_its_weight_within_2_percent(packed):
    targets, context = digit_tokens(64 * 20)
    mix = ObjectiveMix(random_token=0.2, next_token=0.5, next_all=0.3)
    shares = []
    for k in range(20):
        rows = range(64 * k, 64 * (k + 1))
        if packed:   # 4 digits to a row, 16 rows: the share is of documents, wherever they sit
            before = pack_documents([[(PLAN, targets[i], context[i]) for i in rows[j:j + 4]]
                                     for j in range(0, 64, 4)], seq_len=4 * 66)
        else:
            before = batch_inputs(PLAN, targets[rows.start:rows.stop], context[rows.start:rows.stop])
        after = mix_objectives(before, mix, torch.Generator().manual_seed(k))
        kinds = [objective_of(before, after, b, pos) for b, pos in documents(before)]
        assert len(kinds) == 64
        shares.append([kinds.count(o) / 64 for o in ("random_token", "next_token", "next_all")])
    shares = np.array(shares)
    assert np.abs(shares - np.array(mix.weights)).max() <= 0.02, shares
    # the documents drawn for each objective change from batch to batch
    assert len({tuple(objective_of(before, after, b, p) for b, p in documents(before)[:8])
                for before, after in [(batch_inputs(PLAN, targets[:64], context[:64]),
                                       mix_objectives(batch_inputs(PLAN, targets[:64], context[:64]), mix,
                                                      torch.Generator().manual_seed(s))) for s in range(5)]}) > 1


def test_next_all_scores_every_token_after_a_cut_and_hides_them_from_the_inputs():
    targets, context = digit_tokens(300)
    before = batch_inputs(PLAN, targets, context)
    after = mix_objectives(before, ObjectiveMix(random_token=0, next_token=0, next_all=1),
                           torch.Generator().manual_seed(0))
    cuts = []
    for b in range(300):
        scored = after.target_ids[b, 2:] != -100
        cut = int(torch.nonzero(scored)[0])
        cuts.append(cut)
        assert bool(scored[cut:].all()) and not bool(scored[:cut].any())   # every token from the cut on
        assert torch.equal(after.target_ids[b, 2:][cut:], targets[b, cut:])
        assert bool((after.input_ids[b, 2:][cut + 1:] == MASK).all())      # nothing after the cut is read
        assert torch.equal(after.input_ids[b, :2 + cut + 1], before.input_ids[b, :2 + cut + 1])
    assert torch.equal(after.group_ids, before.group_ids)                  # causal attention stays
    assert min(cuts) == 0 and max(cuts) >= 60 and abs(np.mean(cuts) - 31.5) < 3   # cut ~ U{0..63}


def test_random_token_hides_a_cosine_share_and_scores_only_it_with_attention_both_ways():
    targets, context = digit_tokens(400)
    before = batch_inputs(PLAN, targets, context)
    after = mix_objectives(before, ObjectiveMix(random_token=1, next_token=0), torch.Generator().manual_seed(1))
    counts = []
    for b in range(400):
        scored = after.target_ids[b, 2:] != -100
        hidden = torch.nonzero(scored).squeeze(1)
        counts.append(len(hidden))
        # the input that holds token j is target j + 1's (next-token layout): masked for each hidden j
        holders = hidden[hidden < 63] + 1
        assert bool((after.input_ids[b, 2:][holders] == MASK).all())
        assert int((after.input_ids[b, 3:] == MASK).sum()) == len(holders)   # (target 0 reads BOS: MASK's id)
        assert len(set(after.group_ids[b, 2:].tolist())) == 1                # one bidirectional group
    # MaskGIT's law for the count: P(hidden <= m) = 1 - (2 / pi) acos(m / 64)
    m = np.arange(1, 65)
    observed = (np.array(counts)[:, None] <= m[None, :]).mean(0)
    assert np.max(np.abs(observed - (1 - 2 / np.pi * np.arccos(m / 64)))) < 0.08


@pytest.mark.parametrize("kind", ["random_token", "next_all"])
def test_what_a_scored_position_predicts_it_cannot_see(kind):
    """Changing the hidden tokens leaves the logits at the scored positions exactly as they were; changing a
    token the objective shows changes them (random-token prediction sees tokens on both sides)."""
    targets, context = digit_tokens(16)
    mix = ObjectiveMix(**{"random_token": 0, "next_token": 0, kind: 1})
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=VOCAB.vocab_size, n_layer=2, n_head=4, n_embd=32, rope_axes=3,
                                    max_seq_len=70, init_std=0.3)).double().eval()
    after = mix_objectives(batch_inputs(PLAN, targets, context), mix, torch.Generator().manual_seed(3))
    scored = after.target_ids[:, 2:] != -100
    lo, _hi = VOCAB.code_range("image")
    changed = torch.where(scored, lo + (targets - lo + 1) % 4, targets)        # every scored token changed
    again = mix_objectives(batch_inputs(PLAN, changed, context), mix, torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, _ = model(**after.as_kwargs())
        logits2, _ = model(**again.as_kwargs())
    at = torch.nn.functional.pad(scored, (2, 0))
    assert torch.equal(logits[at], logits2[at])
    # a shown token does reach them: for random-token prediction one after the position (attention both
    # ways), for next-all the last one before the cut
    first_B = scored.float().argmax(1)
    if kind == "random_token":
        b, j = next((b, j) for b in range(16) for j in range(62, int(first_B[b]), -1) if not scored[b, j])
    else:
        b = int(torch.nonzero(first_B > 0)[0])
        j = int(first_B[b]) - 1
    shown = targets.clone()
    shown[b, j] = lo + (targets[b, j] - lo + 1) % 4
    third = mix_objectives(batch_inputs(PLAN, shown, context), mix, torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits3, _ = model(**third.as_kwargs())
    assert not torch.equal(logits[b, 2 + int(first_B[b])], logits3[b, 2 + int(first_B[b])])


def test_all_weight_on_next_token_is_plain_next_token_training_bit_for_bit():
    targets, context = digit_tokens(256)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    before = batch_inputs(PLAN, targets, context)
    assert mix_objectives(before, ObjectiveMix(random_token=0, next_token=3, next_all=0), gen) is before
    assert torch.equal(gen.get_state(), state)   # nothing drawn: what follows in the loop is unchanged

    def train(mix: ObjectiveMix | None) -> Transformer:
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=VOCAB.vocab_size, n_layer=1, n_head=2, n_embd=32, rope_axes=3,
                                        max_seq_len=70))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(1)
        for _ in range(15):
            idx = torch.randint(0, 256, (16,), generator=g)
            inputs = batch_inputs(PLAN, targets[idx], context[idx])
            if mix is not None:
                inputs = mix_objectives(inputs, mix, g)
            _, loss = model(**inputs.as_kwargs())
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model

    plain, same, mixed = train(None), train(ObjectiveMix(0, 1, 0)), train(ObjectiveMix(0.3, 0.4, 0.3))
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), same.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), mixed.state_dict().values()))


def test_objective_weights_that_do_not_sum_to_a_positive_number_are_refused():
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        ObjectiveMix(0, 0, 0)
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        ObjectiveMix(-1, 2, 0)


def test_em_tokenunify_example_trains_both_models_and_next_token_weight_alone_is_the_plain_model(tmp_path,
                                                                                                 ray_cluster):
    """examples/em_tokenunify.yaml with tiny budgets, and beside its two models a third whose objective puts all
    the weight on next-token prediction: its weights equal the plain model's bit for bit. The mixed model is
    sampled and its held-out next-token NLL reported, as the plain model's is. The mixed model trains with its
    blocks compiled (`compile: true`)."""
    import json
    import shutil

    from helpers import arpipe, stage_lines
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    examples = Path(__file__).resolve().parent.parent / "examples"
    for name in ("em_tokenunify.yaml", "em_volume_steps.py"):
        shutil.copy(examples / name, tmp_path / name)
    text = (tmp_path / "em_tokenunify.yaml").read_text()
    plain = text[text.index("  train:  "):text.index("  train_unify:")]
    same = plain.replace("  train:  ", "  train_same:").replace(
        "    model: {preset: tiny, paradigm: next_token}\n",
        "    model: {preset: tiny, paradigm: next_token}\n    objective: {next_token: 1}\n")
    (tmp_path / "unify.yaml").write_text(text.replace("  sample:\n", same + "  sample:\n"))
    steps = [a for s in ("train", "train_unify", "train_same") for a in
             ("-s", f"stages.{s}.steps=6", "-s", f"stages.{s}.eval_every=6", "-s", f"stages.{s}.checkpoint_every=6")]
    compiled = ["-s", "stages.train_unify.compile=true"]   # its blocks compiled by torch.compile too
    run = arpipe("run", "unify.yaml", *steps, *compiled, "-s", "stages.sample.num_samples=2", cwd=tmp_path,
                 env={"RAY_ADDRESS": ray_cluster}, timeout=600)
    states = {s: st[-1] for s, st in stage_lines(run.stdout).items()}
    assert run.returncode == 0 and set(states.values()) == {"done"}, run.stdout + run.stderr

    def weights(stage: str) -> dict:
        [folder] = [p for p in (tmp_path / "arpipe-runs" / stage).glob("*/model") if p.is_dir()]
        return load_file(str(folder / "model.safetensors"))

    base, same_w, mixed = weights("train"), weights("train_same"), weights("train_unify")
    assert base.keys() == same_w.keys() and all(torch.equal(base[k], same_w[k]) for k in base)
    assert not all(torch.equal(base[k], mixed[k]) for k in base)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("em-tokenunify")
    runs = {r.data.tags["arpipe.stage"]: r for r in client.search_runs([exp.experiment_id]) if "arpipe.stage" in r.data.tags}
    assert runs["train_unify"].data.params["objective.next_all"] == "0.2"
    assert runs["train_unify"].data.tags["arpipe.compile"] == "blocks" and "compile:" not in run.stdout
    for stage in ("train", "train_unify"):
        assert 0 < runs[stage].data.metrics["heldout_loss"] < np.log(128 + 8)
    [metrics_file] = (tmp_path / "arpipe-runs" / "evaluate").glob("*/metrics/metrics.json")
    assert 0 < json.loads(metrics_file.read_text())["metrics"]["heldout/nll_per_token"] < np.log(128 + 8)


@pytest.mark.parametrize(("objective", "says"), [
    ("{random_token: 0, next_token: 0, next_all: 0}", "the objective weights sum to 0; give at least one of "
                                                      "random_token, next_token, next_all a positive weight"),
    ("{next_token: -1}", "objective.next_token: input should be greater than or equal to 0, got -1"),
    ("{next_token: 1}\n    model: {paradigm: next_scale}", "objective mixes next-token objectives (TokenUnify); "
                                                            "this model is next_scale"),
])
def test_a_bad_objective_is_one_line_naming_the_stage(tmp_path, objective, says):
    from helpers import arpipe

    (tmp_path / "p.yaml").write_text(f"""name: bad
stages:
  train:
    kind: train
    data: [{{store: ./store}}]
    objective: {objective}
""")
    run = arpipe("validate", "p.yaml", cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    [line] = run.stderr.strip().splitlines()
    assert line.startswith("arpipe: error: p.yaml:") and "stages.train" in line and says in line, line
