"""Every file below a source is stored, quarantined with a reason, or skipped with a reason (issue 16).

A user points `tokenize` stages at five messy folders, one per reader: real data (scikit-learn's
digits, scikit-image's GIF, the MNI brain volume and point clouds on its surface) beside files that
do not decode (garbage and zero bytes with a valid suffix), files of other formats (.doc, README.txt,
a stray PNG), and hostile ones (a dotfile, a name with spaces and non-ASCII letters, a symlink to
nothing, a nested folder). One `arpipe run` tokenizes all five; each test then accounts for every
file in its folder: stored + quarantined + skipped == the files present, with each skipped file
named in `rejects.arrow`, counted in the stage's log line and in MLflow.
"""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from helpers import arpipe, stage_lines, write
from realdata import brain_clouds, digits_folder, gif_path, mni_volume

GOOD_NAME = "ünï côde"   # a name with a space and non-ASCII letters: read like any other


def _hostile(folder: Path, link_target: str) -> None:
    """What lands in real folders besides data: OS metadata, notes, a link whose target was removed."""
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "README.txt").write_text("how this folder was made\n")
    (folder / "notes.doc").write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1")
    os.symlink(f"/nonexistent/{link_target}", folder / link_target)


def _images(folder: Path) -> None:
    digits_folder(folder, count=24)                             # 24 PNGs in one sub-folder per class
    png = (folder / "0" / "0000.png").read_bytes()
    shutil.copy(gif_path(), folder / "anim.gif")                # read: its first frame
    (folder / f"{GOOD_NAME}.png").write_bytes(png)
    (folder / "nested" / "deeper").mkdir(parents=True)
    (folder / "nested" / "deeper" / "extra.png").write_bytes(png)
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "garbage.jpg").write_bytes(os.urandom(300))
    (folder / "empty.png").write_bytes(b"")
    _hostile(folder, "missing.png")


def _shards(folder: Path) -> None:
    import webdataset as wds
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    (folder / "nested").mkdir(parents=True)
    for k, name in enumerate(["train-000.tar", f"{GOOD_NAME}.tar", "nested/more.tar"]):
        with wds.TarWriter(str(folder / name)) as sink:
            for i in range(k * 4, k * 4 + 4):
                buf = io.BytesIO()
                Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(buf, format="PNG")
                sink.write({"__key__": f"d{i:04d}", "png": buf.getvalue(), "cls": int(digits.target[i])})
    (folder / "garbage.tar").write_bytes(os.urandom(2048))
    (folder / "empty.tar").write_bytes(b"")
    shutil.copy(folder / "train-000.tar", folder / "copy.tar.bak")   # a backup of a shard: not a shard
    _hostile(folder, "missing.tar")


def _video(folder: Path) -> None:
    (folder / "nested" / "sub").mkdir(parents=True)
    for name in ("clip.gif", f"{GOOD_NAME}.gif", "nested/sub/clip.gif"):
        shutil.copy(gif_path(), folder / name)
    (folder / "garbage.mp4").write_bytes(os.urandom(4096))
    (folder / "empty.webm").write_bytes(b"")
    from PIL import Image

    Image.open(gif_path()).convert("RGB").save(folder / "poster.png")   # a still: not a video
    _hostile(folder, "missing.mp4")


def _slices(folder: Path) -> None:
    """A volume as a folder of TIFF slices: six good ones, one garbage, one empty, and what is not a slice."""
    import tifffile

    planes = mni_volume(2)[40:46]
    folder.mkdir(parents=True)
    for z, name in enumerate(["slice_00", "slice_01", "slice_02", "slice_04", "slice_05", f"slice_07 {GOOD_NAME}"]):
        tifffile.imwrite(folder / f"{name}.tif", planes[z])
    (folder / "slice_03.tif").write_bytes(os.urandom(1024))    # z 3: the crops through it are quarantined
    (folder / "slice_06.tif").write_bytes(b"")
    (folder / "._slice_00.tif").write_bytes(b"\x00\x05\x16\x07")   # macOS resource fork: hidden
    (folder / "nested").mkdir()
    tifffile.imwrite(folder / "nested" / "extra.tif", planes[0])   # a slice stack is the top level only
    _hostile(folder, "missing.tif")


def _clouds(folder: Path) -> None:
    brain_clouds(folder, count=3, points=512)
    (folder / "nested" / "sub").mkdir(parents=True)
    shutil.copy(folder / "brain0.ply", folder / "nested" / "sub" / "brain.ply")
    shutil.copy(folder / "brain1.ply", folder / f"{GOOD_NAME}.ply")
    (folder / "garbage.ply").write_bytes(b"ply\nformat binary_little_endian 1.0\n" + os.urandom(200))
    (folder / "empty.npy").write_bytes(b"")
    (folder / "mesh.obj").write_text("v 0 0 0\nv 1 0 0\nf 1 2 1\n")
    _hostile(folder, "missing.ply")


PIPELINE = """
name: every-file
storage: ./runs
stages:
  tok:
    kind: tokenizer
    source: {{modality: image, uri: ./data/images, channels: 1, size: 8}}
    tokenizer: {{type: msvq, scales: [1, 2, 4, 8], codebook_size: 16, fit_iters: 10}}
    fit: {{max_samples: 40, heldout: 4}}
  images:
    kind: tokenize
    source: {{modality: image, uri: ./data/images, channels: 1, size: 8, files_per_unit: 8}}
    tokenizer: ${{tok.tokenizer}}
    max_reject_fraction: 0.5
    progress: false
  shards:
    kind: tokenize
    source: {{modality: image, uri: ./data/shards, format: webdataset, channels: 1, size: 8}}
    tokenizer: ${{tok.tokenizer}}
    max_reject_fraction: 0.5
    progress: false
  video:
    kind: tokenize
    source: {{modality: video, uri: ./data/video, clip_len: 4, size: 8}}
    tokenizer: {root}/tok_video
    max_reject_fraction: 0.5
    progress: false
  volume:
    kind: tokenize
    source: {{modality: volume, uri: ./data/slices, crop: [1, 32, 32], stride: [1, 48, 48]}}
    tokenizer: {root}/tok_volume
    max_reject_fraction: 0.5
    progress: false
  points:
    kind: tokenize
    source: {{modality: pointcloud, uri: ./data/clouds}}
    tokenizer: {root}/tok_points
    max_reject_fraction: 0.8
    progress: false
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory, ray_cluster):
    """The five folders, small tokenizers for the three that the image tokenizer does not fit, one run."""
    from arpipe.stages.modalities import make_tokenizer

    root = tmp_path_factory.mktemp("every_file")
    data = root / "data"
    _images(data / "images")
    _shards(data / "shards")
    _video(data / "video")
    _slices(data / "slices")
    _clouds(data / "clouds")
    rng = np.random.default_rng(0)
    make_tokenizer("patch_vq", input_shape=[3, 4, 8, 8], patch=[2, 4, 4], codebook_size=8, modality="video",
                   fit_iters=5).fit(rng.random((8, 3, 4, 8, 8), dtype=np.float32)).save(str(root / "tok_video"))
    make_tokenizer("patch_vq", input_shape=[1, 1, 32, 32], patch=[1, 8, 8], codebook_size=8, modality="volume",
                   fit_iters=5).fit(rng.random((8, 1, 1, 32, 32), dtype=np.float32)).save(str(root / "tok_volume"))
    make_tokenizer("octree", depth=4).save(str(root / "tok_points"))
    write(root, {"pipeline.yaml": PIPELINE.format(root=root)})
    env = {"RAY_ADDRESS": ray_cluster}
    run = arpipe("run", "pipeline.yaml", cwd=root, env=env, check=True)
    return root, run.stdout, env


def present(folder: Path) -> set[str]:
    """Every file a user sees below ``folder`` (``find -type f -o -type l``), as paths relative to it."""
    return {(Path(d) / n).relative_to(folder).as_posix() for d, _dirs, names in os.walk(folder) for n in names}


def _table(path: Path) -> list[dict]:
    with pa.ipc.open_file(str(path)) as reader:
        return reader.read_all().to_pylist()


def account(project, stage: str, source: str, *, stored: set[str], quarantined: set[str], skipped: set[str],
            samples: int, skip_counts: str, stored_file=None) -> list[dict]:
    """Account for every file of ``source`` as the stage's outputs name it, and check the story told:
    stored (a sample in the store, no reject row), quarantined (a reject row), skipped (a ``skipped:``
    row), their union the files present, and the stage's log line. ``stored_file`` maps a sample's
    index row to its file when the sample's source URI does not name it (volume crops). The rows."""
    root, stdout, _env = project
    out = next(root.glob(f"runs/{stage}/*/outputs.json")).parent
    folder = str(root / "data" / source)

    def rel(uri: str) -> str:
        assert uri.startswith(folder + "/"), uri
        return uri[len(folder) + 1:].split("#")[0]

    rows = _table(out / "rejects.arrow")
    assert all(r["stage"] == stage and r["reason"] for r in rows)
    got_skipped = {rel(r["source"]) for r in rows if r["reason"].startswith("skipped: ")}
    got_quarantined = {rel(r["source"]) for r in rows if not r["reason"].startswith("skipped: ")}
    index = [row for idx in sorted((out / "store").glob("*.idx.arrow")) for row in _table(idx)]
    got_stored = {stored_file(row) if stored_file else rel(row["source_uri"]) for row in index} - got_quarantined
    files = present(root / "data" / source)
    print(f"{stage}: {len(files)} files = {len(got_stored)} stored + {len(got_quarantined)} quarantined + "
          f"{len(got_skipped)} skipped")
    assert (got_stored, got_quarantined, got_skipped) == (stored, quarantined, skipped)
    assert stored | quarantined | skipped == files and len(stored) + len(quarantined) + len(skipped) == len(files)
    line = store_line(stdout, stage)
    assert f"{len(index)} samples" in line and len(index) == samples, line
    assert f"{len(quarantined)} rejected, {len(skipped)} skipped ({skip_counts})" in line, line
    return rows


def store_line(stdout: str, stage: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith(f"[{stage}] store "))


HOSTILE_SKIPS = {".DS_Store", "README.txt", "notes.doc"}
SKIP_COUNTS = ".doc: 1, .txt: 1, broken link: 1, hidden: 1"   # the image folder's, as its log line says them


def test_image_folder_every_file_accounted_for(project):
    root, stdout, env = project
    digits = {str(p.relative_to(root / "data" / "images")) for p in (root / "data" / "images").glob("[0-9]/*.png")}
    expected = dict(samples=27, stored=digits | {"anim.gif", f"{GOOD_NAME}.png", "nested/deeper/extra.png"},
                    quarantined={"truncated.png", "garbage.jpg", "empty.png"},
                    skipped=HOSTILE_SKIPS | {"missing.png"}, skip_counts=SKIP_COUNTS)
    rows = account(project, "images", "images", **expected)
    reasons = {r["source"].rsplit("/", 1)[1]: r["reason"] for r in rows}
    assert reasons["notes.doc"].startswith("skipped: .doc is not a format the image reader reads (png, jpg")
    assert "convert the file" in reasons["notes.doc"]
    assert "symlink to '/nonexistent/missing.png'" in reasons["missing.png"]
    assert reasons[".DS_Store"].startswith("skipped: hidden file")
    # the tokenizer stage fitted on the same folder and said so too
    assert f"[tok] read 27 samples from {root / 'data' / 'images'}: 3 rejected, 4 skipped ({SKIP_COUNTS})" in stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("every-file")
    [run] = client.search_runs([exp.experiment_id], filter_string="tags.`arpipe.stage` = 'images'")
    metrics = run.data.metrics
    assert metrics["skipped"] == 4 and metrics["rejects"] == 3 and metrics["samples"] == 27
    assert metrics["skipped_doc"] == metrics["skipped_txt"] == metrics["skipped_hidden"] == 1
    assert metrics["skipped_broken_link"] == 1

    # resuming the committed units reports the same counts (skips are listed again, rejects kept per unit)
    next(root.glob("runs/images/*/outputs.json")).unlink()
    rerun = arpipe("run", "pipeline.yaml", "--only", "images", cwd=root, env=env, check=True)
    assert stage_lines(rerun.stdout)["images"] == ["resuming", "done"], rerun.stdout
    assert "4 of 4 units reused" in store_line(rerun.stdout, "images")
    again = account((root, rerun.stdout, env), "images", "images", **expected)
    assert [(r["source"], r["reason"]) for r in again] == [(r["source"], r["reason"]) for r in rows]


def test_image_shards_every_file_accounted_for(project):
    account(project, "shards", "shards", samples=12,
            stored={"train-000.tar", f"{GOOD_NAME}.tar", "nested/more.tar"},
            quarantined={"garbage.tar", "empty.tar"}, skipped=HOSTILE_SKIPS | {"missing.tar", "copy.tar.bak"},
            skip_counts=".bak: 1, .doc: 1, .txt: 1, broken link: 1, hidden: 1")


def test_video_every_file_accounted_for(project):
    account(project, "video", "video", samples=18,   # 24 frames: 6 clips of 4 per GIF
            stored={"clip.gif", f"{GOOD_NAME}.gif", "nested/sub/clip.gif"},
            quarantined={"garbage.mp4", "empty.webm"}, skipped=HOSTILE_SKIPS | {"missing.mp4", "poster.png"},
            skip_counts=".doc: 1, .png: 1, .txt: 1, broken link: 1, hidden: 1")


def test_volume_slices_every_file_accounted_for(project):
    root = project[0]
    slices = sorted(n for n in os.listdir(root / "data" / "slices") if n.startswith("slice_"))   # z order

    def slice_of(row: dict) -> str:   # a crop's key names its z origin: one slice per crop (crop depth 1)
        return slices[int(re.search(r"/z(\d+)_", row["key"]).group(1))]

    rows = account(project, "volume", "slices", samples=54, stored_file=slice_of,   # 9 crops per slice
                   stored={"slice_00.tif", "slice_01.tif", "slice_02.tif", "slice_04.tif", "slice_05.tif",
                           f"slice_07 {GOOD_NAME}.tif"},
                   quarantined={"slice_03.tif", "slice_06.tif"},
                   skipped=HOSTILE_SKIPS | {"missing.tif", "._slice_00.tif", "nested/extra.tif"},
                   skip_counts=".doc: 1, .txt: 1, broken link: 1, hidden: 2, sub-folder: 1")
    reasons = {r["source"].rsplit("/", 1)[1]: r["reason"] for r in rows}
    assert reasons["slice_03.tif"].startswith("cannot read TIFF slice")
    assert reasons["extra.tif"].startswith("skipped: in a sub-folder")


def test_point_clouds_every_file_accounted_for(project):
    account(project, "points", "clouds", samples=5,
            stored={"brain0.ply", "brain1.ply", "brain2.ply", "nested/sub/brain.ply", f"{GOOD_NAME}.ply"},
            # README.txt is read: .txt is an XYZ point format, and prose is not numbers
            quarantined={"garbage.ply", "empty.npy", "README.txt"},
            skipped={".DS_Store", "notes.doc", "mesh.obj", "missing.ply"},
            skip_counts=".doc: 1, .obj: 1, broken link: 1, hidden: 1")
