"""Captions: the text a sample is described by, read beside its file, from a sidecar, or from a tar member.

A reader with ``captions`` set takes each sample's caption from

- a sidecar at the source folder's root, ``captions.csv`` (a file column and a caption column),
  ``captions.json`` (``{file: caption}`` or ``[{file, caption}]``) or ``captions.jsonl`` (one
  ``{file, caption}`` object a line), keyed by the file's relative path with or without its
  extension, or by its bare name (``auto`` finds one; a path names another);
- else a ``.txt`` file beside each file with the same stem (``cat.png`` -> ``cat.txt``);
- in a WebDataset shard, the sample's ``.txt`` member, or the ``caption``/``text`` field of its ``.json``.

A caption that is not UTF-8, or, with ``captions_required``, a missing or empty caption, makes its
sample a :class:`SampleError` (quarantined with the reason), never a sample without its text.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import PurePosixPath
from typing import Any

from arpipe.pipeline.storage import is_s3, join, storage_for

from .base import SampleError, SkippedFile
from .sources import SourceFile, read_bytes

SIDECARS = ("captions.csv", "captions.json", "captions.jsonl")
BESIDE = ".txt"
_KEY_COLUMNS = ("file", "filename", "path", "image", "key", "name")
_TEXT_COLUMNS = ("caption", "text", "prompt", "description")


def decode_caption(data: bytes, source: str, what: str = "caption") -> str:
    """A caption's bytes as text (UTF-8, a BOM and surrounding white space dropped); ``what`` names it in errors."""
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as err:
        raise SampleError(source, f"{what} is not UTF-8 text (byte {err.start}: {data[err.start:err.start + 1]!r})",
                          fix="re-save it as UTF-8") from None


def parse_sidecar(text: str, name: str, source: str) -> dict[str, str]:
    """``{file key: caption}`` from a captions CSV, JSON or JSONL document."""
    rows: list[Any]
    lower = name.lower()
    try:
        if lower.endswith(".jsonl"):
            rows = []
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise SampleError(source, f"caption sidecar line {n} is not JSON ({err.msg})",
                                          fix="write one JSON object a line") from None
        elif lower.endswith(".json"):
            doc = json.loads(text)
            if isinstance(doc, dict):
                return {str(k): str(v) for k, v in doc.items()}
            rows = doc if isinstance(doc, list) else [doc]
        else:
            rows = list(csv.DictReader(io.StringIO(text)))
    except json.JSONDecodeError as err:
        raise SampleError(source, f"caption sidecar is not valid JSON ({err.msg}, line {err.lineno})",
                          fix="fix the JSON") from None
    out: dict[str, str] = {}
    for n, row in enumerate(rows, 1):
        cols = {str(k).strip().lower(): v for k, v in row.items() if k} if isinstance(row, dict) else {}
        key = next((cols[c] for c in _KEY_COLUMNS if c in cols), None)
        caption = next((cols[c] for c in _TEXT_COLUMNS if c in cols), None)
        if key is None or caption is None:
            raise SampleError(source, f"caption sidecar row {n} needs a file column ({'/'.join(_KEY_COLUMNS)}) "
                              f"and a caption column ({'/'.join(_TEXT_COLUMNS)})", fix="rename the columns")
        out[str(key).strip()] = "" if caption is None else str(caption).strip()
    return out


class Captions:
    """Finds the caption of each file below a source folder, as a reader's ``captions`` option says.

    ``mode`` is ``auto`` (a sidecar at the root, else ``.txt`` files beside), ``beside`` or the path of a
    sidecar (relative to the source folder, absolute, or s3://). The sidecar is read once per reader.
    """

    def __init__(self, root: str, mode: str, required: bool):
        self.root, self.mode, self.required = root, mode, required
        self._table: dict[str, str] | None = None
        self.sidecar = self._find_sidecar()

    def _find_sidecar(self) -> str | None:
        if self.mode == "beside":
            return None
        if self.mode == "auto":
            return next((uri for name in SIDECARS if storage_for(uri := join(self.root, name)).exists(uri)), None)
        uri = self.mode if (is_s3(self.mode) or self.mode.startswith("/")) else join(self.root, self.mode)
        if not storage_for(uri).exists(uri):
            raise SampleError(uri, "caption sidecar not found",
                              fix="fix the captions path, or set captions: auto or beside")
        return uri

    @property
    def beside(self) -> bool:
        """Whether captions are ``.txt`` files beside the data files (no sidecar)."""
        return self.sidecar is None

    def sidecars(self) -> dict[str, str]:
        """The sidecar, when inside the source folder (relpath -> what it is), for the listing to report it."""
        prefix = self.root.rstrip("/") + "/"
        if self.sidecar is None or not self.sidecar.startswith(prefix):
            return {}
        return {self.sidecar[len(prefix):]: "caption sidecar"}

    def relabel(self, found: list[SourceFile], skipped: list[SkippedFile]) -> list[SkippedFile]:
        """``skipped`` with the ``.txt`` files beside data files counted as their captions, not as unread files."""
        if self.sidecar is not None:
            return skipped
        stems = {f.stem_key: f.relpath for f in found}
        out = []
        for f in skipped:
            rel = PurePosixPath(f.relpath)
            owner = stems.get(str(rel.with_suffix(""))) if rel.suffix.lower() == BESIDE else None
            out.append(f if owner is None else SkippedFile(f.uri, f.relpath, "caption", f"caption: read as the "
                                                           f"caption of {PurePosixPath(owner).name}, not a sample"))
        return out

    def table(self) -> dict[str, str]:
        """The sidecar's ``{file key: caption}`` (read once; a listing reads it to fail early on a bad one)."""
        if self._table is None:
            self._table = {} if self.sidecar is None else parse_sidecar(
                decode_caption(read_bytes(self.sidecar), self.sidecar, "caption sidecar"), self.sidecar, self.sidecar)
        return self._table

    def of(self, relpath: str, source: str) -> str | None:
        """The caption of the file at ``relpath``: None when it has none and none is required."""
        if self.sidecar is not None:
            table, path = self.table(), PurePosixPath(relpath)
            caption = next((table[k] for k in (relpath, str(path.with_suffix("")), path.name, path.stem)
                            if k in table), None)
            missing = "has no entry in the caption sidecar"
        else:
            name = PurePosixPath(relpath).with_suffix(BESIDE)
            uri = join(self.root, str(name))
            try:
                caption = decode_caption(storage_for(uri).read_bytes(uri), source, f"its caption file {name.name}")
            except FileNotFoundError:   # an image without a caption file: `required` decides
                caption = None
            except (PermissionError, IsADirectoryError) as err:
                raise SampleError(source, f"cannot read its caption file {name.name} ({err.strerror})",
                                  fix="fix the caption file's permissions") from None
            missing = f"has no caption file beside it ({name.name})"
        return check_caption(caption, self.required, source, missing)


def check_caption(caption: str | None, required: bool, source: str, missing: str) -> str | None:
    """The caption as stored (None for none or empty); a required one missing or empty quarantines its sample."""
    if caption is None and required:
        raise SampleError(source, f"sample {missing}, and captions_required is set",
                          fix="add its caption, or set captions_required: false")
    if caption is not None and not caption and required:
        raise SampleError(source, "caption is empty, and captions_required is set",
                          fix="write its caption, or set captions_required: false")
    return caption or None


def tar_caption(group: dict[str, bytes], source: str) -> str | None:
    """A WebDataset sample's caption: its ``.txt`` member, else the caption/text field of its ``.json``."""
    if "txt" in group:
        return decode_caption(group["txt"], source)
    if "json" in group:
        try:
            doc = json.loads(group["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if isinstance(doc, dict):
            value = next((doc[c] for c in _TEXT_COLUMNS if isinstance(doc.get(c), str)), None)
            return None if value is None else value.strip()
    return None
