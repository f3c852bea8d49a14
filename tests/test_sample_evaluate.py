"""Sampling and evaluating through `arpipe run`: a model trained on digits draws digits, by resumable shard,
into a token store, media files and a contact sheet in MLflow; the evaluate stage scores it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import arpipe, background_project, stage_lines, write
from helpers import committed_output as out
from PIL import Image
from realdata import digits_folder

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")
# measured 0.45-0.68 over runs (40 samples; 2 workers' float reductions vary); chance is 0.10 and noise scores
# <= 0.25 below. The stronger claims: tests/test_fidelity.py (in-process) and benchmarks/fidelity.py (>= 0.9)
CAS_FLOOR = 0.3

PIPELINE = """
name: digits
storage: ./runs
stages:
  tok:
    kind: tokenizer
    source: {modality: image, uri: ./data/digits, channels: 1, size: 8}
    tokenizer: {type: msvq, scales: [1, 2, 4, 8], codebook_size: 64}
    fit: {max_samples: 800, heldout: 32}
  digits:
    kind: tokenize
    source: {modality: image, uri: ./data/digits, channels: 1, size: 8}
    tokenizer: ${tok.tokenizer}
  heldout:
    kind: tokenize
    source: {modality: image, uri: ./data/heldout, channels: 1, size: 8}
    tokenizer: ${tok.tokenizer}
  judge:
    kind: python
    callable: digits_steps:fit_classifier
    inputs: {images: DIGITS}   # the python task runs on the cluster: an absolute path
    config: {channels: 1, size: 8, image_size: 8}
  train:
    kind: train
    data: [{store: "${digits.store}"}]
    heldout: ${heldout.store}
    model: {preset: tiny, paradigm: next_scale, n_layer: 2, n_embd: 96, n_head: 4}
    optimizer: {lr: 0.003, warmup_steps: 20}
    global_batch: 32
    steps: 600
    checkpoint_every: 600
    eval_every: 300
  sample:
    kind: sample
    model: ${train.model}
    num_samples: 40
    samples_per_shard: 16
    cfg_scale: 2.0
    cfg_schedule: linear
    actors: 2
  evaluate:
    kind: evaluate
    samples: ${sample.samples}
    reference: ${heldout.store}
    model: ${train.model}
    reconstruction:
      tokenizer: ${tok.tokenizer}
      source: {modality: image, uri: ./data/heldout, channels: 1, size: 8}
    features: {image: ./features.pt, image_size: 16}
    classifier: {image: "${judge.classifier}", image_size: 8}
  evaluate_plain:
    kind: evaluate
    samples: ${sample.samples}
    reference: ${heldout.store}
"""


class TinyFeatures(torch.nn.Module):
    """A small conv net standing in for Inception (its weights are not shipped offline)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


def build_project(root: Path, ray_address: str) -> Path:
    """The digits project, run through: 600 training steps (built in the background, tests/background.py)."""
    digits_folder(root / "data" / "digits", count=1200)
    digits_folder(root / "data" / "heldout", count=200, start=1500)
    torch.jit.save(torch.jit.script(TinyFeatures()), str(root / "features.pt"))
    shutil.copyfile(Path(__file__).parent.parent / "examples" / "digits_steps.py", root / "digits_steps.py")
    write(root, {"digits.yaml": PIPELINE.replace("DIGITS", str(root / "data" / "digits"))})
    background_project(root, "digits.yaml", ray_address)
    return root


BUILT_IN_BACKGROUND = {"digits-project": build_project}


@pytest.fixture(scope="module")
def project(background):
    return background.result("digits-project")


def mlflow_run(root: Path, stage: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("digits")
    # the run that produced the stage's output: later pipelines of the project (CoDe's, the masked one) that
    # reuse the stage log cache hits under the same name
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`arpipe.stage` = '{stage}' "
                                                                 "and tags.`arpipe.cache` = 'miss'")
    return client, runs[0]


def pngs(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("L"), dtype=np.float64) / 255
                     for p in sorted(folder.glob("*.png"))])


def test_the_contact_sheet_in_mlflow_shows_digits(project):
    client, run = mlflow_run(project, "sample")
    assert [a.path for a in client.list_artifacts(run.info.run_id, "contact_sheets")] == \
        ["contact_sheets/contact_image.png"]
    sheet = Image.open(client.download_artifacts(run.info.run_id, "contact_sheets/contact_image.png"))
    assert sheet.width > 200 and sheet.height > 100

    samples = pngs(out(project, "sample") / "media" / "image")
    data = pngs(project / "data" / "heldout" / "0")   # any real digits
    data = np.concatenate([data] + [pngs(project / "data" / "heldout" / str(c)) for c in range(1, 10)])
    assert samples.shape == (40, 8, 8)
    # the samples differ from each other and have the digits' brightness (what they show: the next test)
    flat = samples.reshape(40, -1)
    assert len({row.tobytes() for row in flat}) == 40
    assert np.mean(np.std(flat, axis=0)) > 0.15
    noise = np.random.default_rng(0).random(samples.shape)
    assert abs(samples.mean() - data.mean()) < 0.08 < abs(noise.mean() - data.mean())


def test_a_judge_fitted_on_real_digits_recognises_the_digit_each_sample_was_asked_for(project):
    """The Classification Accuracy Score of the samples is high, and the same judge scores noise and
    samples under shuffled labels near chance (0.10): the check fails on a generator that draws noise."""
    from arpipe.stages.evaluation.classifier import Classifier
    from arpipe.stages.store import TokenStore

    m = json.loads((out(project, "evaluate") / "metrics" / "metrics.json").read_text())["metrics"]
    assert m["image/cas_reference"] >= 0.8, m   # the judge itself knows real digits (measured 0.855)
    assert m["image/cas"] >= CAS_FLOOR, m
    judge_file = next(project.glob("runs/judge/*/classifier.skops"))
    judge = Classifier.load_bytes(judge_file.read_bytes(), str(judge_file))
    media = out(project, "sample") / "media" / "image"
    conditions = {s.key: str(s.condition) for s in TokenStore.open(str(out(project, "sample") / "samples"))}
    files = sorted(media.glob("*.png"))
    requested = np.asarray([conditions[f.stem] for f in files])
    samples = [np.asarray(Image.open(f).convert("L"), dtype=np.float32)[None] / 255 for f in files]
    rng = np.random.default_rng(0)

    def cas(arrays, labels) -> float:
        return float(np.mean(np.asarray(judge.predict("image", arrays, image_size=8)) == labels))

    # the PNGs are the decodes rounded to 8 bits: a sample on the judge's decision boundary may flip
    assert cas(samples, requested) == pytest.approx(m["image/cas"], abs=1.5 / len(files))
    noise = [rng.random((1, 8, 8), dtype=np.float32) for _ in files]
    shuffled = np.concatenate([rng.permutation(requested) for _ in range(10)])
    assert cas(noise, requested) <= 0.25
    assert cas(samples * 10, shuffled) <= 0.25   # each sample under ten random labels


def test_training_logged_held_out_loss_and_accuracy_per_scale(project):
    client, run = mlflow_run(project, "train")
    for k in (1, 2, 3, 4):   # every scale learned something: better than a uniform guess over 64 codes
        assert 1 / 64 < run.data.metrics[f"heldout/scale_{k}/accuracy"] <= 1
        assert 0 < run.data.metrics[f"heldout/scale_{k}/loss"] < np.log(64)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "diagnostics")} == \
        {"diagnostics/heldout_by_segment.json", "diagnostics/heldout_by_segment.png"}
    table = json.loads(Path(client.download_artifacts(run.info.run_id,
                                                      "diagnostics/heldout_by_segment.json")).read_text())
    assert table["columns"] == ["step", "segment", "loss", "accuracy"]
    assert {row[1] for row in table["data"]} == {"scale_1", "scale_2", "scale_3", "scale_4"}


def test_the_model_predicts_held_out_digits_well_below_their_unigram_entropy(project):
    """Held-out loss (nats per token) well below the entropy of the digits' tokens taken one at a time: the model
    learned how tokens depend on the coarser scales and the class, not only how often each code occurs. An
    untrained model scores about log(vocabulary), above that entropy."""
    from mlflow.tracking import MlflowClient

    from arpipe.stages.store import TokenStore

    store = TokenStore.open(str(out(project, "digits") / "store"))
    counts = np.bincount(store.gather(np.arange(len(store))).tokens.astype(np.int64), minlength=64)
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(p * np.log(p)).sum())
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("digits")
    [trained] = client.search_runs([exp.experiment_id],
                                   filter_string="tags.`arpipe.stage` = 'train' and tags.`arpipe.cache` = 'miss'")
    heldout = trained.data.metrics["heldout_loss"]
    print(f"held-out loss {heldout:.3f} nats/token vs unigram entropy {unigram_entropy:.3f}")   # 2.42 vs 4.02
    assert heldout < 0.8 * unigram_entropy < np.log(64)


def test_samples_are_a_token_store_with_their_classes_and_sampling_config(project):
    from arpipe.stages.store import TokenStore

    store = TokenStore.open(str(out(project, "sample") / "samples"))
    assert len(store) == 40
    assert [s.condition for s in store] == [str(i % 10) for i in range(40)]   # every class in turn
    assert store.manifest.metadata["sampling"]["cfg_scale"] == 2.0
    assert store.manifest.metadata["modality"] == "image"
    assert sorted(store.shard_names) == ["image-0000", "image-0001", "image-0002"]
    assert all(s.tokens.size == 1 + 4 + 16 + 64 for s in store)


def test_the_python_api_samples_what_the_sample_stage_sampled(project):
    """arpipe.load_model(...).sample(...) is the stage's own path: same seed and labels, same tokens."""
    import arpipe
    from arpipe.stages.store import TokenStore

    model = arpipe.load_model(out(project, "train") / "model")
    assert model.modalities == ["image"]
    labels = [str(i % 10) for i in range(16)]
    tokens = model.sample("image", labels, cfg_scale=2.0, cfg_schedule="linear", decode=False)
    stage = [s.tokens.reshape(-1) for s in TokenStore.open(str(out(project, "sample") / "samples"))][:16]
    assert all(np.array_equal(a, b) for a, b in zip(tokens, stage, strict=True))
    images = model.sample("image", labels[:3], cfg_scale=2.0, cfg_schedule="linear")
    assert [x.shape for x in images] == [(1, 8, 8)] * 3


# in CI the kill campaigns (tests/faults, `sample` and `evaluate`) kill these stages at seeded moments and check
# unit reuse and outputs against an undisturbed run's; these one-crash stories run in `make test-full`
@pytest.mark.full
def test_a_crashed_sample_stage_redoes_only_its_missing_shard(project, ray_cluster):
    """A crash leaves no outputs.json; a rerun reuses the committed shards and reproduces the rest exactly."""
    folder = out(project, "sample")
    before = json.loads((folder / "outputs.json").read_text())
    (folder / "outputs.json").unlink()
    (folder / ".arpipe" / "units" / "image-0001.json").unlink()
    for path in (folder / "samples").glob("shard-image-0001*"):
        path.unlink()
    shutil.rmtree(folder / "media")   # media files of reused shards are checked: these are redone too
    rerun = arpipe("run", "digits.yaml", "--until", "sample", cwd=project, env={"RAY_ADDRESS": ray_cluster},
                   check=True)
    assert stage_lines(rerun.stdout)["sample"] == ["resuming", "done"]
    assert "(0 reused)" in rerun.stdout   # every shard lost media, so all were redone
    after = json.loads((folder / "outputs.json").read_text())
    assert after["files"] == before["files"]   # the same tokens and media, byte for byte

    (folder / "outputs.json").unlink()
    (folder / ".arpipe" / "units" / "image-0002.json").unlink()
    rerun = arpipe("run", "digits.yaml", "--until", "sample", cwd=project, env={"RAY_ADDRESS": ray_cluster},
                   check=True)
    assert "3 shards (2 reused)" in rerun.stdout
    assert json.loads((folder / "outputs.json").read_text())["files"] == before["files"]


@pytest.mark.full
def test_a_crashed_evaluate_stage_reuses_its_units_and_scores_the_same(project, ray_cluster):
    """Evaluate scores in units of up to 64 samples; after a crash the rerun redoes only the units not
    committed, and its metrics, scores and plots equal the first run's byte for byte."""
    folder = out(project, "evaluate")
    before = json.loads((folder / "outputs.json").read_text())
    records = sorted((folder / ".arpipe" / "units").glob("*.json"))
    assert any(r.name.startswith("score-") for r in records) and any(r.name.startswith("nll-") for r in records)
    (folder / "outputs.json").unlink()
    records[0].unlink()
    rerun = arpipe("run", "digits.yaml", "--until", "evaluate", cwd=project, env={"RAY_ADDRESS": ray_cluster},
                   check=True)
    assert stage_lines(rerun.stdout)["evaluate"] == ["resuming", "done"]
    assert f"{len(records)} units ({len(records) - 1} reused)" in rerun.stdout
    assert json.loads((folder / "outputs.json").read_text())["files"] == before["files"]


def test_evaluate_scores_likelihood_reconstruction_and_distributions(project):
    metrics = json.loads((out(project, "evaluate") / "metrics" / "metrics.json").read_text())
    m = metrics["metrics"]
    assert 0 < m["heldout/bits_per_token"] < np.log2(64)   # better than a uniform guess over 64 codes
    assert m["reconstruction/psnr"] > 15 and 0 < m["reconstruction/ssim"] <= 1
    assert m["image/fid"] > 0 and np.isfinite(m["image/kid"])
    assert 0 <= m["image/precision"] <= 1 and 0 <= m["image/recall"] <= 1
    assert metrics["skipped"] == {}

    import pyarrow.parquet as pq

    table = pq.read_table(out(project, "evaluate") / "metrics" / "scores.parquet").to_pylist()
    heldout = [r for r in table if r["set"] == "heldout" and r["metric"] == "bits_per_token"]
    assert len(heldout) == 200 and all(r["value"] > 0 for r in heldout)
    assert {r["set"] for r in table} == {"heldout", "reconstruction", "samples", "reference"}
    client, run = mlflow_run(project, "evaluate")
    assert run.data.metrics["heldout/bits_per_token"] == pytest.approx(m["heldout/bits_per_token"])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "metrics")} == \
        {"metrics/metrics.json", "metrics/scores.png", "metrics/cas_image.png"}


def test_without_a_feature_network_evaluate_says_what_it_skipped(project):
    metrics = json.loads((out(project, "evaluate_plain") / "metrics" / "metrics.json").read_text())
    assert set(metrics["skipped"]) == {"image/fid", "image/kid", "image/precision", "image/recall"}
    assert "features.image" in metrics["skipped"]["image/fid"]
    assert "image/intensity_mean_gap" in metrics["metrics"]
    _client, run = mlflow_run(project, "evaluate_plain")
    assert "image/fid: no features.image" in run.data.tags["arpipe.skipped_metrics"]


BAD_SETTINGS = [
    ("decoder: sjd", "decoder sjd applies to next_token models; this model is next_scale"),
    ("classes: {'11': 4}", "class '11' is not one the model knows"),
    ("prefix: {store: '${digits.store}', tokens: 3}", "prefix of 3 tokens does not end a next_scale group"),
    ("modalities: [video]", "modality 'video' is not in the model's vocabulary (image)"),
    ("masked: {steps: 4}", "masked sets how a masked (MaskGIT) model decodes; this model is next_scale"),
    ("decoder: sjd\n    relaxed: {k: 2, delta: 0.1}",
     "relaxed (LANTERN) relaxes speculative Jacobi decoding of next_token models; this model is next_scale"),
    ("refiner: {model: '${train.model}', handover: 4}",
     "handover 4 leaves the refiner nothing to draw: the image samples have 4 scales"),
]


@pytest.fixture(scope="module")
def bad_run(project, ray_cluster):
    """One run of a sample stage per bad setting (independent stages: each fails on its own)."""
    text = (project / "digits.yaml").read_text() + "".join(f"""
  bad{i}:
    kind: sample
    model: ${{train.model}}
    num_samples: 4
    {settings}
""" for i, (settings, _message) in enumerate(BAD_SETTINGS))
    write(project, {"bad.yaml": text})
    stages = ",".join(f"bad{i}" for i in range(len(BAD_SETTINGS)))
    return arpipe("run", "bad.yaml", "--only", stages, cwd=project, env={"RAY_ADDRESS": ray_cluster})


@pytest.mark.parametrize("case", range(len(BAD_SETTINGS)), ids=[s for s, _m in BAD_SETTINGS])
def test_bad_sampling_settings_fail_with_one_clear_line(bad_run, case):
    output = bad_run.stdout + bad_run.stderr
    assert bad_run.returncode == 2, output
    [line] = [ln for ln in output.splitlines() if ln.split()[:2] == [f"bad{case}", "failed"]]
    assert BAD_SETTINGS[case][1] in line
    assert "Traceback" not in output


def test_continuing_real_digits_keeps_their_coarse_scales(project, ray_cluster):
    text = (project / "digits.yaml").read_text() + """
  continue:
    kind: sample
    model: ${train.model}
    prefix: {store: '${heldout.store}', tokens: 5, samples: 8}
    media: {}
"""
    write(project, {"continue.yaml": text})
    arpipe("run", "continue.yaml", "--only", "continue", cwd=project, env={"RAY_ADDRESS": ray_cluster}, check=True)
    from arpipe.stages.store import TokenStore

    heldout = TokenStore.open(str(out(project, "heldout") / "store"))
    continued = TokenStore.open(str(out(project, "continue") / "samples"))
    assert len(continued) == 8 and not (out(project, "continue") / "media" / "image").exists()
    for i, sample in enumerate(continued):
        assert np.array_equal(sample.tokens.reshape(-1)[:5], heldout[i].tokens.reshape(-1)[:5])
        assert sample.condition == heldout[i].condition


MASKED = """
  train_masked:
    kind: train
    data: [{store: "${digits.store}"}]
    heldout: ${heldout.store}
    model: {preset: tiny, paradigm: masked, n_layer: 2, n_embd: 96, n_head: 4}
    optimizer: {lr: 0.003, warmup_steps: 20}
    global_batch: 32
    steps: 400
    checkpoint_every: 400
    eval_every: 400
  sample_masked:
    kind: sample
    model: ${train_masked.model}
    num_samples: 40
    cfg_scale: 2.0
    cfg_schedule: linear
    masked: {steps: 8}
  evaluate_masked:
    kind: evaluate
    samples: ${sample_masked.samples}
    reference: ${heldout.store}
    heldout: ["${heldout.store}"]
    max_samples: 40
    model: ${train_masked.model}
    classifier: {image: "${judge.classifier}", image_size: 8}
"""


def test_a_masked_model_trains_draws_digits_in_eight_passes_and_is_scored(project, ray_cluster):
    """MaskGIT through `arpipe run`: the train stage masks and scores the masked tokens, the sample stage decodes
    85 tokens in 8 bidirectional passes a batch, the judge recognises the requested digits, and evaluate scores
    the held-out digits by decoding them a token a step (an exact likelihood, below the unigram entropy)."""
    from arpipe.stages.store import TokenStore

    write(project, {"masked.yaml": (project / "digits.yaml").read_text() + MASKED})
    run = arpipe("run", "masked.yaml", "--only", "train_masked,sample_masked,evaluate_masked", cwd=project,
                 env={"RAY_ADDRESS": ray_cluster}, check=True)
    assert stage_lines(run.stdout)["sample_masked"][-1] == "done"
    _client, sampled = mlflow_run(project, "sample_masked")
    assert sampled.data.metrics["forward_passes"] == 8 * 3   # 40 samples: batches of 16, 16 and 8
    store = TokenStore.open(str(out(project, "sample_masked") / "samples"))
    assert len(store) == 40 and all(s.tokens.size == 85 for s in store)
    assert store.manifest.metadata["sampling"]["masked"] == {"steps": 8, "schedule": "cosine",
                                                              "choice_temperature": 4.5}
    m = json.loads((out(project, "evaluate_masked") / "metrics" / "metrics.json").read_text())["metrics"]
    assert m["image/cas"] >= CAS_FLOOR, m   # noise and shuffled labels score <= 0.25 with this judge (above)
    digits = TokenStore.open(str(out(project, "digits") / "store"))
    counts = np.bincount(digits.gather(np.arange(len(digits))).tokens.astype(np.int64), minlength=64)
    p = counts[counts > 0] / counts.sum()
    assert m["heldout/nll_per_token"] < 0.9 * float(-(p * np.log(p)).sum()), m
    _client, trained = mlflow_run(project, "train_masked")
    assert trained.data.metrics["heldout_loss"] < np.log(64)
