"""The shared-prefix optimizer: merging, stable ids, diffs, policies, and a semantics property test
that runs records through fake pure services both ways."""

from __future__ import annotations

import random
from collections.abc import Sequence

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from etlrouter.dsl import (
    BranchPolicy,
    MergedDag,
    Pipeline,
    StageSpec,
    compile,
    dags_from_json,
    dags_to_json,
    diff,
    optimize,
    stage_id,
)
from etlrouter.dsl.optimizer import count_stages, count_unmerged_stages, merge_policies

ARCHITECTURE_EXAMPLE = """
pipeline kafka-to-s3 { source kafka | transform filter | sink s3 }
pipeline kafka-to-clickhouse { source kafka | transform filter | sink clickhouse }
"""


def services(dag: MergedDag) -> list[str]:
    return [stage.service for stage in dag.stages]


def test_architecture_example_becomes_one_source_one_filter_and_a_two_way_fan_out() -> None:
    [dag] = optimize(compile(ARCHITECTURE_EXAMPLE))
    assert services(dag) == ["kafka", "filter", "clickhouse", "s3"]
    source, filter_stage, clickhouse, s3 = dag.stages
    assert source.id == dag.root
    assert source.children == (filter_stage.id,)
    assert set(filter_stage.children) == {clickhouse.id, s3.id}
    assert source.pipelines == filter_stage.pipelines == ("kafka-to-clickhouse", "kafka-to-s3")
    assert clickhouse.pipelines == ("kafka-to-clickhouse",)
    assert s3.pipelines == ("kafka-to-s3",)
    assert [(edge.src, edge.dst) for edge in dag.edges] == [
        (source.id, filter_stage.id),
        (filter_stage.id, clickhouse.id),
        (filter_stage.id, s3.id),
    ]


def test_different_source_options_or_transform_options_do_not_merge() -> None:
    dags = optimize(
        compile(
            """
            pipeline a { source kafka (batch_size = 10) | transform f | sink x }
            pipeline b { source kafka (batch_size = 20) | transform f | sink y }
            pipeline c { source kafka (batch_size = 10) | transform f (retries = 1) | sink z }
            """
        )
    )
    assert [services(dag) for dag in dags] == [["kafka", "f", "x", "f", "z"], ["kafka", "f", "y"]]
    assert [dag.pipelines for dag in dags] == [("a", "c"), ("b",)]


def test_divergence_after_a_shared_prefix_keeps_the_rest_separate() -> None:
    [dag] = optimize(
        compile(
            """
            pipeline a { source k | transform f | transform g | sink x }
            pipeline b { source k | transform f | transform h | transform g | sink x }
            """
        )
    )
    # f is shared; g appears twice because its parents differ.
    assert services(dag) == ["k", "f", "g", "x", "h", "g", "x"]
    assert count_stages([dag]) == 7
    assert count_unmerged_stages(compile("pipeline a { source k | transform f | sink x }")) == 3


def test_identical_pipelines_share_every_stage_including_the_sink() -> None:
    [dag] = optimize(compile("pipeline a { source k | sink x }\npipeline b { source k | sink x }"))
    assert [stage.pipelines for stage in dag.stages] == [("a", "b"), ("a", "b")]


def test_stage_id_depends_on_parent_kind_service_and_options() -> None:
    base = StageSpec(kind="transform", service="f", options={"retries": 1})
    ids = {
        stage_id("st-parent", base),
        stage_id("st-other", base),
        stage_id("st-parent", StageSpec(kind="transform", service="g", options={"retries": 1})),
        stage_id("st-parent", StageSpec(kind="transform", service="f", options={"retries": 2})),
        stage_id("st-parent", StageSpec(kind="lookup", service="f", options={"retries": 1})),
        stage_id(None, base),
    }
    assert len(ids) == 6
    # Option order does not matter: ids hash a canonical encoding.
    reordered = StageSpec(kind="transform", service="f", options={"b": 1, "a": 2})
    assert stage_id("p", reordered) == stage_id(
        "p", StageSpec(kind="transform", service="f", options={"a": 2, "b": 1})
    )


def test_fan_out_policy_honours_every_pipeline_on_the_edge() -> None:
    shed5 = BranchPolicy(mode="shed", shed_after_ms=5000)
    shed30 = BranchPolicy(mode="shed", shed_after_ms=30_000)
    assert merge_policies([shed5, shed30]) == shed30
    assert merge_policies([shed5, BranchPolicy()]) == BranchPolicy()
    [dag] = optimize(
        compile(
            """
            pipeline a { source k | transform f | sink x  on_branch_lag = shed(after = 5s) }
            pipeline b { source k | transform f | sink x  on_branch_lag = shed(after = 30s) }
            pipeline c { source k | transform f | sink y  on_branch_lag = shed(after = 5s) }
            pipeline d { source k | transform f | sink z }
            """
        )
    )
    policy_by_sink = {dag.stage(edge.dst).service: edge.policy for edge in dag.edges if edge.src != dag.root}
    assert policy_by_sink == {"x": shed30, "y": shed5, "z": BranchPolicy()}


BASE = """
pipeline a { source k | transform f | lookup l (key = "id") | sink x }
pipeline b { source k | transform f | sink y }
pipeline c { source other | sink y }
"""
EXTRA = 'pipeline d { source k | transform f | lookup l (key = "id") | transform g | sink z }'


def stages_only_used_by(dags: Sequence[MergedDag], pipeline: str) -> set[str]:
    return {stage.id for dag in dags for stage in dag.stages if stage.pipelines == (pipeline,)}


def all_ids(dags: Sequence[MergedDag]) -> set[str]:
    return {stage.id for dag in dags for stage in dag.stages}


def test_adding_a_pipeline_only_adds_its_own_stages() -> None:
    old = optimize(compile(BASE))
    new = optimize(compile(BASE + EXTRA))
    change = diff(old, new)
    assert set(change.added) == stages_only_used_by(new, "d")
    assert len(change.added) == 2  # g and z; k, f and l are shared
    assert change.removed == ()
    assert set(change.unchanged) == all_ids(old)
    # k, f and l now also carry d, and l gained a child: routing changes, nothing restarts.
    assert len(change.rerouted) == 3


def test_removing_a_pipeline_only_removes_what_nobody_else_uses() -> None:
    old = optimize(compile(BASE + EXTRA))
    new = optimize(compile(BASE.replace("pipeline b { source k | transform f | sink y }\n", "")))
    change = diff(old, new)
    assert set(change.removed) == stages_only_used_by(old, "b") | stages_only_used_by(old, "d")
    assert change.added == ()
    assert set(change.unchanged) == all_ids(new)


def test_diff_of_identical_outputs_is_empty() -> None:
    dags = optimize(compile(BASE))
    change = diff(dags, optimize(compile(BASE)))
    assert change.is_empty
    assert set(change.unchanged) == all_ids(dags)


def test_merged_dags_round_trip_through_json_and_msgpack() -> None:
    dags = optimize(compile(BASE + EXTRA + " pipeline e { source k | sink q (batch_bytes = 2MiB) }"))
    assert dags_from_json(dags_to_json(dags)) == dags
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(dags), type=list[MergedDag]) == dags


# -- properties -----------------------------------------------------------------------------------

# Fake services: pure functions on ints, so a pipeline's output is fully determined by its stages.
SOURCES = ["source src1", "source src1 (batch_size = 10)", "source src2"]
STAGE_VARIANTS: dict[str, list[str]] = {
    "add3": ["transform add3"],
    "add": ["transform add (config.n = 1)", "transform add (config.n = 2)"],
    "mul2": ["transform mul2", "transform mul2 (parallelism = 4)"],
    "filter_even": ["transform filter_even"],
    "dup": ["transform dup"],
    "tbl": ['lookup tbl (key = "id")', 'lookup tbl (key = "id", config.seed = 7)'],
}
SINKS = ["sink out_a", "sink out_b", "sink out_c (flush = true)"]
POLICIES = ["", "on_branch_lag = block", "on_branch_lag = shed(after = 5s)"]


def apply_stage(spec: StageSpec, records: list[int]) -> list[int]:
    """What one fake transform or lookup does to a batch."""
    if spec.service == "add3":
        return [record + 3 for record in records]
    if spec.service == "add":
        step = spec.options["config.n"]
        assert isinstance(step, int)
        return [record + step for record in records]
    if spec.service == "mul2":
        return [record * 2 for record in records]
    if spec.service == "filter_even":
        return [record for record in records if record % 2 == 0]
    if spec.service == "dup":
        return [copy for record in records for copy in (record, record)]
    if spec.service == "tbl":
        seed = spec.options.get("config.seed", 0)
        assert isinstance(seed, int)
        return [record + (record * 31 + seed) % 5 for record in records]
    raise AssertionError(f"no fake for {spec.service}")


def source_records(spec: StageSpec, base: list[int]) -> list[int]:
    """Each distinct source (service + options) emits its own deterministic stream."""
    offset = sum(ord(char) for char in msgspec.json.encode(spec).decode())
    return [record + offset for record in base]


PathKey = tuple[StageSpec, ...]
Deliveries = dict[tuple[str, bytes], list[int]]


def path_key(path: PathKey) -> bytes:
    return msgspec.json.encode(path, order="sorted")


def run_separately(pipelines: Sequence[Pipeline], base: list[int]) -> Deliveries:
    delivered: Deliveries = {}
    for pipeline in pipelines:
        for branch in pipeline.branches:
            records = source_records(pipeline.source, base)
            for spec in branch[:-1]:
                records = apply_stage(spec, records)
            delivered[(pipeline.name, path_key((pipeline.source, *branch)))] = records
    return delivered


def run_merged(dags: Sequence[MergedDag], base: list[int]) -> Deliveries:
    delivered: Deliveries = {}
    for dag in dags:
        by_id = {stage.id: stage for stage in dag.stages}
        root = by_id[dag.root]
        root_spec = StageSpec(kind=root.kind, service=root.service, options=root.options)
        stack: list[tuple[str, list[int], PathKey]] = [
            (dag.root, source_records(root_spec, base), (root_spec,))
        ]
        while stack:
            stage_key, records, path = stack.pop()
            stage = by_id[stage_key]
            if stage.kind == "sink":
                assert not stage.children
                for pipeline in stage.pipelines:
                    delivered[(pipeline, path_key(path))] = records
                continue
            for child_id in stage.children:
                child = by_id[child_id]
                spec = StageSpec(kind=child.kind, service=child.service, options=child.options)
                output = records if spec.kind == "sink" else apply_stage(spec, records)
                stack.append((child_id, output, (*path, spec)))
    return delivered


@st.composite
def pipeline_texts(draw: st.DrawFn, name: str) -> str:
    services = draw(st.permutations(sorted(STAGE_VARIANTS)))
    prefix_length = draw(st.integers(0, 3))
    steps = [draw(st.sampled_from(STAGE_VARIANTS[service])) for service in services[:prefix_length]]
    remaining = services[prefix_length:]

    def branch_text(sink: str) -> str:
        extra = draw(st.permutations(remaining))[: draw(st.integers(0, 2))]
        return " | ".join([*(draw(st.sampled_from(STAGE_VARIANTS[service])) for service in extra), sink])

    if draw(st.booleans()):
        tail = branch_text(draw(st.sampled_from(SINKS)))
    else:
        # Distinct sinks keep the branches of one tee distinct, as the checker requires.
        sinks = draw(st.lists(st.sampled_from(SINKS), min_size=2, max_size=3, unique=True))
        tail = "tee { " + "; ".join(branch_text(sink) for sink in sinks) + " }"
    source = draw(st.sampled_from(SOURCES))
    policy = draw(st.sampled_from(POLICIES))
    return f"pipeline {name} {{ {' | '.join([source, *steps, tail])} {policy} }}"


@st.composite
def pipeline_sets(draw: st.DrawFn) -> str:
    count = draw(st.integers(1, 7))
    return "\n".join(draw(pipeline_texts(f"p{number}")) for number in range(count))


records_strategy = st.lists(st.integers(-1000, 1000), max_size=12)


@settings(max_examples=150, deadline=None)
@given(text=pipeline_sets(), base=records_strategy)
def test_merged_dag_delivers_exactly_what_separate_pipelines_deliver(text: str, base: list[int]) -> None:
    pipelines = compile(text, "generated.etl")
    dags = optimize(pipelines)
    separately = run_separately(pipelines, base)
    assert run_merged(dags, base) == separately
    # Every pipeline delivers to at least one sink, and merging never adds stages.
    assert {pipeline for pipeline, _ in separately} == {pipeline.name for pipeline in pipelines}
    assert count_stages(dags) <= count_unmerged_stages(pipelines)
    assert_edges_agree_with_stages(dags, pipelines)


def assert_edges_agree_with_stages(dags: Sequence[MergedDag], pipelines: Sequence[Pipeline]) -> None:
    """An edge carries the pipelines of the stage it leads to, and a policy none of them objects to."""
    policy_of = {pipeline.name: pipeline.on_branch_lag for pipeline in pipelines}
    for dag in dags:
        assert sorted(edge.dst for edge in dag.edges) == sorted(stage.id for stage in dag.stages[1:])
        for edge in dag.edges:
            child = dag.stage(edge.dst)
            assert child.parent == edge.src
            assert edge.pipelines == child.pipelines
            wanted = [policy_of[name] for name in child.pipelines]
            if any(policy.mode == "block" for policy in wanted):
                assert edge.policy.mode == "block"
            else:
                assert edge.policy.shed_after_ms == max(policy.shed_after_ms for policy in wanted)


@settings(max_examples=75, deadline=None)
@given(text=pipeline_sets(), seed=st.integers(0, 2**32 - 1))
def test_optimizer_output_does_not_depend_on_pipeline_order(text: str, seed: int) -> None:
    pipelines = compile(text)
    shuffled = list(pipelines)
    random.Random(seed).shuffle(shuffled)
    assert dags_to_json(optimize(shuffled)) == dags_to_json(optimize(pipelines))


@settings(max_examples=75, deadline=None)
@given(text=pipeline_sets(), data=st.data())
def test_removing_any_pipeline_touches_only_its_exclusive_stages(text: str, data: st.DataObject) -> None:
    pipelines = compile(text)
    removed = data.draw(st.sampled_from(pipelines))
    old = optimize(pipelines)
    new = optimize([pipeline for pipeline in pipelines if pipeline is not removed])
    change = diff(old, new)
    assert set(change.removed) == stages_only_used_by(old, removed.name)
    assert change.added == ()
    # The reverse edit adds exactly those stages back, under the same ids.
    assert set(diff(new, old).added) == set(change.removed)
