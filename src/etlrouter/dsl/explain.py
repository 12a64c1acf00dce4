"""Render merged DAGs for people: a terminal tree, Graphviz DOT and Mermaid.

All three show, for every stage, which pipelines share it, and the lag policy on every fan-out
edge (the only place a policy changes anything: a stage with one child simply slows down with it).
"""

from __future__ import annotations

from collections.abc import Sequence

from etlrouter.dsl.model import DagEdge, DagStage, MergedDag, render_value


def _label(stage: DagStage) -> str:
    options = ", ".join(f"{name} = {render_value(value)}" for name, value in stage.options.items())
    return f"{stage.kind} {stage.service}" + (f" ({options})" if options else "")


def _fan_out_policies(dag: MergedDag) -> dict[str, DagEdge]:
    """child id -> its incoming edge, for edges leaving a stage with more than one child."""
    out_degree: dict[str, int] = {}
    for edge in dag.edges:
        out_degree[edge.src] = out_degree.get(edge.src, 0) + 1
    return {edge.dst: edge for edge in dag.edges if out_degree[edge.src] > 1}


def _separate_stage_count(dag: MergedDag) -> int:
    """Stages the same pipelines would run if each ran on its own."""
    return sum(len(stage.pipelines) for stage in dag.stages)


def explain_tree(dags: Sequence[MergedDag]) -> str:
    """One box-drawn tree per source: each line is a stage, its id, the pipelines sharing it and,
    below a fan-out, the branch's lag policy (see docs/dsl.md for a sample)."""
    if not dags:
        return "(no pipelines)\n"
    blocks: list[str] = []
    for dag in dags:
        merged = len(dag.stages)
        separate = _separate_stage_count(dag)
        header = (
            f"# {len(dag.pipelines)} pipeline{'s' if len(dag.pipelines) != 1 else ''}, "
            f"{merged} stage{'s' if merged != 1 else ''} ({separate} if run separately)"
        )
        by_id = {stage.id: stage for stage in dag.stages}
        fan_out = _fan_out_policies(dag)
        lines = [header]

        # Iterative walk: (stage, prefix for its children, connector drawn before it).
        stack: list[tuple[DagStage, str, str]] = [(by_id[dag.root], "", "")]
        while stack:
            stage, indent, connector = stack.pop()
            lines.append(indent + connector + _tree_line(stage, fan_out.get(stage.id)))
            child_indent = indent + ("" if not connector else ("   " if connector == "└─ " else "│  "))
            children = [by_id[child] for child in stage.children]
            for position in reversed(range(len(children))):
                last = position == len(children) - 1
                stack.append((children[position], child_indent, "└─ " if last else "├─ "))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _tree_line(stage: DagStage, fan_out_edge: DagEdge | None) -> str:
    text = f"{_label(stage)}  {stage.id}  [{', '.join(stage.pipelines)}]"
    return text + (f"  on lag: {fan_out_edge.policy}" if fan_out_edge is not None else "")


_DOT_SHAPES = {"source": "cds", "transform": "box", "lookup": "component", "sink": "cylinder"}


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def explain_dot(dags: Sequence[MergedDag]) -> str:
    """A Graphviz digraph: one cluster per source, shared stages drawn bold."""
    lines = [
        "digraph etlrouter {",
        "  rankdir=LR;",
        '  node [fontname="Helvetica", fontsize=10];',
        '  edge [fontname="Helvetica", fontsize=9];',
    ]
    for number, dag in enumerate(dags):
        root = dag.stage(dag.root)
        lines.append(f"  subgraph cluster_{number} {{")
        lines.append(f"    label={_dot_quote(root.service)};")
        for stage in dag.stages:
            options = "\n".join(f"{name} = {render_value(value)}" for name, value in stage.options.items())
            label = f"{stage.kind} {stage.service}" + (f"\n{options}" if options else "")
            label += f"\n[{', '.join(stage.pipelines)}]"
            attributes = f"label={_dot_quote(label)}, shape={_DOT_SHAPES[stage.kind]}"
            if len(stage.pipelines) > 1:
                attributes += ', style="bold"'
            lines.append(f"    {_dot_quote(stage.id)} [{attributes}];")
        fan_out = _fan_out_policies(dag)
        for edge in dag.edges:
            attributes = ""
            if edge.dst in fan_out:
                attributes = f" [label={_dot_quote(str(edge.policy))}]"
            lines.append(f"    {_dot_quote(edge.src)} -> {_dot_quote(edge.dst)}{attributes};")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


_MERMAID_SHAPES = {
    "source": ("([", "])"),
    "transform": ("[", "]"),
    "lookup": ("[[", "]]"),
    "sink": ("[(", ")]"),
}


def _mermaid_text(text: str) -> str:
    return text.replace("&", "#amp;").replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")


def _mermaid_id(stage_id: str) -> str:
    return stage_id.replace("-", "_")


def explain_mermaid(dags: Sequence[MergedDag]) -> str:
    """A Mermaid flowchart, left to right; shared stages get the `shared` class."""
    lines = ["flowchart LR"]
    shared: list[str] = []
    for dag in dags:
        for stage in dag.stages:
            parts = [f"{stage.kind} {stage.service}"]
            parts += [f"{name} = {render_value(value)}" for name, value in stage.options.items()]
            pipelines = "<i>" + _mermaid_text(", ".join(stage.pipelines)) + "</i>"
            label = "<br/>".join([*(_mermaid_text(part) for part in parts), pipelines])
            opening, closing = _MERMAID_SHAPES[stage.kind]
            lines.append(f'  {_mermaid_id(stage.id)}{opening}"{label}"{closing}')
            if len(stage.pipelines) > 1:
                shared.append(_mermaid_id(stage.id))
        fan_out = _fan_out_policies(dag)
        for edge in dag.edges:
            arrow = "-->"
            if edge.dst in fan_out:
                arrow = f'-->|"{_mermaid_text(str(edge.policy))}"|'
            lines.append(f"  {_mermaid_id(edge.src)} {arrow} {_mermaid_id(edge.dst)}")
    if shared:
        lines.append("  classDef shared stroke-width:3px;")
        lines.append(f"  class {','.join(shared)} shared;")
    return "\n".join(lines) + "\n"
