"""Decoded samples become files that common tools open: PNG, GIF, MP4, TIFF, MRC and PLY round-trip."""

from __future__ import annotations

import io

import numpy as np
import pytest
from realdata import gif_path, mni_volume

from arpipe.stages.modalities import media


def test_png_and_gif_hold_the_pixels():
    from PIL import Image

    frames = np.asarray([np.asarray(f.convert("RGB")) for f in _gif_frames()], dtype=np.float32) / 255
    clip = np.transpose(frames[:8], (3, 0, 1, 2))   # x_CTHW
    png = Image.open(io.BytesIO(media.png(clip[:, 0])))
    assert png.format == "PNG" and png.size == (clip.shape[3], clip.shape[2])
    assert np.abs(np.asarray(png, dtype=np.float32) / 255 - frames[0]).max() <= 1 / 255
    gif = Image.open(io.BytesIO(media.gif(clip)))
    assert gif.format == "GIF" and gif.n_frames == 8


def test_mp4_is_h264_with_every_frame_and_even_sides():
    import av

    frames = np.asarray([np.asarray(f.convert("RGB")) for f in _gif_frames()], dtype=np.float32) / 255
    clip = np.transpose(frames, (3, 0, 1, 2))   # 24 frames 25 high, 14 wide: the odd height is padded to 26
    with av.open(io.BytesIO(media.mp4(clip))) as container:
        stream = container.streams.video[0]
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.codec_context.name == "h264"
    assert len(decoded) == 24 and decoded[0].shape == (26, 14, 3)
    assert np.abs(decoded[5][:25].astype(np.float32) / 255 - frames[5]).mean() < 0.05


def test_tiff_and_mrc_hold_the_volume_exactly():
    import mrcfile
    import tifffile

    volume = mni_volume(4)[None]   # x_CDHW
    assert np.array_equal(tifffile.imread(io.BytesIO(media.tiff(volume))), volume[0])
    with mrcfile.open(_tmp(media.mrc(volume))) as m:
        assert np.array_equal(m.data, volume[0]) and m.header.mode == 2


def test_ply_holds_the_points():
    from plyfile import PlyData

    xyz = np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32)
    ply = PlyData.read(io.BytesIO(media.ply(xyz)))
    v = ply["vertex"]
    assert np.array_equal(np.stack([v["x"], v["y"], v["z"]], 1), xyz)


def test_an_unknown_format_is_named():
    with pytest.raises(ValueError, match="unknown media format 'webp'; use one of png, gif"):
        media.encode(np.zeros((1, 4, 4)), "webp")


def _gif_frames():
    from PIL import Image, ImageSequence

    return [f.copy() for f in ImageSequence.Iterator(Image.open(gif_path()))]


def _tmp(data: bytes) -> str:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".mrc", delete=False) as f:
        f.write(data)
    return f.name
