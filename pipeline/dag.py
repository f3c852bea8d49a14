"""The stage graph: edges from ``${stage.output}`` references and ``needs:``; selection."""

from __future__ import annotations

from dataclasses import dataclass, field

from arpipe.pipeline.config import LoadedPipeline, find_refs, suggest
from arpipe.pipeline.errors import UserError


@dataclass
class Graph:
    order: list[str]                                   # topological, stable in file order
    upstream: dict[str, set[str]]                      # stage -> stages it depends on (data or needs)
    refs: dict[str, list[tuple[tuple, str, str]]] = field(default_factory=dict)  # stage -> (path, stage, output)

    def downstream(self, name: str) -> set[str]:
        out: set[str] = set()
        frontier = [name]
        while frontier:
            current = frontier.pop()
            for stage, ups in self.upstream.items():
                if current in ups and stage not in out:
                    out.add(stage)
                    frontier.append(stage)
        return out

    def ancestors(self, name: str) -> set[str]:
        out: set[str] = set()
        frontier = [name]
        while frontier:
            for up in self.upstream[frontier.pop()]:
                if up not in out:
                    out.add(up)
                    frontier.append(up)
        return out


def build_graph(loaded: LoadedPipeline) -> Graph:
    stages = loaded.spec.stages
    upstream: dict[str, set[str]] = {name: set() for name in stages}
    refs: dict[str, list[tuple[tuple, str, str]]] = {}
    for name, spec in stages.items():
        raw = loaded.raw_stages[name]
        stage_refs = []
        for path, ref_stage, output, whole in find_refs(raw):
            where = loaded.where("stages", name, *path)
            dotted_path = ".".join(["stages", name, *map(str, path)])
            if not whole:
                raise UserError(f"${{{ref_stage}.{output}}} must be the whole value, not part of a text",
                                where=where, path=dotted_path,
                                fix="give the reference its own field and combine values in the stage")
            if ref_stage not in stages:
                hint = suggest(ref_stage, stages)
                raise UserError(f"unknown stage {ref_stage!r} in ${{{ref_stage}.{output}}}", where=where,
                                path=dotted_path, fix=hint or f"stages are: {', '.join(stages)}")
            if ref_stage == name:
                raise UserError("a stage cannot use its own output", where=where, path=dotted_path)
            names = stages[ref_stage].output_names
            if getattr(stages[ref_stage], "outputs", None):
                names = tuple(stages[ref_stage].outputs)
            if names is not None and output not in names:
                hint = suggest(output, names)
                raise UserError(f"stage {ref_stage!r} ({stages[ref_stage].kind}) has no output {output!r}",
                                where=where, path=dotted_path,
                                fix=hint or f"its outputs are: {', '.join(names)}")
            upstream[name].add(ref_stage)
            stage_refs.append((path, ref_stage, output))
        refs[name] = stage_refs
        for i, need in enumerate(spec.needs):
            if need not in stages:
                hint = suggest(need, stages)
                raise UserError(f"unknown stage {need!r} in needs", where=loaded.where("stages", name, "needs", i),
                                path=f"stages.{name}.needs[{i}]", fix=hint or f"stages are: {', '.join(stages)}")
            if need == name:
                raise UserError("a stage cannot need itself", where=loaded.where("stages", name, "needs", i))
            upstream[name].add(need)
    order = _toposort(list(stages), upstream, loaded)
    return Graph(order=order, upstream=upstream, refs=refs)


def _toposort(names: list[str], upstream: dict[str, set[str]], loaded: LoadedPipeline) -> list[str]:
    order: list[str] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(name: str) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = stack[stack.index(name):] + [name]
            raise UserError(f"cycle: {' -> '.join(cycle)}", where=loaded.where("stages", cycle[0]),
                            path=f"stages.{cycle[0]}", fix="remove one of these references or needs")
        state[name] = 1
        stack.append(name)
        for up in sorted(upstream[name], key=names.index):
            visit(up)
        stack.pop()
        state[name] = 2
        order.append(name)

    for name in names:
        visit(name)
    return order


@dataclass
class Selection:
    """Which stages a command acts on, and which to redo regardless of the cache."""

    selected: list[str]
    forced: set[str]


def select(graph: Graph, *, only: list[str] | None = None, from_: str | None = None,
           until: str | None = None, force: list[str] | None = None) -> Selection:
    names = set(graph.order)

    def check(stage: str, flag: str) -> None:
        if stage not in names:
            hint = suggest(stage, names)
            raise UserError(f"{flag} {stage}: no such stage", fix=hint or f"stages are: {', '.join(graph.order)}")

    chosen = set(names)
    if only:
        for s in only:
            check(s, "--only")
        chosen &= set(only)
    if from_:
        check(from_, "--from")
        chosen &= {from_} | graph.downstream(from_)
    if until:
        check(until, "--until")
        chosen &= {until} | graph.ancestors(until)
    forced: set[str] = set()
    for s in force or []:
        if s == "all":
            forced |= names
            continue
        check(s, "--force")
        forced |= {s} | graph.downstream(s)
    return Selection(selected=[s for s in graph.order if s in chosen], forced=forced & chosen)
