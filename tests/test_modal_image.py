"""A user points the image reader at folders, WebDataset shards and arrays of real pictures."""

from __future__ import annotations

import hashlib
import io
import json
import pickle

import numpy as np
import pytest
import tifffile
import webdataset as wds
from PIL import Image
from skimage import data as skdata
from sklearn.datasets import load_digits

from arpipe.pipeline.errors import UserError
from arpipe.pipeline.storage import storage_for
from arpipe.stages.modalities import ImageReader, SampleError, Unit, open_reader


def _save(img: np.ndarray, path, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".tif", ".tiff"):
        tifffile.imwrite(path, img)
    else:
        Image.fromarray(img).save(path, **kw)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """astronaut/coffee/chelsea (PNG, JPEG, WebP, 16-bit TIFF) in class sub-folders."""
    root = tmp_path_factory.mktemp("photos")
    _save(skdata.astronaut(), root / "people" / "astronaut.png")
    _save(skdata.coffee(), root / "things" / "coffee.jpg", quality=90)
    _save(skdata.chelsea(), root / "animals" / "chelsea.webp")
    gray16 = (skdata.camera().astype(np.uint16) * 257)
    _save(gray16, root / "things" / "camera16.tif")
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_reads_every_format_with_folder_labels_resized(photo_folder):
    reader = ImageReader(str(photo_folder), size=32, files_per_unit=3)
    units = reader.units()
    assert [len(u.members) for u in units] == [3, 1]  # 4 images, 3 per unit, notes.txt ignored
    # units travel to Ray tasks and into the run ledger: plain JSON and back
    assert [Unit.from_json(json.loads(json.dumps(u.to_json()))) for u in units] == units
    samples = [s for u in units for s in reader.read(u)]
    by_key = {s.key: s for s in samples}
    assert sorted(by_key) == ["animals/chelsea.webp", "people/astronaut.png", "things/camera16.tif",
                            "things/coffee.jpg"]
    for s in samples:
        assert s.shape == (3, 32, 32) and s.data.dtype == np.float32
        assert 0.0 <= s.data.min() and s.data.max() <= 1.0
        with open(s.source_uri, "rb") as f:
            assert s.source_digest == "sha256:" + hashlib.sha256(f.read()).hexdigest()
    assert by_key["people/astronaut.png"].label == "people"
    assert by_key["things/coffee.jpg"].meta["source_size"] == [400, 600]
    # 16-bit gray TIFF keeps its dynamic range and becomes 3 identical channels
    cam = by_key["things/camera16.tif"].data
    assert np.allclose(cam[0], cam[1]) and abs(cam.mean() - skdata.camera().mean() / 255) < 0.01


def test_resize_modes_and_grayscale(photo_folder):
    path = str(photo_folder / "things" / "coffee.jpg")
    crop = next(iter(ImageReader(path, size=(16, 48), resize="resize_crop")))
    stretch = next(iter(ImageReader(path, size=(16, 48), resize="resize")))
    center = next(iter(ImageReader(path, size=64, resize="center_crop", channels=1)))
    native = next(iter(ImageReader(path, resize="none")))
    assert crop.shape == stretch.shape == (3, 16, 48)
    assert not np.allclose(crop.data, stretch.data)
    assert center.shape == (1, 64, 64)
    full = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255
    assert np.abs(center.data[0] - full[168:232, 268:332]).max() < 0.01
    assert native.shape == (3, 400, 600)


def test_sidecar_labels_csv_and_json(tmp_path):
    faces = skdata.lfw_subset()[:4]
    for i, face in enumerate(faces):
        _save((face * 255).astype(np.uint8), tmp_path / "csv" / f"face{i}.png")
        _save((face * 255).astype(np.uint8), tmp_path / "json" / "nested" / f"face{i}.png")
    (tmp_path / "csv" / "labels.csv").write_text("file,label\n" + "".join(f"face{i}.png,{i % 2}\n" for i in range(4)))
    (tmp_path / "json" / "labels.json").write_text(json.dumps({f"nested/face{i}": f"id{i}" for i in range(4)}))
    csv_labels = [s.label for s in ImageReader(str(tmp_path / "csv"), channels=1)]
    json_labels = [s.label for s in ImageReader(str(tmp_path / "json"), channels=1)]
    assert csv_labels == ["0", "1", "0", "1"]
    assert json_labels == ["id0", "id1", "id2", "id3"]
    explicit = ImageReader(str(tmp_path / "json"), labels="folder")
    assert {s.label for s in explicit} == {"nested"}  # asked for folder names: the sidecar is not used
    assert {s.label for s in ImageReader(str(tmp_path / "json"), labels="none")} == {None}


def _write_shard(path, faces, start: int) -> None:
    with wds.TarWriter(str(path)) as sink:
        for i, face in enumerate(faces):
            buf = io.BytesIO()
            Image.fromarray((face * 255).astype(np.uint8)).save(buf, format="PNG")
            sink.write({"__key__": f"s{start + i:05d}", "png": buf.getvalue(), "cls": (start + i) % 3})


def test_webdataset_shards_local_and_on_s3(tmp_path, s3_bucket):
    faces = skdata.lfw_subset()[:10]
    (tmp_path / "shards").mkdir()
    _write_shard(tmp_path / "shards" / "train-000000.tar", faces[:6], 0)
    _write_shard(tmp_path / "shards" / "train-000001.tar", faces[6:], 6)
    local = ImageReader(str(tmp_path / "shards"), size=24, channels=1)
    assert local.format == "webdataset" and [u.kind for u in local.units()] == ["tar", "tar"]
    got = list(local)
    assert [s.key for s in got][:2] == ["train-000000.tar/s00000", "train-000000.tar/s00001"]
    assert [s.label for s in got] == [i % 3 for i in range(10)]
    assert got[0].shape == (1, 24, 24)

    store = storage_for(s3_bucket)
    for name in ("train-000000.tar", "train-000001.tar"):
        store.put_file(tmp_path / "shards" / name, f"{s3_bucket}/shards/{name}")
    remote = open_reader("image", f"{s3_bucket}/shards", size=24, channels=1)
    units = remote.units()
    assert [u.uri for u in units] == [f"{s3_bucket}/shards/train-000000.tar", f"{s3_bucket}/shards/train-000001.tar"]
    from_s3 = [s for u in units for s in remote.read(u)]
    assert [s.key for s in from_s3] == [s.key for s in got]
    assert all(np.array_equal(a.data, b.data) and a.source_digest == b.source_digest for a, b in zip(from_s3, got, strict=True))


def test_npy_rows_stream_by_unit_and_npz_labels(tmp_path):
    digits = load_digits()
    np.save(tmp_path / "digits.npy", digits.images.astype(np.float32))
    np.savez(tmp_path / "digits.npz", images=digits.images[:50].astype(np.uint8), labels=digits.target[:50])
    rows = ImageReader(str(tmp_path / "digits.npy"), value_range=(0, 16), channels=1, rows_per_unit=500)
    units = rows.units()
    assert [(u.start, u.stop) for u in units] == [((0,), (500,)), ((500,), (1000,)), ((1000,), (1500,)),
                                                  ((1500,), (1797,))]
    last = list(rows.read(units[-1]))
    assert len(last) == 297 and last[0].key == "digits.npy/00001500"
    assert np.allclose(last[0].data[0], digits.images[1500] / 16)
    packed = list(ImageReader(str(tmp_path / "digits.npz"), format="npz", value_range=(0, 16), channels=1, size=16))
    assert [s.label for s in packed] == digits.target[:50].tolist()
    assert packed[0].shape == (1, 16, 16)


def test_float_arrays_must_say_their_value_range(tmp_path):
    np.save(tmp_path / "digits.npy", load_digits().images[:4])
    with pytest.raises(SampleError, match=r"float pixels lie in \[0, 15\], not \[0, 1\]; set value_range"):
        list(ImageReader(str(tmp_path / "digits.npy")))


# ---------------------------------------------------------------- bad input


def test_corrupt_image_is_a_typed_one_line_error(photo_folder, tmp_path):
    good = (photo_folder / "people" / "astronaut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 3])
    with pytest.raises(SampleError) as err:
        list(ImageReader(str(tmp_path / "cut.png")))
    message = str(err.value)
    assert isinstance(err.value, UserError) and err.value.exit_code == 2
    assert "\n" not in message and str(tmp_path / "cut.png") in message and "cannot decode image" in message
    assert "re-export the file" in message
    again = pickle.loads(pickle.dumps(err.value))  # crosses Ray task boundaries intact
    assert str(again) == message and again.source == err.value.source


def test_not_an_image_at_all(tmp_path):
    (tmp_path / "fake.jpg").write_bytes(b"GIF89a but not really" * 10)
    with pytest.raises(SampleError, match="cannot decode image"):
        list(ImageReader(str(tmp_path / "fake.jpg")))


def test_image_over_the_size_limit_is_rejected_before_decoding(photo_folder):
    with pytest.raises(SampleError, match=r"512x512 = 262144 pixels, over max_pixels=100000; raise max_pixels"):
        list(ImageReader(str(photo_folder / "people" / "astronaut.png"), max_pixels=100_000))


def test_crop_larger_than_image(photo_folder):
    with pytest.raises(SampleError, match="smaller than the crop 512x512"):
        list(ImageReader(str(photo_folder / "things" / "coffee.jpg"), size=512, resize="center_crop"))


def test_missing_sidecar_entry_is_not_skipped(tmp_path):
    _save(skdata.coins(), tmp_path / "a.png")
    _save(skdata.coins(), tmp_path / "b.png")
    (tmp_path / "labels.csv").write_text("file,label\na.png,coin\n")
    with pytest.raises(SampleError, match="b.png: image has no entry in the label sidecar"):
        list(ImageReader(str(tmp_path)))


def test_truncated_shard(tmp_path):
    _write_shard(tmp_path / "full.tar", skdata.lfw_subset()[:8], 0)
    blob = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(blob[: len(blob) // 2 + 100])
    with pytest.raises(SampleError, match="not a readable tar"):
        list(ImageReader(str(tmp_path / "cut.tar")))


def test_array_of_wrong_shape(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros((5, 64), dtype=np.uint8))
    with pytest.raises(SampleError, match=r"rows have shape \(64,\), not an image"):
        list(ImageReader(str(tmp_path / "flat.npy")))


def test_missing_source(tmp_path):
    with pytest.raises(SampleError, match="source does not exist"):
        ImageReader(str(tmp_path / "nowhere.png")).units()


def test_control_maps_pair_with_images_by_name_whatever_their_suffix():
    """`control.source`'s pairing: a map pairs with the image of its relative path without extension; an
    image without a map is left out (the stage quarantines it), a map without an image is returned (reported as
    skipped), and two maps of one name are refused, naming both."""
    from arpipe.stages.modalities.controls import pair_by_name

    paired, unpaired = pair_by_name(["7/0012.jpg", "7/0013.png", "3/0001.png"],
                                    ["7/0012.png", "3/0001.bmp", "9/9999.png"])
    assert paired == {"7/0012.jpg": "7/0012.png", "3/0001.png": "3/0001.bmp"}
    assert unpaired == ["9/9999.png"]
    with pytest.raises(ValueError, match="two control maps 7/0012.png and 7/0012.tif have the name 7/0012"):
        pair_by_name(["7/0012.jpg"], ["7/0012.png", "7/0012.tif"])
