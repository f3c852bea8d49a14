"""Every file of a source accounted for: read into samples, quarantined with a reason, or skipped with one.

A reader's ``units()`` lists what it skips (``Reader.skipped``: other formats,
hidden files, label sidecars, broken links); reading a unit raises
:class:`SampleError` for what it cannot use. The stage kinds that read sources
(``tokenizer``, ``tokenize``) report both the same way through these helpers:
skips counted per kind in the log line and in MLflow, bad samples quarantined
without losing the rest of their unit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

from arpipe.pipeline.storage import join

from .base import Reader, Sample, SampleError, SkippedFile, Unit


def skip_counts(skipped: Iterable[SkippedFile]) -> dict[str, int]:
    """Skipped files per kind (``{'.gif': 1, 'hidden': 2}``), in kind order."""
    counts: dict[str, int] = {}
    for f in skipped:
        counts[f.kind] = counts.get(f.kind, 0) + 1
    return dict(sorted(counts.items()))


def skip_summary(skipped: Iterable[SkippedFile]) -> str:
    """``'2 skipped (.gif: 1, hidden: 1)'``, or ``'0 skipped'``: the log lines' words for it."""
    counts = skip_counts(skipped)
    total = sum(counts.values())
    return f"{total} skipped" + (f" ({', '.join(f'{k}: {n}' for k, n in counts.items())})" if total else "")


def skip_metrics(skipped: Iterable[SkippedFile]) -> dict[str, float]:
    """``skipped`` and one ``skipped_<kind>`` per kind (``skipped_gif``, ``skipped_broken_link``) for MLflow."""
    counts = skip_counts(skipped)
    metrics = {"skipped": float(sum(counts.values()))}
    for kind, n in counts.items():
        key = "skipped_" + (re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_") or "other")
        metrics[key] = metrics.get(key, 0.0) + n
    return metrics


def read_quarantining(reader: Reader, unit: Unit, reject: Callable[[str, str], None]) -> Iterator[Sample]:
    """The unit's samples; a bad one is rejected (``reject(source, reason)``) and reading goes on.

    A reader raises SampleError for a bad file, which ends its generator; for a unit of several
    files we resume after the failing member, so one corrupt image does not cost its 63 neighbours.
    """
    current: Unit | None = unit
    while current is not None:
        this, current = current, None
        try:
            for item in reader.read(this):
                if isinstance(item, SampleError):   # a bad sample the reader read on past (a tar member)
                    reject(item.source, item.reason)
                else:
                    yield item
        except SampleError as err:
            reject(err.source, err.reason)
            members = list(this.members)
            failed = next((k for k, rel in enumerate(members)
                           if err.source in (join(this.uri, rel), rel) or err.source.endswith("/" + rel)), None)
            if failed is not None and failed + 1 < len(members):
                current = replace(this, members=tuple(members[failed + 1:]))
            elif failed is None and len(members) > 1:
                reject(this.uri, f"unit {this.key} abandoned after the error above: {len(members)} files not read")
