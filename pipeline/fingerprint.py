"""Fingerprints: what a stage's output depends on, hashed.

fingerprint = sha256(canonical JSON of {kind, config minus runtime-only fields,
upstream outputs' content digests (never their paths), stage version, code
digest, digest of raw source data read from outside the pipeline, arpipe version}). The document itself is kept in ``outputs.json`` and
``latest.json`` so that ``plan`` can say *what* changed.
"""

from __future__ import annotations

import json
from typing import Any

from arpipe.pipeline import __version__
from arpipe.pipeline.config import flatten, replace_refs
from arpipe.pipeline.digest import digest_json, hex_of


def fingerprint_doc(kind: str, config: dict[str, Any], runtime_fields: frozenset[str],
                    upstream_digests: dict[tuple[str, str], str], stage_version: str,
                    code_digest: str | None, source_digest: str | None = None) -> dict[str, Any]:
    """The document a fingerprint hashes. ``config`` still holds ``${a.b}`` strings."""
    kept = {k: v for k, v in config.items() if k not in runtime_fields and k != "kind"}
    kept = replace_refs(kept, lambda s, o: {"$ref": f"{s}.{o}", "digest": upstream_digests[(s, o)]})
    doc: dict[str, Any] = {"kind": kind, "config": kept, "stage_version": stage_version, "arpipe": __version__}
    if code_digest:
        doc["code"] = code_digest
    if source_digest:
        doc["sources"] = source_digest
    return doc


def fingerprint(doc: dict[str, Any]) -> str:
    """The hex of the document's digest: it names the stage's output folder."""
    return hex_of(digest_json(doc))


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def explain_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """A short human reason why ``new`` differs from ``old`` (both fingerprint documents)."""
    reasons: list[str] = []
    if old.get("kind") != new.get("kind"):
        return f"kind changed: {old.get('kind')} -> {new.get('kind')}"
    before, after = flatten(old.get("config", {})), flatten(new.get("config", {}))
    upstream, config = [], []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key, "<unset>"), after.get(key, "<unset>")
        if a == b:
            continue
        if isinstance(b, dict) and "$ref" in b:
            upstream.append(b["$ref"].split(".")[0])
        else:
            config.append(f"{key} {_short(a)} -> {_short(b)}")
    if upstream:
        reasons.append("upstream " + ", ".join(sorted(set(upstream))) + " changed")
    if config:
        reasons.append("config changed: " + "; ".join(config[:3]) + (" ..." if len(config) > 3 else ""))
    if old.get("code") != new.get("code"):
        reasons.append("code changed")
    if old.get("sources") != new.get("sources"):
        reasons.append("source data changed")
    if old.get("stage_version") != new.get("stage_version"):
        reasons.append(f"stage version {old.get('stage_version')} -> {new.get('stage_version')}")
    if old.get("arpipe") != new.get("arpipe"):
        reasons.append(f"arpipe {old.get('arpipe')} -> {new.get('arpipe')}")
    return "; ".join(reasons) or "fingerprint changed"
