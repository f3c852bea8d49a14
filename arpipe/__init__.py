"""arpipe: pipelines for autoregressive vision generators.

The project's folders install under this one name, so they never collide with a user's own
``pipeline/`` or ``stages.py``: ``arpipe.pipeline`` (the orchestrator), ``arpipe.stages`` (stage
kinds and the domain libraries), ``arpipe.schemas`` (the YAML's pydantic models) and
``arpipe.cluster`` (Ray Jobs). The small Python API lives in :mod:`arpipe.api` and is re-exported
here; it is imported on first use, so ``import arpipe`` stays light.

In the checkout, ``arpipe/pipeline`` (and ``stages``, ``schemas``, ``cluster``) are symlinks to the
top-level folders, so tools that walk the package on disk (``lint-imports``, IDEs) see the tree an
install has; the wheel is built from pyproject's ``package-dir`` mapping, not from the links.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load", "plan", "run", "open_store", "load_model"]


def __getattr__(name: str):
    if name in __all__:
        from arpipe import api

        return getattr(api, name)
    raise AttributeError(f"module 'arpipe' has no attribute {name!r}")
