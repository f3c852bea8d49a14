"""Digests of raw sources read from outside the pipeline, for fingerprints.

Keyed on a listing (relative names, sizes, and local modification times), not
the path alone: new or changed files at the same place rerun the stage, while
hashing every byte of a large dataset on each `plan` is avoided.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from arpipe.pipeline.storage import is_s3, normalize, storage_for


def source_listing_digest(uri: str, base: Path) -> str:
    uri = normalize(uri, base)
    h = hashlib.sha256()
    if is_s3(uri):
        storage = storage_for(uri)
        size = storage.size(uri)
        entries = [("", size)] if size is not None else [(e.relpath, e.size) for e in storage.list(uri)]
        for rel, size in sorted(entries):
            h.update(f"{rel}\0{size}\n".encode())
        return h.hexdigest()
    path = Path(uri)
    if path.is_file():
        st = path.stat()
        h.update(f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()
    if not path.exists():
        return "missing"
    for dirpath, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = Path(dirpath) / name
            st = full.stat()
            h.update(f"{full.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
