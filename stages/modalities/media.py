"""Decoded samples as files people open: PNG, GIF, MP4, TIFF, MRC and PLY, as bytes.

Inputs are the tokenizers' float layouts (:mod:`.previews` explains them):
images ``x_CHW`` and video ``x_CTHW`` in [0, 1], volumes ``x_CDHW``, point
clouds ``xyz_N3``. Every encoder returns the whole file as bytes, so a stage
can write it to local or S3 storage in one put.
"""

from __future__ import annotations

import io
import os
import tempfile

import numpy as np

from .previews import _to_uint8_HWC

EXTENSIONS = {"png": ".png", "gif": ".gif", "mp4": ".mp4", "tiff": ".tif", "mrc": ".mrc", "ply": ".ply"}


def _frames(x_CTHW: np.ndarray) -> list[np.ndarray]:
    return [_to_uint8_HWC(x_CTHW[:, t]) for t in range(x_CTHW.shape[1])]


def png(x_CHW: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_to_uint8_HWC(x_CHW)).save(buf, format="PNG")
    return buf.getvalue()


def gif(x_CTHW: np.ndarray, fps: int = 8) -> bytes:
    from PIL import Image

    frames = [Image.fromarray(f) for f in _frames(x_CTHW)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return buf.getvalue()


def mp4(x_CTHW: np.ndarray, fps: int = 8) -> bytes:
    """H.264 (yuv420p) through PyAV; odd sides are padded by one pixel, as the codec needs even ones."""
    import av

    frames = _frames(x_CTHW)
    h, w = frames[0].shape[:2]
    H, W = h + h % 2, w + w % 2
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": "18"}
        for f in frames:
            padded = np.pad(f, ((0, H - h), (0, W - w), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(padded, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def tiff(x_CDHW: np.ndarray) -> bytes:
    """A float32 ``(D, H, W)`` stack (channels after the first are dropped: EM is single-channel)."""
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.ascontiguousarray(np.asarray(x_CDHW, dtype=np.float32)[0]), photometric="minisblack")
    return buf.getvalue()


def mrc(x_CDHW: np.ndarray, voxel_size: float = 1.0) -> bytes:
    """An MRC2014 float32 volume (mode 2), the EM community's format."""
    import mrcfile

    fd, path = tempfile.mkstemp(suffix=".mrc")
    os.close(fd)
    try:
        with mrcfile.new(path, overwrite=True) as m:
            m.set_data(np.ascontiguousarray(np.asarray(x_CDHW, dtype=np.float32)[0]))
            m.voxel_size = voxel_size
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.remove(path)


def ply(xyz_N3: np.ndarray) -> bytes:
    """Binary little-endian PLY with float x, y, z vertices."""
    from plyfile import PlyData, PlyElement

    xyz = np.asarray(xyz_N3, dtype=np.float32).reshape(-1, 3)
    vertex = np.empty(len(xyz), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    vertex["x"], vertex["y"], vertex["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    buf = io.BytesIO()
    PlyData([PlyElement.describe(vertex, "vertex")], text=False).write(buf)
    return buf.getvalue()


ENCODERS = {"png": png, "gif": gif, "mp4": mp4, "tiff": tiff, "mrc": mrc, "ply": ply}


def encode(sample: np.ndarray, fmt: str) -> bytes:
    """``sample`` as a ``fmt`` file (one of :data:`EXTENSIONS`)."""
    try:
        return ENCODERS[fmt](sample)
    except KeyError:
        raise ValueError(f"unknown media format {fmt!r}; use one of {', '.join(ENCODERS)}") from None
