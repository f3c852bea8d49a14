"""Regenerate the generated pages of docs/: ``python -m tools.gen_docs`` (``--check``: only say which are stale).

- docs/reference.md: the pipeline file's fields, from the pydantic models in ``schemas/``;
- docs/cli.md: every command and option, from the argparse parsers;
- docs/troubleshooting.md: every user-facing error message and its fix, from the source;
- docs/reliability.md: every fault campaign and test with its counts, from the tests (tests/faults and others).

docs/benchmarks.md is generated too, from measured results: ``benchmarks/run_all --report``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python tools/gen_docs.py` from anywhere
    sys.path.insert(0, str(ROOT))

from tools import cli_doc, errors_doc, reference_doc, reliability_doc  # noqa: E402

GENERATED: dict[str, Callable[[], str]] = {
    "docs/reference.md": reference_doc.render,
    "docs/cli.md": cli_doc.render,
    "docs/troubleshooting.md": errors_doc.render,
    "docs/reliability.md": reliability_doc.render,
}


def stale(root: Path = ROOT) -> list[str]:
    """The generated pages whose checked-in text differs from what the generators produce now."""
    out = []
    for rel, render in GENERATED.items():
        path = root / rel
        if not path.exists() or path.read_text() != render():
            out.append(rel)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page is stale")
    args = ap.parse_args(argv)
    if args.check:
        names = stale()
        for rel in names:
            print(f"stale: {rel} (run `python -m tools.gen_docs`)")
        return 1 if names else 0
    for rel, render in GENERATED.items():
        path = ROOT / rel
        text = render()
        if path.exists() and path.read_text() == text:
            print(f"unchanged {rel}")
            continue
        path.write_text(text)
        print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
