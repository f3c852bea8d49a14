"""Content digests, one format everywhere: ``sha256:<64 hex digits>``.

outputs.json, store manifests, tokenizer.json, sample source digests and MLflow dataset inputs all
name content this way. A fingerprint is the hex part of its document's digest, because it also
names a folder. Part of the foundation (with storage and errors): every layer may import it, and it
imports nothing of arpipe.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, BinaryIO

ALGORITHM = "sha256"
PREFIX = f"{ALGORITHM}:"


def canonical_json(obj: Any) -> bytes:
    """The bytes a JSON document is digested as: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def digest_bytes(data: bytes | memoryview) -> str:
    return PREFIX + hashlib.sha256(data).hexdigest()


def digest_json(obj: Any) -> str:
    return digest_bytes(canonical_json(obj))


def digest_stream(stream: BinaryIO, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    for block in iter(lambda: stream.read(chunk), b""):
        h.update(block)
    return PREFIX + h.hexdigest()


def digest_file(path: str) -> str:
    with open(path, "rb") as f:
        return digest_stream(f)


def digest_array(a: Any) -> str:
    """Digest of a numpy array's dtype, shape and values: a crop or a row is named by what it holds."""
    import numpy as np

    h = hashlib.sha256(f"{a.dtype.str}|{tuple(a.shape)}|".encode())
    h.update(np.ascontiguousarray(a).data)
    return PREFIX + h.hexdigest()


def hex_of(digest: str) -> str:
    """The hex part of a digest (also accepts a bare hex digest written by arpipe 0.1 before the prefix)."""
    return digest.removeprefix(PREFIX)


def listing_digest(uri: str, base_dir: str | os.PathLike | None = None) -> str:
    """A digest of what is at ``uri`` (a file or a folder/prefix, relative to ``base_dir``), for fingerprints.

    Keyed on a listing (relative names, sizes, and local modification times), not
    the path alone: new or changed files at the same place rerun the stage, while
    hashing every byte of a large dataset on each ``plan`` is avoided. ``"missing"``
    when nothing is there.
    """
    from arpipe.pipeline.storage import is_s3, normalize, storage_for

    uri = normalize(uri, base_dir)
    if is_s3(uri):
        storage = storage_for(uri)
        size = storage.size(uri)
        entries = [("", size)] if size is not None else [(e.relpath, e.size) for e in storage.list(uri)]
        return digest_bytes("".join(f"{rel}\0{size}\n" for rel, size in sorted(entries)).encode())
    path = Path(uri)
    if path.is_file():
        st = path.stat()
        return digest_bytes(f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    if not path.exists():
        return "missing"
    lines = []
    for dirpath, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = Path(dirpath) / name
            try:
                st = full.stat()
            except FileNotFoundError:   # a link to nothing: the link itself (readers report it as skipped)
                st = full.lstat()
            lines.append(f"{full.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n")
    return digest_bytes("".join(lines).encode())
