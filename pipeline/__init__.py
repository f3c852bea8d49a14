"""The orchestrator: YAML loading, DAG, fingerprints, cache, runner on Ray, MLflow lineage, storage, CLI."""

__version__ = "0.1.0"
