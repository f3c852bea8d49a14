"""Image reader: folders of PNG/JPEG/TIFF/WebP/BMP/GIF, WebDataset tar shards, and .npy/.npz arrays.

Samples are ``x_CHW`` float32 in [0, 1], resized and/or center-cropped to the
configured size so that a fixed-grid tokenizer can take them. Units are
groups of ``files_per_unit`` files (folders), one shard (tars), ``rows_per_unit``
rows (.npy, read by byte range so a huge array never loads whole) or one
file (.npz, which numpy cannot read partially). Labels come from the
sub-folder name, a CSV/JSON sidecar, a shard's ``.cls``/``.json`` member or
an npz ``labels`` array. A GIF is read as one image, its first frame (animated
GIFs are videos: read them with the video reader). Files of other formats,
hidden files and the label sidecar are not read: ``units()`` lists them in
``skipped`` with the reason, for the stage to report.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from arpipe.pipeline.digest import digest_array, digest_bytes
from arpipe.pipeline.storage import is_s3, join, storage_for

from .base import Reader, Sample, SampleError, Unit
from .captions import Captions, check_caption, tar_caption
from .controls import TRANSFORMS, control_image
from .sources import SourceFile, is_dir, read_bytes, scan_files

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp", ".gif")
_MEMBER_EXTS = tuple(s.lstrip(".") for s in IMAGE_SUFFIXES)   # a shard sample's image member, in preference order
ARRAY_SUFFIXES = (".npy", ".npz")
SIDECARS = ("labels.csv", "labels.json")
RESIZE_MODES = ("resize_crop", "resize", "center_crop", "none")
_KEY_COLUMNS = ("file", "path", "filename", "key", "image", "name")
_LABEL_COLUMNS = ("label", "class", "category", "target", "y")


# ------------------------------------------------------------------ transforms


def as_size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    h, w = (int(s) for s in size)
    return (h, w)


def fit_to_size(x_NCHW: torch.Tensor, size: tuple[int, int] | None, mode: str, source: str) -> torch.Tensor:
    """Resize and/or center-crop frames to ``size`` (bilinear with antialiasing, values kept in [0, 1]).

    ``resize_crop`` scales the shorter side to fit then crops the centre (no
    distortion), ``resize`` stretches, ``center_crop`` only crops, ``none``
    keeps the source size.
    """
    if size is None or mode == "none" or tuple(x_NCHW.shape[-2:]) == size:
        return x_NCHW
    h, w = size
    H, W = x_NCHW.shape[-2:]
    if mode == "resize":
        return F.interpolate(x_NCHW, size=(h, w), mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)
    if mode == "resize_crop":
        scale = max(h / H, w / W)
        new = (max(h, round(H * scale)), max(w, round(W * scale)))
        x_NCHW = F.interpolate(x_NCHW, size=new, mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)
        H, W = new
    elif mode == "center_crop":
        if H < h or W < w:
            raise SampleError(source, f"image is {H}x{W}, smaller than the crop {h}x{w}",
                              fix="use resize: resize_crop, or a smaller size")
    else:
        raise SampleError(source, f"unknown resize mode {mode!r}", fix=f"use one of {', '.join(RESIZE_MODES)}")
    top, left = (H - h) // 2, (W - w) // 2
    return x_NCHW[..., top:top + h, left:left + w]


def to_unit_range(a: np.ndarray, source: str, value_range: Sequence[float] | None = None) -> np.ndarray:
    """Pixels as float32 in [0, 1]: integers by their dtype's range, floats as they are (checked)."""
    if value_range is not None:
        lo, hi = float(value_range[0]), float(value_range[1])
        return np.clip((a.astype(np.float32) - lo) / (hi - lo), 0, 1)
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if np.issubdtype(a.dtype, np.integer):
        # 32-bit integer pixels (PIL mode "I") are 16-bit data in practice
        top = 65535.0 if a.dtype.itemsize >= 2 else float(np.iinfo(a.dtype).max)
        return np.clip(a.astype(np.float32) / top, 0, 1)
    out = a.astype(np.float32)
    if not np.isfinite(out).all():
        raise SampleError(source, "image has NaN or infinite pixels", fix="clean the source data")
    if out.size and (out.min() < 0 or out.max() > 1):
        raise SampleError(source, f"float pixels lie in [{out.min():.4g}, {out.max():.4g}], not [0, 1]",
                          fix=f"set value_range: [{out.min():.4g}, {out.max():.4g}]")
    return out


def to_channels(x_HWC: np.ndarray, channels: int, source: str) -> np.ndarray:
    """Gray <-> RGB as asked; alpha is dropped (tokenizers model colour, not transparency)."""
    c = x_HWC.shape[2]
    if c == channels:
        return x_HWC
    if channels == 3 and c in (1, 2):
        return np.repeat(x_HWC[:, :, :1], 3, axis=2)
    if channels == 3 and c == 4:
        return x_HWC[:, :, :3]
    if channels == 1 and c in (3, 4):
        return (x_HWC[:, :, :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[:, :, None]
    if channels == 1 and c == 2:
        return x_HWC[:, :, :1]
    raise SampleError(source, f"image has {c} channels; cannot convert to {channels}",
                      fix="set channels to 1 or 3, or convert the source images")


def decode_image(data: bytes, name: str, source: str, max_pixels: int) -> np.ndarray:
    """Encoded bytes -> ``x_HWC`` in the file's dtype; size checked before pixels are decoded."""
    if PurePosixPath(name).suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                series = tif.series[0]
                shape = series.shape
                _check_pixels(shape[:2] if len(shape) == 3 and shape[2] <= 4 else shape[-2:], source, max_pixels)
                if not (len(shape) == 2 or (len(shape) == 3 and shape[2] <= 4)):
                    raise SampleError(source, f"TIFF holds an array of shape {shape}, not one image",
                                      fix="read multi-page TIFF stacks with the volume reader")
                a = series.asarray()
        except SampleError:
            raise
        except Exception as err:
            raise SampleError(source, f"cannot decode TIFF ({type(err).__name__}: {err})",
                              fix="re-export the file or remove it from the source") from None
        return a[:, :, None] if a.ndim == 2 else a
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            _check_pixels((img.height, img.width), source, max_pixels)
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F", "L", "RGB", "RGBA", "LA"):
                a = np.asarray(img)
            else:
                a = np.asarray(img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB"))
    except SampleError:
        raise
    except Exception as err:
        raise SampleError(source, f"cannot decode image ({type(err).__name__}: {err})",
                          fix="re-export the file or remove it from the source") from None
    return a[:, :, None] if a.ndim == 2 else a


def _check_pixels(hw: Sequence[int], source: str, max_pixels: int) -> None:
    pixels = int(hw[0]) * int(hw[1])
    if pixels > max_pixels:
        raise SampleError(source, f"image is {hw[0]}x{hw[1]} = {pixels} pixels, over max_pixels={max_pixels}",
                          fix="raise max_pixels or downscale the source")


# --------------------------------------------------------------------- labels


def parse_sidecar(text: str, name: str, source: str) -> dict[str, Any]:
    """CSV with a file column and a label column, or JSON ``{file: label}`` / ``[{file, label}]``."""
    if name.lower().endswith(".json"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise SampleError(source, f"label sidecar is not valid JSON ({err.msg}, line {err.lineno})",
                              fix="fix the JSON") from None
        if isinstance(doc, dict):
            return {str(k): v for k, v in doc.items()}
        rows = doc
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
    out = {}
    for row in rows:
        cols = {k.strip().lower(): v for k, v in row.items() if k}
        key = next((cols[c] for c in _KEY_COLUMNS if c in cols), None)
        label = next((cols[c] for c in _LABEL_COLUMNS if c in cols), None)
        if key is None or label is None:
            raise SampleError(source, f"label sidecar rows need a file column ({'/'.join(_KEY_COLUMNS)}) and a "
                              f"label column ({'/'.join(_LABEL_COLUMNS)})", fix="rename the columns")
        out[str(key).strip()] = label
    return out


def _sidecar_label(table: dict[str, Any], f: SourceFile) -> Any:
    name = PurePosixPath(f.relpath)
    for candidate in (f.relpath, f.stem_key, name.name, name.stem):
        if candidate in table:
            return table[candidate]
    raise SampleError(f.uri, "image has no entry in the label sidecar",
                      fix="add a row for it, or set labels: folder/none")


# --------------------------------------------------------------------- reader


class ImageReader(Reader):
    """Images from a folder (recursive), WebDataset shards, or an .npy/.npz array.

    ``format`` is ``auto`` (by suffix; a folder holding .tar files is read as
    WebDataset), ``folder``, ``webdataset`` or ``array`` (also spelt ``npy``/``npz``). ``labels`` is
    ``auto`` (a ``labels.csv``/``labels.json`` at the folder root, else the
    sub-folder name), ``folder``, ``none``, or the path of a sidecar (CSV,
    JSON, or a row-aligned .npy for arrays).
    """

    modality = "image"

    def __init__(self, uri: str, *, format: str = "auto", size: int | Sequence[int] | None = None,
                 resize: str = "resize_crop", channels: int = 3, labels: str | None = "auto",
                 value_range: Sequence[float] | None = None, max_pixels: int = 1 << 26,
                 files_per_unit: int = 64, rows_per_unit: int = 1024, captions: str | None = None,
                 captions_required: bool = False, transform: str = "none", transform_sigma: float = 1.0):
        super().__init__(uri)
        if resize not in RESIZE_MODES:
            raise SampleError(uri, f"unknown resize mode {resize!r}", fix=f"use one of {', '.join(RESIZE_MODES)}")
        if channels not in (1, 3):
            raise SampleError(uri, f"channels must be 1 or 3, got {channels}", fix="set channels: 1 or 3")
        self.size, self.resize, self.channels = as_size(size), resize, channels
        self.labels, self.value_range, self.max_pixels = labels, value_range, int(max_pixels)
        self.files_per_unit, self.rows_per_unit = int(files_per_unit), int(rows_per_unit)
        self.format = self._infer_format(format)
        self._label_table: dict[str, Any] | None = None
        if captions is not None and self.format == "array":
            raise SampleError(uri, "captions are read for image folders and WebDataset shards, not array files",
                              fix="remove captions:, or store the images as files with a caption sidecar")
        self.captions, self.captions_required = captions, bool(captions_required)
        self._captions: Captions | None = None
        if transform not in ("none", *TRANSFORMS):
            raise SampleError(uri, f"unknown transform {transform!r}", fix=f"use none, {', '.join(TRANSFORMS)}")
        self.transform, self.transform_sigma = transform, float(transform_sigma)

    def _infer_format(self, format: str) -> str:
        if format in ("npy", "npz"):  # the array file's own name for it
            return "array"
        if format != "auto":
            if format not in ("folder", "webdataset", "array"):
                raise SampleError(self.uri, f"unknown image format {format!r}",
                                  fix="use auto, folder, webdataset, array (npy/npz)")
            return format
        suffix = PurePosixPath(self.uri).suffix.lower()
        if suffix == ".tar":
            return "webdataset"
        if suffix in ARRAY_SUFFIXES:
            return "array"
        if is_dir(self.uri):
            names = [e.relpath for e in storage_for(self.uri).list(self.uri)]
            if any(n.endswith(".tar") for n in names) and not any(
                    PurePosixPath(n).suffix.lower() in IMAGE_SUFFIXES for n in names):
                return "webdataset"
        return "folder"

    # ------------------------------------------------------------------ units

    def units(self) -> list[Unit]:
        if self.format == "webdataset":
            files, self.skipped = scan_files(self.uri, (".tar",), "WebDataset shard")
            return [Unit(f.uri, "tar", f.relpath, size=f.size) for f in files]
        if self.format == "array":
            files, self.skipped = scan_files(self.uri, ARRAY_SUFFIXES, "array", sidecars=self._sidecars())
            return [u for f in files for u in self._array_units(f)]
        captions = self._captions_below(self.uri) if is_dir(self.uri) else None
        sidecars = {**self._sidecars(), **(captions.sidecars() if captions else {})}
        files, self.skipped = scan_files(self.uri, IMAGE_SUFFIXES, "image", sidecars=sidecars)
        if captions is not None:
            captions.table()   # a sidecar that does not parse fails the listing, not every unit
            self.skipped = captions.relabel(files, self.skipped)
        single = not is_dir(self.uri)
        base = self.uri if not single else self.uri[: -len(files[0].relpath)].rstrip("/")
        out = []
        for s in range(0, len(files), self.files_per_unit):
            group = files[s:s + self.files_per_unit]
            out.append(Unit(base, "file", group[0].relpath, members=tuple(f.relpath for f in group),
                            size=sum(f.size for f in group)))
        return out

    def _array_units(self, f: SourceFile) -> list[Unit]:
        if f.suffix == ".npz":
            return [Unit(f.uri, "file", f.relpath, size=f.size)]
        shape, _dtype, _offset = npy_header(f.uri)
        n = shape[0] if shape else 0
        return [Unit(f.uri, "rows", f.relpath, start=(r,), stop=(min(n, r + self.rows_per_unit),),
                     size=f.size * (min(n, r + self.rows_per_unit) - r) // max(n, 1))
                for r in range(0, n, self.rows_per_unit)]

    # ------------------------------------------------------------------- read

    def read(self, unit: Unit) -> Iterator[Sample | SampleError]:
        if unit.kind == "tar":
            yield from self._read_tar(unit)
        elif unit.kind == "rows":
            yield from self._read_rows(unit)
        elif unit.uri.lower().endswith(".npz"):
            yield from self._read_npz(unit)
        else:
            for rel in unit.members:
                f = SourceFile(join(unit.uri, rel), rel, 0)
                data = read_bytes(f.uri)
                caption = None if self.captions is None else self._captions_below(unit.uri).of(rel, f.uri)
                yield self._sample(decode_image(data, rel, f.uri, self.max_pixels), f.relpath, f.uri,
                                   digest_bytes(data), self._folder_label(unit.uri, f), caption=caption)

    def _sample(self, x_HWC: np.ndarray, key: str, source: str, digest: str, label: Any,
                value_range: Sequence[float] | None = None, caption: str | None = None) -> Sample:
        h, w = x_HWC.shape[:2]
        x = to_channels(to_unit_range(x_HWC, source, value_range or self.value_range), self.channels, source)
        x_1CHW = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
        x_CHW = fit_to_size(x_1CHW, self.size, self.resize, source)[0].numpy()
        if self.transform != "none":
            x_CHW = control_image(x_CHW, self.transform, self.transform_sigma)
        return Sample(key=key, data=np.ascontiguousarray(x_CHW, dtype=np.float32), modality=self.modality,
                      source_uri=source, source_digest=digest, label=label, caption=caption,
                      meta={"source_size": [h, w]})

    def _captions_below(self, root: str) -> Captions | None:
        """How the files below ``root`` find their captions (None without ``captions``); found once per reader."""
        if self.captions is None:
            return None
        if self._captions is None or self._captions.root != root:
            self._captions = Captions(root, self.captions, self.captions_required)
        return self._captions

    def _folder_label(self, root: str, f: SourceFile) -> Any:
        mode = self.labels
        if mode in (None, "none"):
            return None
        if self._label_table is None:
            self._label_table = self._load_sidecar(root)
        if self._label_table:
            return _sidecar_label(self._label_table, f)
        if mode not in ("auto", "folder"):
            return None
        parent = PurePosixPath(f.relpath).parent
        return parent.name if str(parent) not in ("", ".") else None

    def _sidecar_uri(self, root: str) -> str | None:
        """The CSV/JSON label sidecar a folder's images take their labels from, if any."""
        if self.labels in (None, "none", "folder") or str(self.labels).endswith(".npy") or not is_dir(root):
            return None
        if self.labels == "auto":
            return next((uri for name in SIDECARS if storage_for(uri := join(root, name)).exists(uri)), None)
        uri = self.labels if (is_s3(self.labels) or self.labels.startswith("/")) else join(root, self.labels)
        if not storage_for(uri).exists(uri):
            raise SampleError(uri, "label sidecar not found", fix="fix the labels path or set labels: folder")
        return uri

    def _sidecars(self) -> dict[str, str]:
        """Label files inside the source folder (relpath -> what they are), reported as skipped, not read as data."""
        if not is_dir(self.uri):
            return {}
        if self.format == "array":
            labels = str(self.labels)
            inside = labels.endswith(".npy") and not (is_s3(labels) or labels.startswith("/"))
            return {labels: "label sidecar"} if inside else {}
        uri = self._sidecar_uri(self.uri)
        prefix = self.uri.rstrip("/") + "/"
        return {uri[len(prefix):]: "label sidecar"} if uri and uri.startswith(prefix) else {}

    def _load_sidecar(self, root: str) -> dict[str, Any]:
        uri = self._sidecar_uri(root)
        return {} if uri is None else parse_sidecar(read_bytes(uri).decode("utf-8"), uri, uri)

    def _read_tar(self, unit: Unit) -> Iterator[Sample]:
        from webdataset.tariterators import base_plus_ext

        stream = _CountingReader(storage_for(unit.uri).open_read(unit.uri))
        group: dict[str, bytes] = {}
        current: str | None = None
        refused: list[str] = []
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    why = _unsafe_member(member)
                    if why:
                        refused.append(f"{member.name!r} ({why})")
                        continue
                    if not member.isreg():
                        continue
                    prefix, suffix = base_plus_ext(member.name)
                    if prefix is None or PurePosixPath(member.name).name.startswith("__"):
                        continue
                    if prefix != current and group:
                        yield self._tar_sample_or_error(unit, current, group)
                        group = {}
                    current = prefix
                    group[suffix.lower()] = tar.extractfile(member).read()
                end = tar.offset
            while stream.read(1 << 16):
                pass
            # tarfile ends quietly at a cut-off header; a whole archive has a zero block where it stopped
            if stream.total < end + tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"archive ends inside a header at byte {stream.total}")
        except (tarfile.TarError, EOFError, OSError) as err:
            raise SampleError(unit.uri, f"WebDataset shard is not a readable tar ({err})",
                              fix="re-create the shard; a truncated upload is the usual cause") from None
        finally:
            stream.close()
        if group:
            yield self._tar_sample_or_error(unit, current, group)
        if refused:   # after the shard's good samples: they are kept, the refusal is quarantined
            raise SampleError(unit.uri, f"refused {len(refused)} member(s) that would leave the shard: "
                              f"{', '.join(refused[:3])}", fix="re-create the shard with relative member names "
                              "and no links pointing out of it")

    def _tar_sample_or_error(self, unit: Unit, key: str, group: dict[str, bytes]) -> Sample | SampleError:
        """One shard sample, or why it is bad: the shard's other samples are read on (see Reader.read)."""
        try:
            return self._tar_sample(unit, key, group)
        except SampleError as err:
            return err

    def _tar_sample(self, unit: Unit, key: str, group: dict[str, bytes]) -> Sample:
        source = f"{unit.uri}#{key}"
        ext = next((e for e in _MEMBER_EXTS if e in group), None)
        if ext is None:
            raise SampleError(source, f"shard sample has no image member (has {', '.join(sorted(group))})",
                              fix="store images as .png/.jpg/.webp/.tif members")
        label: Any = None
        if "cls" in group:
            text = group["cls"].decode().strip()
            label = int(text) if text.lstrip("-").isdigit() else text
        elif "json" in group:
            try:
                label = json.loads(group["json"]).get("label")
            except (json.JSONDecodeError, AttributeError):
                raise SampleError(source, "shard sample's .json member is not a JSON object",
                                  fix="write a JSON object such as {\"label\": 3}") from None
        caption = None
        if self.captions is not None:
            caption = check_caption(tar_caption(group, source), self.captions_required, source,
                                    "has no caption (a .txt member, or caption/text in its .json)")
        data = group[ext]
        return self._sample(decode_image(data, f"x.{ext}", source, self.max_pixels), f"{unit.key}/{key}", source,
                            digest_bytes(data), label, caption=caption)

    # ----------------------------------------------------------------- arrays

    def _read_rows(self, unit: Unit) -> Iterator[Sample]:
        shape, dtype, offset = npy_header(unit.uri)
        r0, r1 = unit.start[0], unit.stop[0]
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        raw = storage_for(unit.uri).read_range(unit.uri, offset + r0 * row_bytes, (r1 - r0) * row_bytes)
        if len(raw) != (r1 - r0) * row_bytes:
            raise SampleError(unit.uri, f".npy file is truncated (rows {r0}:{r1} need {(r1 - r0) * row_bytes} "
                              f"bytes, got {len(raw)})", fix="re-create the array file")
        rows = np.frombuffer(raw, dtype=dtype).reshape((r1 - r0, *shape[1:]))
        labels = self._row_labels(unit.uri, r0, r1)
        for i, row in enumerate(rows):
            yield self._array_sample(row, f"{unit.key}/{r0 + i:08d}", f"{unit.uri}#{r0 + i}",
                                     None if labels is None else labels[i])

    def _row_labels(self, uri: str, r0: int, r1: int) -> list[Any] | None:
        if not (isinstance(self.labels, str) and self.labels.endswith(".npy")):
            return None
        parent = str(PurePosixPath(uri).parent) if not is_s3(uri) else uri.rsplit("/", 1)[0]
        path = self.labels if (is_s3(self.labels) or self.labels.startswith("/")) else join(parent, self.labels)
        shape, dtype, offset = npy_header(path)
        raw = storage_for(path).read_range(path, offset + r0 * dtype.itemsize, (r1 - r0) * dtype.itemsize)
        return np.frombuffer(raw, dtype=dtype).tolist()

    def _read_npz(self, unit: Unit) -> Iterator[Sample]:
        try:
            with np.load(io.BytesIO(read_bytes(unit.uri)), allow_pickle=False) as npz:
                names = list(npz.files)
                image_key = next((k for k in ("images", "image", "x", "data") if k in names), None)
                label_key = next((k for k in ("labels", "label", "y", "targets") if k in names), None)
                if image_key is None:
                    image_key = next((k for k in names if npz[k].ndim >= 3), None)
                if image_key is None:
                    raise SampleError(unit.uri, f"npz holds no image array (arrays: {', '.join(names)})",
                                      fix="store images under the key 'images' with shape (N, H, W[, C])")
                images = npz[image_key]
                labels = npz[label_key].tolist() if label_key else None
        except SampleError:
            raise
        except Exception as err:
            raise SampleError(unit.uri, f"cannot read npz ({type(err).__name__}: {err})",
                              fix="re-create the file with numpy.savez") from None
        if labels is not None and len(labels) != len(images):
            raise SampleError(unit.uri, f"npz has {len(images)} images but {len(labels)} labels",
                              fix="store one label per image")
        for i, row in enumerate(images):
            yield self._array_sample(row, f"{unit.key}/{i:08d}", f"{unit.uri}#{i}",
                                     None if labels is None else labels[i])

    def _array_sample(self, row: np.ndarray, key: str, source: str, label: Any) -> Sample:
        if row.ndim == 2:
            x_HWC = row[:, :, None]
        elif row.ndim == 3 and row.shape[2] in (1, 3, 4):
            x_HWC = row
        elif row.ndim == 3 and row.shape[0] in (1, 3, 4):
            x_HWC = row.transpose(1, 2, 0)
        else:
            raise SampleError(source, f"array rows have shape {row.shape}, not an image",
                              fix="store images as (N, H, W), (N, H, W, C) or (N, C, H, W) with C in 1, 3, 4")
        _check_pixels(x_HWC.shape[:2], source, self.max_pixels)
        return self._sample(np.array(x_HWC), key, source, digest_array(row), label)


def _unsafe_member(member: tarfile.TarInfo) -> str | None:
    """Why a tar member's path (or link target) would leave the shard, or None.

    Members are read into memory, never extracted, but their names become sample keys (and links
    would point readers elsewhere): a shard that names files outside itself is refused.
    """
    path = PurePosixPath(member.name)
    if path.is_absolute():
        return "absolute path"
    if ".." in path.parts:
        return "'..' in its path"
    if member.issym() or member.islnk():
        target = PurePosixPath(member.linkname)
        base = path.parent if member.issym() else PurePosixPath()
        depth = 0
        for part in (base / target).parts:
            depth += -1 if part == ".." else (0 if part in (".", "") else 1)
            if depth < 0:
                break
        if target.is_absolute() or depth < 0:
            return f"link to {member.linkname!r} outside the shard"
    return None


class _CountingReader:
    """A read-only stream that counts the bytes it hands out (tar truncation check)."""

    def __init__(self, raw: Any):
        self.raw, self.total = raw, 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n) if n is not None and n >= 0 else self.raw.read()
        self.total += len(data)
        return data

    def close(self) -> None:
        self.raw.close()


def npy_header(uri: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a C-ordered .npy file from its first bytes only (local or s3)."""
    shape, dtype, offset, fortran = npy_layout(uri)
    if fortran:
        raise SampleError(uri, "the .npy array is Fortran-ordered",
                          fix="save a C-ordered numeric array (numpy.ascontiguousarray)")
    return shape, dtype, offset


def npy_layout(uri: str) -> tuple[tuple[int, ...], np.dtype, int, bool]:
    """(shape, dtype, data offset, Fortran order) of an .npy file from its first bytes only (local or s3)."""
    head = storage_for(uri).read_range(uri, 0, 65536)
    f = io.BytesIO(head)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except Exception as err:
        raise SampleError(uri, f"not a readable .npy file ({err})", fix="re-create it with numpy.save") from None
    if dtype.hasobject:
        raise SampleError(uri, "the .npy array holds Python objects", fix="save a numeric array (numpy.save)")
    return tuple(shape), dtype, f.tell(), bool(fortran)
