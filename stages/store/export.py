"""Export a token store as WebDataset tars that stock ``webdataset`` reads.

One tar per store shard, ``<out>/shard-<name>.tar``; per sample two members
sharing the key ``<global index:09d>`` (WebDataset keys stop at the first dot,
so the store's own key, which may hold dots or slashes, goes in the JSON):
``.npy`` with the tokens in their shape and dtype, ``.json`` with the metadata.
Tars are written deterministically (fixed mtimes and owners), so exporting the
same store twice gives the same bytes.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile

import numpy as np

from arpipe.pipeline.storage import atomic_local_file, join, storage_for

from .reader import TokenStore


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    info.uname = info.gname = "arpipe"
    tar.addfile(info, io.BytesIO(data))


def _npy(tokens: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(tokens), allow_pickle=False)
    return buf.getvalue()


def _write_tar(store: TokenStore, shard: int, path: str) -> int:
    start = int(store.shard_starts[shard])
    count = int(store.shard_sizes[shard])
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for lo in range(start, start + count, 1024):
            ids = np.arange(lo, min(lo + 1024, start + count))
            batch = store.gather(ids)
            for j, i in enumerate(ids.tolist()):
                sample = store[i]
                meta = {"key": sample.key, "modality": sample.modality, "shape": list(sample.shape),
                        "condition": sample.condition, "caption": sample.caption, "source_uri": sample.source_uri,
                        "source_digest": sample.source_digest, "index": i, "shard": sample.shard}
                _member(tar, f"{i:09d}.npy", _npy(batch[j]))
                _member(tar, f"{i:09d}.json", json.dumps(meta, sort_keys=True).encode())
    return count


def export_webdataset(store: TokenStore, out: str) -> list[str]:
    """Write one tar per shard under ``out`` (local or ``s3://``); returns the tar URIs in store order."""
    storage = storage_for(out)
    written = []
    for s, name in enumerate(store.shard_names):
        uri = join(out, f"shard-{name}.tar")
        if storage.local_path(uri) is not None:
            with atomic_local_file(uri) as tmp:
                _write_tar(store, s, tmp)
        else:
            fd, tmp = tempfile.mkstemp(suffix=".tar")
            os.close(fd)
            try:
                _write_tar(store, s, tmp)
                storage.put_file(tmp, uri)
            finally:
                os.remove(tmp)
        written.append(uri)
    return written
