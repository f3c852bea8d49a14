"""Expensive module fixtures built ahead, in the background, from the session's first test.

Most of the suite's wall time is spent waiting (on process, Ray and Ray Train start-up), with a core
idle. A test module whose fixture is expensive (a model trained for hundreds of steps) names a builder
in ``BUILT_IN_BACKGROUND = {"name": build}``; ``build(folder, ray_address)`` runs in a thread started by
the session's first test, its processes at the lowest priority (``helpers.BACKGROUND_NICE``) and its
pipelines on the suite's background Ray instance (``fault_ray``, whose workers run at that priority
too), so it uses the cores the tests in front leave idle. The module's fixture then takes the result
with ``background.result("name")``; such modules run after the others (``tests/conftest.py``), by which
time the result is usually there. A builder that fails fails the tests that use it, with its error.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

Build = Callable[[Path, str], Any]


def builders(module) -> dict[str, Build]:
    return getattr(module, "BUILT_IN_BACKGROUND", {})


class Builds:
    """The session's background builds, by name: each a thread, then its value or its error."""

    def __init__(self) -> None:
        self._threads: dict[str, threading.Thread] = {}
        self._values: dict[str, Any] = {}
        self._errors: dict[str, BaseException] = {}

    def start(self, name: str, build: Build, folder: Path, address: str) -> None:
        def work() -> None:
            try:
                self._values[name] = build(folder, address)
            except BaseException as err:   # noqa: BLE001 - handed to the tests that wait for it
                self._errors[name] = err

        self._threads[name] = threading.Thread(target=work, name=f"build-{name}", daemon=True)
        self._threads[name].start()

    def result(self, name: str) -> Any:
        thread = self._threads.get(name)
        if thread is None:
            raise AssertionError(f"no background build named {name!r} was started")
        thread.join()
        if name in self._errors:
            raise AssertionError(f"building {name!r} in the background failed: "
                                 f"{type(self._errors[name]).__name__}: {self._errors[name]}") from self._errors[name]
        return self._values[name]


@pytest.fixture(scope="session", autouse=True)
def background(request, tmp_path_factory) -> Builds:
    """Starts the builders of the session's selected modules (each once) at its first test."""
    builds = Builds()
    wanted: dict[str, Build] = {}
    for module in {item.module for item in request.session.items if hasattr(item, "module")}:
        wanted.update(builders(module))
    if wanted:
        address = request.getfixturevalue("fault_ray").address
        for name, build in sorted(wanted.items()):
            builds.start(name, build, tmp_path_factory.mktemp(f"built-{name}"), address)
    return builds
