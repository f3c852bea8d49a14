"""The token store's manifest and per-shard sidecar: the contract between writers and readers.

A store is a folder (local or ``s3://``) holding ``shard-<name>.bin`` (tokens),
``shard-<name>.idx.arrow`` (per-sample index), ``shard-<name>.json`` (a
:class:`ShardInfo`, so a driver can assemble the manifest without rereading
tokens) and ``manifest.json`` (a :class:`StoreManifest`, written last: the commit).
Readers trust only the manifest; they never list a bucket.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

STORE_FORMAT_VERSION = 1
"""Bumped on any change a reader of the previous version would misread."""

TokenDtype = Literal["uint16", "uint32"]
SHARD_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_SHARD_NAME = re.compile(SHARD_NAME_PATTERN)


def valid_shard_name(name: str) -> bool:
    """Shard names become file names and object keys: a safe, portable alphabet only."""
    return bool(_SHARD_NAME.match(name))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VocabRange(_Strict):
    """A named slice ``[start, stop)`` of the vocabulary (e.g. image codes, class tokens, specials)."""

    name: str = Field(min_length=1)
    start: int = Field(ge=0)
    stop: int = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> VocabRange:
        if self.stop <= self.start:
            raise ValueError(f"vocab range {self.name!r}: stop ({self.stop}) must be greater than start ({self.start})")
        return self


class VocabLayout(_Strict):
    """How many token ids exist and, optionally, what the id ranges mean."""

    vocab_size: int = Field(gt=0, le=2**32)
    ranges: list[VocabRange] = Field(default_factory=list)

    @model_validator(mode="after")
    def _ranges_fit(self) -> VocabLayout:
        spans = sorted(self.ranges, key=lambda r: r.start)
        names = [r.name for r in spans]
        if len(set(names)) != len(names):
            raise ValueError(f"vocab range names repeat: {names}")
        for prev, cur in zip(spans, spans[1:], strict=False):
            if cur.start < prev.stop:
                raise ValueError(f"vocab ranges {prev.name!r} and {cur.name!r} overlap")
        if spans and spans[-1].stop > self.vocab_size:
            raise ValueError(f"vocab range {spans[-1].name!r} ends at {spans[-1].stop} > vocab_size {self.vocab_size}")
        return self


class TokenizerRef(_Strict):
    """Which tokenizer produced the tokens: its id and the content digest of its artifact."""

    id: str = Field(min_length=1)
    digest: str = Field(min_length=1)


class ShardEntry(_Strict):
    """One shard as the manifest records it; sizes let a reader catch truncation without hashing."""

    name: str = Field(pattern=SHARD_NAME_PATTERN)
    samples: int = Field(ge=0)
    tokens: int = Field(ge=0)
    bytes: int = Field(ge=0)
    checksum: str = Field(min_length=1)
    index_bytes: int = Field(gt=0)
    index_checksum: str = Field(min_length=1)


class ShardInfo(ShardEntry):
    """The sidecar a shard writer leaves beside its shard (``shard-<name>.json``).

    Carries what the manifest needs to check that independently written shards agree.
    """

    format_version: int = Field(ge=1)
    dtype: TokenDtype
    checksum_algorithm: str

    def entry(self) -> ShardEntry:
        return ShardEntry(**self.model_dump(include=set(ShardEntry.model_fields)))


class StoreTotals(_Strict):
    shards: int = Field(ge=0)
    samples: int = Field(ge=0)
    tokens: int = Field(ge=0)
    bytes: int = Field(ge=0)
    index_bytes: int = Field(ge=0)


class StoreManifest(_Strict):
    """``manifest.json``: names every shard; its ``digest`` identifies the store's content."""

    format_version: int = Field(ge=1)
    tokenizer: TokenizerRef | None = None
    vocab: VocabLayout
    dtype: TokenDtype
    checksum_algorithm: str
    shards: list[ShardEntry]
    totals: StoreTotals
    digest: str = Field(min_length=1)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> StoreManifest:
        names = [s.name for s in self.shards]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"shard names repeat: {dup}")
        expect = StoreTotals(
            shards=len(self.shards),
            samples=sum(s.samples for s in self.shards),
            tokens=sum(s.tokens for s in self.shards),
            bytes=sum(s.bytes for s in self.shards),
            index_bytes=sum(s.index_bytes for s in self.shards),
        )
        if expect != self.totals:
            raise ValueError(f"totals {self.totals.model_dump()} do not match the shards {expect.model_dump()}")
        return self
