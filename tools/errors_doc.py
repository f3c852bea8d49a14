"""docs/troubleshooting.md: every user-facing error, found by reading the source.

The scan parses ``schemas/ pipeline/ stages/ cluster/`` (nothing is imported)
and collects each construction of an :class:`ArpipeError` subclass
(``UserError``, ``SampleError``, ``TokenizerError``, ``StoreError``, ...) or of a
domain library's error that a stage re-raises as one (``ClassifierError``) with
its message and ``fix=``; the ``ValueError`` s raised by the pipeline file's
validators, which reach the user as validation errors; and the model-shape
problems the train stage reports at ``validate``. f-string fields become
``<name>`` placeholders. The cause column is the condition the error is
raised under and where.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("schemas", "pipeline", "stages", "cluster")
#: validators of the pipeline file: their ValueErrors reach the user through pydantic
VALIDATOR_FILES = ("schemas/pipeline.py", "schemas/base.py", "schemas/tokenize.py", "schemas/train.py",
                   "schemas/sample.py")
#: the model-shape problems TrainStage.check returns as "model: invalid model config: ..."
MODEL_CHECK_FILE = "stages/models/config.py"
VALIDATION_FIX = "see `arpipe schema` for the expected shape"
#: errors of the plain-Python domain libraries (``what``, ``fix=``) that their stage re-raises as UserError
DOMAIN_ERRORS = frozenset({"ClassifierError"})

#: (title, intro); rows are assigned to an area by :func:`area_of`
AREAS: dict[str, tuple[str, str]] = {
    "file": ("Pipeline file", "Reading the YAML, `-s` overrides, `${env:...}` and field validation. "
             "Raised by `validate`, `plan`, `run` and `submit` before anything runs. `<msg>, got <shown>` is "
             "pydantic's check of one value (its type, a bound, an allowed value), e.g. `input should be "
             "greater than or equal to 1, got 0`; the [reference](reference.md) lists every field."),
    "graph": ("References, the stage graph and selection", "`${stage.output}`, `needs:`, cycles and "
              "`--only/--from/--until/--force`. Raised before anything runs."),
    "run": ("Running, storage and lineage", "The runner, the output cache, storage (local and `s3://`) and "
            "MLflow."),
    "python": ("`python` stages", "Your callable and what it returns."),
    "read": ("Reading sources", "Readers of images, video, volumes and point clouds. In a `tokenize` stage "
             "these are per-sample: the sample goes to `rejects.arrow` with this reason and the stage fails "
             "only when more than `max_reject_fraction` of the samples are rejected. In a `tokenizer` stage "
             "unreadable samples are skipped and counted."),
    "tokenizer": ("Tokenizers", "Tokenizer options, artifacts, and what a tokenizer accepts."),
    "tokenize": ("`tokenizer` and `tokenize` stages", ""),
    "store": ("Token stores", "Writing, reading, verifying and exporting stores (also `arpipe store`)."),
    "train": ("`train` stage", "The model-shape checks run at `validate`, before Ray starts: they appear as "
              "`stages.NAME: model: invalid model config: ...`."),
    "sample": ("`sample` and `evaluate` stages", ""),
    "cluster": ("Cluster: `submit` and `jobs`", "See also [cluster.md](cluster.md#4-when-something-is-wrong)."),
    "other": ("Other", ""),
}


def area_of(path: str, error_class: str) -> str:
    if path.startswith("schemas/") or path in ("pipeline/config.py", "pipeline/yamlpos.py"):
        return "file"
    if path in ("pipeline/dag.py", "pipeline/plan.py"):
        return "graph"
    if path.startswith("pipeline/"):
        return "run"
    if path == "stages/python.py":
        return "python"
    if path.startswith("stages/modalities/"):
        return "read" if error_class == "SampleError" else "tokenizer"
    if path in ("stages/tokenizer.py", "stages/tokenize.py"):
        return "tokenize"
    if path.startswith("stages/store/"):
        return "store"
    if path == "stages/models/folder.py":   # opening a trained model folder: the sample/evaluate side
        return "sample"
    if path.startswith(("stages/train", "stages/models/", "stages/modalities/vqvae_fit")):
        return "train"
    if path.startswith(("stages/sample", "stages/evaluat")):
        return "sample"
    if path.startswith("cluster/"):
        return "cluster"
    return "other"


@dataclass
class ErrorSite:
    area: str
    message: str
    fix: str
    causes: list[str] = field(default_factory=list)
    #: (path, line, column): rows keep the source order
    position: tuple[str, int, int] = ("", 0, 0)


# ------------------------------------------------------------------ reading patterns


def _placeholder(node: ast.AST) -> str:
    """A short name for an interpolated expression: ``{', '.join(kinds)}`` -> ``kinds``."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return "type" if node.attr == "__name__" else node.attr
    if isinstance(node, ast.Subscript):
        return _placeholder(node.value)
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Attribute):  # a method: name what it is called on (", ".join(x) -> x)
            return _placeholder(node.args[0] if isinstance(func.value, ast.Constant) and node.args else func.value)
        if isinstance(func, ast.Name) and func.id == "getattr" and len(node.args) > 1:
            return _placeholder(node.args[1])
        if isinstance(func, ast.Name) and func.id in ("len", "repr", "str", "int", "float", "sorted", "tuple",
                                                      "list", "set", "type") and node.args:
            return _placeholder(node.args[0])
        if isinstance(func, ast.Name):
            return func.id.strip("_")
    code = ast.unparse(node)
    if len(code) <= 20 and "'" not in code and '"' not in code:
        return code
    if isinstance(node, ast.BinOp):
        return _placeholder(node.left)
    return "…"


class Patterns:
    """Renders message expressions as text with ``<name>`` placeholders, resolving module constants."""

    def __init__(self, constants: dict[str, str]):
        self.constants = constants

    def text(self, node: ast.AST | None) -> str:
        if node is None:
            return ""
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.JoinedStr):
            return "".join(self.text(v) if isinstance(v, ast.Constant) else "<" + _placeholder(v.value) + ">"
                           for v in node.values)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self.text(node.left) + self.text(node.right)
        if isinstance(node, ast.Name) and node.id in self.constants:
            return self.constants[node.id]
        if isinstance(node, ast.Name) and node.id == "hint":
            return "did you mean …?"
        if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
            return ", else ".join(self.text(v) for v in node.values)
        if isinstance(node, ast.IfExp):
            body, orelse = self.text(node.body), self.text(node.orelse)
            return f"{body} (else: {orelse})" if orelse.strip() else body
        return "<" + _placeholder(node) + ">"


def module_constants(tree: ast.Module) -> dict[str, str]:
    patterns = Patterns({})
    out: dict[str, str] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            value = stmt.value
            if isinstance(value, (ast.Constant, ast.JoinedStr, ast.BinOp)):
                text = patterns.text(value)
                if isinstance(value, ast.Constant) and not isinstance(value.value, str):
                    continue
                out[stmt.targets[0].id] = text
    return out


def error_classes(trees: dict[str, ast.Module]) -> set[str]:
    """Names of ArpipeError and every class deriving from it in the scanned source."""
    known = {"ArpipeError"}
    while True:
        found = {node.name for tree in trees.values() for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
                 and any(isinstance(b, ast.Name) and b.id in known for b in node.bases)}
        if found <= known:
            return known - {"ArpipeError"}
        known |= found


# --------------------------------------------------------------------------- scan


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _short(code: str, limit: int = 90) -> str:
    """One line of code for a table cell (a pipe would end the cell, even inside a code span)."""
    code = " ".join(code.split())
    code = code if len(code) <= limit else code[: limit - 1] + "…"
    return code.replace("|", "\\|")


def _cause(node: ast.AST, parents: dict[ast.AST, ast.AST], path: str) -> tuple[str, ast.AST | None]:
    """'when `test`' / 'on `Exception`' (the innermost condition in its function) and the function."""
    condition, child, current = "", node, parents.get(node)
    while current is not None and not isinstance(current, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        if not condition and isinstance(current, ast.If):
            test = ast.unparse(current.test)
            condition = f"when `{_short(test)}`" if child in current.body else f"unless `{_short(test)}`"
        elif not condition and isinstance(current, ast.ExceptHandler):
            caught = ast.unparse(current.type) if current.type is not None else "any error"
            condition = f"on `{_short(caught)}`"
        child, current = current, parents.get(current)
    func = current.name if current is not None else "module"
    where = f"`{func}` in [{path}](../{path})"
    return (f"{condition}, {where}" if condition else where), current


def _split_fix(text: str) -> tuple[str, str]:
    """Messages that carry their own fix after '; ' (validator and model-check texts)."""
    head, sep, tail = text.rpartition("; ")
    return (head, tail) if sep else (text, "")


def _call_name(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def scan(root: Path = ROOT) -> list[ErrorSite]:
    trees = {}
    for folder in SCANNED:
        for file in sorted((root / folder).rglob("*.py")):
            rel = file.relative_to(root).as_posix()
            trees[rel] = ast.parse(file.read_text(), filename=rel)
    classes = error_classes(trees) | DOMAIN_ERRORS
    sites: list[ErrorSite] = []
    for path, tree in trees.items():
        patterns = Patterns(module_constants(tree))
        parents = _parents(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _call_name(node)
            site = None
            if name in classes:
                site = _error_call(node, name, path, patterns, parents)
            elif name == "ValueError" and path in VALIDATOR_FILES and isinstance(parents.get(node), ast.Raise):
                message, fix = _split_fix(patterns.text(node.args[0] if node.args else None))
                site = ErrorSite("file", f"value error, {message}", fix or VALIDATION_FIX)
            elif path == MODEL_CHECK_FILE and name == "append" and isinstance(node.func, ast.Attribute) \
                    and ast.unparse(node.func.value) == "problems" and node.args:
                message, fix = _split_fix(patterns.text(node.args[0]))
                site = ErrorSite("train", f"model: invalid model config: {message}", fix)
            if site is not None:
                cause, _ = _cause(node, parents, path)
                site.causes.append(cause)
                site.position = (path, node.lineno, node.col_offset)
                sites.append(site)
    return sorted(sites, key=lambda s: s.position)


def _error_call(node: ast.Call, name: str, path: str, patterns: Patterns,
                parents: dict[ast.AST, ast.AST]) -> ErrorSite | None:
    args = list(node.args)
    kwargs = {k.arg: k.value for k in node.keywords if k.arg}
    if name == "SampleError":  # SampleError(source, reason, fix=None)
        message_node = args[1] if len(args) > 1 else kwargs.get("reason")
        fix_node = args[2] if len(args) > 2 else kwargs.get("fix")
    else:
        message_node = args[0] if args else kwargs.get("what")
        fix_node = kwargs.get("fix")
    _, func = _cause(node, parents, path)
    params = {a.arg for a in func.args.args + func.args.kwonlyargs} if isinstance(func, ast.FunctionDef) else set()
    if isinstance(message_node, ast.Name) and message_node.id in params:
        return None  # a wrapper that passes a message through (e.g. rebuilding a pickled error)
    if isinstance(message_node, ast.Attribute) and message_node.attr == "what":
        return None  # a caught error re-raised with a location added: its own site is listed
    return ErrorSite(area_of(path, name), patterns.text(message_node), patterns.text(fix_node))


# ------------------------------------------------------------------------- render


def _cell(text: str) -> str:
    text = " ".join(text.split())
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace("*", "\\*")
    if text.count("`") % 2:
        text = text.replace("`", "\\`")
    return text or "—"


def merged(sites: list[ErrorSite]) -> dict[str, list[ErrorSite]]:
    """Sites by area; the same message and fix raised in several places is one row with several causes."""
    by_area: dict[str, dict[tuple[str, str], ErrorSite]] = {key: {} for key in AREAS}
    for site in sites:
        key = (" ".join(site.message.split()), " ".join(site.fix.split()))
        row = by_area[site.area].get(key)
        if row is None:
            by_area[site.area][key] = ErrorSite(site.area, *key, list(site.causes))
        else:
            row.causes += [c for c in site.causes if c not in row.causes]
    return {area: list(rows.values()) for area, rows in by_area.items() if rows}


HEADER = """\
# Troubleshooting

<!-- generated by `python -m tools.gen_docs` from the raises in schemas/ pipeline/ stages/ cluster/; do not edit -->

arpipe reports a problem as one line on stderr and exits:

```
arpipe: error: pipeline.yaml:12:5: stages.train.deepspeed.zero_stage: input should be 0, 1, 2 or 3, got 4; see `arpipe schema` for the expected shape
```

That is `where: path: what; fix`: the file, line and column (or the file, URI or flag), the dotted path
inside the pipeline, what is wrong, and how to fix it.

| exit code | meaning |
| --- | --- |
| 0 | success |
| 1 | a stage failed at run time for another reason (its message is in the line, in `arpipe status` and in the stage's MLflow run as tag `arpipe.error`), a submitted Ray job did not succeed, or an internal error |
| 2 | a user error: the pipeline file, an override, the data or a flag; also a run whose failed stages all failed on user errors |
| 130 | interrupted (Ctrl-C); rerun the same command to resume |

- `--debug` (before the command: `arpipe --debug run ...`) prints the traceback and the command's time.
- `arpipe: internal error: TYPE: ... (rerun with --debug for the traceback)` is a bug in arpipe: report it
  with the `--debug` output.
- `stage(s) failed: NAME: MESSAGE; .... Independent stages finished; fix and rerun to resume.` ends a run in
  which stages failed; each MESSAGE is one of the lines below. The failed stage's work is kept and resumes.

Below, every message arpipe can print, by area. `<name>` stands for a value filled in at run time; the
cause is the condition the error is raised under, and where in the source.
"""


def render(root: Path = ROOT) -> str:
    areas = merged(scan(root))
    out = [HEADER]
    out += ["Areas: " + " · ".join(f"[{AREAS[a][0]}](#{_slug(AREAS[a][0])})" for a in areas), ""]
    for area, rows in areas.items():
        title, intro = AREAS[area]
        out += [f"## {title}", ""]
        if intro:
            out += [intro, ""]
        out += ["| message (pattern) | cause | fix |", "| --- | --- | --- |"]
        for row in rows:
            out.append(f"| {_cell(row.message)} | {'<br>'.join(row.causes)} | {_cell(row.fix)} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _slug(title: str) -> str:
    text = title.strip().lower()
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")
