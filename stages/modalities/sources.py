"""Finding and opening source files, local or on s3://, through pipeline.storage.

Readers list what a URI holds (a file, or every matching file below a
folder/prefix, recursively, in sorted order so units are deterministic) and
what they skip there with the reason (every file is read or reported), read
small files whole, and give libraries that read large files piecemeal (h5py,
tifffile, PyAV, mrcfile's header reader) a :class:`RangedFile`: a seekable file
object over an s3:// object whose reads are ranged GETs, so a unit transfers the
part of a volume or video it reads, not the whole file. :func:`local_file` is the
whole-file download, for the readers that need every byte anyway.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import tempfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

from arpipe.pipeline.digest import digest_stream
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


@contextlib.contextmanager
def _reading(uri: str) -> Iterator[None]:
    """A listed file that cannot be read is the sample's error, named by its uri."""
    try:
        yield
    except FileNotFoundError:
        raise SampleError(uri, "source file vanished after listing", fix="re-run once the source is stable") from None
    except (PermissionError, IsADirectoryError) as err:
        raise SampleError(uri, f"cannot read the file ({err.strerror})", fix="fix its permissions") from None


def read_bytes(uri: str) -> bytes:
    with _reading(uri):
        return storage_for(uri).read_bytes(uri)


def digest_source(uri: str) -> str:
    """The digest of a file's bytes, streamed (nothing kept on disk or in memory)."""
    with _reading(uri), contextlib.closing(storage_for(uri).open_read(uri)) as stream:
        return digest_stream(stream)


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


class RangedFile(io.RawIOBase):
    """A read-only, seekable binary file over ``uri`` (s3:// or local) whose reads are ranged GETs.

    h5py, tifffile, PyAV and mrcfile take it where they take an open file and read only what they
    need: a chunk, a strip, the packets of a clip. Reads shorter than ``small_read`` (headers, HDF5
    B-tree nodes, TIFF IFDs: many small reads close together, mostly forward) fetch ``read_ahead``
    bytes from where they start, kept in a small LRU for the reads that follow, so a library's
    metadata walk costs a few requests instead of one per field; longer reads (the data itself) fetch
    exactly the bytes asked for; with ``streaming`` (a decoder reading on through a file), a long read
    that continues the previous one fetches twice as much as that did, up to ``max_fetch``, so a long
    sequential read costs few requests and overshoots by at most its last fetch. The size comes from
    one HEAD at open (or from a listing, ``size``); an object that shrinks or vanishes while it is read
    is an error, not garbage (a rewrite to the same length is not detected: there is no ETag check).
    """

    def __init__(self, uri: str, size: int | None = None, *, small_read: int = 4 << 10, read_ahead: int = 16 << 10,
                 cached: int = 64, streaming: bool = False, max_fetch: int = 8 << 20):
        super().__init__()
        self.uri, self.small_read, self.read_ahead, self._cached = uri, small_read, max(read_ahead, small_read), cached
        self.streaming, self.max_fetch = streaming, max_fetch
        self._fetched: tuple[int, bytes] = (0, b"")   # the last long fetch (streaming): start, bytes
        self._storage = storage_for(uri)
        size = self._storage.size(uri) if size is None else size
        if size is None:
            raise SampleError(uri, "source file does not exist", fix="check the source uri (or re-run once it is uploaded)")
        self.size, self._pos = int(size), 0
        self._extents: OrderedDict[int, bytes] = OrderedDict()   # start -> bytes fetched for small reads

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self.size - self._pos))
        if n:
            view[:n] = self.read_at(self._pos, n)
            self._pos += n
        return n

    def readall(self) -> bytes:
        data = self.read_at(self._pos, max(0, self.size - self._pos))
        self._pos += len(data)
        return data

    def read_at(self, start: int, length: int) -> bytes:
        """``length`` bytes at ``start`` (fewer only past the end of the file); the position is unchanged."""
        length = max(0, min(length, self.size - start))
        if length >= self.small_read or length == 0:
            return self._long(start, length) if self.streaming else self._get(start, length)
        for begin, data in self._extents.items():
            if begin <= start and start + length <= begin + len(data):
                self._extents.move_to_end(begin)
                return data[start - begin:start - begin + length]
        data = self._extents[start] = self._get(start, min(self.read_ahead, self.size - start))
        while len(self._extents) > self._cached:
            self._extents.popitem(last=False)
        return data[:length]

    def _long(self, start: int, length: int) -> bytes:
        begin, data = self._fetched
        if begin <= start and start + length <= begin + len(data):
            return data[start - begin:start - begin + length]
        fetch = length
        if begin < start <= begin + len(data):   # reading on: what is left of the last fetch, then twice that
            fetch = max(length, min(2 * len(data), self.max_fetch))
            head = data[start - begin:]
            more = self._get(begin + len(data), min(fetch - len(head), self.size - begin - len(data)))
            self._fetched = (start, head + more)
        else:
            self._fetched = (start, self._get(start, min(fetch, self.size - start)))
        return self._fetched[1][:length]

    def _get(self, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        try:
            data = self._storage.read_range(self.uri, start, length)
        except FileNotFoundError:
            raise SampleError(self.uri, "source file vanished while it was read",
                              fix="re-run once the source is stable") from None
        if len(data) != length:
            raise SampleError(self.uri, f"source file changed while it was read ({length} bytes at {start} asked, "
                                        f"{len(data)} served; it was {self.size} bytes when opened)",
                              fix="re-run once the source is stable")
        return data

    def close(self) -> None:
        self._extents.clear()
        super().close()
