"""Safe YAML loading that remembers where every value came from.

PyYAML's ``safe_load`` forgets positions and silently keeps the last of two
equal keys; we build the Python objects from the node tree ourselves so that
each dotted path maps to its ``file:line:col`` and a duplicate key is an error.
"""

from __future__ import annotations

from typing import Any

import yaml

from arpipe.pipeline.errors import UserError

Path = tuple[str | int, ...]


class Positions:
    """dotted path -> 'file:line:col' (1-based) of the value (and of the key, for mappings)."""

    def __init__(self, filename: str):
        self.filename = filename
        self.values: dict[Path, str] = {}
        self.keys: dict[Path, str] = {}

    def mark(self, mark: yaml.Mark) -> str:
        return f"{self.filename}:{mark.line + 1}:{mark.column + 1}"

    def find(self, path: Path, *, key: bool = False) -> str:
        """The position of ``path``, or of its nearest ancestor that has one."""
        path = tuple(path)
        while True:
            table = self.keys if key and path in self.keys else self.values
            if path in table:
                return table[path]
            if not path:
                return self.filename
            path = path[:-1]


#: values a pipeline file may hold once its aliases are expanded: a few lines of nested aliases
#: (a "billion laughs") would otherwise expand to billions and hang the loader
MAX_VALUES = 100_000


def load_yaml(text: str, filename: str) -> tuple[Any, Positions]:
    """Parse YAML text into plain Python data plus the position of every value."""
    positions = Positions(filename)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is None:
            return {}, positions
        return _build(node, (), positions, yaml.SafeLoader("")), positions
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = positions.mark(mark) if mark else filename
        what = (err.problem or err.context or "invalid YAML").strip()
        raise UserError(f"YAML syntax error: {what}", where=where,
                        fix="fix the indentation or quoting at that spot") from None
    except RecursionError:
        raise UserError("YAML nested too deeply to read", where=filename,
                        fix="flatten the structure (a pipeline file needs a few levels)") from None


def _build(node: yaml.Node, path: Path, positions: Positions, constructor: yaml.SafeLoader) -> Any:
    positions.values[path] = positions.mark(node.start_mark)
    if len(positions.values) > MAX_VALUES:
        raise UserError(f"the file expands to more than {MAX_VALUES} values", where=positions.mark(node.start_mark),
                        fix="YAML aliases repeat whole blocks: write the values out or use fewer aliases")
    if not isinstance(node, yaml.ScalarNode) and node.tag not in _PLAIN_TAGS:
        raise _tag_error(node, positions)
    if isinstance(node, yaml.MappingNode):
        constructor.flatten_mapping(node)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node, positions, constructor)
            if not isinstance(key, (str, int, float, bool)) or key is None:
                raise UserError("mapping keys must be plain strings", where=positions.mark(key_node.start_mark))
            key = str(key)
            if key in out:
                raise UserError(f"duplicate key {key!r} (first at {positions.keys[path + (key,)]})",
                                where=positions.mark(key_node.start_mark), path=_dotted(path + (key,)),
                                fix="give each entry a unique name")
            positions.keys[path + (key,)] = positions.mark(key_node.start_mark)
            out[key] = _build(value_node, path + (key,), positions, constructor)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, path + (i,), positions, constructor) for i, item in enumerate(node.value)]
    return _scalar(node, positions, constructor)


def _scalar(node: yaml.Node, positions: Positions, constructor: yaml.SafeLoader) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        raise UserError("expected a plain value here", where=positions.mark(node.start_mark))
    try:
        return constructor.construct_object(node, deep=True)
    except yaml.constructor.ConstructorError:
        raise _tag_error(node, positions) from None


_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:omap")


def _tag_error(node: yaml.Node, positions: Positions) -> UserError:
    return UserError(f"YAML tag {node.tag!r} is not allowed (only plain data is loaded)",
                     where=positions.mark(node.start_mark),
                     fix="remove the tag; pipeline files never construct Python objects")


def _dotted(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


dotted = _dotted
