"""Every file below a source is stored, quarantined with a reason, or skipped with a reason (issue 16).

A user points `tokenize` stages at five messy folders, one per reader: real data (scikit-learn's
digits, scikit-image's GIF, the MNI brain volume and point clouds on its surface) beside files that
do not decode (garbage and zero bytes with a valid suffix), files of other formats (.doc, README.txt,
a stray PNG), and hostile ones (a dotfile, a name with spaces and non-ASCII letters, a symlink to
nothing, a nested folder). One `arpipe run` tokenizes all five; each test then accounts for every
file in its folder: stored + quarantined + skipped == the files present, with each skipped file
named in `rejects.arrow`, counted in the stage's log line and in MLflow. Captioned folders (issue 17) add
the caption files to the account: each read as its image's caption, stored with its tokens (and, with a
`text` tokenizer fitted on them, as caption tokens), or its image quarantined with the reason.
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


NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _captioned(folder: Path) -> None:
    """Digits with a caption file beside each (`.txt`, same stem), and the ways captions go wrong."""
    digits_folder(folder, count=8)
    for png in folder.glob("[0-9]/*.png"):
        png.with_suffix(".txt").write_text(f"a handwritten {NUMBERS[int(png.parent.name)]}\n")
    png = (folder / "0" / "0000.png").read_bytes()
    for name in ("latin1", "blank", "alone"):
        (folder / f"{name}.png").write_bytes(png)
    (folder / "latin1.txt").write_bytes("un zéro écrit à la main".encode("latin-1"))   # not UTF-8
    (folder / "blank.txt").write_text("  \n")
    (folder / "notes.txt").write_text("captions written by hand\n")   # beside no image: not a caption
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")


def _caption_sidecar(folder: Path) -> None:
    """Digits whose captions are one JSON Lines sidecar; one image has no line there."""
    digits_folder(folder, count=6)
    pngs = sorted(folder.glob("[0-9]/*.png"))
    lines = [f'{{"file": "{p.relative_to(folder).as_posix()}", "caption": "digit {NUMBERS[int(p.parent.name)]}"}}'
             for p in pngs[1:]]
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")


def _edge_maps(folder: Path, images: Path) -> None:
    """Edge maps drawn by another tool (here scikit-image's Canny, saved as files) for the images below
    ``images``, under the same relative names: one image has none, one map is a .bmp, one map has no image and a
    note sits beside them."""
    from PIL import Image
    from skimage.feature import canny

    pngs = sorted(images.glob("[0-9]/*.png"))
    for k, png in enumerate(pngs[1:]):
        edges = canny(np.asarray(Image.open(png), dtype=np.float64) / 255, sigma=1.0)
        target = folder / png.relative_to(images).with_suffix(".bmp" if k == 0 else ".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((edges * 255).astype(np.uint8)).save(target)
    (folder / "9").mkdir(exist_ok=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "9" / "9999.png")
    (folder / "notes.txt").write_text("drawn with skimage.feature.canny(sigma=1)\n")


def _captioned_shards(folder: Path) -> None:
    """A WebDataset shard whose samples carry captions as `.txt` or in `.json`, one without, one not UTF-8."""
    import webdataset as wds
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder.mkdir(parents=True)
    with wds.TarWriter(str(folder / "train-000.tar")) as sink:
        for i in range(6):
            buf = io.BytesIO()
            Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(buf, format="PNG")
            sample = {"__key__": f"d{i:04d}", "png": buf.getvalue(), "cls": int(digits.target[i])}
            if i < 3:
                sample["txt"] = f"a handwritten {NUMBERS[digits.target[i]]}"
            elif i == 3:
                sample["json"] = {"caption": "a digit told in JSON", "label": int(digits.target[i])}
            elif i == 4:
                sample["txt"] = "ein Zähler".encode("latin-1")
            sink.write(sample)


def _video(folder: Path) -> None:
    (folder / "nested" / "sub").mkdir(parents=True)
    for name in ("clip.gif", f"{GOOD_NAME}.gif", "nested/sub/clip.gif"):
        shutil.copy(gif_path(), folder / name)
    (folder / "clip.txt").write_text("a man shrugs\n")   # its caption; the others have none
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
    (folder.parent / "slices.txt").write_text("six axial slices of an MNI brain\n")   # the volume's caption


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
    source: {{modality: video, uri: ./data/video, clip_len: 4, size: 8, captions: auto}}
    tokenizer: {root}/tok_video
    max_reject_fraction: 0.5
    progress: false
  volume:
    kind: tokenize
    source: {{modality: volume, uri: ./data/slices, crop: [1, 32, 32], stride: [1, 48, 48], captions: auto}}
    tokenizer: {root}/tok_volume
    max_reject_fraction: 0.5
    progress: false
  fit_text:
    kind: tokenizer
    source: {{modality: image, uri: ./data/captioned, channels: 1, size: 8, captions: auto}}
    tokenizer: {{type: text, vocab_size: 280}}
    fit: {{heldout: 2}}
  captioned:
    kind: tokenize
    source: {{modality: image, uri: ./data/captioned, channels: 1, size: 8, captions: auto, captions_required: true}}
    tokenizer: ${{tok.tokenizer}}
    text_tokenizer: ${{fit_text.tokenizer}}
    max_reject_fraction: 0.5
    progress: false
  fit_edges:
    kind: tokenizer
    source: {{modality: image, uri: ./data/images, channels: 1, size: 8, transform: canny}}
    tokenizer: {{type: msvq, scales: [1, 2, 4, 8], codebook_size: 16, fit_iters: 10}}
    fit: {{max_samples: 40, heldout: 4}}
  caption_sidecar:
    kind: tokenize
    source: {{modality: image, uri: ./data/caption_sidecar, channels: 1, size: 8, captions: auto}}
    tokenizer: ${{tok.tokenizer}}
    control: {{transform: canny, tokenizer: "${{fit_edges.tokenizer}}"}}
    progress: false
  paired_maps:
    kind: tokenize
    source: {{modality: image, uri: ./data/caption_sidecar, channels: 1, size: 8}}
    tokenizer: ${{tok.tokenizer}}
    control: {{source: {{modality: image, uri: ./data/edge_maps}}, tokenizer: "${{fit_edges.tokenizer}}"}}
    max_reject_fraction: 0.5
    progress: false
  captioned_shards:
    kind: tokenize
    source: {{modality: image, uri: ./data/captioned_shards, channels: 1, size: 8, captions: auto}}
    tokenizer: ${{tok.tokenizer}}
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
    _captioned(data / "captioned")
    _caption_sidecar(data / "caption_sidecar")
    _edge_maps(data / "edge_maps", data / "caption_sidecar")
    _captioned_shards(data / "captioned_shards")
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
            quarantined={"garbage.mp4", "empty.webm"},
            skipped=HOSTILE_SKIPS | {"missing.mp4", "poster.png", "clip.txt"},
            skip_counts=".doc: 1, .png: 1, .txt: 1, broken link: 1, caption: 1, hidden: 1")
    # every clip of the captioned video carries its caption; the other videos' clips have none
    captions = _captions(project, "video")
    assert {key: text for key, text in captions.items() if text} == {
        f"clip.gif/clip{k:06d}": "a man shrugs" for k in range(6)}


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
    # the volume's caption, beside its folder, is every crop's
    assert set(_captions(project, "volume").values()) == {"six axial slices of an MNI brain"}


def test_point_clouds_every_file_accounted_for(project):
    account(project, "points", "clouds", samples=5,
            stored={"brain0.ply", "brain1.ply", "brain2.ply", "nested/sub/brain.ply", f"{GOOD_NAME}.ply"},
            # README.txt is read: .txt is an XYZ point format, and prose is not numbers
            quarantined={"garbage.ply", "empty.npy", "README.txt"},
            skipped={".DS_Store", "notes.doc", "mesh.obj", "missing.ply"},
            skip_counts=".doc: 1, .obj: 1, broken link: 1, hidden: 1")


def _captions(project, stage: str) -> dict[str, str | None]:
    out = next(project[0].glob(f"runs/{stage}/*/outputs.json")).parent
    return {row["key"]: row["caption"] for idx in sorted((out / "store").glob("*.idx.arrow")) for row in _table(idx)}


def test_captions_beside_images_are_stored_with_their_tokens_and_bad_ones_quarantine_the_image(project):
    """A caption `.txt` beside each image is read as its caption (and counted as such, not as an unread file);
    with captions required, an image whose caption is not UTF-8, blank or missing is quarantined, naming why."""
    root, stdout, env = project
    folder = root / "data" / "captioned"
    digits = {p.relative_to(folder).as_posix() for p in folder.glob("[0-9]/*.png")}
    captions = {p.relative_to(folder).as_posix() for p in folder.glob("*/*.txt")} | {"latin1.txt", "blank.txt"}
    rows = account(project, "captioned", "captioned", samples=8, stored=digits,
                   quarantined={"latin1.png", "blank.png", "alone.png"},
                   skipped=captions | {"notes.txt", ".DS_Store"}, skip_counts=".txt: 1, caption: 10, hidden: 1")
    reasons = {r["source"].rsplit("/", 1)[1]: r["reason"] for r in rows}
    assert reasons["latin1.png"].startswith("its caption file latin1.txt is not UTF-8 text"), reasons
    assert reasons["blank.png"].startswith("caption is empty, and captions_required is set")
    assert reasons["alone.png"].startswith("sample has no caption file beside it (alone.txt)")
    assert reasons["0000.txt"] == "skipped: caption: read as the caption of 0000.png, not a sample"
    stored = _captions(project, "captioned")
    assert stored == {key: f"a handwritten {NUMBERS[int(key.split('/')[0])]}" for key in digits}

    # `arpipe store head` shows a user each sample's caption with its tokens
    store = next(root.glob("runs/captioned/*/outputs.json")).parent / "store"
    head = arpipe("store", "head", str(store), "-n", "2", cwd=root, env=env, check=True).stdout
    first = sorted(digits)[0]
    assert f"key={first} " in head and f"    caption: a handwritten {NUMBERS[int(first[0])]}" in head, head


def test_a_caption_sidecar_names_captions_by_file_and_shard_members_carry_their_own(project):
    root = project[0]
    folder = root / "data" / "caption_sidecar"
    pngs = sorted(p.relative_to(folder).as_posix() for p in folder.glob("[0-9]/*.png"))
    account(project, "caption_sidecar", "caption_sidecar", samples=6, stored=set(pngs), quarantined=set(),
            skipped={"captions.jsonl"}, skip_counts="caption sidecar: 1")
    # not required: the image without a line is stored, without a caption
    assert _captions(project, "caption_sidecar") == {
        key: None if key == pngs[0] else f"digit {NUMBERS[int(key[0])]}" for key in pngs}

    # a shard's sample with a bad caption is quarantined, and the shard's later samples are still read
    from sklearn.datasets import load_digits

    rows = _table(next(root.glob("runs/captioned_shards/*/outputs.json")).parent / "rejects.arrow")

    target = load_digits().target
    assert _captions(project, "captioned_shards") == {
        **{f"train-000.tar/d{i:04d}": f"a handwritten {NUMBERS[target[i]]}" for i in range(3)},
        "train-000.tar/d0003": "a digit told in JSON", "train-000.tar/d0005": None}
    [bad] = rows
    assert bad["source"].endswith("train-000.tar#d0004") and bad["reason"].startswith("caption is not UTF-8 text")


def test_a_text_tokenizer_fitted_on_the_captions_encodes_them_into_the_store(project):
    """A `text` tokenizer stage fits a byte-level BPE on the folder's captions; the tokenize stage stores each
    caption's ids with the image's tokens, and they decode back to the caption. The artifact carries the
    standard Hugging Face tokenizer.json, which `tokenizers` reads as it is."""
    from tokenizers import Tokenizer as HFTokenizer

    from arpipe.stages.modalities import load_tokenizer
    from arpipe.stages.store import TokenStore

    root, stdout, env = project
    artifact = next(root.glob("runs/fit_text/*/outputs.json")).parent / "tokenizer"
    text = load_tokenizer(str(artifact))
    # 10 samples read (latin1.png's caption is not UTF-8: rejected), 2 held out; 6 of the 8 others have captions
    [line] = [ln for ln in stdout.splitlines() if "[fit_text] fitted text on 6 captions: " in ln]
    assert line.endswith(", heldout_exact=1"), line     # every held-out caption decodes back to itself
    store = TokenStore.open(str(next(root.glob("runs/captioned/*/outputs.json")).parent / "store"))
    assert store.manifest.metadata["text_tokenizer"]["digest"] == text.digest
    samples = list(store)
    assert len(samples) == 8 and all(s.caption_tokens for s in samples)
    assert [text.decode_texts([np.asarray(s.caption_tokens)])[0] for s in samples] == [s.caption for s in samples]
    hf = HFTokenizer.from_file(str(artifact / "huggingface" / "tokenizer.json"))
    assert [tuple(hf.encode(s.caption).ids) for s in samples] == [s.caption_tokens for s in samples]
    # a byte-level vocabulary beyond the bytes: common words are single tokens, so captions are short
    assert max(len(s.caption_tokens) for s in samples) < min(len(s.caption) for s in samples) / 2



def test_a_text_tokenizer_without_captions_of_another_type_or_in_the_wrong_place_fails_with_one_line(project):
    root, _stdout, env = project
    tok, text = (next(root.glob(f"runs/{s}/*/outputs.json")).parent / "tokenizer" for s in ("tok", "fit_text"))
    source = "{modality: image, uri: ./data/caption_sidecar, channels: 1, size: 8"
    write(root, {"refused.yaml": f"""
name: every-file
storage: ./runs
stages:
  no_captions: {{kind: tokenize, source: {source}}}, tokenizer: {tok}, text_tokenizer: {text}}}
  not_text: {{kind: tokenize, source: {source}, captions: auto}}, tokenizer: {tok}, text_tokenizer: {tok}}}
  text_first: {{kind: tokenize, source: {source}, captions: auto}}, tokenizer: {text}}}
"""})
    run = arpipe("run", "refused.yaml", cwd=root, env=env)
    output = run.stdout + run.stderr
    assert run.returncode == 2 and "Traceback" not in output, output
    lines = {ln.split()[0]: ln for ln in output.splitlines() if ln.split()[1:2] == ["failed"]}
    assert "text_tokenizer is set but the source reads no captions" in lines["no_captions"]
    assert "set source.captions" in lines["no_captions"]
    assert "text_tokenizer is a msvq tokenizer, not a text one" in lines["not_text"]
    assert "tokenizer is a text tokenizer: it encodes captions, not the source's samples" in lines["text_first"]


def test_each_image_keeps_the_tokens_of_its_canny_edges_which_decode_to_its_own_edges(project):
    """With `control: {transform: canny}` a store keeps each image's edge map (ControlAR's control), encoded by a
    tokenizer fitted on edge maps (`transform: canny` on its source). Decoded, each image's control tokens match
    its own Canny edges better than any other image's."""
    from arpipe.stages.modalities import load_tokenizer, open_reader
    from arpipe.stages.modalities.controls import control_image
    from arpipe.stages.store import TokenStore

    root = project[0]
    store = TokenStore.open(str(next(root.glob("runs/caption_sidecar/*/outputs.json")).parent / "store"))
    edges_tok = load_tokenizer(str(next(root.glob("runs/fit_edges/*/outputs.json")).parent / "tokenizer"))
    assert store.manifest.metadata["control"]["digest"] == edges_tok.digest
    samples = list(store)
    reader = open_reader("image", str(root / "data" / "caption_sidecar"), channels=1, size=8)
    images = {s.key: s.data for s in reader}
    edges = np.stack([control_image(images[s.key], "canny") for s in samples])
    decoded = np.stack(edges_tok.decode_arrays([np.asarray(s.control_tokens) for s in samples]))
    error = ((decoded[:, None] - edges[None]) ** 2).mean(axis=(2, 3, 4))   # [decoded i, edges of j]
    assert (error.argmin(axis=1) == np.arange(len(samples))).all(), error
    assert np.diag(error).mean() < 0.5 * error[~np.eye(len(samples), dtype=bool)].mean()



def test_control_maps_from_a_second_folder_pair_with_their_images_by_name(project):
    """`control: {source: <folder of maps>}`: each image's map is the file with its name (any image suffix) in
    the maps folder, tokenized beside it; an image without a map is quarantined and a map without an image is
    reported as skipped, each with the way out; the other files there are reported as for any source."""
    from PIL import Image

    from arpipe.stages.modalities import load_tokenizer
    from arpipe.stages.store import TokenStore

    root, stdout, _env = project
    images, maps = root / "data" / "caption_sidecar", root / "data" / "edge_maps"
    out = next(root.glob("runs/paired_maps/*/outputs.json")).parent
    store = TokenStore.open(str(out / "store"))
    edges_tok = load_tokenizer(str(next(root.glob("runs/fit_edges/*/outputs.json")).parent / "tokenizer"))
    assert store.manifest.metadata["control"] | {"sigma": None} == {
        "transform": "none", "source": str(maps), "sigma": None, "id": f"msvq:{edges_tok.digest[:12]}",
        "digest": edges_tok.digest, "uri": str(edges_tok_uri(root)), "vocab_size": edges_tok.vocab_size}
    samples = list(store)
    first = sorted(images.glob("[0-9]/*.png"))[0].relative_to(images).as_posix()
    assert sorted(s.key for s in samples) == sorted(p.relative_to(images).as_posix()
                                                    for p in images.glob("[0-9]/*.png"))[1:]
    drawn = {p.relative_to(maps).with_suffix("").as_posix(): np.asarray(Image.open(p), dtype=np.float32)[None] / 255
             for p in maps.glob("[0-8]/*.*")}
    wanted = np.stack([drawn[s.key.removesuffix(".png")] for s in samples])
    decoded = np.stack(edges_tok.decode_arrays([np.asarray(s.control_tokens) for s in samples]))
    error = ((decoded[:, None] - wanted[None]) ** 2).mean(axis=(2, 3, 4))   # [decoded i, map of j]
    assert (error.argmin(axis=1) == np.arange(len(samples))).all(), error

    rows = {r["source"]: r["reason"] for r in _table(out / "rejects.arrow")}
    assert rows.pop(f"{images / first}#{first}") == (
        f"no control map named {first.removesuffix('.png')} below {maps}: add it there (any image suffix), or move "
        "the image out of the source")
    assert rows.pop(str(maps / "9" / "9999.png")).startswith(
        "skipped: control map without image: no image named 9/9999 below")
    assert rows.pop(str(maps / "notes.txt")).startswith("skipped: .txt is not a format the image reader reads")
    assert rows.pop(str(images / "captions.jsonl")).startswith("skipped: ")
    assert not rows, rows
    line = store_line(stdout, "paired_maps")
    assert " 5 samples, " in line and "1 rejected, 3 skipped (" in line, line


def edges_tok_uri(root: Path) -> Path:
    return next(root.glob("runs/fit_edges/*/outputs.json")).parent / "tokenizer"
