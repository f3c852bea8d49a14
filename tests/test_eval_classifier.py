"""A quality judge that fails on noise: the Classification Accuracy Score (CAS) of the evaluate stage.

A user fits a scikit-learn classifier on real digits in a `python` stage (examples/digits_steps.py), saves it
with skops, and points `classifier: {image: ${fit_judge.classifier}, image_size: 16}` at it. Real digits the
judge never saw score high; pure noise and digits under shuffled labels score near chance (0.10), while the
judge's own accuracy on the reference stays high. No AR model is trained: token stores of real (or broken)
digits stand in for a sampler's output.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import arpipe, stage_lines, write
from PIL import Image
from realdata import digits_folder

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SETS = ("real", "noise", "shuffled", "unlabelled")   # folders under data/, each tokenized and judged
PIPELINE = """
name: cas
storage: ./runs
stages:
  fit_judge:
    kind: python
    callable: digits_steps:fit_classifier
    inputs: {images: DATA/train}   # python stages get paths as given: absolute
    config: {channels: 1, size: 8, image_size: 16}
  tok:
    kind: tokenizer
    source: {modality: image, uri: ./data/train, channels: 1, size: 8}
    tokenizer: {type: msvq, scales: [1, 2, 4, 8], codebook_size: 256}
    fit: {max_samples: 800, heldout: 32}
""" + "".join(f"""
  {name}:
    kind: tokenize
    source: {{modality: image, uri: ./data/{name}, channels: 1, size: 8}}
    tokenizer: ${{tok.tokenizer}}
  judge_{name}:
    kind: evaluate
    samples: ${{{name}.store}}
    reference: ${{real.store}}
    classifier: {{image: "${{fit_judge.classifier}}", image_size: 16}}
""" for name in SETS)


def write_data(root: Path) -> None:
    """Real digits for the judge (the first 1000) and unseen ones (300 from 1300); noise and shuffled labels."""
    digits_folder(root / "data" / "train", count=1000)
    real = digits_folder(root / "data" / "real", count=300, start=1300)
    rng = np.random.default_rng(0)
    for i in range(200):   # uniform noise, 20 images asked to be each digit
        folder = root / "data" / "noise" / str(i % 10)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    paths = sorted(real.glob("*/*.png"))
    for path, label in zip(paths, rng.permutation([p.parent.name for p in paths])):   # right digits, wrong labels
        (root / "data" / "shuffled" / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / "data" / "shuffled" / label / path.name)
    (root / "data" / "unlabelled").mkdir(parents=True)
    for path in paths[:40]:   # no class folders: an unconditional sampler's output
        shutil.copy(path, root / "data" / "unlabelled" / path.name)


@pytest.fixture(scope="module")
def project(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("cas")
    write_data(root)
    shutil.copy(EXAMPLES / "digits_steps.py", root / "digits_steps.py")
    write(root, {"cas.yaml": PIPELINE.replace("DATA/", f"{root / 'data'}/")})
    run = arpipe("run", "cas.yaml", cwd=root, env={"RAY_ADDRESS": ray_cluster}, timeout=600, check=True)
    assert all(states[-1] == "done" for states in stage_lines(run.stdout).values()), run.stdout
    root.joinpath("run.log").write_text(run.stdout)
    return root


def metrics(root: Path, stage: str) -> dict:
    [path] = root.glob(f"runs/{stage}/*/metrics/metrics.json")
    return json.loads(path.read_text())


def mlflow_run(root: Path, stage: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cas")
    [run] = client.search_runs([exp.experiment_id], filter_string=f"tags.`arpipe.stage` = '{stage}'")
    return client, run


# ------------------------------------------------------------------ the judge through `arpipe run`


def test_real_digits_the_judge_never_saw_score_high(project):
    m = metrics(project, "judge_real")["metrics"]
    assert m["image/cas"] >= 0.85, m
    assert m["image/cas_reference"] >= 0.85     # the judge itself works on real data
    assert all(m[f"image/cas/{c}"] >= 0.4 for c in range(10)), m   # every digit, after the tokenizer


def test_pure_noise_scores_near_chance(project):
    m = metrics(project, "judge_noise")["metrics"]
    assert m["image/cas"] <= 0.25, m
    assert m["image/cas_reference"] >= 0.85     # not a broken judge: the samples are bad


def test_real_digits_under_shuffled_labels_score_near_chance(project):
    m = metrics(project, "judge_shuffled")["metrics"]
    assert m["image/cas"] <= 0.25, m
    assert m["image/cas_reference"] >= 0.85


def test_confusion_matrix_and_per_class_scores_reach_mlflow(project):
    import pyarrow.parquet as pq

    folder = next(project.glob("runs/judge_real/*/metrics"))
    summary = metrics(project, "judge_real")["metrics"]
    assert {f"image/cas/{c}" for c in range(10)} <= set(summary)
    client, run = mlflow_run(project, "judge_real")
    assert run.data.metrics["image/cas"] == pytest.approx(summary["image/cas"])
    assert run.data.metrics["image/cas/7"] == pytest.approx(summary["image/cas/7"])
    assert "image/cas_reference" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id, "metrics")} == \
        {"metrics/metrics.json", "metrics/scores.png", "metrics/cas_image.png"}
    png = Image.open(client.download_artifacts(run.info.run_id, "metrics/cas_image.png"))
    assert png.width > 400 and png.height > 200          # two panels: samples and reference
    assert (folder / "cas_image.png").read_bytes() == Path(png.filename).read_bytes()

    rows = [r for r in pq.read_table(folder / "scores.parquet").to_pylist() if r["metric"] == "cas_correct"]
    samples = [r["value"] for r in rows if r["set"] == "samples"]
    assert len(samples) == 256 and set(samples) <= {0.0, 1.0}   # max_samples of the 300 real digits, spread
    assert np.mean(samples) == pytest.approx(summary["image/cas"])
    assert {r["set"] for r in rows} == {"samples", "reference"}


def test_unconditional_samples_are_skipped_with_a_reason(project):
    result = metrics(project, "judge_unlabelled")
    assert "image/cas" not in result["metrics"]
    assert "unconditional" in result["skipped"]["image/cas"]
    log = (project / "run.log").read_text()
    assert "skipped image/cas: the samples are unconditional" in log
    assert "CAS skips 40 unconditional image samples" in log


BAD_CLASSIFIERS = [
    ("classifier: {image: ./junk.skops}", "junk.skops: the .skops file is not a skops archive"),
    ("classifier: {image: ./missing.skops}", "missing.skops: classifier file not found"),
    ('classifier: {image: "${fit_judge.classifier}", image_size: 12}',
     "the classifier takes 256 features; 12 x 12 images with 1 channel(s) give 144; set classifier.image_size "
     "to 16"),
]


@pytest.fixture(scope="module")
def bad_run(project, ray_cluster):
    """One run of an evaluate stage per bad classifier setting (independent stages: each fails on its own)."""
    (project / "junk.skops").write_bytes(b"not a zip archive")
    text = (project / "cas.yaml").read_text() + "".join(f"""
  bad{i}:
    kind: evaluate
    samples: ${{real.store}}
    reference: ${{real.store}}
    {setting}
""" for i, (setting, _message) in enumerate(BAD_CLASSIFIERS))
    write(project, {"bad.yaml": text})
    stages = ",".join(f"bad{i}" for i in range(len(BAD_CLASSIFIERS)))
    return arpipe("run", "bad.yaml", "--only", stages, cwd=project, env={"RAY_ADDRESS": ray_cluster})


@pytest.mark.parametrize("case", range(len(BAD_CLASSIFIERS)), ids=[s for s, _m in BAD_CLASSIFIERS])
def test_a_bad_classifier_fails_in_one_line_naming_the_file(bad_run, case):
    output = bad_run.stdout + bad_run.stderr
    assert bad_run.returncode == 2, output
    [line] = [ln for ln in output.splitlines() if ln.split()[:2] == [f"bad{case}", "failed"]]
    assert BAD_CLASSIFIERS[case][1] in line
    assert line.split()[2].endswith((".skops:", "classifier.skops:"))   # the line starts with the file
    assert "Traceback" not in output


# ------------------------------------------------------------------ the domain library, without Ray


def _digits_judge():
    """A judge fitted on the first 1000 digits, as the file bytes a user would save."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from arpipe.stages.evaluation.classifier import classifier_features

    digits = load_digits()
    images = [x[None] / 16.0 for x in digits.images]
    x_NF = classifier_features("image", images[:1000], image_size=16, channels=1)
    judge = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)).fit(x_NF, digits.target[:1000])
    import skops.io

    return skops.io.dumps(judge), images, digits.target


def test_a_skops_judge_loads_and_takes_rgb_samples_and_a_pickled_one_is_refused():
    import joblib

    from arpipe.stages.evaluation import Classifier, ClassifierError

    data, images, target = _digits_judge()
    skops_judge = Classifier.load_bytes(data, "digits.skops")
    assert skops_judge.classes == [str(c) for c in range(10)]
    buf = io.BytesIO()
    joblib.dump(skops_judge.model, buf)
    with pytest.raises(ClassifierError, match="is a pickle") as refused:
        Classifier.load_bytes(buf.getvalue(), "digits.joblib")
    assert "skops.io.dump(joblib.load(path)" in refused.value.fix
    unseen = images[1300:1600]
    predicted = skops_judge.predict("image", unseen, image_size=16)
    assert np.mean([p == str(t) for p, t in zip(predicted, target[1300:1600])]) >= 0.85
    rgb = [np.repeat(x, 3, axis=0) for x in unseen]      # grey judge, RGB samples: converted by luminance
    assert skops_judge.predict("image", rgb, image_size=16) == predicted


def test_a_torchscript_judge_with_class_names():
    import torch

    from arpipe.stages.evaluation import Classifier

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.classes = ["dark", "bright"]

        def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
            mean_N = x_NCHW.mean(dim=(1, 2, 3))
            return torch.stack([0.5 - mean_N, mean_N - 0.5], dim=1)

    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(Net()), buf)
    judge = Classifier.load_bytes(buf.getvalue(), "brightness.pt")
    assert judge.classes == ["dark", "bright"]
    images = [np.full((1, 8, 8), 0.1, np.float32), np.full((3, 8, 8), 0.9, np.float32)]
    assert judge.predict("image", images, image_size=16) == ["dark", "bright"]


@pytest.mark.parametrize(("name", "data", "message"), [
    ("judge.skops", b"junk", "not a skops archive"),
    ("judge.pkl", b"junk", "a .pkl file is a pickle"),
    ("judge.pt", b"junk", "not a TorchScript module"),
    ("judge.bin", b"junk", "cannot tell the classifier format of .bin"),
])
def test_files_that_are_not_classifiers_are_refused(name, data, message):
    from arpipe.stages.evaluation import Classifier, ClassifierError

    with pytest.raises(ClassifierError, match=message):
        Classifier.load_bytes(data, name)


def custom_step(x):
    """User code inside a pipeline: skops must not import and call it unchecked."""
    return x


def test_skops_refuses_types_outside_sklearn_and_numpy():
    import skops.io
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    from arpipe.stages.evaluation import Classifier, ClassifierError

    x, y = np.random.default_rng(0).random((20, 4)), np.arange(20) % 2
    judge = make_pipeline(FunctionTransformer(custom_step), LogisticRegression()).fit(x, y)
    with pytest.raises(ClassifierError, match=r"types outside sklearn and numpy \(test_eval_classifier.custom_step\)"):
        Classifier.load_bytes(skops.io.dumps(judge), "judge.skops")
    with pytest.raises(ClassifierError, match="not a fitted scikit-learn classifier"):
        Classifier.load_bytes(skops.io.dumps({"weights": np.zeros(3)}), "judge.skops")


def test_a_class_the_judge_does_not_know_is_named():
    from arpipe.stages.evaluation import Classifier, ClassifierError

    judge = Classifier.load_bytes(_digits_judge()[0], "digits.skops")
    with pytest.raises(ClassifierError, match="class '11' of the samples is not one the classifier knows"):
        judge.check_classes(["3", "11"], "samples")


def _shapes(rng: np.random.Generator, label: str, points: int = 400) -> np.ndarray:
    """A cloud of one of three shape classes, randomly rotated, scaled and moved."""
    if label == "ball":
        xyz = rng.normal(size=(points, 3))
        xyz /= np.linalg.norm(xyz, axis=1, keepdims=True)
    elif label == "rod":
        xyz = np.c_[rng.uniform(-1, 1, points), 0.05 * rng.normal(size=(points, 2))]
    else:   # a flat disc
        r, t = np.sqrt(rng.uniform(0, 1, points)), rng.uniform(0, 2 * np.pi, points)
        xyz = np.c_[r * np.cos(t), r * np.sin(t), 0.02 * rng.normal(size=points)]
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return (xyz @ q.T) * rng.uniform(0.5, 2.0) + rng.normal(size=3)


def test_a_point_cloud_judge_on_shape_statistics_fails_on_noise():
    import skops.io
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from arpipe.stages.evaluation import Classifier, classifier_features

    rng = np.random.default_rng(0)
    labels = ["ball", "rod", "disc"] * 40
    clouds = [_shapes(rng, c) for c in labels]
    judge = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(
        classifier_features("pointcloud", clouds), labels)
    judge = Classifier.load_bytes(skops.io.dumps(judge), "shapes.skops")

    requested = ["ball", "rod", "disc"] * 20
    fresh = judge.predict("pointcloud", [_shapes(rng, c) for c in requested])
    noise = judge.predict("pointcloud", [rng.uniform(-1, 1, (400, 3)) for _ in requested])

    def cas(predicted):
        return np.mean([p == r for p, r in zip(predicted, requested)])

    assert cas(fresh) >= 0.9
    assert cas(noise) <= 0.5                         # chance is 1/3: noise is one blob, whatever was asked
    assert cas(judge.predict("pointcloud", [_shapes(rng, c) for c in rng.permutation(requested)])) <= 0.6


def test_shape_statistics_ignore_point_order_and_pose_and_see_volume_layout():
    from arpipe.stages.evaluation.classifier import cloud_statistics, volume_statistics

    rng = np.random.default_rng(1)
    cloud = _shapes(rng, "rod")
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    moved = rng.permutation(cloud) @ q.T + 5.0
    assert np.allclose(cloud_statistics(cloud), cloud_statistics(moved), atol=1e-4)
    assert cloud_statistics(cloud).shape == (19,)

    top = np.zeros((1, 8, 8, 8), np.float32)
    top[:, :4] = 1.0
    bottom = top[:, ::-1].copy()
    a, b = volume_statistics(top), volume_statistics(bottom)
    assert a.shape == (80,)
    assert np.allclose(a[:16], b[:16])               # same intensity histogram...
    assert not np.allclose(a[16:], b[16:])           # ...different layout


def test_the_classifier_file_is_part_of_the_fingerprint(tmp_path):
    from arpipe.schemas.sample import EvaluateStage as Spec
    from arpipe.stages.evaluate import EvaluateStage

    (tmp_path / "judge.skops").write_bytes(b"one")
    spec = Spec(kind="evaluate", samples="${sample.samples}", reference="${tok.store}",
                classifier={"image": "./judge.skops"})
    before = EvaluateStage.source_digest(spec, tmp_path)
    (tmp_path / "judge.skops").write_bytes(b"a different judge")
    assert EvaluateStage.source_digest(spec, tmp_path) != before
    upstream = Spec(kind="evaluate", samples="${sample.samples}", reference="${tok.store}",
                    classifier={"image": "${fit_judge.classifier}"})
    assert EvaluateStage.source_digest(upstream, tmp_path) is None   # an upstream output: its content digest


def test_a_classifier_without_samples_is_a_config_error():
    from pydantic import ValidationError

    from arpipe.schemas.sample import EvaluateStage as Spec

    with pytest.raises(ValidationError, match="a classifier judges generated samples"):
        Spec(kind="evaluate", model="./model", reference="./store", classifier={"image": "./judge.skops"})


def test_a_prompted_sample_is_checked_against_the_one_digit_its_prompt_names():
    from arpipe.stages.evaluate import prompt_class

    words = {"7": "seven", "2": "two"}
    assert prompt_class("a thick, slanted seven", words) == "7"
    assert prompt_class("Seven!", words) == "7"
    assert prompt_class("a sevenfold two", words) == "2"   # whole words only
    assert prompt_class("a two or a seven", words) is None   # two classes: nothing to check
    assert prompt_class("an eight", words) is None and prompt_class(None, words) is None
