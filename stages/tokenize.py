"""Stage kind ``tokenize``: apply a tokenizer to a source on Ray, into a token store.

The source's reader lists partition units (files, tar shards, volume crop
regions, clip windows); each unit is one Ray task that reads, encodes and
commits its shard(s), then a small ``units/<n>.json`` record. A rerun
reuses every unit whose record and shards are in place, so a crash costs at
most the units in flight. At most ``workers`` tasks (one CPU each) are in flight
(backpressure: memory stays bounded however large the source).

A sample that fails to read or encode is quarantined in ``rejects.arrow``
(source, reason, stage, time); the stage fails only when rejects exceed
``max_reject_fraction``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from arpipe.pipeline.errors import UserError
from arpipe.pipeline.execute import forwarded_env, with_env
from arpipe.pipeline.stage import Output, Stage
from arpipe.pipeline.storage import join, storage_for
from arpipe.schemas.tokenize import TokenizeStage as TokenizeSpec
from arpipe.stages.sources import source_listing_digest
from arpipe.stages.tokenizer import resolve_uri

ENCODE_BATCH = 64
_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(uri: str, digest: str):
    """One loaded tokenizer per worker process and artifact (workers are reused across tasks).

    The driver read the artifact's digest once; a worker verifies and loads it only on a miss.
    """
    key = f"{uri}@{digest}"
    if key not in _TOKENIZERS:
        from arpipe.stages.modalities import load_tokenizer

        _TOKENIZERS[key] = load_tokenizer(uri)
    return _TOKENIZERS[key]


def unit_record_uri(store_uri: str, index: int) -> str:
    return join(store_uri, "units", f"u{index:06d}.json")


def encode_unit(store_uri: str, index: int, unit_json: dict, source_json: dict, tokenizer_uri: str,
                tokenizer_digest: str, samples_per_shard: int, stage: str) -> dict[str, Any]:
    """Read, encode and commit one unit; returns (and writes last) its record."""
    import numpy as np

    from arpipe.stages.modalities import TokenizerError, Unit, open_reader
    from arpipe.stages.store import ShardWriter

    spec_source = _source_model(source_json)
    reader = open_reader(spec_source.modality, spec_source.uri, **spec_source.reader_options())
    tok = _tokenizer(tokenizer_uri, tokenizer_digest)
    unit = Unit.from_json(unit_json)
    layout = tok.layout()
    # single-grid tokenizers (patch_vq, vqvae) store tokens in their grid shape; scales/octree stay flat
    grid = tuple(layout["grid"]) if "grid" in layout and "scales" not in layout else None
    shards: list[str] = []
    rejects: list[dict[str, Any]] = []
    state = {"writer": None, "count": 0}
    samples = tokens = 0
    started = time.time()

    def writer() -> ShardWriter:
        if state["writer"] is None or state["count"] >= samples_per_shard:
            if state["writer"] is not None:
                state["writer"].commit()
            name = f"u{index:06d}-{len(shards):03d}"
            shards.append(name)
            state["writer"], state["count"] = ShardWriter(store_uri, name, vocab_size=tok.vocab_size), 0
        return state["writer"]

    def reject(source_uri: str, reason: str) -> None:
        rejects.append({"source": source_uri, "reason": reason, "stage": stage, "time": time.time()})

    def flush(batch: list) -> None:
        nonlocal samples, tokens
        if not batch:
            return
        try:
            encoded = tok.encode_arrays([s.data for s in batch])
            pairs = list(zip(batch, encoded))
        except (TokenizerError, ValueError, RuntimeError):
            pairs = []   # find the culprit(s): encode one by one
            for sample in batch:
                try:
                    pairs.append((sample, tok.encode_arrays([sample.data])[0]))
                except (TokenizerError, ValueError, RuntimeError) as err:
                    reject(f"{sample.source_uri}#{sample.key}", f"encode failed: {err}")
        for sample, idx in pairs:
            condition = sample.label if sample.label is None or isinstance(sample.label, (int, str)) else str(sample.label)
            if grid is not None and int(np.prod(grid)) == idx.size:
                idx = idx.reshape(grid)
            writer().append(idx, key=sample.key, modality=sample.modality, condition=condition,
                            source_uri=sample.source_uri, source_digest=sample.source_digest)
            state["count"] += 1
            samples += 1
            tokens += int(idx.size)
        batch.clear()

    batch: list = []
    for sample in read_quarantining(reader, unit, reject):
        batch.append(sample)
        if len(batch) >= ENCODE_BATCH:
            flush(batch)
    flush(batch)
    if state["writer"] is not None:
        state["writer"].commit()
    record = {"index": index, "unit": unit_json, "shards": shards, "samples": samples, "tokens": tokens,
              "rejects": rejects, "seconds": time.time() - started}
    uri = unit_record_uri(store_uri, index)
    storage_for(uri).write_text(uri, json.dumps(record))
    return record


def read_quarantining(reader, unit, reject):
    """The unit's samples; a bad one is rejected and reading goes on with the unit's next member.

    A reader raises SampleError for a bad file, which ends its generator; for a unit of several
    files we resume after the failing member, so one corrupt image does not cost its 63 neighbours.
    """
    from dataclasses import replace

    from arpipe.pipeline.storage import join
    from arpipe.stages.modalities import SampleError

    while unit is not None:
        current, unit = unit, None
        try:
            yield from reader.read(current)
        except SampleError as err:
            reject(err.source, err.reason)
            members = list(current.members)
            failed = next((k for k, rel in enumerate(members)
                           if err.source in (join(current.uri, rel), rel) or err.source.endswith("/" + rel)), None)
            if failed is not None and failed + 1 < len(members):
                unit = replace(current, members=tuple(members[failed + 1:]))
            elif failed is None and len(members) > 1:
                reject(current.uri, f"unit {current.key} abandoned after the error above: {len(members)} files "
                                    "not read", )


def _source_model(source_json: dict):
    from pydantic import TypeAdapter

    from arpipe.schemas.tokenize import Source

    return TypeAdapter(Source).validate_python(source_json)


class TokenizeStage(Stage):
    kind = "tokenize"
    version = "1"
    placement = "driver"   # it fans out its own Ray tasks
    spec: TokenizeSpec

    @classmethod
    def source_digest(cls, spec: TokenizeSpec, pipeline_dir: Path) -> str | None:
        return source_listing_digest(spec.source.uri, pipeline_dir)

    def _reusable(self, store_uri: str, index: int) -> dict | None:
        """A unit's record, if it and every shard it names are committed."""
        from arpipe.stages.store import read_shard_info

        uri = unit_record_uri(store_uri, index)
        try:
            record = json.loads(storage_for(uri).read_text(uri))
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        try:
            for name in record["shards"]:
                read_shard_info(store_uri, name)
        except UserError:
            return None
        return record

    def run(self) -> dict[str, Output]:
        import ray

        from arpipe.stages.modalities import open_reader, read_artifact
        from arpipe.stages.store import TokenizerRef, read_shard_info, write_manifest

        spec, ctx = self.spec, self.ctx
        source = spec.source.model_copy(update={"uri": resolve_uri(spec.source.uri, ctx.pipeline_dir)})
        tok_doc = read_artifact(spec.tokenizer)[0]
        store_uri = join(ctx.out_uri, "store")
        reader = open_reader(source.modality, source.uri, **source.reader_options())
        units = reader.units()
        if not units:
            raise UserError("the source has no data", where=source.uri, fix="check source.uri and its format")
        records: dict[int, dict] = {}
        for i in range(len(units)):
            record = self._reusable(store_uri, i)
            if record is not None:
                records[i] = record
        reused = len(records)
        todo = [i for i in range(len(units)) if i not in records]
        print(f"[{ctx.name}] {len(units)} units from {source.uri}: {reused} reused, {len(todo)} to encode "
              f"with {spec.workers} worker(s)", flush=True)
        task = ray.remote(with_env).options(num_cpus=1, max_retries=2, name=f"arpipe:{ctx.name}:unit")
        env = forwarded_env()
        source_json = source.model_dump(mode="json")
        if "format" in source_json and getattr(reader, "format", None):
            source_json["format"] = reader.format   # inferred once here, not by listing the source per unit
        in_flight: dict[Any, int] = {}
        started = time.time()
        last_print = 0.0
        encoded_samples = 0
        pending = list(todo)
        while pending or in_flight:
            while pending and len(in_flight) < spec.workers:   # one CPU each: `workers` run at once
                i = pending.pop(0)
                ref = task.remote(env, encode_unit, store_uri, i, units[i].to_json(), source_json, spec.tokenizer,
                                  tok_doc["digest"], spec.shards.samples_per_shard, ctx.name)
                in_flight[ref] = i
            done, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in done:
                i = in_flight.pop(ref)
                records[i] = ray.get(ref)
                encoded_samples += records[i]["samples"]
            now = time.time()
            if spec.progress and (now - last_print > 2 or not (pending or in_flight)):
                last_print = now
                rate = encoded_samples / max(now - started, 1e-9)
                print(f"[{ctx.name}] {len(records)}/{len(units)} units, {encoded_samples} samples encoded, "
                      f"{rate:.0f} samples/s", flush=True)
        seconds = time.time() - started
        ordered = [records[i] for i in range(len(units))]
        samples = sum(r["samples"] for r in ordered)
        tokens = sum(r["tokens"] for r in ordered)
        rejects = [rej for r in ordered for rej in r["rejects"]]
        write_rejects(join(ctx.out_uri, "rejects.arrow"), rejects)
        ctx.log_metrics({"samples": samples, "tokens": tokens, "rejects": len(rejects), "units": len(units),
                         "units_reused": reused,
                         "samples_per_s": encoded_samples / max(seconds, 1e-9),
                         "tokens_per_s": sum(records[i]["tokens"] for i in todo) / max(seconds, 1e-9)})
        total = samples + len(rejects)
        if total and len(rejects) / total > spec.max_reject_fraction:
            raise UserError(f"{len(rejects)} of {total} samples rejected ({len(rejects) / total:.2%}), more than "
                            f"max_reject_fraction {spec.max_reject_fraction:g}; reasons are in "
                            f"{join(ctx.out_uri, 'rejects.arrow')}", where=source.uri,
                            fix="fix or remove the bad files, or raise max_reject_fraction")
        if samples == 0:
            raise UserError("no sample could be tokenized", where=source.uri, fix="see rejects.arrow for reasons")
        infos = [read_shard_info(store_uri, name) for r in ordered for name in r["shards"]]
        manifest = write_manifest(
            store_uri, infos, vocab=tok_doc["vocab_size"],
            tokenizer=TokenizerRef(id=f"{tok_doc['type']}:{tok_doc['digest'][:12]}", digest=tok_doc["digest"]),
            metadata={"modality": source.modality, "source_uri": source.uri,
                      "source_digest": source_listing_digest(source.uri, ctx.pipeline_dir),
                      "tokenizer_uri": spec.tokenizer, "tokenizer_layout": tok_doc.get("layout"),
                      "tokens_per_sample": tok_doc.get("tokens_per_sample"),
                      "rejects": len(rejects), "units": len(units)})
        for info in infos:   # the commit need not download and rehash what the writers checksummed
            algo = info.checksum_algorithm
            ctx.known_files[f"store/shard-{info.name}.bin"] = (info.bytes, f"{algo}:{info.checksum}")
            ctx.known_files[f"store/shard-{info.name}.idx.arrow"] = (info.index_bytes, f"{algo}:{info.index_checksum}")
        print(f"[{ctx.name}] store {store_uri}: {samples} samples, {tokens} tokens, {len(rejects)} rejected, "
              f"{reused} of {len(units)} units reused", flush=True)
        return {"store": Output(path="store", digest=manifest.digest)}


def write_rejects(uri: str, rejects: list[dict[str, Any]]) -> None:
    """Quarantined samples as an Arrow IPC file: source, reason, stage, time (an empty file when none)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    table = pa.table({
        "source": pa.array([r["source"] for r in rejects], pa.string()),
        "reason": pa.array([r["reason"] for r in rejects], pa.string()),
        "stage": pa.array([r["stage"] for r in rejects], pa.string()),
        "time": pa.array([r["time"] for r in rejects], pa.float64()),
    })
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    storage_for(uri).write_bytes(uri, sink.getvalue().to_pybytes())
