"""Fitting tokenizers and tokenizing real data of all four modalities through `arpipe run`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from helpers import arpipe, spawn, stage_lines, write
from realdata import brain_clouds, digits_folder, gif_path, mni_mrc

FOUR = """
name: four
storage: ./runs
stages:
  tok_image:
    kind: tokenizer
    source: {modality: image, uri: ./data/digits, channels: 1, size: 8}
    tokenizer: {type: msvq, scales: [1, 2, 4, 8], codebook_size: 64}
    fit: {max_samples: 200, heldout: 16}
  image:
    kind: tokenize
    source: {modality: image, uri: ./data/digits, channels: 1, size: 8}
    tokenizer: ${tok_image.tokenizer}
  tok_video:
    kind: tokenizer
    source: {modality: video, uri: ./data/video, clip_len: 8, stride: 8, size: 16}
    tokenizer: {type: patch_vq, patch: [2, 4, 4], codebook_size: 32}
    fit: {max_samples: 3, heldout: 1}
  video:
    kind: tokenize
    source: {modality: video, uri: ./data/video, clip_len: 8, stride: 8, size: 16}
    tokenizer: ${tok_video.tokenizer}
  tok_volume:
    kind: tokenizer
    source: {modality: volume, uri: ./data/mni.mrc, crop: [16, 32, 32], stride: [32, 48, 48]}
    tokenizer: {type: patch_vq, patch: [4, 8, 8], codebook_size: 32}
    fit: {max_samples: 30, heldout: 4}
  volume:
    kind: tokenize
    source: {modality: volume, uri: ./data/mni.mrc, crop: [16, 32, 32], stride: [32, 48, 48]}
    tokenizer: ${tok_volume.tokenizer}
  tok_points:
    kind: tokenizer
    source: {modality: pointcloud, uri: ./data/clouds}
    tokenizer: {type: octree, depth: 5}
    fit: {max_samples: 3, heldout: 1}
  points:
    kind: tokenize
    source: {modality: pointcloud, uri: ./data/clouds}
    tokenizer: ${tok_points.tokenizer}
"""


@pytest.fixture(scope="module")
def four_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("four")
    digits_folder(root / "data" / "digits", count=120)
    (root / "data" / "video").mkdir(parents=True)
    shutil.copy(gif_path(), root / "data" / "video" / "clip.gif")
    mni_mrc(root / "data" / "mni.mrc")
    brain_clouds(root / "data" / "clouds", count=4)
    return root


def store_info(folder: Path, stage: str) -> dict:
    store = next(folder.glob(f"runs/{stage}/*/store"))
    proc = arpipe("store", "info", "--json", str(store), cwd=folder, check=True)
    return json.loads(proc.stdout)


def test_four_modalities_from_real_data(four_data, ray_cluster):
    folder = four_data
    write(folder, {"pipeline.yaml": FOUR})
    run = arpipe("run", "pipeline.yaml", cwd=folder, env={"RAY_ADDRESS": ray_cluster}, check=True)
    assert all(states[-1] == "done" for states in stage_lines(run.stdout).values()), run.stdout

    expected = {"image": (120, [85]), "video": (3, None), "volume": (None, None), "points": (4, None)}
    for stage, (count, shape) in expected.items():
        info = store_info(folder, stage)
        tok_dir = next(folder.glob(f"runs/tok_{stage}/*/tokenizer"))
        tok_doc = json.loads((tok_dir / "tokenizer.json").read_text())
        assert info["tokenizer"]["digest"] == tok_doc["digest"], stage
        if count is not None:
            assert info["samples"] == count, (stage, info)
        if shape is not None:
            assert info["shapes"] == [shape], (stage, info)
    volume = store_info(folder, "volume")
    assert volume["samples"] >= 4 and volume["shapes"] == [[4, 4, 4]]
    video = store_info(folder, "video")
    assert video["shapes"] == [[4, 4, 4]]
    # labels from the folder names flow into the condition column
    head = arpipe("store", "head", "-n", "3", str(next(folder.glob("runs/image/*/store"))), cwd=folder, check=True)
    conditions = [line.split("condition=")[1].split()[0].strip('"') for line in head.stdout.splitlines()
                  if "condition=" in line]
    assert len(conditions) == 3 and set(conditions) <= set("0123456789")


def _digits_project(root: Path, count: int) -> Path:
    digits_folder(root / "data" / "digits", count=count)
    write(root, {"pipeline.yaml": """
        name: digits
        storage: ./runs
        stages:
          tok:
            kind: tokenizer
            source: {modality: image, uri: ./data/digits, channels: 1, size: 8}
            tokenizer: {type: msvq, scales: [1, 2, 4, 8], codebook_size: 32}
            fit: {max_samples: 100, heldout: 8}
          tokenize:
            kind: tokenize
            source: {modality: image, uri: ./data/digits, channels: 1, size: 8, files_per_unit: 2}
            tokenizer: ${tok.tokenizer}
            shards: {samples_per_shard: 64}
            workers: 2
        """})
    return root


# in CI the kill campaign (tests/faults, `tokenize`) kills this stage at seeded moments and checks unit reuse
# and the store against an undisturbed run's; this one-kill story runs in `make test-full`
@pytest.mark.full
def test_kill_9_mid_tokenize_then_resume_gives_the_same_store(tmp_path, ray_cluster):
    folder = _digits_project(tmp_path, count=400)
    env = {"RAY_ADDRESS": ray_cluster}
    arpipe("run", "pipeline.yaml", "--until", "tok", cwd=folder, env=env, check=True)
    proc = spawn("run", "pipeline.yaml", cwd=folder, env=env)
    deadline = time.time() + 120
    while len(list(folder.glob("runs/tokenize/*/.arpipe/units/*.json"))) < 10:
        assert proc.poll() is None and time.time() < deadline, "tokenize finished before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(folder.glob("runs/tokenize/*/.arpipe/units/*.json")))
    assert not list(folder.glob("runs/tokenize/*/outputs.json"))

    rerun = arpipe("run", "pipeline.yaml", cwd=folder, env=env, check=True)
    line = next(x for x in rerun.stdout.splitlines() if "units from" in x)
    reused = int(line.split(": ")[1].split(" reused")[0])
    assert done_before <= reused < 200, line
    assert f"{200 - reused} to encode" in line

    fresh = arpipe("run", "pipeline.yaml", "-s", "storage=./fresh", cwd=folder, env=env, check=True)
    assert "0 reused, 200 to encode" in fresh.stdout
    resumed = json.loads(next(folder.glob("runs/tokenize/*/store/manifest.json")).read_text())
    clean = json.loads(next(folder.glob("fresh/tokenize/*/store/manifest.json")).read_text())
    assert resumed["digest"] == clean["digest"] and resumed["totals"]["samples"] == 400


def test_corrupt_files_are_quarantined(tmp_path, ray_cluster):
    folder = _digits_project(tmp_path, count=500)
    pngs = sorted((folder / "data" / "digits").rglob("*.png"))
    for path in pngs[::50]:   # ten corrupt files among 500
        path.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    env = {"RAY_ADDRESS": ray_cluster}
    run = arpipe("run", "pipeline.yaml", "-s", "stages.tokenize.max_reject_fraction=0.05", cwd=folder, env=env,
                 check=True)
    assert "490 samples" in run.stdout and "10 rejected" in run.stdout
    import pyarrow.ipc as ipc

    rejects = ipc.open_file(str(next(folder.glob("runs/tokenize/*/rejects.arrow")))).read_all().to_pylist()
    assert len(rejects) == 10
    assert {Path(r["source"]).name for r in rejects} == {p.name for p in pngs[::50]}
    assert all(r["reason"] and r["stage"] == "tokenize" for r in rejects)
    manifest = json.loads(next(folder.glob("runs/tokenize/*/store/manifest.json")).read_text())
    assert manifest["totals"]["samples"] == 490 and manifest["metadata"]["rejects"] == 10

    strict = arpipe("run", "pipeline.yaml", "-s", "stages.tokenize.max_reject_fraction=0.001", cwd=folder, env=env)
    assert strict.returncode == 2   # a data problem: the user fixes it
    assert "10 of 500 samples rejected (2.00%), more than max_reject_fraction 0.001" in strict.stderr
    assert "Traceback" not in strict.stderr


def test_tokenizer_config_refits_but_workers_do_not(tmp_path, ray_cluster):
    folder = _digits_project(tmp_path, count=60)
    env = {"RAY_ADDRESS": ray_cluster}
    arpipe("run", "pipeline.yaml", cwd=folder, env=env, check=True)
    plan = arpipe("plan", "pipeline.yaml", "-s", "stages.tokenize.workers=1", cwd=folder, check=True)
    assert [line.split()[2] for line in plan.stdout.splitlines()[1:]] == ["cached", "cached"]
    plan = arpipe("plan", "pipeline.yaml", "-s", "stages.tok.tokenizer.codebook_size=16", cwd=folder, check=True)
    rows = {line.split()[0]: line for line in plan.stdout.splitlines()[1:]}
    assert "config changed: tokenizer.codebook_size 32 -> 16" in rows["tok"]
    assert " run " in rows["tokenize"]
    run = arpipe("run", "pipeline.yaml", "-s", "stages.tok.tokenizer.codebook_size=16", cwd=folder, env=env,
                 check=True)
    assert stage_lines(run.stdout) == {"tok": ["running", "done"], "tokenize": ["running", "done"]}


def test_source_and_store_on_s3(tmp_path, ray_cluster, s3_bucket):
    from arpipe.pipeline.storage import storage_for

    local = digits_folder(tmp_path / "digits", count=40)
    storage = storage_for(s3_bucket)
    for png in local.rglob("*.png"):
        storage.put_file(png, f"{s3_bucket}/data/digits/{png.relative_to(local).as_posix()}")
    write(tmp_path, {"pipeline.yaml": f"""
        name: s3digits
        storage: {s3_bucket}/runs
        stages:
          tok:
            kind: tokenizer
            source: {{modality: image, uri: {s3_bucket}/data/digits, channels: 1, size: 8}}
            tokenizer: {{type: msvq, scales: [1, 2, 4], codebook_size: 16}}
            fit: {{max_samples: 30, heldout: 4}}
          tokenize:
            kind: tokenize
            source: {{modality: image, uri: {s3_bucket}/data/digits, channels: 1, size: 8}}
            tokenizer: ${{tok.tokenizer}}
        """})
    env = {"RAY_ADDRESS": ray_cluster, "ARPIPE_STAGING": str(tmp_path / "staging")}
    arpipe("run", "pipeline.yaml", cwd=tmp_path, env=env, check=True)
    manifests = [e.relpath for e in storage.list(f"{s3_bucket}/runs/tokenize") if e.relpath.endswith("manifest.json")]
    [manifest] = manifests
    store = f"{s3_bucket}/runs/tokenize/{manifest.rsplit('/', 1)[0]}"
    info = json.loads(arpipe("store", "info", "--json", store, cwd=tmp_path, check=True).stdout)
    assert info["samples"] == 40 and info["shapes"] == [[21]]
    record = json.loads(storage.read_text(f"{store.rsplit('/', 1)[0]}/outputs.json"))
    bins = {k: v for k, v in record["files"].items() if k.endswith(".bin")}
    assert bins and all(v["digest"].startswith("xxh3_128:") for v in bins.values())
    verify = arpipe("store", "verify", store, cwd=tmp_path)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    again = arpipe("run", "pipeline.yaml", cwd=tmp_path, env=env, check=True)
    assert stage_lines(again.stdout) == {"tok": ["cached"], "tokenize": ["cached"]}
