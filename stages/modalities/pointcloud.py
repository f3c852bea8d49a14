"""Point cloud reader: PLY (binary and ascii), .npy/.npz, XYZ/TXT and LAS files.

Samples are ``xyz_N3`` float32. With ``normalize="unit_sphere"`` (the
default) a cloud is centred on its bounding-box centre and scaled so its
farthest point lies on the unit sphere; the centre and scale go into
``meta`` and :func:`denormalize` maps decoded points back to the source
frame. A unit is one file; a file may hold several clouds (an ``(B, N, 3)``
array, several arrays in an .npz).

Clouds with no points, NaN/inf coordinates or more than ``max_points``
points raise :class:`SampleError`; files of other formats and hidden files are
listed in ``skipped`` with the reason: nothing is dropped silently.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from arpipe.pipeline.digest import digest_array, digest_bytes
from arpipe.pipeline.storage import storage_for

from .base import Reader, Sample, SampleError, Unit
from .sources import read_bytes, scan_files

POINT_SUFFIXES = (".ply", ".npy", ".npz", ".xyz", ".txt", ".pts", ".las", ".laz")
NORMALIZATIONS = ("unit_sphere", "none")


def normalization(xyz_N3: np.ndarray) -> tuple[np.ndarray, float]:
    """(centre, scale): bounding-box centre, and the largest distance from it (1 for a single point)."""
    lo, hi = xyz_N3.min(0), xyz_N3.max(0)
    center = (lo + hi) / 2
    scale = float(np.sqrt(((xyz_N3 - center) ** 2).sum(1).max()))
    return center, (scale if scale > 0 else 1.0)


def denormalize(xyz_N3: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """Undo the reader's normalization: decoded points in the source's coordinate frame (float64)."""
    return np.asarray(xyz_N3, dtype=np.float64) * float(meta["scale"]) + np.asarray(meta["center"], dtype=np.float64)


def _parse_ply(data: bytes, source: str) -> np.ndarray:
    from plyfile import PlyData

    try:
        ply = PlyData.read(io.BytesIO(data))
        vertex = ply["vertex"]
        return np.stack([np.asarray(vertex[a], dtype=np.float64) for a in ("x", "y", "z")], axis=1)
    except KeyError:
        raise SampleError(source, "PLY file has no vertex element with x, y, z properties",
                          fix="export the cloud's vertices with x, y, z") from None
    except Exception as err:
        raise SampleError(source, f"cannot parse PLY ({type(err).__name__}: {err})",
                          fix="re-export the file (binary or ascii PLY)") from None


def _parse_text(data: bytes, source: str) -> np.ndarray:
    text = data.decode("utf-8", errors="replace").replace(",", " ")
    rows = [line.split() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith(("#", "//"))]
    try:
        xyz = np.array([[float(v) for v in r[:3]] for r in rows], dtype=np.float64).reshape(-1, 3)
    except ValueError as err:
        raise SampleError(source, f"XYZ text is not numeric columns ({err})",
                          fix="write one point per line as 'x y z [more columns]'; comments start with #") from None
    if any(len(r) < 3 for r in rows):
        raise SampleError(source, "XYZ text has lines with fewer than 3 columns", fix="write 'x y z' per line")
    return xyz


def _parse_las(data: bytes, source: str) -> np.ndarray:
    import laspy

    try:
        las = laspy.read(io.BytesIO(data))
        return np.stack([np.asarray(las.x), np.asarray(las.y), np.asarray(las.z)], axis=1).astype(np.float64)
    except Exception as err:
        hint = " (LAZ needs the lazrs or laszip package)" if "laz" in str(err).lower() else ""
        raise SampleError(source, f"cannot read LAS{hint} ({type(err).__name__}: {err})",
                          fix="re-export as uncompressed LAS, or install lazrs for LAZ") from None


def _clouds_in_array(a: np.ndarray, key: str, source: str) -> list[tuple[str, np.ndarray]]:
    if a.ndim == 2 and a.shape[1] >= 3:
        return [(key, a[:, :3])]
    if a.ndim == 3 and a.shape[2] >= 3:
        return [(f"{key}/{i:06d}", a[i, :, :3]) for i in range(a.shape[0])]
    raise SampleError(source, f"array of shape {a.shape} is not a point cloud",
                      fix="store clouds as (N, 3+) or (B, N, 3+) arrays")


class PointCloudReader(Reader):
    """Point clouds from a file or a folder (recursive); ``format`` is inferred from the suffix."""

    modality = "pointcloud"

    def __init__(self, uri: str, *, normalize: str = "unit_sphere", max_points: int = 1 << 22,
                 labels: str | None = "folder"):
        super().__init__(uri)
        if normalize not in NORMALIZATIONS:
            raise SampleError(uri, f"unknown normalize {normalize!r}", fix=f"use one of {', '.join(NORMALIZATIONS)}")
        self.normalize, self.max_points, self.labels = normalize, int(max_points), labels

    def units(self) -> list[Unit]:
        files, self.skipped = scan_files(self.uri, POINT_SUFFIXES, "point cloud")
        return [Unit(f.uri, "file", f.relpath, members=(f.relpath,), size=f.size) for f in files]

    def _declared_points(self, uri: str, suffix: str) -> int | None:
        """The point count a PLY/LAS/.npy header declares, read before the body (None if unknown)."""
        head = storage_for(uri).read_range(uri, 0, 4096)
        if suffix == ".ply":
            match = re.search(rb"^element vertex (\d+)", head, re.MULTILINE)
            return int(match.group(1)) if match else None
        if suffix in (".las", ".laz") and head[:4] == b"LASF" and len(head) >= 111:
            legacy = int.from_bytes(head[107:111], "little")
            modern = int.from_bytes(head[247:255], "little") if len(head) >= 255 and head[25] >= 4 else 0
            return modern or legacy
        if suffix == ".npy":
            try:
                f = io.BytesIO(head)
                np.lib.format.read_magic(f)
                shape = np.lib.format.read_array_header_1_0(f)[0]
            except Exception:
                return None
            return int(np.prod(shape[:-1])) if len(shape) >= 2 else None
        return None

    def read(self, unit: Unit) -> Iterator[Sample]:
        suffix = PurePosixPath(unit.uri).suffix.lower()
        declared = self._declared_points(unit.uri, suffix)
        if declared is not None and declared > self.max_points:
            raise SampleError(unit.uri, f"file declares {declared} points, over max_points={self.max_points}",
                              fix="raise max_points or subsample the cloud")
        data = read_bytes(unit.uri)
        rel = PurePosixPath(unit.members[0] if unit.members else unit.uri)
        label = rel.parent.name if self.labels == "folder" and str(rel.parent) not in ("", ".") else None
        file_digest = digest_bytes(data)
        if suffix in (".npy", ".npz"):
            try:
                loaded = np.load(io.BytesIO(data), allow_pickle=False)
            except Exception as err:
                raise SampleError(unit.uri, f"cannot read {suffix} ({type(err).__name__}: {err})",
                                  fix="re-create it with numpy.save/savez") from None
            if suffix == ".npy":
                clouds = _clouds_in_array(loaded, unit.key, unit.uri)
            else:
                with loaded:
                    clouds = [c for name in loaded.files
                              for c in _clouds_in_array(loaded[name], f"{unit.key}/{name}", unit.uri)]
            single = len(clouds) == 1
            for key, xyz in clouds:
                yield self._sample(xyz, key, unit.uri if single else f"{unit.uri}#{key[len(unit.key) + 1:]}",
                                   file_digest if single else digest_array(np.ascontiguousarray(xyz)), label)
            return
        if suffix == ".ply":
            xyz = _parse_ply(data, unit.uri)
        elif suffix in (".las", ".laz"):
            xyz = _parse_las(data, unit.uri)
        else:
            xyz = _parse_text(data, unit.uri)
        yield self._sample(xyz, unit.key, unit.uri, file_digest, label)

    def _sample(self, xyz: np.ndarray, key: str, source: str, digest: str, label: Any) -> Sample:
        xyz = np.asarray(xyz, dtype=np.float64)
        if xyz.shape[0] == 0:
            raise SampleError(source, "point cloud has no points", fix="remove the empty file from the source")
        bad = int((~np.isfinite(xyz)).any(1).sum())
        if bad:
            raise SampleError(source, f"point cloud has {bad} points with NaN or infinite coordinates",
                              fix="drop or repair those points before tokenizing")
        if xyz.shape[0] > self.max_points:
            raise SampleError(source, f"point cloud has {xyz.shape[0]} points, over max_points={self.max_points}",
                              fix="raise max_points or subsample the cloud")
        meta: dict[str, Any] = {"points": int(xyz.shape[0])}
        if self.normalize == "unit_sphere":
            center, scale = normalization(xyz)
            xyz = (xyz - center) / scale
            meta.update(center=[float(c) for c in center], scale=scale)
        else:
            meta.update(center=[0.0, 0.0, 0.0], scale=1.0)
        return Sample(key=key, data=xyz.astype(np.float32), modality=self.modality, source_uri=source,
                      source_digest=digest, label=label, meta=meta)
