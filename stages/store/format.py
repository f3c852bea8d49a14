"""The on-disk layout of a token store: file names, token dtype, index schema, checksums, digest.

Writers and readers share this module so the two can never disagree about a byte.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import xxhash

from arpipe.pipeline.digest import digest_json
from arpipe.pipeline.errors import UserError
from arpipe.pipeline.storage import join
from arpipe.schemas.store import STORE_FORMAT_VERSION, ShardEntry, TokenizerRef, VocabLayout

FORMAT_VERSION = STORE_FORMAT_VERSION
MANIFEST = "manifest.json"
CHECKSUM_ALGORITHM = "xxh3_128"
UINT16_VOCAB_LIMIT = 65536

INDEX_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("offset", pa.int64(), nullable=False),  # in tokens from the start of the shard
    pa.field("length", pa.int64(), nullable=False),  # in tokens
    pa.field("shape", pa.list_(pa.int64()), nullable=False),
    pa.field("modality", pa.string(), nullable=False),
    pa.field("condition", pa.string()),  # JSON text of the label/condition, null when unconditional
    pa.field("source_uri", pa.string()),
    pa.field("source_digest", pa.string()),
    pa.field("caption", pa.string()),    # the text describing the sample, null without one (stores before it lack it)
    pa.field("caption_tokens", pa.list_(pa.int32())),   # the caption's text-tokenizer ids, null without them
    pa.field("control_tokens", pa.list_(pa.int32())),   # its control map's ids (ControlAR), null without one
])


class StoreError(UserError):
    """A token store is malformed, incomplete or misused; the message names the shard and sample."""


def dtype_for_vocab(vocab_size: int) -> str:
    """uint16 halves the bytes of every read whenever the vocabulary allows it."""
    if vocab_size <= 0:
        raise StoreError(f"vocab_size must be positive, got {vocab_size}", fix="pass the tokenizer's codebook size")
    if vocab_size <= UINT16_VOCAB_LIMIT:
        return "uint16"
    if vocab_size <= 2**32:
        return "uint32"
    raise StoreError(f"vocab_size {vocab_size} does not fit uint32", fix="use a vocabulary of at most 2**32 ids")


def numpy_dtype(dtype: str) -> np.dtype:
    """The explicit little-endian numpy dtype: files are the same bytes on any host."""
    if dtype not in ("uint16", "uint32"):
        raise StoreError(f"unknown token dtype {dtype!r}", fix="use 'uint16' or 'uint32'")
    return np.dtype("<u2" if dtype == "uint16" else "<u4")


def bin_name(shard: str) -> str:
    return f"shard-{shard}.bin"


def index_name(shard: str) -> str:
    return f"shard-{shard}.idx.arrow"


def info_name(shard: str) -> str:
    return f"shard-{shard}.json"


def shard_uri(store_uri: str, filename: str) -> str:
    return join(store_uri, filename)


def new_hasher() -> xxhash.xxh3_128:
    return xxhash.xxh3_128()


def checksum(data: bytes | memoryview | np.ndarray) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def checksum_stream(chunks: Iterable[bytes]) -> str:
    h = new_hasher()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def store_digest(*, dtype: str, vocab: VocabLayout, tokenizer: TokenizerRef | None, shards: list[ShardEntry]) -> str:
    """Content identity of a store: the ordered shard checksums plus everything that gives tokens meaning.

    Free metadata is left out on purpose: annotating a store must not change
    what downstream stages see as their input.
    """
    payload: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "checksum_algorithm": CHECKSUM_ALGORITHM,
        "vocab": vocab.model_dump(mode="json"),
        "tokenizer": tokenizer.model_dump(mode="json") if tokenizer else None,
        "shards": [[s.name, s.samples, s.tokens, s.bytes, s.checksum, s.index_bytes, s.index_checksum] for s in shards],
    }
    return digest_json(payload)
