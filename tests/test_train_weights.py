"""Which weights a trained model holds: DeepSpeed's fp32 master weights under bf16, and their EMA beside them.

One `arpipe run` (a module fixture: niced in the background it starved behind the suite) trains a digits model in bf16 under ZeRO-3
on 2 workers with `ema:` (the sample stage's choice of weights is checked in test_models_registry.py); the
other tests are
cheap: the EMA's arithmetic, its checkpoint round trip and its partitioned shares, and the model folder's
choice of weights. That an EMA resumed after `kill -9` equals an uninterrupted run's bitwise is the train
kill campaign's check (`tests/faults/kinds.py`: its stage keeps an EMA, and every file of `model/` is
compared with the undisturbed run's).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import arpipe, stage_lines, write
from realdata import digits_folder
from test_train_stage import DATA, train_block

from arpipe.pipeline.errors import UserError
from arpipe.stages.train.ema import Ema, Share, merge, whole_shares

STEPS, EVERY, DECAY = 6, 3, 0.75

def build_project(folder: Path, ray_address: str) -> Path:
    """A digits model trained 6 steps in bf16 under ZeRO-3 on 2 workers with an EMA updated every 3 steps
    (checkpoints at steps 3 and 6, both kept)."""
    digits_folder(folder / "data" / "digits", count=300)
    digits_folder(folder / "data" / "heldout", count=16, start=1500)
    pipeline = DATA.format(name="weights") + train_block(
        "train", zero=3, workers=2, steps=STEPS, every=EVERY, extra=", precision: bf16",
        more=f"    ema: {{decay: {DECAY}, every: {EVERY}}}\n")
    write(folder, {"weights.yaml": pipeline})
    run = arpipe("run", "weights.yaml", cwd=folder, env={"RAY_ADDRESS": ray_address}, timeout=900, check=True)
    assert all(states[-1] == "done" for states in stage_lines(run.stdout).values()), run.stdout
    return folder


@pytest.fixture(scope="module")
def project(tmp_path_factory, ray_cluster) -> Path:
    return build_project(tmp_path_factory.mktemp("weights"), ray_cluster)


def checkpoints(folder: Path) -> dict[int, Path]:
    """The train stage's kept Ray Train checkpoints, by step (DeepSpeed's `latest` tag names it)."""
    found = folder.glob("runs/train/*/.arpipe/ray/train/checkpoint_*")
    return {int((c / "latest").read_text().strip().removeprefix("step")): c for c in found if (c / "latest").exists()}


@pytest.mark.full   # a 2-worker ZeRO-3 bf16 run: `make test-full`
def test_bf16_training_saves_deepspeed_fp32_master_weights_not_bf16_values(project):
    """model.safetensors is what DeepSpeed's zero_to_fp32 consolidates from the final checkpoint, and its values
    are fp32 ones: before, the bf16 module weights were saved upcast, every value a bf16 value."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    final = checkpoints(project)[STEPS]
    master = get_fp32_state_dict_from_zero_checkpoint(str(final), tag=f"step{STEPS:08d}")
    saved = load_file(str(next(project.glob("runs/train/*/model")) / "model.safetensors"))
    assert saved.keys() == master.keys()
    for name, tensor in saved.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, master[name]), name
    upcast = [name for name, t in saved.items() if torch.equal(t, t.bfloat16().float())]
    assert len(upcast) < len(saved) / 2, f"bf16 values saved as fp32: {upcast}"


@pytest.mark.full   # a 2-worker ZeRO-3 bf16 run: `make test-full`
def test_the_ema_of_zero_3_partitions_is_merged_beside_the_raw_weights(project):
    """ema.safetensors continues the EMA the ranks checkpointed at step 3 (their partitions, merged) by one update
    towards the final master weights, is recorded in config.json, and differs from the raw weights."""
    import json

    from safetensors.torch import load_file

    model = next(project.glob("runs/train/*/model"))
    assert "ema.safetensors" in json.loads((model / "config.json").read_text())["files"]
    raw, ema = load_file(str(model / "model.safetensors")), load_file(str(model / "ema.safetensors"))
    at_3 = merge(sorted(checkpoints(project)[EVERY].glob("ema-rank*.safetensors")))
    assert ema.keys() == raw.keys() == at_3.keys()
    for name in raw:
        expected = at_3[name].view_as(raw[name]).lerp(raw[name], 1 - DECAY)
        assert torch.allclose(ema[name], expected, rtol=0, atol=1e-6), name
    assert any(not torch.equal(ema[n], raw[n]) for n in raw)


def test_the_ema_follows_torchs_averaged_model_and_resumes_bitwise():
    """decay x ema + (1 - decay) x weights from the initial weights, as AveragedModel with get_ema_multi_avg_fn;
    saved and read back mid-way, it goes on exactly as the uninterrupted one."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    averaged.update_parameters(model)   # its first update copies the weights: the EMA starts from them
    ema = Ema(whole_shares(model.named_parameters()), decay=0.9, every=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    states = []
    for step in range(1, 9):
        optimizer.zero_grad()
        model(torch.randn(4, 5)).square().mean().backward()
        optimizer.step()
        if ema.due(step):
            ema.update(whole_shares(model.named_parameters()))
            averaged.update_parameters(model)
            states.append(ema.state())
    assert len(states) == 4
    expected = dict(zip((n for n, _ in model.named_parameters()), averaged.module.parameters()))
    for name, values in ema.state().items():
        assert torch.equal(values, expected[name].detach().reshape(-1)), name
    assert any(not torch.equal(values, p.detach().reshape(-1)) for (_, p), values
               in zip(model.named_parameters(), ema.state().values()))


def test_an_ema_checkpoint_reads_back_bitwise_even_on_other_ranks(tmp_path):
    """Shares as ZeRO-3 lays them out (a padded partition per rank, 3 ranks over 10 elements) are saved per rank,
    merged into whole parameters, and read back by each rank exactly, also by ranks that divide differently."""
    torch.manual_seed(1)
    whole = {"w": torch.randn(10), "b": torch.randn(3)}
    moved = {k: v + 0.5 for k, v in whole.items()}

    def shares(values: dict[str, torch.Tensor], rank: int, world: int) -> list[Share]:
        out = []
        for name, v in values.items():
            size = -(-v.numel() // world)
            start = rank * size
            if start < v.numel():
                out.append(Share(name, start, v.numel(), v[start:start + size]))
        return out

    ranks = [Ema(shares(whole, r, 3), decay=0.5) for r in range(3)]
    for r, ema in enumerate(ranks):
        ema.update(shares(moved, r, 3))
        ema.save(tmp_path, r)
    merged = merge(sorted(tmp_path.glob("ema-rank*.safetensors")))
    reference = Ema(whole_shares(whole.items()), decay=0.5)
    reference.update(whole_shares(moved.items()))
    assert merged.keys() == reference.state().keys()
    for name, values in reference.state().items():
        assert torch.equal(merged[name], values), name
    for world in (3, 2):   # the same layout, then another number of ranks
        for r in range(world):
            again = Ema(shares(whole, r, world), decay=0.5)
            again.load(tmp_path, r)
            for share in again.shares:
                assert torch.equal(share.values, merged[share.name][share.start:share.start + share.values.numel()])
    (tmp_path / "ema-rank1.safetensors").unlink()
    with pytest.raises(ValueError, match="a rank's file is missing"):
        merge(sorted(tmp_path.glob("ema-rank*.safetensors")))


def test_a_model_folder_loads_its_ema_by_default_and_refuses_an_ema_it_lacks(tmp_path):
    """open_model takes ema.safetensors when the folder has it (tied embeddings stored once, as in
    model.safetensors), raw weights on request or when it has none; asking for an EMA it lacks is one clear
    error, which the sample stage raises before its actors start."""
    from safetensors import safe_open

    from arpipe.stages.models import Transformer, VocabLayout, preset, save_model
    from arpipe.stages.models.folder import choose_weights, open_model
    from arpipe.stages.models.io import load_model, verify_files

    vocab = VocabLayout.build({"image": 16})
    config = preset("tiny", vocab_size=vocab.vocab_size, n_layer=1, n_embd=16, n_head=2, max_seq_len=8,
                    tie_embeddings=True)
    torch.manual_seed(0)
    model = Transformer(config)
    ema = {k: v + 1.0 for k, v in model.state_dict().items()}
    save_model(tmp_path / "with", model, vocab=vocab, ema=ema)
    save_model(tmp_path / "without", model, vocab=vocab)
    verify_files(tmp_path / "with")
    with safe_open(str(tmp_path / "with" / "ema.safetensors"), "pt") as f:
        assert "head.weight" not in f.keys()
    averaged = load_model(tmp_path / "with", weights="ema")
    assert averaged.head.weight is averaged.tok_emb.weight
    assert torch.equal(averaged.tok_emb.weight, model.tok_emb.weight + 1.0)
    assert choose_weights(tmp_path / "with", None, where="w") == "ema"
    assert choose_weights(tmp_path / "without", None, where="w") == "raw"
    with pytest.raises(UserError, match="has no EMA weights"):
        choose_weights(tmp_path / "without", "ema", where="stages.draw.weights")
    for folder, weights, shift in (("with", None, 1.0), ("with", "raw", 0.0), ("without", None, 0.0)):
        opened = open_model(str(tmp_path / folder), weights=weights, check_weights=False)
        assert opened.weights == ("ema" if shift else "raw")
        assert torch.equal(opened.model.norm.weight, model.norm.weight + shift)
