"""The shared-prefix optimizer: pipelines that read the same source and start with the same stages
run those stages once and fan out where they diverge.

Pure and deterministic: the output depends only on the set of pipelines, never on their order.
A stage's id is a short hash of (parent id, kind, service, options), i.e. of the stage's whole path
from the source, so adding or removing a pipeline never renames a stage it does not pass through and
the control plane can leave untouched branches running.

Stages are merged when their kind, service and every option are equal; that includes identical
sinks at the end of identical paths, which then write each record once for all their pipelines.
A fan-out edge carries the lag policy of the pipelines below it; if they disagree, the one that
loses nothing wins (`block` over `shed`, then the longest `shed` wait).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import msgspec

from etlrouter.dsl.model import BranchPolicy, DagEdge, DagStage, MergedDag, Pipeline, StageSpec

STAGE_ID_PREFIX = "st-"
_ID_HEX_DIGITS = 12


def stage_id(parent_id: str | None, spec: StageSpec) -> str:
    """Content-addressed id of `spec` placed under `parent_id` (None for a source)."""
    content = msgspec.json.encode([parent_id, spec.kind, spec.service, spec.options], order="sorted")
    digest = hashlib.blake2b(content, digest_size=_ID_HEX_DIGITS // 2).hexdigest()
    return STAGE_ID_PREFIX + digest


@dataclass
class _Node:
    id: str
    spec: StageSpec
    parent: str | None
    pipelines: set[str] = field(default_factory=set)
    policies: list[BranchPolicy] = field(default_factory=list)
    children: dict[str, _Node] = field(default_factory=dict)


def optimize(pipelines: Iterable[Pipeline]) -> list[MergedDag]:
    """Merge `pipelines` into one DAG per distinct source, ordered by source service then id."""
    roots: dict[str, _Node] = {}
    for pipeline in pipelines:
        root_id = stage_id(None, pipeline.source)
        root = roots.setdefault(root_id, _Node(root_id, pipeline.source, None))
        root.pipelines.add(pipeline.name)
        for branch in pipeline.branches:
            node = root
            for spec in branch:
                child_id = stage_id(node.id, spec)
                child = node.children.setdefault(child_id, _Node(child_id, spec, node.id))
                if child.spec != spec:  # a 48-bit hash collision: refuse rather than mis-merge
                    raise RuntimeError(f"stage id collision on {child_id}")
                child.pipelines.add(pipeline.name)
                child.policies.append(pipeline.on_branch_lag)
                node = child
    ordered = sorted(roots.values(), key=lambda root: (root.spec.service, root.id))
    return [_freeze(root) for root in ordered]


def merge_policies(policies: Sequence[BranchPolicy]) -> BranchPolicy:
    """The policy that honours every pipeline on an edge: nobody's records are shed early."""
    if not policies or any(policy.mode == "block" for policy in policies):
        return BranchPolicy()
    return BranchPolicy(mode="shed", shed_after_ms=max(policy.shed_after_ms for policy in policies))


def _sorted_children(node: _Node) -> list[_Node]:
    return sorted(node.children.values(), key=lambda child: (child.spec.service, child.id))


def _freeze(root: _Node) -> MergedDag:
    stages: list[DagStage] = []
    edges: list[DagEdge] = []
    stack = [root]
    while stack:  # iterative DFS: pipelines can be long, Python's stack is not
        node = stack.pop()
        children = _sorted_children(node)
        pipelines = tuple(sorted(node.pipelines))
        stages.append(
            DagStage(
                id=node.id,
                kind=node.spec.kind,
                service=node.spec.service,
                options=node.spec.options,
                parent=node.parent,
                children=tuple(child.id for child in children),
                pipelines=pipelines,
            )
        )
        for child in children:
            edges.append(
                DagEdge(
                    src=node.id,
                    dst=child.id,
                    pipelines=tuple(sorted(child.pipelines)),
                    policy=merge_policies(child.policies),
                )
            )
        stack.extend(reversed(children))
    return MergedDag(
        root=root.id, stages=tuple(stages), edges=tuple(edges), pipelines=tuple(sorted(root.pipelines))
    )


class DagDiff(msgspec.Struct, frozen=True):
    """How the stage set changes between two optimizer outputs.

    `unchanged` stages keep running; `rerouted` is the subset of them whose pipelines, children or
    lag policy changed (a routing-table update, not a restart).
    """

    added: tuple[str, ...]
    removed: tuple[str, ...]
    unchanged: tuple[str, ...]
    rerouted: tuple[str, ...]

    @property
    def is_empty(self) -> bool:
        return not self.added and not self.removed and not self.rerouted


def diff(old: Sequence[MergedDag], new: Sequence[MergedDag]) -> DagDiff:
    """Compare two optimizer outputs by stage id."""
    old_stages = _index(old)
    new_stages = _index(new)
    kept = sorted(old_stages.keys() & new_stages.keys())
    return DagDiff(
        added=tuple(sorted(new_stages.keys() - old_stages.keys())),
        removed=tuple(sorted(old_stages.keys() - new_stages.keys())),
        unchanged=tuple(kept),
        rerouted=tuple(stage for stage in kept if old_stages[stage] != new_stages[stage]),
    )


def _index(dags: Sequence[MergedDag]) -> dict[str, tuple[DagStage, tuple[DagEdge, ...]]]:
    """stage id -> (stage, its outgoing edges): everything a routing table derives from."""
    index: dict[str, tuple[DagStage, tuple[DagEdge, ...]]] = {}
    for dag in dags:
        outgoing: dict[str, list[DagEdge]] = {}
        for edge in dag.edges:
            outgoing.setdefault(edge.src, []).append(edge)
        for stage in dag.stages:
            index[stage.id] = (stage, tuple(outgoing.get(stage.id, ())))
    return index


def count_stages(dags: Sequence[MergedDag]) -> int:
    return sum(len(dag.stages) for dag in dags)


def count_unmerged_stages(pipelines: Iterable[Pipeline]) -> int:
    """Stages the pipelines would run if each were deployed on its own (its tee branches still
    share the prefix written once before the tee)."""
    return sum(count_stages(optimize([pipeline])) for pipeline in pipelines)
