"""The orchestrator: YAML loading, DAG, fingerprints, cache, runner on Ray, MLflow lineage, storage, CLI."""

from arpipe import __version__  # noqa: F401  (one version, set in arpipe/__init__.py)
