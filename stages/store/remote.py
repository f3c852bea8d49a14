"""Ranged reads of remote shards through a block cache with read-ahead.

Shuffled training reads touch small samples all over a shard; one GET per
sample would be latency-bound. Reads are instead rounded to fixed-size blocks
(default 4 MiB), fetched by a thread pool and kept in an LRU bounded by bytes.
The sampler's windowed shuffle keeps a batch's samples within a few blocks, and
:meth:`BlockCache.prefetch` lets a reader fetch the blocks of upcoming batches
while the current one is being used.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

from arpipe.pipeline.storage import Storage


class BlockCache:
    """An LRU of ``(uri, block number) -> bytes`` filled by background ranged GETs."""

    def __init__(self, storage: Storage, *, block_bytes: int = 4 << 20, capacity_bytes: int = 256 << 20,
                 threads: int = 8):
        if block_bytes <= 0 or capacity_bytes < block_bytes:
            raise ValueError(f"need 0 < block_bytes ({block_bytes}) <= capacity_bytes ({capacity_bytes})")
        self.storage = storage
        self.block_bytes = block_bytes
        self.capacity_blocks = capacity_bytes // block_bytes
        self.threads = threads
        self.fetches = 0
        self._lock = threading.Lock()
        self._blocks: OrderedDict[tuple[str, int], Future] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._pid = os.getpid()

    def _executor(self) -> ThreadPoolExecutor:
        # A forked DataLoader worker inherits no live threads: start its own pool and cache.
        if self._pid != os.getpid():
            self._pid, self._pool, self._blocks = os.getpid(), None, OrderedDict()
            self._lock = threading.Lock()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="store-blocks")
        return self._pool

    def _fetch(self, uri: str, block: int, size: int) -> bytes:
        start = block * self.block_bytes
        data = self.storage.read_range(uri, start, min(self.block_bytes, size - start))
        self.fetches += 1
        return data

    def _block(self, uri: str, block: int, size: int) -> Future:
        pool = self._executor()
        key = (uri, block)
        with self._lock:
            fut = self._blocks.get(key)
            if fut is not None:
                self._blocks.move_to_end(key)
                return fut
            fut = pool.submit(self._fetch, uri, block, size)
            self._blocks[key] = fut
            while len(self._blocks) > self.capacity_blocks:
                self._blocks.popitem(last=False)
            return fut

    def blocks_for(self, start: int, length: int) -> range:
        if length <= 0:
            return range(0)
        return range(start // self.block_bytes, (start + length - 1) // self.block_bytes + 1)

    def prefetch(self, uri: str, blocks: Iterable[int], size: int) -> None:
        """Start fetching ``blocks`` of ``uri`` (an object of ``size`` bytes) without waiting."""
        for block in blocks:
            self._block(uri, int(block), size)

    def get(self, uri: str, block: int, size: int) -> bytes:
        """Block ``block`` of ``uri`` (an object of ``size`` bytes), waiting for it if it is in flight."""
        fut = self._block(uri, block, size)
        try:
            return fut.result()
        except BaseException:
            with self._lock:  # do not cache a failure: the next read tries again
                if self._blocks.get((uri, block)) is fut:
                    del self._blocks[(uri, block)]
            raise

    def read(self, uri: str, start: int, length: int, size: int) -> bytes:
        """``length`` bytes at ``start`` of ``uri`` (an object of ``size`` bytes), through the cache."""
        if start < 0 or start + length > size:
            raise ValueError(f"range {start}+{length} outside {uri} ({size} bytes)")
        parts = []
        for block in self.blocks_for(start, length):
            data = self.get(uri, block, size)
            lo = max(start - block * self.block_bytes, 0)
            hi = min(start + length - block * self.block_bytes, len(data))
            parts.append(data[lo:hi])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        if self._pool is not None and self._pid == os.getpid():
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None
        self._blocks = OrderedDict()
