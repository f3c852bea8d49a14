"""Text prompts through the pipeline: captioned digits -> a text tokenizer -> a store with caption tokens -> a
model trained on them (DeepSpeed; the example trains with 2 workers) -> samples drawn from a prompts file, each kept with its prompt,
and completions of stored digits whose bottom half is drawn again (in-painting).

What the samples show is checked on a longer-trained model in tests/test_prompt_fidelity.py; here the
story is what a user sees: the model folder names its text tokenizer, every sample is stored and written
beside its prompt, the contact sheet in MLflow has the prompts under the pictures, evaluate reports the
prompt-following metrics (CAS, thick against thin, control agreement), and a prompt the model cannot take
fails in one line that names its file and line.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from helpers import arpipe, background_project, write
from helpers import committed_output as out

PROMPTS = ["a thick seven", "a thin two", "an eight", "a thin seven"]

PIPELINE = """
name: prompts
storage: ./runs
stages:
  data:
    kind: python
    callable: captioned_digits_steps:export_captioned
    config: {count: 300}
  fit_tok:
    kind: tokenizer
    source: {modality: image, uri: "${data.images}", channels: 1, size: 8, labels: null}
    tokenizer: {type: msvq, scales: [1, 2, 4, 8], codebook_size: 32, fit_iters: 10}
    fit: {max_samples: 300, heldout: 16}
  fit_text:
    kind: tokenizer
    source: {modality: image, uri: "${data.images}", channels: 1, size: 8, captions: auto}
    tokenizer: {type: text, vocab_size: 280}
    fit: {heldout: 16}
  fit_edges:
    kind: tokenizer
    source: {modality: image, uri: "${data.images}", channels: 1, size: 8, transform: canny}
    tokenizer: {type: patch_vq, patch: [2, 2], codebook_size: 16, fit_iters: 10}
    fit: {max_samples: 300, heldout: 16}
  tokenize:
    kind: tokenize
    source: {modality: image, uri: "${data.images}", channels: 1, size: 8, labels: null, captions: auto,
             captions_required: true}
    tokenizer: ${fit_tok.tokenizer}
    text_tokenizer: ${fit_text.tokenizer}
    control: {transform: canny, tokenizer: "${fit_edges.tokenizer}"}
    progress: false
  train:
    kind: train
    data: [{store: "${tokenize.store}"}]
    model: {preset: tiny, paradigm: next_scale, n_layer: 2, n_embd: 64, n_head: 4}
    global_batch: 16
    steps: 40
    checkpoint_every: 40
  sample:
    kind: sample
    model: ${train.model}
    prompts: ./prompts.txt
    samples_per_prompt: 2
    cfg_scale: 2.0
    progress: false
  controlled:
    kind: sample
    model: ${train.model}
    controls: {store: "${tokenize.store}", samples: 2, samples_per_control: 2}
    prompts: ./prompts.txt
    progress: false
  from_pictures:
    kind: sample
    model: ${train.model}
    controls: {images: ./pictures, transform: canny}
    progress: false
  inpaint:
    kind: sample
    model: ${train.model}
    inpaint: {store: "${tokenize.store}", box: [4, 0, 8, 8], samples: 4}
    progress: false
  judge:
    kind: python
    callable: digits_steps:fit_classifier
    inputs: {images: "${data.images}"}
    config: {channels: 1, size: 8, image_size: 8}
  evaluate:
    kind: evaluate
    samples: ${sample.samples}
    reference: ${tokenize.store}
    classifier: {image: "${judge.classifier}", image_size: 8, prompt_classes: {"2": two, "7": seven, "8": eight}}
    prompt_attributes: [{word: thick, opposite: thin, measure: ink}]
  follow_controls:
    kind: evaluate
    samples: ${controlled.samples}
    reference: ${tokenize.store}
    control_agreement: true
"""


def build_project(root: Path, ray_address: str) -> Path:
    from realdata import digits_folder

    digits_folder(root / "pictures", count=2, start=1700)   # two pictures whose edges steer two samples
    for steps in ("captioned_digits_steps.py", "digits_steps.py"):
        shutil.copyfile(Path(__file__).parent.parent / "examples" / steps, root / steps)
    write(root, {"prompts.yaml": PIPELINE, "prompts.txt": "\n".join(PROMPTS) + "\n"})
    run = background_project(root, "prompts.yaml", ray_address)
    (root / "run.log").write_text(run.stdout)
    return root


BUILT_IN_BACKGROUND = {"prompts-project": build_project}


@pytest.fixture(scope="module")
def project(background):
    return background.result("prompts-project")


def test_the_model_names_its_text_and_control_tokenizers_and_their_positions(project):
    model = out(project, "train") / "model"
    vocab = json.loads((model / "vocab.json").read_text())
    [[text_name, text_size, text_positions], control_stream] = vocab["prompts"]
    text = json.loads((next(project.glob("runs/fit_text/*/tokenizer/tokenizer.json"))).read_text())
    assert text_name == "text" and text_size == text["vocab_size"] and 2 <= text_positions <= 12
    assert control_stream == ["control", 16, 16]   # 2x2 patches of the 8x8 edge map, 16 codes
    tokenizers = json.loads((model / "tokenizers.json").read_text())
    assert tokenizers["text"]["tokenizer_uri"] == str(out(project, "fit_text") / "tokenizer")
    assert tokenizers["control"]["tokenizer_uri"] == str(out(project, "fit_edges") / "tokenizer")
    assert tokenizers["control"]["transform"] == "canny"
    assert vocab["classes"] == []   # labels: null: the captions are the only condition


def test_every_sample_is_kept_with_its_prompt(project):
    from arpipe.stages.store import TokenStore

    folder = out(project, "sample")
    store = TokenStore.open(str(folder / "samples"))
    captions = [store[i].caption for i in range(len(store))]
    assert captions == [p for p in PROMPTS for _ in range(2)]
    assert all(store[i].caption_tokens for i in range(len(store)))
    media = folder / "media" / "image"
    for i, prompt in enumerate(captions):
        key = store[i].key
        assert (media / f"{key}.png").exists()
        assert (media / f"{key}.txt").read_text() == prompt   # the caption layout the readers read back


def test_controlled_samples_are_kept_with_their_control_map_and_prompt(project):
    from arpipe.stages.store import TokenStore

    folder = out(project, "controlled")
    store = TokenStore.open(str(folder / "samples"))
    assert [store[i].caption for i in range(len(store))] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    source = TokenStore.open(str(out(project, "tokenize") / "store"))
    assert [store[i].control_tokens for i in range(len(store))] == [source[k].control_tokens for k in (0, 0, 1, 1)]
    media = folder / "media" / "image"
    for i in range(len(store)):
        key = store[i].key
        assert {p.name for p in media.glob(f"{key}.*")} == {f"{key}.png", f"{key}.txt", f"{key}.control.png"}


def test_control_maps_computed_from_pictures_steer_the_samples(project):
    """`controls: {images: ./pictures, transform: canny}`: each picture's Canny edges, tokenized by the model's
    control tokenizer, is the control map written beside its sample."""
    import numpy as np
    from PIL import Image

    from arpipe.stages.modalities.controls import control_image
    from arpipe.stages.store import TokenStore

    folder = out(project, "from_pictures")
    store = TokenStore.open(str(folder / "samples"))
    assert len(store) == 2
    pictures = sorted((project / "pictures").glob("*/*.png"))
    edges = [control_image(np.asarray(Image.open(p), dtype=np.float32)[None] / 255, "canny") for p in pictures]
    shown = [np.asarray(Image.open(folder / "media" / "image" / f"{store[i].key}.control.png").convert("L"),
                        dtype=np.float32) / 255 for i in range(2)]
    error = [[float(((s - e[0]) ** 2).mean()) for e in edges] for s in shown]
    assert error[0][0] < error[0][1] and error[1][1] < error[1][0]   # each shows its own picture's edges


def test_the_contact_sheet_shows_each_prompt_under_its_picture(project):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("prompts")
    [run] = client.search_runs([exp.experiment_id], filter_string="tags.`arpipe.stage` = 'sample'")
    sheet = Image.open(client.download_artifacts(run.info.run_id, "contact_sheets/contact_image.png"))
    # eight pictures with a caption strip each: taller than the pictures alone (scale 8: 64 pixels)
    assert sheet.width >= 8 * 64 and sheet.height > 64 + 10


def test_in_painting_keeps_the_known_tokens_of_each_stored_digit(project):
    import numpy as np

    from arpipe.stages.models import known_cells
    from arpipe.stages.store import TokenStore

    done = TokenStore.open(str(out(project, "inpaint") / "samples"))
    source = TokenStore.open(str(out(project, "tokenize") / "store"))
    keep = np.zeros((8, 8), dtype=bool)
    keep[:4] = True   # box [4, 0, 8, 8]: the bottom half is drawn
    known = known_cells([[1, 1], [2, 2], [4, 4], [8, 8]], keep).numpy()
    assert len(done) == 4
    for i in range(4):
        sample = done[i]
        uri, index = sample.source_uri.rsplit("#", 1)
        original = source[int(index)]
        assert uri == str(out(project, "tokenize") / "store") and int(index) == i
        assert np.array_equal(sample.tokens.reshape(-1)[known], original.tokens.reshape(-1)[known])
        assert sample.caption == original.caption   # a captioned model completes with the stored caption
    assert (out(project, "inpaint") / "media" / "image" / f"{done[0].key}.png").exists()


def test_evaluate_checks_each_prompted_sample_against_the_digit_its_prompt_names(project):
    """CAS of prompted samples: the class a prompt names (classifier.prompt_classes) is the one checked. The
    model here trained for 40 steps only: what is checked is which samples were scored for which digit."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("prompts")
    [run] = client.search_runs([exp.experiment_id], filter_string="tags.`arpipe.stage` = 'evaluate'")
    metrics = run.data.metrics
    assert {"image/cas", "image/cas/2", "image/cas/7", "image/cas/8"} <= set(metrics)
    assert 0 <= metrics["image/cas"] <= 1
    assert "image/cas_reference" not in metrics   # the reference store is unlabelled (labels: null)
    assert not any(k.startswith("image/cas/") and k[len("image/cas/"):] not in ("2", "7", "8") for k in metrics)


def test_evaluate_compares_thick_and_thin_prompts_in_matched_pairs(project):
    """`prompt_attributes`: the k-th "a thick seven" sample against the k-th "a thin seven" one, by ink. After
    40 steps of training what is checked is which samples were paired and that the share is reported."""
    import pyarrow.parquet as pq

    from arpipe.stages.store import TokenStore

    metrics = stage_metrics(project, "evaluate")
    assert metrics["image/attribute/thick_vs_thin/pairs"] == 2   # two samples of each prompt
    assert metrics["image/attribute/thick_vs_thin"] in (0.0, 0.5, 1.0)
    assert math.isfinite(metrics["image/attribute/thick_vs_thin/mean_difference"])
    store = TokenStore.open(str(out(project, "sample") / "samples"))
    rows = pq.read_table(out(project, "evaluate") / "metrics" / "scores.parquet").to_pylist()
    paired = [r["key"] for r in rows if r["metric"] == "thick_vs_thin"]
    assert paired == [store[i].key for i in range(len(store)) if store[i].caption == "a thick seven"]
    assert "image thick vs thin: the 'thick' sample has more ink in" in (project / "run.log").read_text()


def test_evaluate_scores_controlled_samples_against_their_own_and_another_control_map(project):
    """`control_agreement`: each controlled sample's Canny edges against its control map, and against the
    other control map's (the baseline). Correlations, so in [-1, 1]; a ratio only over a positive baseline."""
    metrics = stage_metrics(project, "follow_controls")
    own, shuffled = metrics["image/control_agreement"], metrics["image/control_agreement_shuffled"]
    assert -1 <= own <= 1 and -1 <= shuffled <= 1
    assert ("image/control_agreement_ratio" in metrics) == (shuffled > 0)
    assert "image control agreement" in (project / "run.log").read_text()
    assert not any(k.startswith("image/attribute") for k in metrics)


def stage_metrics(project, stage: str) -> dict[str, float]:
    """The metrics of ``stage``'s MLflow run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("prompts")
    [run] = client.search_runs([exp.experiment_id], filter_string=f"tags.`arpipe.stage` = '{stage}'")
    return run.data.metrics


BAD_PROMPTS = [
    ("./long.txt", "long.txt:2: the prompt 'a thick, thin, slanted, a thick, thin, s' is "),
    ("./bad.jsonl", 'bad.jsonl:1: the line has no "prompt" text'),
    ("./missing.txt", "missing.txt: prompts file not found"),
]
BAD_MASK = ("./big.png", "big.png: the mask is 16x16 pixels but the samples are 8x8; resize the mask to 8x8")


@pytest.fixture(scope="module")
def bad_run(project, ray_cluster, tmp_path_factory):
    """One run of a sample stage per bad prompts file or mask (independent stages: each fails on its own)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("bad_prompts")
    stages = "".join(f"""
  bad{i}:
    kind: sample
    model: {out(project, "train") / "model"}
    prompts: {prompts}
""" for i, (prompts, _message) in enumerate(BAD_PROMPTS))
    stages += f"""
  bad{len(BAD_PROMPTS)}:
    kind: sample
    model: {out(project, "train") / "model"}
    inpaint: {{store: {out(project, "tokenize") / "store"}, mask: {BAD_MASK[0]}}}
"""
    Image.new("L", (16, 16), 255).save(folder / "big.png")
    (folder / "p.yaml").write_text(f"name: bad-prompts\nstorage: ./runs\nstages:{stages}")
    write(folder, {"long.txt": "a seven\n" + "a thick, thin, slanted, " * 6 + "seven\n",
                   "bad.jsonl": '{"caption": "a seven"}\n'})
    return arpipe("run", "p.yaml", cwd=folder, env={"RAY_ADDRESS": ray_cluster})


@pytest.mark.parametrize("case", range(len(BAD_PROMPTS) + 1), ids=[p for p, _m in [*BAD_PROMPTS, BAD_MASK]])
def test_a_prompt_or_mask_the_model_cannot_take_fails_in_one_line(bad_run, case):
    output = bad_run.stdout + bad_run.stderr
    assert bad_run.returncode == 2, output
    [line] = [ln for ln in output.splitlines() if ln.split()[:2] == [f"bad{case}", "failed"]]
    assert [*BAD_PROMPTS, BAD_MASK][case][1] in line, line
    assert "Traceback" not in output
    if case == 0:
        assert "text tokens; the model was trained on captions of at most" in line and "shorten the prompt" in line
