"""Finding and opening source files, local or on s3://, through pipeline.storage.

Readers list what a URI holds (a file, or every matching file below a
folder/prefix, recursively, in sorted order so units are deterministic) and
what they skip there with the reason (every file is read or reported), read
small files whole, and hand libraries that need a real file (PyAV, h5py,
tifffile, zarr) a local copy that lives only while the unit is read.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

from arpipe.pipeline.storage import is_s3, join, storage_for

from .accounting import skip_summary
from .base import SampleError, SkippedFile


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
    """The files :func:`scan_files` keeps (for readers that do not report what it skips)."""
    return scan_files(uri, suffixes, what)[0]


def scan_files(uri: str, suffixes: tuple[str, ...], what: str, *, sidecars: Mapping[str, str] | None = None,
               recursive: bool = True) -> tuple[list[SourceFile], list[SkippedFile]]:
    """(files to read, files skipped with why) below ``uri``, each in path order; ``uri`` itself when a file.

    A file is read when its suffix is one of ``suffixes``; skipped are other suffixes,
    hidden files (a path part starting with '.'), ``sidecars`` (relpath -> what the
    reader reads it for), files in sub-folders unless ``recursive``, and on local
    disks links to nothing, links to folders (not followed) and non-regular files.
    """
    store = storage_for(uri)
    if not is_dir(uri):
        size = store.size(uri)
        if size is None:
            raise SampleError(uri, f"{what} source does not exist", fix="check the source uri")
        return [SourceFile(uri, PurePosixPath(uri).name, size)], []
    found: list[SourceFile] = []
    skipped: list[SkippedFile] = []
    entries = _local_entries(uri) if not is_s3(uri) else ((e.relpath, e.size, None) for e in store.list(uri))
    formats = ", ".join(s.lstrip(".") for s in suffixes)
    for rel, size, problem in entries:
        path = PurePosixPath(rel)
        why: tuple[str, str] | None = None
        if problem is not None:
            why = problem
        elif any(part.startswith(".") for part in path.parts):
            why = ("hidden", "hidden file (a name starting with '.': OS, editor or version-control metadata); "
                             "rename it without the leading dot to have it read")
        elif sidecars and rel in sidecars:
            why = (sidecars[rel], f"{sidecars[rel]}: read by the {what} reader, not a sample")
        elif not recursive and len(path.parts) > 1:
            why = ("sub-folder", f"in a sub-folder: a {what} source reads only the folder's top level; "
                                 "move the file up or point a source at its folder")
        elif path.suffix.lower() not in suffixes:
            kind = path.suffix.lower() or "no suffix"
            why = (kind, f"{kind if path.suffix else 'a file without a suffix'} is not a format the {what} reader "
                         f"reads ({formats}); convert the file or move it out of the source")
        if why is None:
            found.append(SourceFile(join(uri, rel), rel, int(size or 0)))
        else:
            skipped.append(SkippedFile(join(uri, rel), rel, why[0], why[1]))
    if not found:
        raise SampleError(uri, f"no {what} files ({', '.join(suffixes)}) found"
                               + (f"; {skip_summary(skipped)}" if skipped else ""),
                          fix="check the source uri and format")
    return sorted(found, key=lambda f: f.relpath), sorted(skipped, key=lambda f: f.relpath)


def _local_entries(root: str) -> Iterator[tuple[str, int | None, tuple[str, str] | None]]:
    """(relpath, size, problem) of every entry below a local folder, links and unreadable folders included.

    ``pipeline.storage`` lists only files it can stat; a reader must also see what it cannot read.
    """
    unreadable: list[OSError] = []
    for dirpath, dirs, files in os.walk(root, onerror=unreadable.append):
        for name in dirs:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):   # os.walk does not follow it: a link could loop or leave the source
                yield (_rel(full, root), None, ("folder link", "symlink to a folder, not followed; copy the "
                                                "folder into the source or point a source at it"))
        for name in files:
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except FileNotFoundError:
                if os.path.islink(full):
                    yield (_rel(full, root), None, ("broken link", f"symlink to {os.readlink(full)!r}, which "
                                                    "does not exist; fix or remove the link"))
                continue   # removed since the walk listed it: not there to account for
            except OSError as err:
                yield _rel(full, root), None, ("unreadable", f"cannot stat the file ({err.strerror})")
                continue
            if not stat.S_ISREG(st.st_mode):
                yield (_rel(full, root), None, ("not a regular file", "a FIFO, socket or device, not a file "
                                                "(reading it could block); remove it from the source"))
                continue
            yield _rel(full, root), st.st_size, None
    for err in unreadable:
        if err.filename and os.path.abspath(err.filename) != os.path.abspath(root):
            yield (_rel(err.filename, root), None, ("unreadable folder", f"cannot list the folder "
                                                    f"({err.strerror}); its files are not read: fix its permissions"))


def _rel(path: str, root: str) -> str:
    return PurePosixPath(os.path.relpath(path, root).replace(os.sep, "/")).as_posix()


def read_bytes(uri: str) -> bytes:
    try:
        return storage_for(uri).read_bytes(uri)
    except FileNotFoundError:
        raise SampleError(uri, "source file vanished after listing", fix="re-run once the source is stable") from None
    except (PermissionError, IsADirectoryError) as err:
        raise SampleError(uri, f"cannot read the file ({err.strerror})", fix="fix its permissions") from None


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
