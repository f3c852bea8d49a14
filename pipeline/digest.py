"""Content digests, one format everywhere: ``sha256:<64 hex digits>``.

outputs.json, store manifests, tokenizer.json, sample source digests and MLflow dataset inputs all
name content this way. A fingerprint is the hex part of its document's digest, because it also
names a folder. Part of the foundation (with storage and errors): every layer may import it, and it
imports nothing of arpipe.
"""

from __future__ import annotations

import hashlib
import json
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
