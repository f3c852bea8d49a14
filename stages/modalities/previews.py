"""Pictures a person looks at in MLflow: contact sheets and before/after grids, for every modality.

Images and video frames are tiled; volumes show their three orthogonal
centre slices; point clouds are rasterized as three axis-aligned projections.
All inputs are the readers' float layouts (values in [0, 1], clouds centred).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


def _to_uint8_HWC(x_CHW: np.ndarray) -> np.ndarray:
    x = np.clip(np.asarray(x_CHW, dtype=np.float32), 0.0, 1.0)
    x = (x * 255.0 + 0.5).astype(np.uint8)
    if x.shape[0] == 1:
        x = np.repeat(x, 3, axis=0)
    return np.transpose(x[:3], (1, 2, 0))


def _project_cloud(xyz_N3: np.ndarray, size: int = 64) -> np.ndarray:
    """Three projections (xy, xz, yz) side by side, dark points on white: a 3 x size x 3*size RGB tile."""
    xyz = np.asarray(xyz_N3, dtype=np.float32)
    tile = np.full((size, 3 * size, 3), 255, dtype=np.uint8)
    if xyz.size == 0:
        return tile
    lo, hi = xyz.min(0), xyz.max(0)
    span = float(np.max(hi - lo)) or 1.0
    unit = (xyz - (lo + hi) / 2) / span + 0.5  # in [0, 1]
    pix = np.clip((unit * (size - 1)).round().astype(int), 0, size - 1)
    for k, (a, b) in enumerate(((0, 1), (0, 2), (1, 2))):
        tile[size - 1 - pix[:, b], k * size + pix[:, a]] = (20, 40, 120)
    return tile


def tiles(sample: np.ndarray, modality: str) -> list[np.ndarray]:
    """One sample as a row of uint8 HWC tiles."""
    if modality == "image":
        return [_to_uint8_HWC(sample)]
    if modality == "video":  # x_CTHW: up to 8 frames
        frames = sample.shape[1]
        picks = np.linspace(0, frames - 1, num=min(frames, 8)).round().astype(int)
        return [_to_uint8_HWC(sample[:, t]) for t in picks]
    if modality == "volume":  # x_CDHW: the three centre slices
        c, d, h, w = sample.shape
        return [_to_uint8_HWC(sample[:, d // 2]), _to_uint8_HWC(sample[:, :, h // 2]),
                _to_uint8_HWC(sample[:, :, :, w // 2])]
    if modality == "pointcloud":
        return [_project_cloud(sample)]
    raise ValueError(f"no preview for modality {modality!r}")


def grid(rows: Sequence[Sequence[np.ndarray]], scale: int = 1, pad: int = 2) -> Image.Image:
    """Tile rows of uint8 HWC tiles (any sizes) onto a white sheet."""
    heights = [max(t.shape[0] for t in row) for row in rows]
    widths = [sum(t.shape[1] for t in row) + pad * (len(row) - 1) for row in rows]
    sheet = np.full((sum(heights) + pad * (len(rows) - 1), max(widths), 3), 255, dtype=np.uint8)
    y = 0
    for row, h in zip(rows, heights):
        x = 0
        for t in row:
            sheet[y:y + t.shape[0], x:x + t.shape[1]] = t
            x += t.shape[1] + pad
        y += h + pad
    image = Image.fromarray(sheet)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    return image


def captioned(tile_HWC: np.ndarray, caption: str, *, min_width: int = 96) -> np.ndarray:
    """``tile`` above ``caption`` in black on white, wrapped to the tile's width (at least ``min_width``)."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    width = max(tile_HWC.shape[1], min_width)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines, line = [], ""
    for word in caption.split():
        wider = f"{line} {word}".strip()
        if line and draw.textlength(wider, font=font) > width - 4:
            lines.append(line)
            line = word
        else:
            line = wider
    lines.append(line)
    step = int(font.getbbox("Ag")[3]) + 2
    strip = Image.new("RGB", (width, step * len(lines) + 4), "white")
    pen = ImageDraw.Draw(strip)
    for k, text in enumerate(lines):
        pen.text((2, 2 + k * step), text, fill="black", font=font)
    top = np.full((tile_HWC.shape[0], width, 3), 255, np.uint8)
    top[:, :tile_HWC.shape[1]] = tile_HWC
    return np.concatenate([top, np.asarray(strip)], axis=0)


def contact_sheet(samples: Sequence[np.ndarray], modality: str, columns: int = 8,
                  captions: Sequence[str | None] | None = None) -> Image.Image:
    """Many samples of one modality on one sheet (video: one row of frames per clip); with ``captions``
    (the prompts), each sample's text is written under its picture."""
    if captions is not None and any(captions):
        scale = _scale(samples, modality)
        pictures = []
        for s, text in zip(samples, captions, strict=True):
            row = tiles(s, modality)
            tile = np.asarray(grid([row], scale=scale))
            pictures.append(captioned(tile, text or ""))
        return grid([pictures[i:i + columns] for i in range(0, len(pictures), columns)], pad=4)
    if modality in ("video", "volume"):
        rows = [tiles(s, modality) for s in samples]
    else:
        flat = [tiles(s, modality)[0] for s in samples]
        rows = [flat[i:i + columns] for i in range(0, len(flat), columns)]
    return grid(rows or [[np.full((8, 8, 3), 255, np.uint8)]], scale=_scale(samples, modality))


def before_after(originals: Sequence[np.ndarray], reconstructions: Sequence[np.ndarray], modality: str,
                 count: int = 8) -> Image.Image:
    """Originals above their reconstructions (video, volumes: pairs of rows)."""
    a, b = list(originals)[:count], list(reconstructions)[:count]
    if modality in ("video", "volume"):
        rows = [r for pair in zip(a, b) for r in (tiles(pair[0], modality), tiles(pair[1], modality))]
    else:
        rows = [[tiles(s, modality)[0] for s in a], [tiles(s, modality)[0] for s in b]]
    return grid(rows, scale=_scale(a, modality))


def _scale(samples: Sequence[np.ndarray], modality: str) -> int:
    if modality == "pointcloud" or not len(samples):
        return 2
    side = int(np.asarray(samples[0]).shape[-1])
    return max(1, min(8, 96 // max(side, 1)))
