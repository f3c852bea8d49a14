"""Deciding, for each stage, run / cached / resume — and saying why.

A stage's fingerprint depends on its upstream outputs' content digests, so it
is known only once every upstream output is committed; until then the stage
"runs after" its upstream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from arpipe.pipeline import outputs as out
from arpipe.pipeline.config import LoadedPipeline, redact
from arpipe.pipeline.dag import Graph, Selection
from arpipe.pipeline.errors import UserError
from arpipe.pipeline.fingerprint import explain_change, fingerprint, fingerprint_doc
from arpipe.pipeline.registry import stage_class
from arpipe.pipeline.storage import normalize
from arpipe.schemas.outputs import OutputsRecord


@dataclass
class StagePlan:
    name: str
    kind: str
    action: str                      # run | cached | resume | blocked
    why: str
    fingerprint: str | None = None
    doc: dict[str, Any] | None = None
    out_uri: str | None = None
    record: OutputsRecord | None = None
    code_digest: str | None = None


def storage_root(loaded: LoadedPipeline) -> str:
    return normalize(loaded.spec.storage, loaded.directory)


class Planner:
    """Computes stage decisions from what is committed on storage."""

    def __init__(self, loaded: LoadedPipeline, graph: Graph):
        self.loaded = loaded
        self.graph = graph
        self.root = storage_root(loaded)
        self._code: dict[str, str | None] = {}
        self.check()

    def check(self) -> None:
        """Each stage kind's own checks (e.g. a model shape that cannot work), before anything runs.

        Code digests are taken here too, not only once a stage's upstream is done: they read the files
        beside the pipeline a stage depends on (a python stage's module, a train stage's ds_config), and a
        missing or broken one is reported by `plan` and refused by `run` before Ray starts.
        """
        stages = self.loaded.spec.stages
        for name, spec in stages.items():
            cls = stage_class(spec.kind)
            problem = cls.check(spec) or cls.check_across(spec, stages)
            if problem:
                raise UserError(problem, where=self.loaded.where("stages", name), path=f"stages.{name}")
        for name in self.loaded.spec.stages:
            self.code_digest(name)

    def code_digest(self, name: str) -> str | None:
        if name not in self._code:
            spec = self.loaded.spec.stages[name]
            try:
                self._code[name] = stage_class(spec.kind).code_digest(spec, self.loaded.directory)
            except UserError as err:
                if err.where:
                    raise
                raise UserError(err.what, where=self.loaded.where("stages", name), path=f"stages.{name}",
                                fix=err.fix) from None
        return self._code[name]

    def decide(self, name: str, records: dict[str, OutputsRecord], forced: bool = False) -> StagePlan:
        """``records``: committed outputs of upstream stages known so far."""
        spec = self.loaded.spec.stages[name]
        waiting = sorted(s for s in self.graph.upstream[name] if s not in records)
        if waiting:
            return StagePlan(name, spec.kind, "run", f"after {', '.join(waiting)}")
        digests = {}
        for _path, up, output in self.graph.refs[name]:
            if output not in records[up].outputs:
                raise UserError(f"stage {up!r} produced no output {output!r} (it has: "
                                f"{', '.join(records[up].outputs) or 'none'})",
                                where=self.loaded.where("stages", name), path=f"stages.{name}",
                                fix="reference one of its outputs")
            digests[(up, output)] = records[up].outputs[output].digest
        code = self.code_digest(name)
        cls = stage_class(spec.kind)
        # secrets are how a stage reaches its data, not what it computes: they stay out of the fingerprint,
        # and so out of the document kept in outputs.json and latest.json (and out of `plan`'s reasons)
        doc = fingerprint_doc(spec.kind, redact(spec.model_dump(mode="json"), self.loaded.secret_values),
                              type(spec).runtime_fields, digests,
                              cls.version, code, cls.source_digest(spec, self.loaded.directory))
        fp = fingerprint(doc)
        uri = out.output_uri(self.root, name, fp)
        plan = StagePlan(name, spec.kind, "run", "", fp, doc, uri, code_digest=code)
        verdict = out.inspect(uri)
        if forced:
            plan.why = "forced (--force)"
        elif verdict.state == "committed":
            plan.action, plan.record = "cached", verdict.record
            producer = verdict.record.mlflow_run_id
            plan.why = "outputs verified" + (f" (run {producer[:12]})" if producer else "")
        elif verdict.state == "corrupt":
            plan.why = verdict.reason
        elif verdict.state == "partial":
            plan.action, plan.why = "resume", "an interrupted run left work; it is reused"
        else:
            latest = out.read_latest(self.root, name)
            if latest is None:
                plan.why = "never run"
            elif latest.get("fingerprint") == fp:
                plan.why = "output missing"
            else:
                plan.why = explain_change(latest.get("fingerprint_doc", {}), doc)
        return plan

    def plan(self, selection: Selection) -> list[StagePlan]:
        """Decisions for the selected stages, assuming stages that will run change their outputs."""
        records: dict[str, OutputsRecord] = {}
        plans: list[StagePlan] = []
        chosen = set(selection.selected)
        for name in self.graph.order:
            if name not in chosen and not any(name in self.graph.ancestors(s) for s in chosen):
                continue
            plan = self.decide(name, records, forced=name in selection.forced)
            if plan.action == "cached":
                records[name] = plan.record
            elif name not in chosen:
                plan.action, plan.why = "blocked", "not selected and not built: include it or drop the selection"
            if name in chosen or plan.action == "blocked":
                plans.append(plan)
        return plans
