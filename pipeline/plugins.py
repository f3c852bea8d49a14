"""Plugins: stage kinds, tokenizer types and readers that other distributions declare as entry points.

An entry point in group ``arpipe.stages``, ``arpipe.tokenizers`` or ``arpipe.readers`` names a pydantic
config model, cheap to import (no torch): its tag field (``kind``, ``type``, ``modality``) is
``Literal[<the entry point's name>]``, and its ``implementation`` class variable names the class that does
the work (a ``Stage``, a ``Tokenizer``, a ``Reader``) as ``"module:Class"``, imported only when it is used.
docs/extending.md builds one such plugin.

Entry points are read once per process. A plugin that does not load is one :class:`UserError` line naming
its distribution, its entry point, what is wrong and how to fix it, raised where the plugin is needed
(``validate``, ``plan``, ``run``, ``schema``), never when arpipe is imported. Part of the foundation: the
layers above the schemas and the domain libraries all use it, so it imports only ``errors`` of arpipe.
"""

from __future__ import annotations

import functools
import importlib
import re
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Literal, get_args, get_origin

from arpipe.pipeline.errors import UserError

#: group -> the config model's tag field, whose one value is the entry point's name
GROUPS = {"arpipe.stages": "kind", "arpipe.tokenizers": "type", "arpipe.readers": "modality"}
TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _distribution(ep: EntryPoint) -> str:
    return ep.dist.name if ep.dist is not None else "an unknown distribution"


def _error(ep: EntryPoint, what: str, fix: str | None = None) -> UserError:
    dist = _distribution(ep)
    return UserError(what, where=f"plugin {dist}, entry point {ep.name} = {ep.value!r} in group {ep.group}",
                     fix=fix or f"fix the entry point in {dist}'s pyproject.toml and reinstall it, or uninstall it "
                                f"(pip uninstall {dist})")


@functools.cache
def declared(group: str) -> dict[str, EntryPoint]:
    """name -> entry point of ``group``, as installed (nothing is imported)."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=group):
        other = found.get(ep.name)
        if other is not None and other.value != ep.value:
            raise _error(ep, f"{_distribution(other)} declares the same name as {other.value!r}",
                         fix=f"uninstall one of them (pip uninstall {_distribution(ep)})")
        found[ep.name] = ep
    return found


def _load(ep: EntryPoint, target: str) -> Any:
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except AttributeError:
        raise _error(ep, f"module {module} has no {attr}") from None
    except Exception as err:   # ImportError, but also whatever the plugin's module raises as it loads
        raise _error(ep, f"cannot import {target} ({type(err).__name__}: {err})") from None


@functools.cache
def config_model(group: str, name: str, base: type) -> type:
    """The config model entry point ``name`` of ``group`` names, checked: a subclass of ``base`` whose tag is
    ``Literal[name]`` and whose ``implementation`` is ``"module:Class"``."""
    ep, tag = declared(group)[name], GROUPS[group]
    model = _load(ep, ep.value)
    if not (isinstance(model, type) and issubclass(model, base)):
        raise _error(ep, f"{ep.value} is {model!r}, not a config model (a subclass of {base.__module__}."
                         f"{base.__qualname__})")
    field = model.model_fields.get(tag)
    if field is None or get_origin(field.annotation) is not Literal or get_args(field.annotation) != (name,):
        raise _error(ep, f"{model.__name__}.{tag} must be Literal[{name!r}], the entry point's name")
    if not TARGET.match(str(getattr(model, "implementation", ""))):
        raise _error(ep, f"{model.__name__}.implementation must name the class that does the work as "
                         "'module:Class'")
    return model


def config_models(group: str, base: type, builtin: frozenset[str]) -> tuple[type, ...]:
    """The config models of every entry point of ``group``, by name; a name arpipe has built in is an error."""
    for name, ep in declared(group).items():
        if name in builtin:
            raise _error(ep, f"{GROUPS[group]} {name!r} is built into arpipe",
                         fix=f"give the plugin's {GROUPS[group]} another name (the entry point's and its model's), "
                             f"or uninstall it (pip uninstall {_distribution(ep)})")
    return tuple(config_model(group, name, base) for name in sorted(declared(group)))


def implementation(group: str, name: str, model_base: type, base: type) -> type:
    """The class that does the work for entry point ``name`` of ``group``: its config model's ``implementation``,
    imported and checked to subclass ``base``."""
    ep = declared(group)[name]
    target = config_model(group, name, model_base).implementation
    cls = _load(ep, target)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise _error(ep, f"{target} is {cls!r}, not a subclass of {base.__module__}.{base.__qualname__}")
    return cls
