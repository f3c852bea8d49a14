"""Every example in examples/ beyond the quickstart runs as a user runs it, with tiny budgets (`-s`):
faces with next-scale prediction, an anisotropic MRC volume, octree point clouds, S3 storage, and a
submission to a Ray cluster. Each checks what a user would look at: stages done, files in their formats,
the metrics the evaluate stage reports.

They run in `make test-full` (about 5 minutes of the two cores). `make test` (CI) runs the quickstart end to end,
whose stage kinds and modalities these share, and checks that every example validates and plans
(tests/test_examples.py); S3 storage, training on S3 and `arpipe submit` have their own CI tests
(test_pipeline_s3, faults/test_train_s3, test_cluster_jobs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import arpipe, stage_lines

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
pytestmark = pytest.mark.full


def copy_examples(tmp_path: Path) -> Path:
    folder = tmp_path / "examples"
    shutil.copytree(EXAMPLES, folder, ignore=shutil.ignore_patterns("arpipe-runs", "mlflow.db", "mlruns",
                                                                     "__pycache__"))
    return folder


def run_example(folder: Path, pipeline: str, *overrides: str, env: dict[str, str],
                flags: tuple[str, ...] = ()) -> dict[str, str]:
    """`arpipe run PIPELINE -s ... FLAGS` from the examples folder; stage -> its last state, all asserted done."""
    args = [a for o in overrides for a in ("-s", o)]
    run = arpipe("run", pipeline, *args, *flags, cwd=folder, env=env, timeout=600, check=True)
    states = {s: st[-1] for s, st in stage_lines(run.stdout).items()}
    assert set(states.values()) == {"done"}, states
    return states


def only(folder: Path, pattern: str) -> Path:
    """The one path matching pattern (a stage folder also holds latest.json beside its outputs)."""
    [found] = [p for p in folder.glob(pattern) if p.name != "latest.json"]
    return found


def metrics_of(folder: Path) -> dict:
    return json.loads(only(folder, "arpipe-runs/evaluate/*/metrics/metrics.json").read_text())


def test_faces_next_scale(tmp_path, ray_cluster):
    from PIL import Image

    from arpipe.stages.store import TokenStore

    folder = copy_examples(tmp_path)
    states = run_example(folder, "faces_next_scale.yaml", "stages.train.steps=3", "stages.sample.classes.face=4",
                         env={"RAY_ADDRESS": ray_cluster})
    assert sorted(states) == ["data", "evaluate", "faces", "faces_heldout", "sample", "tokenizer", "train"]

    data = only(folder, "arpipe-runs/data/*")
    assert {p.name: len(list(p.glob("*.png"))) for p in (data / "train").iterdir()} == {"face": 90, "background": 90}
    assert {p.name: len(list(p.glob("*.png"))) for p in (data / "heldout").iterdir()} == {"face": 10, "background": 10}

    faces = TokenStore.open(str(only(folder, "arpipe-runs/faces/*/store")))
    assert len(faces) == 180 and faces.lengths().tolist() == [130] * 180      # 1+4+9+16+36+64 tokens, 6 scales
    assert faces.manifest.metadata["tokenizer_layout"]["scales"] == [[s, s] for s in (1, 2, 3, 4, 6, 8)]

    sample = only(folder, "arpipe-runs/sample/*")
    samples = TokenStore.open(str(sample / "samples"))
    assert samples.conditions(np.arange(len(samples))) == ["face"] * 4        # classes: {face: 4}
    pngs = sorted((sample / "media" / "image").glob("*.png"))
    assert len(pngs) == 4 and Image.open(pngs[0]).size == (32, 32)
    assert (sample / "media" / "contact_image.png").exists()

    metrics = metrics_of(folder)
    assert {"heldout/bits_per_token", "reconstruction/psnr", "reconstruction/ssim",
            "image/intensity_mean_gap"} <= set(metrics["metrics"])
    assert metrics["metrics"]["reconstruction/psnr"] > 20       # the tokenizer's round trip on held-out faces
    assert "image/fid" in metrics["skipped"]                    # no Inception weights offline: said, not faked


def test_em_volume_anisotropic(tmp_path, ray_cluster):
    import mrcfile
    import tifffile

    from arpipe.stages.store import TokenStore

    folder = copy_examples(tmp_path)
    run_example(folder, "em_volume.yaml", "stages.train.steps=3", "stages.sample.num_samples=3",
                env={"RAY_ADDRESS": ray_cluster})

    with mrcfile.open(only(folder, "arpipe-runs/data/*/train.mrc")) as mrc:
        voxel = mrc.voxel_size
        assert (float(voxel.z), float(voxel.y), float(voxel.x)) == (4.0, 2.0, 2.0)
        assert mrc.data.ndim == 3

    crops = TokenStore.open(str(only(folder, "arpipe-runs/crops/*/store")))
    assert crops[0].tokens.shape == (4, 4, 4)                   # 8x16x16 voxels in 2x4x4 patches
    assert crops.manifest.metadata["tokenizer_layout"]["patch"] == [2, 4, 4]

    media = only(folder, "arpipe-runs/sample/*/media")
    tiffs, mrcs = sorted(media.glob("volume/*.tif")), sorted(media.glob("volume/*.mrc"))
    assert len(tiffs) == len(mrcs) == 3
    assert tifffile.imread(tiffs[0]).shape == (8, 16, 16)
    with mrcfile.open(mrcs[0]) as mrc:
        assert mrc.data.shape == (8, 16, 16)

    metrics = metrics_of(folder)
    assert {"heldout/bits_per_token", "reconstruction/psnr", "reconstruction/ssim",
            "volume/intensity_mean_gap"} <= set(metrics["metrics"])
    assert metrics["metrics"]["reconstruction/psnr"] > 15


def test_point_clouds_octree(tmp_path, ray_cluster):
    import pyarrow as pa
    from plyfile import PlyData

    from arpipe.stages.store import TokenStore

    folder = copy_examples(tmp_path)
    run_example(folder, "point_clouds.yaml", "stages.data.config.clouds=20", "stages.data.config.heldout=4",
                "stages.tokenizer.fit.heldout=4", "stages.train.steps=3", "stages.sample.num_samples=4",
                env={"RAY_ADDRESS": ray_cluster})

    assert len(list(folder.glob("arpipe-runs/data/*/train/*.ply"))) == 20
    clouds = TokenStore.open(str(only(folder, "arpipe-runs/clouds/*/store")))
    lengths = clouds.lengths()
    assert len(clouds) == 20 and lengths.min() < lengths.max()      # octree sequences vary with the shape

    sample = only(folder, "arpipe-runs/sample/*")
    plys = sorted((sample / "media" / "pointcloud").glob("*.ply"))
    with pa.ipc.open_file(str(sample / "rejects.arrow")) as reader:
        rejects = reader.read_all().to_pylist()
    assert len(plys) + len(rejects) == 4 and plys                  # incomplete trees are set aside, not written
    assert all("tokens do not decode" in r["reason"] for r in rejects)
    cloud = PlyData.read(str(plys[0]))["vertex"]
    assert len(cloud) > 0 and {"x", "y", "z"} <= set(cloud.data.dtype.names)

    metrics = metrics_of(folder)["metrics"]
    assert {f"pointcloud/{m}_{d}" for m in ("mmd", "cov", "1nna") for d in ("cd", "emd")} <= set(metrics)
    assert {"reconstruction/chamfer", "heldout/bits_per_token"} <= set(metrics)


def bucket_keys(env: dict[str, str], uri: str) -> list[str]:
    import boto3

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_REGION"],
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return [o["Key"].removeprefix(prefix + "/") for page in pages for o in page.get("Contents", [])]


def committed_stages(env: dict[str, str], uri: str) -> dict[str, int]:
    """stage -> how many of its outputs are committed (an outputs.json at <stage>/<fingerprint>/) under uri."""
    found: dict[str, int] = {}
    for key in bucket_keys(env, uri):
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == "outputs.json" and not parts[0].startswith("."):
            found[parts[0]] = found.get(parts[0], 0) + 1
    return found


S3_STAGES = ["data", "digits", "tokenizer", "train"]

@pytest.fixture(scope="module")
def s3_example(tmp_path_factory, ray_cluster, s3_server):
    """A copy of examples/, ARPIPE_STORAGE on a fresh bucket and the AWS_* as the user exports them, and
    the example run once on this machine up to its token store."""
    import uuid

    tmp = tmp_path_factory.mktemp("s3_example")
    folder = copy_examples(tmp)
    storage = f"{s3_server.make_bucket(f'ex-{uuid.uuid4().hex[:12]}')}/arpipe-runs"
    env = {**s3_server.env, "RAY_ADDRESS": ray_cluster, "ARPIPE_STORAGE": storage,
           "ARPIPE_STAGING": str(tmp / "staging")}
    states = run_example(folder, "s3_storage.yaml", env=env, flags=("--until", "digits"))
    return folder, storage, env, states


def test_s3_storage(s3_example):
    folder, storage, env, states = s3_example
    assert sorted(states) == ["data", "digits", "tokenizer"]
    assert not (folder / "arpipe-runs").exists()                # nothing written beside the pipeline
    assert committed_stages(env, storage) == {"data": 1, "digits": 1, "tokenizer": 1}
    keys = bucket_keys(env, storage)
    assert any(k.startswith("data/") and k.endswith("/digits.npy") for k in keys)
    assert any(k.startswith("digits/") and k.endswith("/store/manifest.json") for k in keys)

    again = arpipe("run", "s3_storage.yaml", "--until", "digits", cwd=folder, env=env, check=True)
    assert stage_lines(again.stdout) == {s: ["cached"] for s in ("data", "tokenizer", "digits")}


def test_s3_storage_train(s3_example):
    folder, storage, env, _ = s3_example
    run = arpipe("run", "s3_storage.yaml", "-s", "stages.train.steps=2", cwd=folder, env=env, timeout=600,
                 check=True)
    assert stage_lines(run.stdout)["train"] == ["running", "done"]
    assert committed_stages(env, storage) == {s: 1 for s in S3_STAGES}
    keys = bucket_keys(env, storage)
    assert any(k.startswith("train/") and k.endswith("/model/model.safetensors") for k in keys)
    again = arpipe("run", "s3_storage.yaml", "-s", "stages.train.steps=2", cwd=folder, env=env, check=True)
    assert stage_lines(again.stdout) == {s: ["cached"] for s in S3_STAGES}


@pytest.fixture(scope="module")
def ray_head():
    from test_cluster_jobs import RayHead

    head = RayHead("disabled").start()
    yield head
    head.stop()


def test_cluster_submit(s3_example, ray_head, tmp_path):
    """examples/cluster_submit.md as written: the S3 example submitted to a Ray cluster (a local head that,
    like a real one, has none of this shell's AWS_* variables: --env hands them over; the storage travels resolved).

    What this machine made is a cache hit on the cluster (same bucket, same code); the token store is
    forced to be made again there.
    """
    folder, storage, env, _ = s3_example
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    submit = arpipe("submit", "s3_storage.yaml", "--address", ray_head.address, "--tracking-uri", tracking,
                    "--env", "AWS_*", "--until", "digits", "--force", "digits",
                    "--follow", cwd=folder, env=client_env, timeout=600, check=True)
    job = next(line.split()[1] for line in submit.stdout.splitlines() if line.startswith("submitted "))
    assert job.startswith("arpipe-s3-storage-") and f"{job} SUCCEEDED" in submit.stdout
    assert stage_lines(submit.stdout) == {"data": ["cached"], "tokenizer": ["cached"],
                                          "digits": ["running", "done"]}
    assert committed_stages(env, storage)["digits"] == 1        # the same fingerprint, made again in place
    assert not (folder / "arpipe-runs").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("s3-storage").experiment_id])
    cache = {r.data.tags["arpipe.stage"]: r.data.tags["arpipe.cache"] for r in runs if "arpipe.stage" in r.data.tags}
    assert cache == {"data": "hit", "tokenizer": "hit", "digits": "miss"}

    listed = arpipe("jobs", "list", "--address", ray_head.address, cwd=folder, env=client_env, check=True)
    assert any(line.startswith(job) and "SUCCEEDED" in line for line in listed.stdout.splitlines())


def test_captioned_digits(tmp_path, ray_cluster):
    """The captioned-digits example, shortened: every image stored with its measured caption and the caption's
    text tokens, which decode back to it; a model trained on them; a sample drawn for every prompt of the file."""
    from arpipe.stages.modalities import load_tokenizer
    from arpipe.stages.store import TokenStore

    folder = copy_examples(tmp_path)
    states = run_example(folder, "captioned_digits.yaml", "stages.data.config.count=300",
                         "stages.fit_tok.fit.max_samples=200", "stages.fit_text.fit.heldout=16",
                         "stages.train.steps=20", "stages.train.checkpoint_every=20",
                         "stages.sample.samples_per_prompt=1", env={"RAY_ADDRESS": ray_cluster})
    assert set(states) == {"data", "fit_tok", "fit_text", "tokenize", "train", "sample", "judge", "evaluate"}
    prompts = (folder / "captioned_digits_prompts.txt").read_text().splitlines()
    drawn = TokenStore.open(str(only(folder, "arpipe-runs/sample/*/samples")))
    assert [s.caption for s in drawn] == prompts
    scores = json.loads(only(folder, "arpipe-runs/evaluate/*/metrics/metrics.json").read_text())
    assert {f"image/cas/{d}" for d in range(10)} <= set(scores["metrics"])   # every prompt names a digit
    assert scores["metrics"]["image/attribute/thick_vs_thin/pairs"] == 10   # "a thick X" with "a thin X"
    store = TokenStore.open(str(only(folder, "arpipe-runs/tokenize/*/store")))
    text = load_tokenizer(str(only(folder, "arpipe-runs/fit_text/*/tokenizer")))
    samples = list(store)
    assert len(samples) == 300 and all(s.caption and s.caption_tokens for s in samples)
    assert all(s.caption.endswith(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))
               for s in samples)
    assert text.decode_texts([np.asarray(s.caption_tokens) for s in samples]) == [s.caption for s in samples]
