"""The EtlPipeline controller's pure rules: targets, verdicts from DSL errors and router answers."""

from __future__ import annotations

import datetime as dt

import pytest

from etlrouter import dsl
from etlrouter._proto.v1 import admin_pb2
from etlrouter.operator.pipeline import (
    RouterPipeline,
    TargetError,
    apply_event,
    assignments_summary,
    dsl_filename,
    endpoint_of,
    pipeline_names,
    status_update,
    target_of,
    verdict_applied,
    verdict_invalid_dsl,
    verdict_router_diagnostics,
)

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
TWO = """pipeline a {
  source orders | sink archive
}
pipeline b {
  source orders | sink warehouse
}
"""


def test_targets() -> None:
    assert target_of({"router": "127.0.0.1:7400"}) == ("router", "127.0.0.1:7400")
    assert target_of({"cluster": "main"}) == ("cluster", "main")
    for spec, needle in [
        ({}, "spec.cluster or spec.router is required"),
        ({"router": "x", "cluster": "y"}, "exclusive"),
        ({"router": "nohost"}, "spec.router: invalid address"),
    ]:
        with pytest.raises(TargetError, match=needle) as info:
            target_of(spec)
        assert info.value.retry is False


def test_cluster_endpoint() -> None:
    assert endpoint_of({"status": {"endpoint": "c-client.ns.svc:7400"}}, "ns", "c") == "c-client.ns.svc:7400"
    with pytest.raises(TargetError, match="EtlRouterCluster c not found in namespace ns") as missing:
        endpoint_of(None, "ns", "c")
    assert missing.value.reason == "ClusterNotFound" and missing.value.retry
    with pytest.raises(TargetError, match=r"status\.endpoint"):
        endpoint_of({"status": {}}, "ns", "c")


def test_invalid_dsl_is_degraded_with_file_line_col_and_not_retried() -> None:
    text = "pipeline a {\n  source orders (batch_size = 0) | sink x\n}\n"
    errors = dsl.validate(text, dsl_filename("ns", "p"))
    verdict = verdict_invalid_dsl(errors)
    assert verdict.degraded[0] == "True" and verdict.ready[0] == "False"
    assert verdict.ready[1] == "InvalidDSL"
    assert verdict.ready[2].startswith("ns/p.etl:2:")
    assert verdict.requeue is None
    assert verdict.event is not None and verdict.event[0] == "Warning"
    assert verdict.message == verdict.degraded[2]


def test_unknown_services_are_waited_for_other_rejections_are_degraded() -> None:
    unknown = [
        admin_pb2.Diagnostic(file="ns/p.etl", line=2, column=10, message="unknown source `orders`"),
        admin_pb2.Diagnostic(file="ns/p.etl", line=2, column=27, message="unknown sink `archive`"),
    ]
    waiting = verdict_router_diagnostics(unknown)
    assert waiting.progressing[:2] == ("True", "WaitingForServices")
    assert waiting.degraded[0] == "False" and waiting.ready[0] == "False"
    assert "`orders`, `archive`" in waiting.ready[2] and "ns/p.etl:2:10" in waiting.ready[2]
    assert waiting.requeue == "wait"
    kind = admin_pb2.Diagnostic(
        file="f", line=3, column=4, message="`x` is registered as a sink, not a source"
    )
    rejected = verdict_router_diagnostics([*unknown, kind])
    assert rejected.degraded[:2] == ("True", "RejectedByRouter")


def running(name: str, *stages: str) -> RouterPipeline:
    return RouterPipeline(name, "Running", (), stages)


def test_applied_verdicts_follow_the_router_phases() -> None:
    summary = {"stages": 2, "placed": 2, "sidecars": 2}
    ready = verdict_applied(["a", "b"], {"a": running("a"), "b": running("b")}, summary)
    assert ready.ready == ("True", "Running", "2 pipelines running")
    assert ready.requeue == "recheck" and ready.extra == {"assignments": summary}
    pending = RouterPipeline("b", "Pending", ("no sidecar offers service `warehouse`",), ())
    waiting = verdict_applied(["a", "b"], {"a": running("a"), "b": pending}, summary)
    assert waiting.ready[:2] == ("False", "Pending") and waiting.degraded[0] == "False"
    assert waiting.ready[2] == "b: no sidecar offers service `warehouse`"
    partial = RouterPipeline("b", "Degraded", ("stage s: 1 of 2 replicas placed",), ())
    assert verdict_applied(["a", "b"], {"a": running("a"), "b": partial}, summary).degraded[0] == "True"
    assert verdict_applied(["a"], {}, summary).ready[1] == "Applying"


def test_assignments_summary_counts_only_our_stages() -> None:
    pipelines = [running("a", "s1", "s2"), running("b", "s1", "s3")]
    placements = [("s1", "sc-1"), ("s2", "sc-2"), ("s2", "sc-3"), ("other", "sc-9")]
    assert assignments_summary(pipelines, placements) == {"stages": 3, "placed": 2, "sidecars": 3}


def test_status_update_keeps_transition_times_and_sets_observed_generation() -> None:
    summary = {"stages": 1, "placed": 1, "sidecars": 1}
    verdict = verdict_applied(["a"], {"a": running("a", "s")}, summary)
    first = status_update({}, verdict, 3, NOW, pipelines=["a"])
    assert (
        first["observedGeneration"] == 3 and first["pipelines"] == ["a"] and first["assignments"] == summary
    )
    assert {c["type"]: c["status"] for c in first["conditions"]} == {
        "Ready": "True",
        "Progressing": "False",
        "Degraded": "False",
    }
    later = status_update(first, verdict, 3, NOW + dt.timedelta(hours=1), pipelines=["a"])
    assert later == first, "an unchanged verdict must not rewrite the status (no watch loop)"


def test_pipeline_names_are_every_pipeline_of_the_document() -> None:
    assert pipeline_names(TWO, "f.etl") == ["a", "b"]


def test_the_first_apply_after_waiting_for_services_is_applied_not_drift() -> None:
    # The waiting pass recorded observedGeneration and claimed the names, but the router never ran them.
    waited = {"observedGeneration": 3, "pipelines": ["a", "b"]}
    event = apply_event(["a", "b"], [], [], ["a", "b"], waited, 3, "r:1")
    assert event == ("Normal", "Applied", "created a, b at r:1")


def test_a_change_to_text_the_router_accepted_for_this_generation_is_drift() -> None:
    accepted = {"observedGeneration": 3, "appliedGeneration": 3, "pipelines": ["a", "b"]}
    assert apply_event([], ["b"], [], ["a", "b"], accepted, 3, "r:1") == (
        "Warning",
        "DriftRepaired",
        "pipeline b changed at the router: re-applied",
    )
    # A new generation's text is the user's edit, whatever the router held before.
    assert apply_event([], ["b"], ["c"], ["a", "b", "c"], accepted, 4, "r:1") == (
        "Normal",
        "Applied",
        "updated b; deleted c at r:1",
    )
    assert apply_event([], [], [], ["a", "b"], accepted, 3, "r:1") is None
