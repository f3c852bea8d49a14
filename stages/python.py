"""Stage kind ``python``: a user callable ``module:function(config, inputs, out_dir)``.

This executes user code, with the stage's MLflow run active (``MLFLOW_RUN_ID``): what it logs
with ``mlflow.log_metric`` and friends lands in that run. The callable's source file is part of the
fingerprint, so editing it reruns the stage (and a long-lived Ray worker
that imported an older version reloads it).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from arpipe.pipeline.digest import digest_file
from arpipe.pipeline.errors import UserError
from arpipe.pipeline.lineage import active_run
from arpipe.pipeline.stage import Output, Stage
from arpipe.pipeline.storage import is_s3, join, storage_for
from arpipe.schemas.pipeline import PythonStage as PythonSpec


def _module_file(module_name: str, pipeline_dir: Path) -> Path | None:
    if str(pipeline_dir) not in sys.path:
        sys.path.insert(0, str(pipeline_dir))
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.has_location:
        return None
    return Path(spec.origin)


def _forget(module_name: str) -> None:
    """Drop a stale user module and the packages above it, so they import again from this pipeline's folder.

    arpipe's own modules all live under ``arpipe.`` and are never touched: a user's ``pipeline/`` or
    ``stages.py`` is a different module from ``arpipe.pipeline`` or ``arpipe.stages``.
    """
    parts = module_name.split(".")
    if parts[0] == "arpipe":
        return
    for depth in range(len(parts), 0, -1):
        sys.modules.pop(".".join(parts[:depth]), None)
    importlib.invalidate_caches()


class PythonStage(Stage):
    kind = "python"
    version = "1"

    spec: PythonSpec

    @classmethod
    def code_digest(cls, spec: PythonSpec, pipeline_dir: Path) -> str | None:
        module_name = spec.callable.partition(":")[0]
        path = _module_file(module_name, pipeline_dir)
        if path is None:
            raise UserError(f"cannot find module {module_name!r} of callable {spec.callable!r}",
                            fix=f"put {module_name.replace('.', '/')}.py beside the pipeline file or install it")
        return f"{module_name}:" + digest_file(str(path))

    def _load(self):
        module_name, _, func_name = self.spec.callable.partition(":")
        folder = str(self.ctx.pipeline_dir)
        if folder in sys.path:
            sys.path.remove(folder)
        sys.path.insert(0, folder)
        module = sys.modules.get(module_name)
        expected = _module_file(module_name, self.ctx.pipeline_dir)
        if module is not None:
            # a long-lived Ray worker may hold another pipeline's module of that name, or an older version
            current = getattr(module, "__file__", None)
            stale = current is None or expected is None or Path(current).resolve() != expected.resolve()
            if not stale and self.ctx.code_digest:
                digest = digest_file(current)
                stale = f"{module_name}:{digest}" != self.ctx.code_digest
            if stale:
                _forget(module_name)
        module = importlib.import_module(module_name)
        func = getattr(module, func_name, None)
        if not callable(func):
            raise UserError(f"module {module_name!r} has no function {func_name!r}",
                            fix=f"define def {func_name}(config, inputs, out_dir) in {module.__file__}")
        return func

    def _localize(self, value: Any) -> Any:
        """Upstream file/dir outputs on S3 are handed to the callable as local copies."""
        if not (isinstance(value, str) and is_s3(value) and value in self.ctx.inputs.values()):
            return value
        local = self.ctx.staging_dir(value)
        target = local.parent / "inputs" / local.name / value.rsplit("/", 1)[-1]
        storage = storage_for(value)
        if storage.size(value) is not None:
            if not target.exists():
                storage.get_file(value, target)
            return str(target)
        for entry in storage.list(value):
            local = target / entry.relpath
            if not local.exists():
                storage.get_file(join(value, entry.relpath), local)
        return str(target)

    def run(self) -> dict[str, Any]:
        func = self._load()
        inputs = {name: self._localize(value) for name, value in self.spec.inputs.items()}
        # plain `mlflow.log_metric(...)` in the callable lands in this stage's run, not a stray one
        with active_run(self.ctx.tracking_uri, self.ctx.mlflow_run_id):
            result = func(dict(self.spec.config), inputs, str(self.ctx.work_dir))
        if result is None:
            result = {}
        if not isinstance(result, dict):
            raise UserError(f"{self.spec.callable} returned {type(result).__name__}, not a dict of outputs",
                            fix="return {name: value_or_path, ...}")
        expected = self.spec.outputs
        if expected is not None:
            missing = [name for name in expected if name not in result]
            if missing:
                raise UserError(f"{self.spec.callable} did not return declared outputs {missing}",
                                fix="return them or drop them from outputs:")
        work = self.ctx.work_dir.resolve()
        outputs: dict[str, Any] = {}
        for name, value in result.items():
            if isinstance(value, (str, Path)) and Path(value).is_absolute() and Path(value).exists():
                try:
                    rel = Path(value).resolve().relative_to(work)
                    outputs[name] = Output(path=rel.as_posix())
                    continue
                except ValueError:
                    pass
            outputs[name] = Output(value=value)
        return outputs
