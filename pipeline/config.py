"""Load a pipeline file: safe YAML, ``-s`` overrides, ``${env:...}``, validation.

Every problem becomes one :class:`UserError` line naming ``file:line:col``,
the dotted path, what was expected and how to fix it.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from arpipe.pipeline.errors import UserError
from arpipe.pipeline.registry import pipeline_spec, stage_models
from arpipe.pipeline.yamlpos import Positions, dotted, load_yaml
from arpipe.schemas.base import REF_PATTERN
from arpipe.schemas.pipeline import PipelineSpec, tags

ENV_PATTERN = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)(?:,([^}]*))?\}")
#: names (config keys, environment variables) whose values are credentials: a name *segment* such as
#: token, secret or password (api_token, AWS_SECRET_ACCESS_KEY, DB_PASSWORD) -- not a word that merely
#: contains one (tokenizer, max_tokens), whose value must stay visible and in the fingerprint
SECRET_KEY = re.compile(r"(?:^|[_\-.])(?:secrets?|passwords?|passwd|token|credentials?|api_?key|access_?key"
                        r"|private_?key|session_?key)(?:$|[_\-.])", re.IGNORECASE)
#: secret values shorter than this are redacted where their key says so, but not scrubbed from free text
MIN_SCRUBBED = 4
#: nor are values of secret-named environment variables the pipeline does not reference, below this
MIN_ENV_SCRUBBED = 8


@dataclass
class LoadedPipeline:
    """A validated pipeline and what is needed to explain it."""

    spec: PipelineSpec
    path: Path
    text: str
    positions: Positions
    #: raw stage configs after overrides and env interpolation, references still as "${a.b}" strings
    raw_stages: dict[str, dict[str, Any]]
    #: values read from secret-named environment variables, to scrub from anything logged
    secret_values: set[str] = field(default_factory=set)
    #: values that came from ``${env:NAME}`` (in the file or an override): path -> the variables it read,
    #: e.g. ``{("storage",): ("ARPIPE_STORAGE",)}``, so callers ask the loader instead of re-reading the text
    from_env: dict[tuple[str | int, ...], tuple[str, ...]] = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        return self.path.parent

    def where(self, *path: str | int) -> str:
        return self.positions.find(tuple(path))


def suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else ""


def load_pipeline(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> LoadedPipeline:
    """Read, override, interpolate and validate a pipeline file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError("pipeline file not found", where=str(path),
                        fix="check the path (run from the folder that holds it, or give its full path)") from None
    except IsADirectoryError:
        raise UserError("is a folder, not a pipeline file", where=str(path), fix="name the .yaml file") from None
    except UnicodeDecodeError as err:
        raise UserError(f"not UTF-8 text (byte {err.start} cannot be decoded)", where=str(path),
                        fix="save the pipeline file as UTF-8 text") from None
    data, positions = load_yaml(text, str(path))
    if not isinstance(data, dict):
        raise UserError("a pipeline file is a mapping with name, storage and stages", where=f"{path}:1:1",
                        fix="see examples/ for the shape")
    for override in overrides:
        _apply_override(data, override, positions)
    secrets: set[str] = set()
    from_env: dict[tuple[str | int, ...], tuple[str, ...]] = {}
    data = _interpolate_env(data, (), positions, secrets, from_env)
    secrets |= {v for v in _secret_literals(data) if len(v) >= MIN_SCRUBBED}
    secrets |= {v for k, v in os.environ.items() if SECRET_KEY.search(k) and len(v) >= MIN_ENV_SCRUBBED}
    _check_kinds(data, positions)
    try:
        spec = pipeline_spec().model_validate(data)
    except ValidationError as err:
        raise _explain(err, data, positions) from None
    loaded = LoadedPipeline(spec=spec, path=path.resolve(), text=text, positions=positions,
                            raw_stages=data["stages"], secret_values=secrets, from_env=from_env)
    return loaded


def _apply_override(data: dict, override: str, positions: Positions) -> None:
    where = f"-s {override}"
    key, sep, value_text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError("an override is PATH=VALUE", where=where, fix="write e.g. -s stages.train.steps=10")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        raise UserError(f"cannot parse the value {value_text!r}", where=where,
                        fix="quote it, e.g. -s 'stages.a.config.name=\"x: y\"'") from None
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in key.split(".")]
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        here = tuple(parts[: depth + 1])
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                raise UserError(f"no item {part} in the list at {dotted(here[:-1])}", where=where)
            node = node[part]
            continue
        if not isinstance(node, dict):
            raise UserError(f"{dotted(here[:-1])} is a value, not a mapping", where=where)
        if part not in node:
            if depth == 1 and parts[0] == "stages":
                hint = suggest(str(part), node)
                raise UserError(f"no stage {part!r} in the pipeline", where=where,
                                fix=hint or f"stages are: {', '.join(node)}")
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list) and isinstance(last, int) and last < len(node):
        node[last] = value
    elif isinstance(node, dict):
        node[str(last)] = value
    else:
        raise UserError(f"cannot set {key}: its parent is not a mapping", where=where)
    positions.values[tuple(str(p) if not isinstance(p, int) else p for p in parts)] = where


def _interpolate_env(value: Any, path: tuple, positions: Positions, secrets: set[str],
                     from_env: dict[tuple[str | int, ...], tuple[str, ...]]) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate_env(v, path + (k,), positions, secrets, from_env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate_env(v, path + (i,), positions, secrets, from_env) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${env:" not in value:
        return value
    names = tuple(dict.fromkeys(m.group(1) for m in ENV_PATTERN.finditer(value)))
    if names:
        from_env[path] = names

    def replace(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            resolved = os.environ[name]
        elif default is not None:
            resolved = default
        else:
            raise UserError(f"environment variable {name} is not set", where=positions.find(path),
                            path=dotted(path), fix=f"export {name}=... or write ${{env:{name},default}}")
        if SECRET_KEY.search(name) and resolved:
            secrets.add(resolved)
        return resolved

    whole = ENV_PATTERN.fullmatch(value)
    if whole:
        text = replace(whole)
        # a whole-value ${env:X} takes the YAML type of what it holds (numbers stay numbers)
        try:
            parsed = yaml.safe_load(text)
            return parsed if isinstance(parsed, (int, float, bool)) else text
        except yaml.YAMLError:
            return text
    return ENV_PATTERN.sub(replace, value)


def _secret_literals(value: Any, secret: bool = False) -> set[str]:
    """String values under secret-named keys (``api_token: abc``), to scrub from text arpipe writes."""
    if isinstance(value, dict):
        return {v for k, item in value.items() for v in _secret_literals(item, secret or bool(SECRET_KEY.search(str(k))))}
    if isinstance(value, list):
        return {v for item in value for v in _secret_literals(item, secret)}
    if secret and isinstance(value, (str, int)) and not isinstance(value, bool) and "${" not in str(value):
        return {str(value)}
    return set()


def _check_kinds(data: dict, positions: Positions) -> None:
    stages = data.get("stages")
    if not isinstance(stages, dict):
        return
    kinds = stage_models()
    for name, stage in stages.items():
        if not isinstance(stage, dict):
            raise UserError("a stage is a mapping with a 'kind'", where=positions.find(("stages", name)),
                            path=f"stages.{name}", fix=f"known kinds: {', '.join(kinds)}")
        kind = stage.get("kind")
        if kind is None:
            raise UserError("missing required field 'kind'", where=positions.find(("stages", name), key=True),
                            path=f"stages.{name}", fix=f"add kind: one of {', '.join(kinds)}")
        if kind not in kinds:
            hint = suggest(str(kind), kinds)
            raise UserError(f"unknown stage kind {kind!r}", where=positions.find(("stages", name, "kind")),
                            path=f"stages.{name}.kind",
                            fix=(hint + " " if hint else "") + f"known kinds: {', '.join(kinds)}")


def _model_at(loc: tuple, data: dict) -> tuple[type[BaseModel] | None, tuple]:
    """Walk the pipeline model (plugins included) along a pydantic error location; return the model there and
    the data path.

    A discriminated union (stage kinds, sources, tokenizers) inserts its tag (``'python'``, ``'image'``) into the
    location right after its field; the tag is not part of the YAML path.
    """
    model: type[BaseModel] | None = pipeline_spec()
    path: list = []
    node: Any = data
    union: dict[str, type[BaseModel]] = {}   # members by tag while the next part of loc is a union's tag
    for part in loc:
        if part in union:
            model, union = union[part], {}
            continue
        path.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
        field = model.model_fields.get(part) if model is not None and isinstance(part, str) else None
        model, union, tag = None, {}, "kind"
        if len(path) == 2 and path[0] == "stages":
            union = stage_models()
        elif field is not None and isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            model = field.annotation
        elif field is not None and isinstance(field.discriminator, str):
            union, tag = tags(field.annotation, field.discriminator), field.discriminator
        if union and isinstance(node, dict):
            model = union.get(node.get(tag))
    return model, tuple(path)


def _explain(err: ValidationError, data: dict, positions: Positions) -> UserError:
    first = err.errors()[0]
    kind, loc, msg = first["type"], tuple(first["loc"]), first["msg"]
    if kind == "extra_forbidden":
        parent_model, parent = _model_at(loc[:-1], data)
        field_name = str(loc[-1])
        _, full = _model_at(loc, data)
        hint = suggest(field_name, parent_model.model_fields) if parent_model else ""
        allowed = ", ".join(f for f in parent_model.model_fields if f != "kind") if parent_model else ""
        return UserError(f"unknown field {field_name!r}", where=positions.find(full, key=True), path=dotted(full),
                         fix=hint or (f"allowed fields: {allowed}" if allowed else "remove it"))
    model, path = _model_at(loc, data)
    if kind == "missing":
        return UserError(f"missing required field {str(path[-1])!r}", where=positions.find(path[:-1], key=True),
                         path=dotted(path[:-1]), fix=f"add {path[-1]}: ...")
    got = first.get("input")
    shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
    return UserError(f"{msg[0].lower() + msg[1:]}, got {shown}", where=positions.find(path), path=dotted(path),
                     fix="see `arpipe schema` for the expected shape")


def find_refs(value: Any, path: tuple = ()) -> list[tuple[tuple, str, str, bool]]:
    """Every ``${stage.output}`` in a stage config: (path, stage, output, is_whole_value)."""
    found: list[tuple[tuple, str, str, bool]] = []
    if isinstance(value, dict):
        for k, v in value.items():
            found += find_refs(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += find_refs(v, path + (i,))
    elif isinstance(value, str) and "${" in value:
        whole = REF_PATTERN.fullmatch(value.strip()) is not None
        found += [(path, m.group(1), m.group(2), whole) for m in REF_PATTERN.finditer(value)]
    return found


def replace_refs(value: Any, resolve) -> Any:
    """A copy of ``value`` with each whole-value ``${stage.output}`` replaced by ``resolve(stage, output)``."""
    if isinstance(value, dict):
        return {k: replace_refs(v, resolve) for k, v in value.items()}
    if isinstance(value, list):
        return [replace_refs(v, resolve) for v in value]
    if isinstance(value, str):
        match = REF_PATTERN.fullmatch(value.strip())
        if match:
            return resolve(match.group(1), match.group(2))
    return value


def flatten(value: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted paths to the leaves of nested mappings: ``{"a": {"b": 1}} -> {"a.b": 1}``.

    An empty mapping is a leaf, and so is a resolved reference (``{"$ref": ..., "digest": ...}``
    in a fingerprint document): both are one value to compare or to log.
    """
    out: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(item, dict) and item and "$ref" not in item:
            out.update(flatten(item, name))
        else:
            out[name] = item
    return out


def redact(value: Any, secrets: set[str] = frozenset(), key: str = "") -> Any:
    """A copy with secret-named keys' values and known secret values replaced by '***'."""
    if key and SECRET_KEY.search(key):
        return "***"
    if isinstance(value, dict):
        return {k: redact(v, secrets, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, secrets) for v in value]
    if isinstance(value, str):
        value = scrub(value, secrets)
    return value


def scrub(text: str, secrets: set[str] | frozenset[str]) -> str:
    """``text`` with every known secret value replaced by '***' (longest first: one may hold another)."""
    for secret in sorted(secrets, key=len, reverse=True):
        if secret and secret in text:
            text = text.replace(secret, "***")
    return text
