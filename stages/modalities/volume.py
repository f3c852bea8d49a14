"""Volume (EM, MRI) reader: TIFF stacks, HDF5, Zarr, MRC and .npy, cut into sub-volume crops.

Volumes can be larger than memory, so nothing reads a whole volume. The
crop origins form a grid (``crop`` sides, ``stride`` apart; with ``cover``
one more crop flush with the far edge so no voxel is left out). A unit is a
block of neighbouring crops whose bounding region fits ``max_unit_bytes``;
reading a unit reads that region once, from the format's own random
access (HDF5/Zarr chunks, memory-mapped MRC/.npy, the TIFF strips or tiles
of the region's pages), and yields its crops. On s3:// the same holds: a unit
reads its region by ranged GETs (sources.RangedFile for HDF5 and TIFF, a Zarr
store over pipeline.storage, byte ranges of the z slices for MRC and .npy),
never the whole volume. Samples are ``x_CDHW`` float32 (C = 1) with the voxel
size (z, y, x) kept in ``meta``.

Intensities: integer volumes are scaled by their dtype's range, floats are
kept, ``intensity_range=(lo, hi)`` maps lo..hi to 0..1 (clipped). The rule
depends only on configuration, never on a crop's own statistics, so the same
voxels give the same sample whatever the file format.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from arpipe.pipeline.digest import digest_array
from arpipe.pipeline.storage import is_s3, storage_for

from .base import Reader, Sample, SampleError, Unit
from .captions import Captions
from .image import npy_layout
from .sources import RangedFile, is_dir, scan_files

FORMATS = ("tiff", "tiff_folder", "hdf5", "zarr", "mrc", "npy")
TIFF_SLICE_SUFFIXES = (".tif", ".tiff")
_SUFFIX_FORMAT = {".tif": "tiff", ".tiff": "tiff", ".h5": "hdf5", ".hdf5": "hdf5", ".hdf": "hdf5",
                  ".zarr": "zarr", ".mrc": "mrc", ".map": "mrc", ".rec": "mrc", ".npy": "npy"}


def _triple(v: int | Sequence[int], name: str, source: str) -> tuple[int, int, int]:
    t = (int(v),) * 3 if isinstance(v, int) else tuple(int(a) for a in v)
    if len(t) != 3 or min(t) < 1:
        raise SampleError(source, f"{name} must be one positive int or three (z, y, x), got {v}",
                          fix=f"set {name}: 64 or [32, 64, 64]")
    return t  # type: ignore[return-value]


def window_origins(n: int, crop: int, stride: int, cover: bool) -> list[int]:
    """Crop starts along one axis; with ``cover`` a last crop flush with the end."""
    out = list(range(0, n - crop + 1, stride))
    if cover and out and out[-1] != n - crop:
        out.append(n - crop)
    return out


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class _Volume(ABC):
    """A 3-D array opened for region reads; ``read(z0, z1, y0, y1, x0, x1)``."""

    shape: tuple[int, ...]
    dtype: np.dtype
    voxel_size: tuple[float, float, float] | None = None

    @abstractmethod
    def read(self, z0: int, z1: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray: ...

    def close(self) -> None:
        return None


class _ArrayVolume(_Volume):
    """Anything indexable by slices: h5py/zarr arrays, memory maps."""

    def __init__(self, array: Any, voxel_size: tuple[float, float, float] | None = None, *closers: Any):
        self.array, self.shape, self.dtype = array, tuple(array.shape), np.dtype(array.dtype)
        self.voxel_size, self._closers = voxel_size, closers

    def read(self, z0, z1, y0, y1, x0, x1):
        return np.asarray(self.array[z0:z1, y0:y1, x0:x1])

    def close(self):
        for closer in self._closers:
            closer.close()


class _RangedArray(_Volume):
    """An array stored raw at ``offset`` of a remote file (.npy, MRC), read by byte ranges: one per slice
    along the slowest axis (z; x when ``fortran``-ordered), or one for the whole slab when the region
    spans whole slices. Nothing outside the region's rows is transferred."""

    def __init__(self, file: RangedFile, shape: tuple[int, ...], dtype: np.dtype, offset: int,
                 voxel_size: tuple[float, float, float] | None = None, fortran: bool = False):
        self.file, self.shape, self.dtype, self.offset = file, tuple(shape), np.dtype(dtype), offset
        self.voxel_size, self.fortran = voxel_size, fortran
        need = offset + math.prod(self.shape) * self.dtype.itemsize
        if file.size < need:
            raise SampleError(file.uri, f"file is truncated: its header describes {need} bytes, the file has {file.size}",
                              fix="re-create or re-upload the file")

    def read(self, z0, z1, y0, y1, x0, x1):
        box, shape = [(z0, z1), (y0, y1), (x0, x1)], self.shape
        if self.fortran:   # stored as the C-ordered (x, y, z) array
            box, shape = box[::-1], shape[::-1]
        (a0, a1), (b0, b1), (c0, c1) = box
        _, nb, nc = shape
        item = self.dtype.itemsize
        if b0 == 0 and b1 == nb:
            raw = self.file.read_at(self.offset + a0 * nb * nc * item, (a1 - a0) * nb * nc * item)
        else:
            raw = b"".join(self.file.read_at(self.offset + (a * nb + b0) * nc * item, (b1 - b0) * nc * item)
                           for a in range(a0, a1))
        region = np.frombuffer(raw, self.dtype).reshape(a1 - a0, b1 - b0, nc)[:, :, c0:c1]
        return region.transpose(2, 1, 0) if self.fortran else region

    def close(self):
        self.file.close()


def _tiff(path: str) -> Any:
    """A TiffFile on a local path, or on a :class:`RangedFile` for s3 (tifffile then reads only what is asked)."""
    import tifffile

    return tifffile.TiffFile(RangedFile(path) if is_s3(path) else path)


def _page_region(page: Any, y0: int, y1: int, x0: int, x1: int, ranged: bool) -> np.ndarray:
    """Rows y0:y1, columns x0:x1 of one single-sample TIFF page. Over s3 (``ranged``) only what covers them is
    read: the rows themselves when the page is stored uncompressed in one run, else the strips or tiles they
    cross. A local page is decoded whole, as tifffile does it."""
    key = page.keyframe
    if not ranged or key.samplesperpixel != 1 or key.imagedepth != 1 or key.tiledepth != 1 or key.fillorder != 1 or key.dtype is None:
        return page.asarray()[y0:y1, x0:x1]
    fh, height, width = key.parent.filehandle, key.imagelength, key.imagewidth
    if key.is_contiguous and key.predictor == 1:   # whole bytes per sample (8 to 64 bits), stored as is
        stored = np.dtype(key.parent.byteorder + key.dtype.char)
        fh.seek(page.dataoffsets[0] + y0 * width * stored.itemsize)
        raw = fh.read((y1 - y0) * width * stored.itemsize)
        return np.frombuffer(raw, stored).reshape(y1 - y0, width)[:, x0:x1]
    seg_h, seg_w = key.chunks
    across = math.ceil(width / seg_w)
    out = np.full((y1 - y0, x1 - x0), key.nodata, dtype=key.dtype)
    for row in range(y0 // seg_h, (y1 - 1) // seg_h + 1):
        for col in range(x0 // seg_w, (x1 - 1) // seg_w + 1):
            i = row * across + col
            data = None
            if page.databytecounts[i]:
                fh.seek(page.dataoffsets[i])
                data = fh.read(page.databytecounts[i])
            segment, (_, _, sy, sx, _), _ = key.decode(data, i, jpegtables=key.jpegtables)
            if segment is None:
                continue
            ya, yb = max(y0, sy), min(y1, sy + segment.shape[1], height)
            xa, xb = max(x0, sx), min(x1, sx + segment.shape[2], width)
            out[ya - y0:yb - y0, xa - x0:xb - x0] = segment[0, ya - sy:yb - sy, xa - sx:xb - sx, 0]
    return out


class _TiffStack(_Volume):
    """A multi-page TIFF (one page per z), or a folder of single-page slices; a region is read page by page,
    only the rows, strips or tiles it covers (local paths or s3 URIs)."""

    def __init__(self, paths: list[str], source: str):
        self.paths, self.source = paths, source
        if len(paths) == 1:
            self._tif = _tiff(paths[0])
            series = self._tif.series[0]
            self.shape, self.dtype = tuple(series.shape), np.dtype(series.dtype)
            self.voxel_size = _tiff_voxel_size(self._tif)
            if len(self.shape) == 3 and len(series.pages) != self.shape[0]:
                raise SampleError(source, f"TIFF series of shape {self.shape} is not stored one page per z slice",
                                  fix="re-save it as a multi-page TIFF (tifffile.imwrite of a (z, y, x) array)")
        else:
            self._tif = None
            try:
                with _tiff(paths[0]) as first:
                    page_shape, self.dtype = tuple(first.series[0].shape), np.dtype(first.series[0].dtype)
            except SampleError:
                raise
            except Exception as err:
                raise self._unreadable(paths[0], err) from None
            self.shape = (len(paths), *page_shape)  # slices say nothing of the z spacing: voxel_size unknown

    def _slice_uri(self, path: str) -> str:
        """A slice named by its place in the source."""
        return f"{self.source.rstrip('/')}/{PurePosixPath(path).name}"

    def _unreadable(self, path: str, err: Exception) -> SampleError:
        return SampleError(self._slice_uri(path), f"cannot read TIFF slice ({type(err).__name__}: {err})",
                           fix="re-export the slice, or move it out of the folder (the crops through it are lost)")

    def read(self, z0, z1, y0, y1, x0, x1):
        out = np.empty((z1 - z0, y1 - y0, x1 - x0), dtype=self.dtype)
        for i, z in enumerate(range(z0, z1)):
            if self._tif is not None:
                out[i] = _page_region(self._tif.series[0].pages[z], y0, y1, x0, x1, is_s3(self.paths[0]))
                continue
            try:
                with _tiff(self.paths[z]) as tif:
                    series = tif.series[0]
                    shape = tuple(series.shape)
                    if shape == self.shape[1:]:
                        out[i] = _page_region(series.pages[0], y0, y1, x0, x1, is_s3(self.paths[z]))
            except SampleError:
                raise
            except Exception as err:
                raise self._unreadable(self.paths[z], err) from None
            if shape != self.shape[1:]:
                raise SampleError(self._slice_uri(self.paths[z]), f"slice has shape {shape}, the first slice {self.shape[1:]}",
                                  fix="all slices of a stack must have one shape")
        return out

    def close(self):
        if self._tif is not None:
            self._tif.close()


def _tiff_voxel_size(tif: Any) -> tuple[float, float, float] | None:
    """(z, y, x) spacing from ImageJ metadata and the resolution tags, when present."""
    page = tif.pages[0]
    try:
        xres = page.tags["XResolution"].value
        yres = page.tags["YResolution"].value
        x, y = xres[1] / xres[0], yres[1] / yres[0]
    except (KeyError, ZeroDivisionError, TypeError, IndexError):
        return None
    z = float((tif.imagej_metadata or {}).get("spacing", 1.0))
    return (z, float(y), float(x))


def _attrs_voxel_size(attrs: Any) -> tuple[float, float, float] | None:
    for key in ("voxel_size", "element_size_um", "resolution", "spacing"):
        if key in attrs:
            v = [float(a) for a in np.asarray(attrs[key]).reshape(-1)]
            if len(v) == 3:
                return (v[0], v[1], v[2])
    ms = attrs.get("multiscales") if hasattr(attrs, "get") else None
    if ms:  # OME-NGFF: scale of the first dataset's first transformation, last three axes
        try:
            scale = ms[0]["datasets"][0]["coordinateTransformations"][0]["scale"]
            return tuple(float(s) for s in scale[-3:])  # type: ignore[return-value]
        except (KeyError, IndexError, TypeError):
            return None
    return None


class VolumeReader(Reader):
    """Sub-volume crops of a 3-D volume (z, y, x); see the module docstring for units and intensities.

    ``format`` is inferred from the suffix (a folder of .tif slices is
    ``tiff_folder``); ``dataset`` names the array inside an HDF5 file or Zarr
    group (needed only when there are several). ``voxel_size`` overrides
    what the file says. ``max_voxels`` rejects volumes above a size.
    """

    modality = "volume"

    def __init__(self, uri: str, *, format: str = "auto", dataset: str | None = None,
                 crop: int | Sequence[int] = 64, stride: int | Sequence[int] | None = None, cover: bool = True,
                 intensity_range: Sequence[float] | None = None, voxel_size: Sequence[float] | None = None,
                 max_unit_bytes: int = 256 << 20, max_voxels: int | None = None, captions: str | None = None,
                 captions_required: bool = False):
        super().__init__(uri)
        self.format = self._infer_format(format)
        self.dataset = dataset
        self.crop = _triple(crop, "crop", uri)
        self.stride = _triple(stride, "stride", uri) if stride is not None else self.crop
        self.cover = cover
        self.intensity_range = None if intensity_range is None else (float(intensity_range[0]), float(intensity_range[1]))
        self.voxel_size = None if voxel_size is None else tuple(float(v) for v in voxel_size)
        self.max_unit_bytes, self.max_voxels = int(max_unit_bytes), max_voxels
        self.captions, self.captions_required = captions, bool(captions_required)

    def _infer_format(self, format: str) -> str:
        if format != "auto":
            if format not in FORMATS:
                raise SampleError(self.uri, f"unknown volume format {format!r}", fix=f"use one of {', '.join(FORMATS)}")
            return format
        suffix = PurePosixPath(self.uri.rstrip("/")).suffix.lower()
        if suffix in _SUFFIX_FORMAT:
            return _SUFFIX_FORMAT[suffix]
        if is_dir(self.uri):
            if any(e.relpath in ("zarr.json", ".zarray", ".zgroup") for e in _top_entries(self.uri)):
                return "zarr"
            return "tiff_folder"
        raise SampleError(self.uri, "cannot tell the volume format from the name",
                          fix=f"set format to one of {', '.join(FORMATS)}")

    # ------------------------------------------------------------------- open

    @contextlib.contextmanager
    def open(self) -> Iterator[_Volume]:
        """The volume, opened for region reads (on s3, reads of what a region needs: see the module docstring)."""
        fmt, uri = self.format, self.uri
        try:
            vol = self._open_volume()
        except SampleError:
            raise
        except Exception as err:
            raise SampleError(uri, f"cannot open {fmt} volume ({type(err).__name__}: {err})",
                              fix="check the file and the format/dataset options") from None
        try:
            if len(vol.shape) != 3:
                raise SampleError(uri, f"expected a 3-D volume (z, y, x), got shape {vol.shape}",
                                  fix="pass a single-channel 3-D array (pick it with dataset=, or split channels)")
            if self.max_voxels is not None and math.prod(vol.shape) > self.max_voxels:
                raise SampleError(uri, f"volume has {math.prod(vol.shape)} voxels, over max_voxels={self.max_voxels}",
                                  fix="raise max_voxels or crop the source")
            if self.voxel_size is not None:
                vol.voxel_size = self.voxel_size  # type: ignore[assignment]
            yield vol
        finally:
            vol.close()

    def _open_volume(self) -> _Volume:
        fmt, path, remote = self.format, self.uri, is_s3(self.uri)
        if fmt == "npy":
            if remote:
                file = RangedFile(path)
                shape, dtype, offset, fortran = npy_layout(path)
                return _RangedArray(file, shape, dtype, offset, fortran=fortran)
            return _ArrayVolume(np.load(path, mmap_mode="r"))
        if fmt == "mrc":
            if remote:
                return _ranged_mrc(path)
            import mrcfile

            mrc = mrcfile.mmap(path, mode="r", permissive=False)
            vs = mrc.voxel_size
            return _ArrayVolume(mrc.data, (float(vs.z), float(vs.y), float(vs.x)), mrc)
        if fmt == "hdf5":
            import h5py

            handle = RangedFile(path) if remote else None
            f = h5py.File(handle or path, "r")
            closers = (f, handle) if handle else (f,)
            name = self.dataset or _only_dataset(f, self.uri)
            if name not in f or not isinstance(f[name], h5py.Dataset):
                f.close()
                raise SampleError(self.uri, f"HDF5 file has no dataset {name!r}", fix="set dataset to an existing path")
            ds = f[name]
            return _ArrayVolume(ds, self.voxel_size or _attrs_voxel_size(ds.attrs), *closers)
        if fmt == "zarr":
            import zarr

            if remote:
                from .zarr_store import StorageStore

                node = zarr.open(StorageStore(path), mode="r")
            else:
                node = zarr.open(path, mode="r")
            if isinstance(node, zarr.Group):
                arrays = sorted(k for k, _ in node.arrays())
                name = self.dataset or (arrays[0] if len(arrays) == 1 else None)
                if name is None or name not in arrays:
                    raise SampleError(self.uri, f"Zarr group holds arrays {arrays}; cannot tell which to read",
                                      fix="set dataset to one of them")
                node = node[name]
            return _ArrayVolume(node, self.voxel_size or _attrs_voxel_size(dict(node.attrs)))
        if fmt == "tiff":
            return _TiffStack([path], self.uri)
        # the slices scan_files lists in units(): top-level regular .tif files, hidden ones left out
        if remote:
            found = [e.relpath for e in storage_for(path).list_dir(path)[0]]
        else:
            found = [n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n))]
        names = sorted((n for n in found if n.lower().endswith(TIFF_SLICE_SUFFIXES) and not n.startswith(".")),
                       key=_natural_key)
        if not names:
            raise SampleError(self.uri, "folder holds no .tif slices", fix="point to a folder of TIFF slices")
        return _TiffStack([f"{path.rstrip('/')}/{n}" if remote else os.path.join(path, n) for n in names], self.uri)

    # ------------------------------------------------------------------ units

    def _origins(self, shape: tuple[int, ...]) -> list[list[int]]:
        for n, c in zip(shape, self.crop, strict=True):
            if n < c:
                raise SampleError(self.uri, f"volume shape {shape} is smaller than the crop {self.crop}",
                                  fix="lower crop (or pad the volume)")
        return [window_origins(n, c, s, self.cover) for n, c, s in zip(shape, self.crop, self.stride, strict=True)]

    def units(self) -> list[Unit]:
        """Blocks of crops: one z origin, runs of y and x origins sized to ``max_unit_bytes``.

        For a folder of slices, the files that are not slices go to ``skipped`` (a Zarr folder is one store).
        """
        if self.format == "tiff_folder":
            self.skipped = scan_files(self.uri, TIFF_SLICE_SUFFIXES, "TIFF slice", recursive=False)[1]
        self.caption()   # a required caption that is missing fails the listing: every crop would lack it
        with self.open() as vol:
            shape, itemsize = vol.shape, vol.dtype.itemsize
        oz, oy, ox = self._origins(shape)
        cz, cy, cx = self.crop

        def region_bytes(ny: int, nx: int) -> int:
            return cz * (oy[ny - 1] - oy[0] + cy) * (ox[nx - 1] - ox[0] + cx) * itemsize

        gy, gx = len(oy), len(ox)
        while gy > 1 and region_bytes(gy, gx) > self.max_unit_bytes:
            gy = (gy + 1) // 2
        while gx > 1 and region_bytes(gy, gx) > self.max_unit_bytes:
            gx = (gx + 1) // 2
        key = PurePosixPath(self.uri.rstrip("/")).name
        out = []
        for z in oz:
            for iy in range(0, len(oy), gy):
                ys = oy[iy:iy + gy]
                for ix in range(0, len(ox), gx):
                    xs = ox[ix:ix + gx]
                    start, stop = (z, ys[0], xs[0]), (z + cz, ys[-1] + cy, xs[-1] + cx)
                    out.append(Unit(self.uri, "crops", key, start=start, stop=stop,
                                    size=math.prod(b - a for a, b in zip(start, stop, strict=True)) * itemsize))
        return out

    # ------------------------------------------------------------------- read

    def caption(self) -> str | None:
        """The volume's caption (every crop carries it): the ``.txt`` beside the volume file or folder
        (``brain.mrc`` -> ``brain.txt``), or its row in a caption sidecar of the folder holding it."""
        if self.captions is None:
            return None
        root, _, name = self.uri.rstrip("/").rpartition("/")
        return Captions(root, self.captions, self.captions_required).of(name, self.uri)

    def read(self, unit: Unit) -> Iterator[Sample]:
        caption = self.caption()
        with self.open() as vol:
            (z0, y0, x0), (z1, y1, x1) = unit.start, unit.stop
            region = vol.read(z0, z1, y0, y1, x0, x1)
            origins = self._origins(vol.shape)
            inside = [[o for o in axis if lo <= o and o + c <= hi]
                      for axis, lo, hi, c in zip(origins, unit.start, unit.stop, self.crop, strict=True)]
            cz, cy, cx = self.crop
            for z in inside[0]:
                for y in inside[1]:
                    for x in inside[2]:
                        raw = region[z - z0:z - z0 + cz, y - y0:y - y0 + cy, x - x0:x - x0 + cx]
                        source = f"{self.uri}#z{z}_y{y}_x{x}"
                        yield Sample(key=f"{unit.key}/z{z:05d}_y{y:05d}_x{x:05d}",
                                     data=self._intensity(raw, source)[None], modality=self.modality,
                                     source_uri=self.uri, source_digest=digest_array(raw), caption=caption,
                                     meta={"origin": [z, y, x], "crop": list(self.crop),
                                           "volume_shape": list(vol.shape), "voxel_size":
                                           None if vol.voxel_size is None else list(vol.voxel_size)})

    def _intensity(self, raw: np.ndarray, source: str) -> np.ndarray:
        if self.intensity_range is not None:
            lo, hi = self.intensity_range
            return np.clip((raw.astype(np.float32) - lo) / (hi - lo), 0, 1)
        if raw.dtype == np.bool_:
            return raw.astype(np.float32)
        if np.issubdtype(raw.dtype, np.integer):
            info = np.iinfo(raw.dtype)
            return ((raw.astype(np.float32) - info.min) / (float(info.max) - info.min)).astype(np.float32)
        out = raw.astype(np.float32)
        if not np.isfinite(out).all():
            raise SampleError(source, f"crop has {int((~np.isfinite(out)).sum())} NaN or infinite voxels",
                              fix="clean the volume or mask those voxels before tokenizing")
        return out


def _top_entries(uri: str) -> list[Any]:
    return storage_for(uri).list_dir(uri)[0]


def _ranged_mrc(uri: str) -> _RangedArray:
    """An MRC file on s3: mrcfile reads its header (and extended header) from a RangedFile, with the checks
    it makes on a local file; the data block is then read by ranges (mrcfile's memory map needs a local file)."""
    from mrcfile.mrcinterpreter import MrcInterpreter
    from mrcfile.utils import data_dtype_from_header, data_shape_from_header

    # mrcfile writes its header back when an interpreter is closed on an open stream: it gets one of its own,
    # closed before the interpreter is dropped
    with RangedFile(uri) as head:
        mrc = MrcInterpreter(iostream=head, permissive=False, header_only=True)
        header, vs = mrc.header, mrc.voxel_size
    offset = header.nbytes + int(header.nsymbt)
    return _RangedArray(RangedFile(uri, head.size), data_shape_from_header(header), data_dtype_from_header(header),
                        offset, (float(vs.z), float(vs.y), float(vs.x)))


def _only_dataset(f: Any, source: str) -> str:
    import h5py

    names: list[str] = []
    f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) and o.ndim >= 2 else None)
    if len(names) != 1:
        f.close()
        raise SampleError(source, f"HDF5 file holds datasets {names}; cannot tell which to read",
                          fix="set dataset to one of them")
    return names[0]

