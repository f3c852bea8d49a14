"""Finding and opening source files, local or on s3://, through pipeline.storage.

Readers list what a URI holds (a file, or every matching file below a
folder/prefix, recursively, in sorted order so units are deterministic), read
small files whole, and hand libraries that need a real file (PyAV, h5py,
tifffile, zarr) a local copy that lives only while the unit is read.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

from arpipe.pipeline.storage import is_s3, join, storage_for

from .base import SampleError


@dataclass(frozen=True)
class SourceFile:
    uri: str
    relpath: str
    size: int

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.relpath).suffix.lower()

    @property
    def stem_key(self) -> str:
        """The relative path without its extension (how label sidecars may name a file)."""
        return str(PurePosixPath(self.relpath).with_suffix(""))


def is_dir(uri: str) -> bool:
    if is_s3(uri):
        return storage_for(uri).size(uri) is None
    return os.path.isdir(uri)


def list_files(uri: str, suffixes: tuple[str, ...], what: str) -> list[SourceFile]:
    """``uri`` itself when it is a file, else every file below it whose suffix matches (hidden ones skipped)."""
    store = storage_for(uri)
    if not is_dir(uri):
        size = store.size(uri)
        if size is None:
            raise SampleError(uri, f"{what} source does not exist", fix="check the source uri")
        return [SourceFile(uri, PurePosixPath(uri).name, size)]
    found = [SourceFile(join(uri, e.relpath), e.relpath, e.size) for e in store.list(uri)
             if PurePosixPath(e.relpath).suffix.lower() in suffixes
             and not any(part.startswith(".") for part in PurePosixPath(e.relpath).parts)]
    if not found:
        raise SampleError(uri, f"no {what} files ({', '.join(suffixes)}) found",
                          fix="check the source uri and format")
    return sorted(found, key=lambda f: f.relpath)


def read_bytes(uri: str) -> bytes:
    try:
        return storage_for(uri).read_bytes(uri)
    except FileNotFoundError:
        raise SampleError(uri, "source file vanished after listing", fix="re-run once the source is stable") from None


@contextlib.contextmanager
def local_file(uri: str) -> Iterator[str]:
    """A local path for ``uri``: itself when local, else a temporary download removed afterwards."""
    if not is_s3(uri):
        yield uri
        return
    fd, tmp = tempfile.mkstemp(prefix="arpipe-src-", suffix=PurePosixPath(uri).suffix)
    os.close(fd)
    try:
        storage_for(uri).get_file(uri, tmp)
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


@contextlib.contextmanager
def local_tree(uri: str) -> Iterator[str]:
    """Like :func:`local_file` for a folder (a Zarr store, a folder of TIFF slices)."""
    if not is_s3(uri):
        yield uri
        return
    store = storage_for(uri)
    tmp = tempfile.mkdtemp(prefix="arpipe-src-")
    try:
        for entry in store.list(uri):
            store.get_file(join(uri, entry.relpath), os.path.join(tmp, *entry.relpath.split("/")))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
