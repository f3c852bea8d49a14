"""Model configs, presets, the vocabulary and the saved-model format, as a trainer and a sampler see them."""

from __future__ import annotations

import json

import pytest
import torch

from arpipe.stages.models import (
    NULL,
    PRESET_SIZES,
    PRESETS,
    ModelConfig,
    Transformer,
    VocabLayout,
    count_parameters,
    drop_conditions,
    load_config,
    load_model,
    load_vocab,
    preset,
    save_model,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.mark.parametrize("name", ["tiny", "small", "1b", "3b"])
def test_preset_parameter_count_matches_its_name(name):
    config = preset(name)
    with torch.device("meta"):
        model = Transformer(config)
    n = model.num_params()
    assert n == count_parameters(config)
    assert abs(n - PRESET_SIZES[name]) <= 0.10 * PRESET_SIZES[name], f"{name}: {n / 1e6:.1f}M parameters"
    assert config.n_embd % config.n_head == 0


def test_presets_validate_and_take_overrides():
    for name in PRESETS:
        preset(name).validate()
    c = preset("tiny", vocab_size=300, paradigm="next_block", block_size=4)
    assert (c.vocab_size, c.paradigm, c.block_size, c.n_embd) == (300, "next_block", 4, 128)
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        preset("huge")


@pytest.mark.parametrize("changes, message", [
    (dict(n_head=3), r"n_head \(3\) does not divide n_embd \(128\)"),
    (dict(paradigm="next_pixel"), "paradigm 'next_pixel' is unknown"),
    (dict(block_size=4), "block_size 4 applies to next_block only"),
    (dict(n_head=32, rope_axes=4), "fewer than rope_axes"),
    (dict(cond_dropout=1.0), r"cond_dropout must lie in \[0, 1\)"),
    (dict(n_layer=0), "n_layer must be >= 1"),
])
def test_validate_names_the_problem_and_the_fix(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**changes).validate()


def test_validate_checks_data_against_the_vocabulary_and_sequence_length():
    config = ModelConfig(vocab_size=100, max_seq_len=64)
    config.validate(max_token=99, seq_len=64)
    with pytest.raises(ValueError, match="the data holds token 100 but vocab_size is 100; raise vocab_size to at least 101"):
        config.validate(max_token=100)
    with pytest.raises(ValueError, match="raise max_seq_len to at least 65"):
        config.validate(seq_len=65)
    with pytest.raises(ValueError, match="invalid model config"):
        Transformer(ModelConfig(n_head=5))


def test_model_args_round_trip_through_json():
    config = preset("small", paradigm="next_scale", checkpointing=True, rope_theta=50.0)
    again = ModelConfig.from_json(json.dumps(json.loads(config.to_json())))
    assert again == config
    with pytest.raises(ValueError, match=r"unknown model_args \['n_embed'\]"):
        ModelConfig.from_dict({**config.to_dict(), "n_embed": 3})


def test_vocabulary_maps_modalities_and_round_trips():
    vocab = VocabLayout.build({"image": 512, "volume": 64}, classes=range(10))
    assert vocab.vocab_size == 4 + 2 + 10 + 512 + 64
    img = torch.tensor([0, 511])
    g = vocab.to_global("image", img)
    assert vocab.modality_of(int(g[0])) == "image" and vocab.modality_of(vocab.tag("image")) is None
    assert torch.equal(vocab.to_local("image", g), img)
    vol = vocab.to_global("volume", torch.tensor([0, 63]))
    assert int(vol[0]) == int(g[1]) + 1 and vocab.modality_of(int(vol[1])) == "volume"
    assert vocab.context("image", 3) == [vocab.tag("image"), vocab.class_token("3")]
    assert vocab.context("volume") == [vocab.tag("volume"), NULL]
    assert VocabLayout.from_json(vocab.to_json()) == vocab
    ranges = vocab.ranges()
    assert ranges[-1] == {"name": "volume", "start": vocab.code_range("volume")[0], "stop": vocab.vocab_size}
    with pytest.raises(ValueError, match=r"image codes must lie in \[0, 512\)"):
        vocab.to_global("image", torch.tensor([512]))
    with pytest.raises(ValueError, match="modality 'video' is not in this vocabulary"):
        vocab.tag("video")
    with pytest.raises(ValueError, match="label 11 is not a class"):
        vocab.class_token(11)


def test_condition_dropout_drops_whole_documents_at_the_given_rate():
    vocab = VocabLayout.build({"image": 16}, classes=range(4))
    cls = vocab.class_token(2)
    row = torch.tensor([vocab.tag("image"), cls, 1, 30, 31, vocab.tag("image"), cls, 1, 32, 33])
    ids = row.repeat(4000, 1)
    docs = torch.tensor([0] * 5 + [1] * 5).repeat(4000, 1)
    out = drop_conditions(ids, vocab, 0.1, doc_ids_BL=docs, generator=torch.Generator().manual_seed(0))
    dropped = out == NULL
    assert torch.equal(out[~dropped], ids[~dropped])
    assert dropped[:, [0, 2, 3, 4, 5, 7, 8, 9]].sum() == 0  # only class tokens change
    rate = dropped[:, [1, 6]].float().mean().item()
    assert 0.09 < rate < 0.11
    assert not torch.equal(dropped[:, 1], dropped[:, 6])  # each document draws on its own
    assert torch.equal(drop_conditions(ids, vocab, 0.0), ids)


def test_saved_model_reloads_with_identical_outputs_and_no_pickle(tmp_path):
    vocab = VocabLayout.build({"image": 32}, classes=["cat", "dog"])
    for tie in (False, True):
        config = ModelConfig(vocab_size=vocab.vocab_size, n_layer=2, n_head=2, n_embd=32, tie_embeddings=tie)
        model = Transformer(config).eval()
        folder = save_model(tmp_path / f"m{tie}", model, vocab=vocab)
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
        assert load_config(folder) == config and load_vocab(folder) == vocab
        again = load_model(folder)
        ids = torch.randint(0, vocab.vocab_size, (2, 9))
        assert torch.equal(model(ids)[0], again(ids)[0])
        if tie:
            assert again.head.weight is again.tok_emb.weight
        assert load_model(folder, dtype=torch.float64).head.weight.dtype == torch.float64
    with pytest.raises(FileNotFoundError, match="is .* a folder written by save_model"):
        load_model(tmp_path / "nothing")
