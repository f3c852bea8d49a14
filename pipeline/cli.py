# PYTHON_ARGCOMPLETE_OK
"""``arpipe``: validate | plan | run | status | gc | submit | jobs | store | model | schema | ui.

Errors print one line (where, what, how to fix) and exit 2 for user errors;
``--debug`` shows the traceback. ``validate``, ``plan`` and a fully cached
``run`` import neither torch nor ray; a fully cached ``run`` not even MLflow (a
background writer delivers its lineage, see ``pipeline/lineage_queue.py``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time
import traceback
from pathlib import Path

from arpipe.pipeline.console import Router, flush_pending, routed, whole_lines
from arpipe.pipeline.errors import ArpipeError

#: subcommands that live with their domain: name -> (module exposing register(subparsers), help).
#: The module is imported only when its command runs, so `arpipe plan` stays light.
EXTERNAL_COMMANDS = {
    "store": ("arpipe.stages.store.cli", "inspect, verify and export token stores"),
    "submit": ("arpipe.cluster.commands", "submit a pipeline to a Ray cluster as a Ray job"),
    "jobs": ("arpipe.cluster.commands", "list, follow and stop submitted Ray jobs"),
    "model": ("arpipe.pipeline.models", "register trained models in the MLflow Model Registry"),
}


def _add_pipeline_args(p: argparse.ArgumentParser, selection: bool = False) -> None:
    p.add_argument("pipeline", help="pipeline YAML file")
    p.add_argument("-s", "--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="override a value, e.g. -s stages.train.steps=10 (repeatable)")
    if selection:
        p.add_argument("--only", action="append", default=[], metavar="STAGE",
                       help="act on these stages only (repeatable or comma-separated)")
        p.add_argument("--from", dest="from_", metavar="STAGE", help="this stage and everything downstream")
        p.add_argument("--until", metavar="STAGE", help="this stage and everything upstream")
        p.add_argument("--force", action="append", default=[], metavar="STAGE|all",
                       help="rerun this stage (and its downstream) even if cached (repeatable)")


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--allow-local-storage", action="store_true",
                   help="allow local storage / SQLite MLflow on a remote cluster (every node mounts the same paths)")


def _split(values: list[str]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _load(args):
    from arpipe.pipeline.config import load_pipeline
    from arpipe.pipeline.dag import build_graph

    loaded = load_pipeline(args.pipeline, args.overrides)
    return loaded, build_graph(loaded)


def _selection(graph, args):
    from arpipe.pipeline.dag import select

    return select(graph, only=_split(args.only), from_=args.from_, until=args.until, force=_split(args.force))


def cmd_validate(args) -> int:
    loaded, graph = _load(args)
    _check_cluster(loaded, args)
    from arpipe.pipeline.plan import Planner

    planner = Planner(loaded, graph)
    for name in graph.order:
        planner.code_digest(name)
    if args.json:
        from arpipe.schemas.cli import ValidateOutput

        return _print_json(ValidateOutput(pipeline=str(loaded.path), name=loaded.spec.name, stages=graph.order))
    print(f"{loaded.path}: ok: {len(graph.order)} stage(s) in order {' -> '.join(graph.order)}")
    return 0


def _print_json(output) -> int:
    """One JSON object on stdout: a ``--json`` output model (arpipe.schemas.cli)."""
    print(output.model_dump_json(indent=2))
    return 0


def format_table(rows: list[list[str]], header: list[str]) -> str:
    """Plain aligned columns, header first (what `plan`, `status` and `jobs list` print)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=False)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in rows]
    return "\n".join(lines)


def cmd_plan(args) -> int:
    loaded, graph = _load(args)
    from arpipe.pipeline.lineage_queue import deliver_if_pending
    from arpipe.pipeline.plan import Planner

    planner = Planner(loaded, graph)
    deliver_if_pending(planner.root)   # lineage an earlier run's background writer did not deliver
    plans = planner.plan(_selection(graph, args))
    if args.json:
        from arpipe.schemas.cli import PlannedStage, PlanOutput

        return _print_json(PlanOutput(pipeline=str(loaded.path), name=loaded.spec.name, stages=[
            PlannedStage(stage=p.name, kind=p.kind, action=p.action, fingerprint=p.fingerprint, why=p.why)
            for p in plans]))
    rows = [[p.name, p.kind, p.action, (p.fingerprint or "-")[:12], p.why] for p in plans]
    print(format_table(rows, ["stage", "kind", "action", "fingerprint", "why"]))
    return 0


def cmd_run(args) -> int:
    loaded, graph = _load(args)
    _check_cluster(loaded, args)
    from arpipe.pipeline.runner import Runner

    runner = Runner(loaded, graph, _selection(graph, args), address=args.address, tracking=args.tracking_uri,
                    echo=lambda line: print(line, flush=True), debug=args.debug, lineage_in_background=True)
    if sys.stdout.isatty() and not args.verbose:   # progress bars may move every second; a file gets a line per 10 s
        os.environ.setdefault("ARPIPE_PROGRESS_EVERY_S", "1")
        # MLflow's own artifact bars would take tqdm's lock and then the console's, in the bars' opposite order
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    runner.router = Router(set(loaded.spec.stages), verbose=args.verbose, run_log=_run_log(runner))
    try:
        _run_routed(runner)
    except KeyboardInterrupt:
        print("arpipe: interrupted; rerun the same command to resume", file=sys.stderr)
        flush_pending()   # every thread's unfinished line: os._exit skips atexit
        # a stage running in a driver thread (a trainer) cannot be cancelled from here, and Python
        # would wait for it at exit: leave now; locks are released and the work stays resumable
        os._exit(130)
    return 0


def _run_routed(runner) -> None:
    """The run with the console's router in front of stdout; each stage's log is published once the router
    has let go of it (after Ray relayed the workers' last lines), whether the run succeeded or failed."""
    interrupted = False
    try:
        with routed(runner.router):
            try:
                runner.run()
            except KeyboardInterrupt:
                interrupted = True
                raise
            finally:
                if not interrupted:
                    _leave_ray()   # what Ray's log thread still holds goes through the router
    finally:
        if not interrupted:
            runner.publish_logs()


def _leave_ray() -> None:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def _run_log(runner) -> Path:
    """Where a run's own lines and the chatter outside any stage go: ``<storage>/.arpipe/logs/<run>.log``
    (on S3 storage: arpipe's folder in the user's cache)."""
    from arpipe.pipeline.storage import control_uri, storage_for, user_cache

    uri = control_uri(runner.root, "logs", f"{runner.run_id}.log")
    return storage_for(uri).local_path(uri) or user_cache("logs", runner.run_id, "run.log")


def cmd_status(args) -> int:
    loaded, graph = _load(args)
    from arpipe.pipeline.status import stage_status, status_table

    rows = stage_status(loaded, graph)
    if args.json:
        from arpipe.schemas.cli import StatusOutput

        return _print_json(StatusOutput(pipeline=str(loaded.path), name=loaded.spec.name, stages=rows))
    print(format_table(status_table(rows), ["stage", "state", "fingerprint", "duration", "mlflow run", "output"]))
    return 0


def cmd_gc(args) -> int:
    from arpipe.pipeline.config import load_pipeline
    from arpipe.pipeline.dag import build_graph
    from arpipe.pipeline.errors import UserError
    from arpipe.pipeline.gc import apply_gc, gc_table, plan_gc, size_text

    if args.keep_last < 0:
        raise UserError("--keep-last must be 0 or more", where=f"--keep-last {args.keep_last}",
                        fix="give how many superseded folders of each stage to keep")
    loaded = [load_pipeline(path, args.overrides) for path in args.pipelines]
    plan = plan_gc([(p, build_graph(p)) for p in loaded], keep_last=args.keep_last)
    if args.yes:
        plan = apply_gc(plan)
    freed = sum(item.bytes for item in plan.items if item.state == "removed")
    if args.json:
        from arpipe.schemas.cli import GcOutput

        return _print_json(GcOutput(pipelines=[str(p.path) for p in loaded], dry_run=not args.yes, items=plan.items,
                                    kept=plan.kept, bytes=plan.bytes, freed=freed))
    if plan.items or plan.kept:
        print(format_table(gc_table(plan), ["stage", "what", "size", "path", "why"]))
    if not plan.items:
        print("nothing to remove")
    elif args.yes:
        skipped = sum(item.state == "skipped" for item in plan.items)
        print(f"removed {len(plan.items) - skipped} item(s), freed {size_text(freed)}"
              + (f"; skipped {skipped} in use since they were listed" if skipped else ""))
    else:
        print(f"dry run: {len(plan.items)} item(s), {size_text(plan.bytes)} would be freed; "
              "rerun with --yes to remove them")
    return 0


def cmd_schema(args) -> int:
    from arpipe.pipeline.registry import pipeline_spec
    from arpipe.schemas.export import render

    text = render(pipeline_spec())   # with the installed plugins' kinds, sources and tokenizers
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_ui(args) -> int:
    from arpipe.pipeline.lineage import tracking_uri

    uri = tracking_uri(args.tracking_uri)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
               "--port", str(args.port)]
    print(f"MLflow UI for {uri} at http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    os.execv(sys.executable, command)
    return 0


DESCRIPTION = """\
Tokenize, train, sample and evaluate autoregressive vision generators from one pipeline YAML, on Ray,
DeepSpeed and MLflow. Finished stages are skipped, interrupted ones resume where they stopped."""

EPILOG = """\
examples:
  arpipe validate pipeline.yaml          check the file (exit 2 and one line if it is wrong)
  arpipe plan pipeline.yaml              what a run would do with each stage, and why
  arpipe run pipeline.yaml               run it on an embedded local Ray (or RAY_ADDRESS)
  arpipe run pipeline.yaml -s stages.train.steps=100 --force train
  arpipe status pipeline.yaml --json     each stage's state, for scripts
  arpipe gc pipeline.yaml [--yes]        list (then remove) outputs the pipeline no longer uses
  arpipe submit pipeline.yaml --address http://HEAD:8265 --follow
  arpipe ui                              browse the lineage in MLflow

-v (every line from Ray and DeepSpeed, not only arpipe's) and --debug (tracebacks and timings) go anywhere
on the line. Shell completion (bash, zsh):
  eval "$(register-python-argcomplete arpipe)"
Docs: docs/cli.md."""

GC_DESCRIPTION = """\
Lists what storage holds that the given pipelines no longer reach, and the bytes it takes; with --yes, removes it
(a dry run by default). It collects: stage folders of an earlier fingerprint (superseded, committed or
interrupted; --keep-last N keeps the N most recently finished of each stage); the checkpoints a finished trainer
keeps (train, a vqvae tokenizer's fit) once its outputs are committed; locks whose holder is gone. It never
touches a stage's current folder (an unfinished stage's checkpoints are its resume point), a folder a live lock
holds, nor any folder the last run of a pipeline on the same storage used (its ledger: a running run's inputs,
another pipeline's stages). Each removal holds the folder's lock, so a run that would write the folder waits,
and just before it gc reads the ledgers again and skips a folder a run began to use since the listing (a run
that is deciding at that very moment is not seen: run gc when no run of an older config starts). -s overrides
apply to every pipeline as in `arpipe run`. Works on local and s3:// storage alike."""

#: options accepted anywhere on the command line, before or after the command (taken out before parsing)
ANYWHERE = {"--debug": "debug", "-v": "verbose", "--verbose": "verbose"}


def _add_json(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", action="store_true",
                   help=f"print {what} as one JSON object (fields: docs/cli.md, schemas/cli/)")


def build_parser(whole: bool = False) -> argparse.ArgumentParser:
    """arpipe's parser; the commands of :data:`EXTERNAL_COMMANDS` take their arguments to their own module's
    parser, which ``whole`` (shell completion, the help checks) registers here instead."""
    from arpipe import __version__

    parser = argparse.ArgumentParser(prog="arpipe", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"arpipe {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks, every line and how long the command took (anywhere on the line)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Ray's and DeepSpeed's lines on the console too; by default they go only to "
                             "each stage's log file (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("validate", help="check a pipeline file without running anything")
    _add_pipeline_args(p)
    _add_cluster_args(p)
    _add_json(p, "the stages in run order")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="say for each stage: run, cached or resume, and why")
    _add_pipeline_args(p, selection=True)
    _add_json(p, "the plan")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", help="run a pipeline (cached stages are skipped, interrupted ones resume)")
    _add_pipeline_args(p, selection=True)
    _add_cluster_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="table of stages: state, fingerprint, duration, MLflow run, output")
    _add_pipeline_args(p)
    _add_json(p, "each stage's state")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("gc", help="list, then with --yes remove, outputs the pipelines no longer use",
                       description=GC_DESCRIPTION)
    p.add_argument("pipelines", nargs="+", metavar="pipeline",
                   help="pipeline YAML file(s): name every pipeline that shares the storage")
    p.add_argument("-s", "--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="override a value in every pipeline, as its runs did (e.g. -s storage=s3://b/p; repeatable)")
    p.add_argument("--yes", action="store_true", help="remove what is listed (without it gc only lists: a dry run)")
    p.add_argument("--keep-last", type=int, default=0, metavar="N",
                   help="keep the N most recently finished superseded folders of each stage")
    _add_json(p, "what is listed or removed")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("schema", help="print the pipeline file's JSON Schema (installed plugins included)")
    p.add_argument("--out", help="write it to this file instead")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for the tracking backend")
    p.add_argument("--tracking-uri",
                   help="MLflow tracking URI to browse (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; another exposes the UI beyond this machine)")
    p.add_argument("--port", type=int, default=5000, help="port to listen on (default 5000)")
    p.set_defaults(func=cmd_ui)

    if whole:
        for module_name in dict.fromkeys(module for module, _help in EXTERNAL_COMMANDS.values()):
            importlib.import_module(module_name).register(sub)
        return parser
    for name, (module_name, help_text) in EXTERNAL_COMMANDS.items():
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_external(name, module_name))
    return parser


def _external(name: str, module_name: str):
    def run(args) -> int:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and module_name.startswith(err.name):
                print(f"arpipe: `{name}` is not available in this installation", file=sys.stderr)
                return 2
            raise
        parser = argparse.ArgumentParser(prog="arpipe")
        parser.add_argument("--debug", action="store_true", default=args.debug)
        module.register(parser.add_subparsers(dest="command", required=True))
        inner = parser.parse_args([name, *args.rest])
        inner.debug = args.debug or inner.debug
        return inner.func(inner)

    return run


def _split_external(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """``arpipe [--debug] submit|jobs|store|model REST...``: REST goes untouched to the command's own parser
    (argparse cannot hand on a remainder that starts with an option, such as ``--help``)."""
    for i, token in enumerate(argv):
        if token in EXTERNAL_COMMANDS:
            return argv[: i + 1], argv[i + 1:]
        if not token.startswith("-"):
            break
    return argv, None


def _take_anywhere(argv: list[str]) -> tuple[list[str], dict[str, bool]]:
    """The options of :data:`ANYWHERE` taken out of ``argv`` wherever they stand (up to a ``--``)."""
    found = dict.fromkeys(ANYWHERE.values(), False)
    kept: list[str] = []
    for i, token in enumerate(argv):
        if token == "--":
            kept.extend(argv[i:])
            break
        if token in ANYWHERE:
            found[ANYWHERE[token]] = True
        else:
            kept.append(token)
    return kept, found


def _check_cluster(loaded, args) -> None:
    """A remote cluster cannot see local storage or a SQLite MLflow: say so before anything runs."""
    from arpipe.pipeline.lineage import tracking_uri
    from arpipe.pipeline.remote import check_cluster_ready, env_allows_local_storage

    check_cluster_ready(loaded, args.address or os.environ.get("RAY_ADDRESS"), tracking_uri(args.tracking_uri),
                        args.allow_local_storage or env_allows_local_storage())


def _complete() -> None:
    """Shell completion through argcomplete when the shell asks (``eval "$(register-python-argcomplete
    arpipe)"``): it completes from the whole parser, the external commands' own flags included, then exits."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    import argcomplete

    argcomplete.autocomplete(build_parser(whole=True))


def main(argv: list[str] | None = None) -> int:
    plain_when_piped()
    # the runner's status lines and Ray's worker lines (another thread) share stdout: keep each line whole
    with whole_lines():
        return _main(argv)


def plain_when_piped() -> None:
    """No ANSI colour codes in a file or a pipe: Ray colours the prefix of every worker line it relays
    (``RAY_COLOR_PREFIX=0`` turns that off) unless the user chose otherwise."""
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _complete()
    parser = build_parser()
    argv, anywhere = _take_anywhere(argv)
    head, rest = _split_external(argv)
    args = parser.parse_args(head)
    if rest is not None:
        args.rest = rest
    args.debug = args.debug or anywhere["debug"]
    args.verbose = args.verbose or anywhere["verbose"] or args.debug
    if getattr(args, "tracking_uri", None):   # stages resolving models:/ URIs (and their workers) read it there
        from arpipe.pipeline.lineage import tracking_uri

        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri(args.tracking_uri)
    start = time.time()
    try:
        code = args.func(args)
    except ArpipeError as err:
        if args.debug:
            traceback.print_exc()
        print(f"arpipe: error: {err}", file=sys.stderr)
        code = err.exit_code
    except KeyboardInterrupt:
        print("arpipe: interrupted", file=sys.stderr)
        code = 130
    except OSError as err:   # the machine, not arpipe: a full disk, a permission, a vanished folder
        if args.debug:
            traceback.print_exc()
        where = f"{err.filename}: " if err.filename else ""
        print(f"arpipe: error: {where}{err.strerror or err}; fix that and rerun (a run resumes where it stopped)",
              file=sys.stderr)
        code = 1
    except Exception as err:
        if args.debug:
            traceback.print_exc()
        else:
            print(f"arpipe: internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)",
                  file=sys.stderr)
        code = 1
    if args.debug:
        print(f"arpipe: {args.command} took {time.time() - start:.2f} s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
