"""Depth maps: single-channel 16-bit PNG files, one sample each, scaled to [0, 1] by ``max_depth``."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import PurePosixPath

import numpy as np
from PIL import Image

from arpipe.pipeline.digest import digest_bytes
from arpipe.stages.modalities.base import Reader, Sample, SampleError, Unit
from arpipe.stages.modalities.sources import read_bytes, scan_files


class DepthReader(Reader):
    modality = "depth"

    def __init__(self, uri: str, *, max_depth: float = 65535.0, labels: str | None = "folder"):
        super().__init__(uri)
        if max_depth <= 0:
            raise SampleError(uri, f"max_depth must be positive, got {max_depth}", fix="set max_depth > 0")
        self.max_depth, self.labels = float(max_depth), labels

    def units(self) -> list[Unit]:
        files, self.skipped = scan_files(self.uri, (".png",), "depth map")   # the stage reports these
        return [Unit(f.uri, "file", f.relpath, members=(f.relpath,), size=f.size) for f in files]

    def read(self, unit: Unit) -> Iterator[Sample]:
        data = read_bytes(unit.uri)
        try:
            depth_HW = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32)
        except Exception as err:
            raise SampleError(unit.uri, f"cannot decode PNG ({type(err).__name__}: {err})",
                              fix="re-export the file or remove it from the source") from None
        if depth_HW.ndim != 2:
            raise SampleError(unit.uri, f"depth map has shape {depth_HW.shape}, not (H, W)",
                              fix="store one single-channel PNG per depth map")
        folder = PurePosixPath(unit.members[0]).parent.name
        yield Sample(key=unit.key, data=np.clip(depth_HW / self.max_depth, 0.0, 1.0)[None],
                     modality=self.modality, source_uri=unit.uri, source_digest=digest_bytes(data),
                     label=folder if self.labels == "folder" and folder else None,
                     meta={"max_depth": self.max_depth})
