"""A read-only Zarr 3 store over a folder or prefix of arpipe's storage: a region read GETs only its chunks.

zarr reads a region by asking its store for the chunks the region covers, one key each (a shard's
index and inner chunks by byte range). fsspec's store would need s3fs, which arpipe does not depend
on; this store answers those requests with :func:`arpipe.pipeline.storage.storage_for`, so a volume on
s3:// is read with the same client, credentials, endpoint and retries as every other S3 read.
zarr fetches a region's chunks concurrently; each GET runs in a worker thread (boto3 clients are
thread-safe). Group members are listed one level at a time, never by listing every chunk.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype

from arpipe.pipeline.storage import join, storage_for


class StorageStore(Store):
    """The Zarr store rooted at ``root`` (``s3://bucket/volume.zarr`` or a local folder), read-only."""

    supports_writes = False
    supports_deletes = False
    supports_partial_writes = False
    supports_listing = True

    def __init__(self, root: str):
        super().__init__(read_only=True)
        self.root = root.rstrip("/")
        self._storage = storage_for(self.root)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StorageStore) and other.root == self.root

    def __repr__(self) -> str:
        return f"StorageStore({self.root!r})"

    def _read(self, key: str, byte_range: ByteRequest | None) -> bytes | None:
        uri = join(self.root, key)
        try:
            if byte_range is None:
                return self._storage.read_bytes(uri)
            if isinstance(byte_range, RangeByteRequest):
                return self._storage.read_range(uri, byte_range.start, byte_range.end - byte_range.start)
            size = self._storage.size(uri)
            if size is None:
                return None
            if isinstance(byte_range, OffsetByteRequest):
                start = byte_range.offset
            elif isinstance(byte_range, SuffixByteRequest):
                start = max(0, size - byte_range.suffix)
            else:
                raise TypeError(f"unexpected byte range {byte_range!r}")
            return self._storage.read_range(uri, start, size - start)
        except FileNotFoundError:
            return None

    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        data = await asyncio.to_thread(self._read, key, byte_range)
        return None if data is None else (prototype or default_buffer_prototype()).buffer.from_bytes(data)

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(key, prototype, byte_range) for key, byte_range in key_ranges)))

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self._storage.size, join(self.root, key)) is not None

    async def set(self, key: str, value: Buffer) -> None:
        self._check_writable()

    async def delete(self, key: str) -> None:
        self._check_writable()

    async def list(self) -> AsyncIterator[str]:
        for entry in await asyncio.to_thread(lambda: list(self._storage.list(self.root))):
            yield entry.relpath

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        async for key in self.list():
            if key.startswith(prefix):
                yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        files, folders = await asyncio.to_thread(self._storage.list_dir, join(self.root, prefix))
        for name in [e.relpath for e in files] + folders:
            yield name
