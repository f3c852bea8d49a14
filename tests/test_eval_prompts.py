"""Do samples follow their prompt's words and their control map? The evaluate stage's weight-free checks.

A user who prompts "a thick seven" and "a thin seven" wants to know whether the thick ones have more ink:
the evaluate stage matches the k-th sample of one prompt with the k-th of its counterpart
(``prompt_attributes``) and reports the share of pairs where the measure goes the prompted way. A user who
draws under control maps wants to know whether a sample's edges follow its own map better than another's
(``control_agreement``). Both are checked here on real digits (scikit-learn's), against noise, swapped words
and shuffled maps, and once through the stage itself on a store of real digits written as the sample stage
writes one.
"""

from __future__ import annotations

import json
import re
import typing

import numpy as np
import pytest
from pydantic import ValidationError
from scipy.ndimage import affine_transform, grey_dilation
from sklearn.datasets import load_digits

from arpipe.schemas.sample import EvaluateStage as EvaluateSpec
from arpipe.schemas.sample import PromptAttribute
from arpipe.stages.evaluation import MEASURES, edge_agreement, matched_pairs, other_controls
from arpipe.stages.modalities.controls import control_image

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 real 8x8 digits as ``x_N1HW`` in [0, 1], and their labels."""
    d = load_digits()
    return (d.images[:, None] / 16).astype(np.float32), d.target


def measured(name: str, images) -> np.ndarray:
    return np.asarray([MEASURES[name](x) for x in images])


def thick_and_thin(images: np.ndarray, labels: np.ndarray, per_class: int):
    """For every digit, its ``per_class`` most and least inked real images, captioned "a thick X" and "a thin X"
    in turn (thick, thin, thick, ...): the store a perfect prompted model would write."""
    order, captions = [], []
    ink = measured("ink", images)
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        ranked = members[np.argsort(ink[members])]
        for thick, thin in zip(ranked[::-1][:per_class], ranked[:per_class]):
            order += [thick, thin]
            article = "an" if digit == 8 else "a"
            captions += [f"{article} thick {NUMBERS[digit]}", f"{article} thin {NUMBERS[digit]}"]
    return images[order], captions


def test_the_kth_sample_of_a_prompt_pairs_with_the_kth_of_its_counterpart():
    captions = ["a thick seven", "a thin seven", "a thin seven", "a thick seven", "an eight",
                "A  Thick two", "a thin two", "a thickset seven", None, "a thin two", "a thick seven"]
    # the third "a thick seven" has no third "a thin seven"; "thickset" is not the word "thick"
    assert matched_pairs(captions, "thick", "thin") == [(0, 1), (3, 2), (5, 6)]
    # asked the other way round, the same pairs, each once, from the other side
    assert matched_pairs(captions, "thin", "thick") == [(1, 0), (2, 3), (6, 5)]
    assert matched_pairs(captions, "slanted", "upright") == []


def test_thicker_strokes_have_more_ink_also_in_rgb(digits):
    images, _labels = digits
    x = images[:200]
    thicker = np.stack([grey_dilation(d, size=(1, 2, 2)) for d in x])   # every stroke a pixel wider
    assert np.all(measured("ink", thicker) > measured("ink", x))
    rgb = np.repeat(x, 3, axis=1)   # the luma of grey repeated to RGB is the grey image
    assert np.allclose(measured("ink", rgb), measured("ink", x), rtol=1e-5)


def test_a_slanted_stroke_has_more_slant(digits):
    upright = np.zeros((1, 8, 8))
    upright[0, :, 4] = 1.0
    slanted = np.zeros((1, 8, 8))
    slanted[0, np.arange(8), np.arange(8) // 2 + 2] = 1.0   # one column further every two rows
    assert MEASURES["slant"](upright) < 1e-6 < MEASURES["slant"](slanted)
    assert MEASURES["slant"](slanted) == pytest.approx(0.5, abs=0.05)
    # real ones, sheared: x moves 0.4 pixels per row
    images, labels = digits
    ones = images[labels == 1][:50]
    shear = np.array([[1.0, 0.0], [-0.4, 1.0]])
    sheared = np.stack([affine_transform(o[0], shear, offset=(0, 1.4), order=1)[None] for o in ones])
    assert np.mean(measured("slant", sheared) > measured("slant", ones)) >= 0.9


def test_real_thick_digits_beat_thin_ones_and_noise_or_swapped_words_do_not(digits):
    images, labels = digits
    x, captions = thick_and_thin(images, labels, per_class=8)
    pairs = matched_pairs(captions, "thick", "thin")
    assert len(pairs) == 80 and all(captions[a].replace("thick", "thin") == captions[b] for a, b in pairs)

    def share(images_, captions_) -> float:
        amount = measured("ink", images_)
        return float(np.mean([amount[a] > amount[b] for a, b in matched_pairs(captions_, "thick", "thin")]))

    assert share(x, captions) == 1.0
    noise = np.random.default_rng(0).random(x.shape)
    assert 0.35 <= share(noise, captions) <= 0.65
    swapped = [re.sub("thick|thin", lambda w: {"thick": "thin", "thin": "thick"}[w[0]], c) for c in captions]
    assert share(x, swapped) == 0.0


def test_edges_agree_with_their_own_map_and_not_with_another_digits(digits):
    images, _labels = digits
    edges = np.stack([control_image(x, "canny") for x in images[:100]])
    assert np.allclose(edge_agreement(edges, edges), 1.0)
    shuffled = edge_agreement(edges, np.roll(edges, 1, axis=0))
    assert abs(shuffled.mean()) < 0.15
    noise = np.stack([control_image(x, "canny") for x in np.random.default_rng(0).random(images[:100].shape)])
    assert abs(edge_agreement(noise, edges).mean()) < 0.15


def test_the_baseline_control_is_never_the_samples_own():
    maps = [(1, 2), (1, 2), (3, 4), (3, 4), (5, 6)]   # two samples per map, as samples_per_control: 2 draws
    other = other_controls(maps)
    assert other == [2, 2, 4, 4, 0]
    assert all(maps[j] != m for j, m in zip(other, maps))
    assert other_controls([(1, 2)] * 3) is None


def test_the_schema_names_the_measures_there_are():
    measure = PromptAttribute.model_fields["measure"].annotation
    assert set(typing.get_args(measure)) == set(MEASURES)


@pytest.mark.parametrize(("attributes", "message"), [
    ([{"word": "thick", "opposite": "thin", "measure": "weight"}], "Input should be 'ink' or 'slant'"),
    ([{"word": "thick", "opposite": "Thick", "measure": "ink"}], "word and opposite are both 'thick'"),
    ([{"word": "thick", "opposite": "thin", "measure": "ink"}, {"word": "thin", "opposite": "thick",
                                                                 "measure": "ink"}],
     "prompt_attributes[1] compares 'thin' and 'thick' again (as prompt_attributes[0] does); remove one"),
])
def test_a_bad_prompt_attribute_is_a_config_error(attributes, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        EvaluateSpec.model_validate({"kind": "evaluate", "samples": "s", "reference": "r",
                                     "prompt_attributes": attributes})
    with pytest.raises(ValidationError, match="judge generated samples: give samples"):
        EvaluateSpec.model_validate({"kind": "evaluate", "model": "m", "heldout": "h", "control_agreement": True})


# ---------------------------------------------------------------------------- through the stage


def write_samples(folder, images, captions, controls, image_tok, control_uri: str) -> str:
    """A samples store as the sample stage writes one: tokens, each sample's prompt as its caption, its
    control map's tokens, and the control tokenizer in the metadata."""
    from arpipe.stages.store import StoreWriter

    meta = {"modality": "image", "tokenizer_uri": str(folder.parent / "image_tok"),
            "control": {"transform": "canny", "sigma": 1.0, "uri": control_uri, "digest": "sha256:0", "vocab_size": 16}}
    with StoreWriter(str(folder), vocab_size=64, samples_per_shard=64, metadata=meta) as writer:
        for i, (tokens, caption, control) in enumerate(zip(image_tok.encode_arrays(list(images)), captions, controls)):
            writer.append(np.asarray(tokens), key=f"image-{i:06d}", modality="image", caption=caption,
                          control_tokens=control)
    return str(folder)


def evaluate(tmp_path, name: str, samples: str, **settings) -> dict:
    from arpipe.pipeline.stage import StageContext
    from arpipe.stages.evaluate import EvaluateStage

    spec = EvaluateSpec.model_validate({"kind": "evaluate", "samples": samples, "reference": samples, **settings})
    out = tmp_path / name
    ctx = StageContext(name=name, kind="evaluate", fingerprint="0" * 64, out_uri=str(out), work_dir=out,
                       pipeline_dir=tmp_path)
    EvaluateStage(spec, ctx).run()
    return json.loads((out / "metrics" / "metrics.json").read_text())


def test_the_stage_scores_prompted_and_controlled_real_digits_and_noise_fails(tmp_path, digits, capsys):
    import pyarrow.parquet as pq

    from arpipe.stages.modalities import PatchVQ

    images, labels = digits
    x, captions = thick_and_thin(images[:1500], labels[:1500], per_class=3)
    image_tok = PatchVQ(input_shape=(1, 8, 8), patch=(2, 2), codebook_size=64, fit_iters=10).fit(list(images[:400]))
    image_tok.save(str(tmp_path / "image_tok"))
    edge_maps = [control_image(d, "canny") for d in images]
    control_tok = PatchVQ(input_shape=(1, 8, 8), patch=(2, 2), codebook_size=16, fit_iters=10).fit(edge_maps[:400])
    control_tok.save(str(tmp_path / "control_tok"))
    controls = [np.asarray(c).reshape(-1) for c in control_tok.encode_arrays([control_image(d, "canny") for d in x])]
    settings = {"prompt_attributes": [{"word": "thick", "opposite": "thin", "measure": "ink"},
                                      {"word": "slanted", "opposite": "upright", "measure": "slant"}],
                "control_agreement": True}

    real = write_samples(tmp_path / "real", x, captions, controls, image_tok, str(tmp_path / "control_tok"))
    m = evaluate(tmp_path, "real_eval", real, **settings)
    metrics = m["metrics"]
    assert metrics["image/attribute/thick_vs_thin"] >= 0.9 and metrics["image/attribute/thick_vs_thin/pairs"] == 30
    assert metrics["image/attribute/thick_vs_thin/mean_difference"] > 0
    assert "no prompt with 'slanted'" in m["skipped"]["image/attribute/slanted_vs_upright"]
    # measured: 0.83 with the own map, 0.20 with the next map's (mostly the same digit, thick beside thin)
    own, shuffled = metrics["image/control_agreement"], metrics["image/control_agreement_shuffled"]
    assert own >= 0.6 and own >= 2 * shuffled
    assert metrics["image/control_agreement_ratio"] == pytest.approx(own / shuffled)
    rows = pq.read_table(tmp_path / "real_eval" / "metrics" / "scores.parquet").to_pylist()
    per_metric = {r["metric"]: sum(1 for q in rows if q["metric"] == r["metric"]) for r in rows}
    assert per_metric["thick_vs_thin"] == 30 and per_metric["ink"] == 60 and per_metric["control_agreement"] == 60
    log = capsys.readouterr().out
    assert "image thick vs thin: the 'thick' sample has more ink in" in log
    assert "skipped image/attribute/slanted_vs_upright: no prompt with 'slanted'" in log

    noise = np.random.default_rng(0).random(x.shape).astype(np.float32)
    fake = write_samples(tmp_path / "noise", noise, captions, controls, image_tok, str(tmp_path / "control_tok"))
    metrics = evaluate(tmp_path, "noise_eval", fake, **settings)["metrics"]
    assert 0.25 <= metrics["image/attribute/thick_vs_thin"] <= 0.75
    assert abs(metrics["image/control_agreement"]) < 0.2   # measured: -0.01 to 0.02 over five noise seeds
    # a correlation: no ratio over a baseline at or below 0
    assert ("image/control_agreement_ratio" in metrics) == (metrics["image/control_agreement_shuffled"] > 0)

    # a rerun reuses every decode unit (the samples' and their control maps') and scores the same
    capsys.readouterr()
    assert evaluate(tmp_path, "noise_eval", fake, **settings)["metrics"] == metrics
    [(units, reused)] = re.findall(r"\] (\d+) units \((\d+) reused\)", capsys.readouterr().out)
    assert int(units) >= 2 and reused == units


def test_samples_without_prompts_or_controls_are_skipped_with_a_reason(tmp_path, digits):
    from arpipe.stages.modalities import PatchVQ

    images, _labels = digits
    image_tok = PatchVQ(input_shape=(1, 8, 8), patch=(2, 2), codebook_size=16, fit_iters=2).fit(list(images[:64]))
    image_tok.save(str(tmp_path / "image_tok"))
    plain = write_samples(tmp_path / "plain", images[:8], [None] * 8, [None] * 8, image_tok, "")
    m = evaluate(tmp_path, "plain_eval", plain, control_agreement=True,
                 prompt_attributes=[{"word": "thick", "opposite": "thin", "measure": "ink"}])
    assert "sample with prompts: to score prompt_attributes" in m["skipped"]["image/attribute/thick_vs_thin"]
    assert "sample with controls: to score control_agreement" in m["skipped"]["image/control_agreement"]
    assert not any(k.startswith(("image/attribute", "image/control")) for k in m["metrics"])
