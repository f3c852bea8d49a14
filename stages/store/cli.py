"""``arpipe store info|verify|head|export URI``: look into a token store from the shell.

:func:`register` adds the ``store`` command to arpipe's argparse tree; each
subcommand sets ``func(args) -> exit code``. Heavy imports happen inside the
handlers so ``arpipe --help`` stays fast. ``python -m arpipe.stages.store.cli ...``
runs the same commands stand-alone.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``store`` with its subcommands to ``subparsers``; returns the ``store`` parser."""
    store = subparsers.add_parser("store", help="inspect, verify and export token stores",
                                  description="Inspect, verify and export token stores (local paths or s3://).")
    sub = store.add_subparsers(dest="store_command", metavar="{info,verify,head,export}", required=True)

    info = sub.add_parser("info", help="summary of a store's manifest")
    info.add_argument("uri", help="store folder or s3://bucket/prefix")
    info.add_argument("--json", action="store_true",
                      help="print the manifest and its summary as one JSON object (docs/cli.md)")
    info.set_defaults(func=cmd_info)

    verify = sub.add_parser("verify", help="check every shard's checksum against the manifest")
    verify.add_argument("uri", help="store folder or s3://bucket/prefix")
    verify.set_defaults(func=cmd_verify)

    head = sub.add_parser("head", help="print the first samples")
    head.add_argument("uri", help="store folder or s3://bucket/prefix")
    head.add_argument("-n", "--count", type=int, default=5, help="how many samples (default 5)")
    head.add_argument("--tokens", type=int, default=16, help="tokens shown per sample (default 16)")
    head.set_defaults(func=cmd_head)

    export = sub.add_parser("export", help="write the store in another format")
    export.add_argument("uri", help="store folder or s3://bucket/prefix")
    export.add_argument("--format", choices=["webdataset"], default="webdataset", help="output format")
    export.add_argument("--out", required=True, help="output folder (or s3:// prefix)")
    export.set_defaults(func=cmd_export)
    return store


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_info(args: argparse.Namespace) -> int:
    from arpipe.pipeline.storage import normalize

    from .reader import read_manifest

    uri = normalize(args.uri)
    m = read_manifest(uri)
    summary = _summary(uri)
    if args.json:
        from arpipe.schemas.cli import StoreInfoOutput

        print(StoreInfoOutput(**m.model_dump(), **summary).model_dump_json(indent=2))
        return 0
    t = m.totals
    tok = f"{m.tokenizer.id} ({m.tokenizer.digest})" if m.tokenizer else "none recorded"
    ranges = ", ".join(f"{r.name} {r.start}..{r.stop - 1}" for r in m.vocab.ranges)
    rows = [
        ("store", uri), ("format", str(m.format_version)), ("digest", m.digest), ("tokenizer", tok),
        ("vocab", f"{m.vocab.vocab_size} ids as {m.dtype}" + (f"; {ranges}" if ranges else "")),
        ("shards", str(t.shards)), ("samples", str(t.samples)), ("tokens", str(t.tokens)),
        ("bytes", f"{_size(t.bytes)} tokens + {_size(t.index_bytes)} index"),
    ]
    rows.append(("shapes", ", ".join(f"{shape} x{n}" for shape, n in summary["shape_counts"])))
    rows.append(("modalities", ", ".join(f"{mod} x{n}" for mod, n in summary["modality_counts"])))
    if m.metadata:
        rows.append(("metadata", json.dumps(m.metadata, sort_keys=True)))
    for label, value in rows:
        print(f"{label:<10} {value}")
    return 0


def _summary(uri: str) -> dict:
    """Sample count, distinct token shapes and modalities, read off the shard indexes (not the tokens)."""
    from collections import Counter

    from .reader import TokenStore

    store = TokenStore.open(uri)
    shapes: Counter = Counter()
    modalities: Counter = Counter()
    for shard in store._shards:
        shard.load()
        modalities.update(shard.table.column("modality").to_pylist())
        if shard.uniform_shape is not None:
            shapes[tuple(shard.uniform_shape)] += shard.table.num_rows
        else:
            shapes.update(tuple(s) for s in shard.table.column("shape").to_pylist())
    return {"samples": len(store), "shapes": sorted(list(s) for s in shapes),
            "shape_counts": sorted(([list(s), n] for s, n in shapes.items()), key=lambda x: -x[1]),
            "modality_counts": sorted(([m, n] for m, n in modalities.items()), key=lambda x: -x[1])}


def cmd_verify(args: argparse.Namespace) -> int:
    from arpipe.pipeline.storage import normalize

    from .format import StoreError
    from .reader import TokenStore, read_manifest

    uri = normalize(args.uri)
    manifest = read_manifest(uri)
    # open without the size pre-check so that every bad shard is reported, not only the first
    store = TokenStore(uri, manifest, check_sizes=False)
    problems = store.verify()
    bad = {p.where for p in problems}
    for shard in manifest.shards:
        files = [f"{uri}/shard-{shard.name}.bin", f"{uri}/shard-{shard.name}.idx.arrow"]
        mark = "BAD" if any(f in bad for f in files) else "ok "
        print(f"{mark} shard-{shard.name} ({shard.samples} samples, {_size(shard.bytes)})")
    for p in problems:
        print(f"  {p}")
    if problems:
        names = ", ".join(sorted({(p.where or "").rsplit("/", 1)[-1] for p in problems}))
        raise StoreError(f"{len(problems)} problem(s) found: {names}", where=uri,
                         fix="re-copy the store or rerun the stage that wrote it")
    print(f"verified {manifest.totals.shards} shards, {manifest.totals.samples} samples: all checksums match")
    return 0


def cmd_head(args: argparse.Namespace) -> int:
    import numpy as np

    from .reader import TokenStore

    store = TokenStore.open(args.uri)
    for i in range(min(args.count, len(store))):
        s = store[i]
        flat = np.asarray(s.tokens).reshape(-1)
        shown = " ".join(str(int(t)) for t in flat[: args.tokens]) + (" ..." if flat.size > args.tokens else "")
        cond = "" if s.condition is None else f" condition={json.dumps(s.condition)}"
        print(f"[{i}] key={s.key} modality={s.modality} shape={list(s.shape)}{cond} shard={s.shard}")
        if s.caption is not None:
            print(f"    caption: {s.caption}")
        for what, ids in (("caption tokens", s.caption_tokens), ("control tokens", s.control_tokens)):
            if ids is not None:
                print(f"    {what}: {' '.join(str(t) for t in ids[: args.tokens])}"
                      + (" ..." if len(ids) > args.tokens else ""))
        print(f"    tokens: {shown}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from arpipe.pipeline.storage import is_s3, normalize

    from .export import export_webdataset
    from .reader import TokenStore

    store = TokenStore.open(args.uri)
    out = args.out if is_s3(args.out) else normalize(args.out)
    tars = export_webdataset(store, out)
    print(f"wrote {len(tars)} tar(s), {len(store)} samples, to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m arpipe.stages.store.cli store info URI`` (or without ``store``)."""
    from arpipe.pipeline.errors import ArpipeError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if argv[:1] != ["store"]:
        argv = ["store", *argv]
    parser = argparse.ArgumentParser(prog="arpipe")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ArpipeError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
