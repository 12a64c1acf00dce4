"""The rolling-restart planner (`plan_rollout`): one step at a time, highest ordinal first, the leader
handed over before its restart, never a second member down — pure, no server."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from etlrouter.operator.cluster import (
    ROLLOUT_MAX_LAG,
    TEMPLATE_HASH,
    Member,
    MemberReport,
    PodView,
    RolloutStep,
    RolloutView,
    desired_objects,
    plan_rollout,
    pod_views,
    rollout_in_progress,
)

OLD, NEW = "rev-old", "rev-new"
COMMIT = 500


def view(
    revisions: list[str],
    *,
    partition: int,
    leader: str = "r-0",
    ready: list[bool] | None = None,
    **changes: Any,
) -> RolloutView:
    """Three healthy, caught-up members r-0..r-2 whose pods have `revisions`; `changes` override."""
    n = len(revisions)
    ready = ready or [True] * n
    ids = [f"r-{i}" for i in range(n)]
    base = RolloutView(
        name="r",
        replicas=n,
        partition=partition,
        template_changed=False,
        observed=True,
        update_revision=NEW,
        current_revision=OLD,
        pods={i: PodView(rev, ready[i]) for i, rev in enumerate(revisions)},
        settled=True,
        leader=leader,
        commit_index=COMMIT,
        members=[Member(i, f"{i}:7400", True, i == leader, COMMIT, True) for i in ids],
        reports={i: MemberReport(leader, COMMIT) for i in ids},
    )
    return replace(base, **changes)


def test_no_rollout_keeps_partition_zero() -> None:
    v = view([NEW, NEW, NEW], partition=0, current_revision=NEW)
    assert not rollout_in_progress(v)
    assert plan_rollout(v) == RolloutStep("idle", 0)
    # An unhealthy cluster outside a rollout is not the planner's business.
    assert plan_rollout(replace(v, members=None, leader="")) == RolloutStep("idle", 0)


def test_a_template_change_goes_out_with_the_partition_closed() -> None:
    v = view([OLD, OLD, OLD], partition=0, template_changed=True, members=None)
    step = plan_rollout(v)
    assert (step.action, step.partition) == ("hold", 3)


def test_full_rollout_highest_ordinal_first_leader_handed_over_to_an_updated_member() -> None:
    # r-0 leads, so it restarts last, after leadership moved to a member on the new revision.
    v = view([OLD, OLD, OLD], partition=3)
    assert plan_rollout(v) == RolloutStep("lower", 2, "restarting r-2 (1 of 3)", "r-2")
    # partition 2: the StatefulSet has not replaced r-2 yet
    v = view([OLD, OLD, OLD], partition=2)
    assert plan_rollout(v) == RolloutStep("wait", 2, "waiting for pod r-2 to be replaced")
    v = view([OLD, OLD, NEW], partition=2, ready=[True, True, False])
    assert plan_rollout(v) == RolloutStep("wait", 2, "waiting for pod r-2 to be Ready")
    v = view([OLD, OLD, NEW], partition=2)
    assert plan_rollout(v) == RolloutStep("lower", 1, "restarting r-1 (2 of 3)", "r-1")
    v = view([OLD, NEW, NEW], partition=1)
    assert plan_rollout(v) == RolloutStep(
        "transfer", 1, "moved leadership from r-0 to r-2 before its restart", "r-2", "r-0"
    )
    v = view([OLD, NEW, NEW], partition=1, leader="r-2")
    assert plan_rollout(v) == RolloutStep("lower", 0, "restarting r-0 (3 of 3)", "r-0")
    v = view([NEW, NEW, NEW], partition=0, leader="r-2")
    assert plan_rollout(v) == RolloutStep("idle", 0)


def test_the_first_member_to_restart_hands_leadership_to_the_one_restarting_last() -> None:
    v = view([OLD, OLD, OLD], partition=3, leader="r-2")
    assert plan_rollout(v) == RolloutStep(
        "transfer", 3, "moved leadership from r-2 to r-0 before its restart", "r-0", "r-2"
    )


def test_a_restarted_member_that_has_not_caught_up_holds_the_next_restart() -> None:
    v = view([OLD, OLD, NEW], partition=2)
    behind = [
        replace(m, match_index=COMMIT - ROLLOUT_MAX_LAG - 1) if m.id == "r-2" else m for m in v.members or []
    ]
    step = plan_rollout(replace(v, members=behind))
    assert step == RolloutStep(
        "wait",
        2,
        f"before restarting r-1: r-2 is not caught up in Raft (match index {COMMIT - ROLLOUT_MAX_LAG - 1}, "
        f"leader commit index {COMMIT})",
    )
    # Just within the bound is caught up.
    close = [
        replace(m, match_index=COMMIT - ROLLOUT_MAX_LAG) if m.id == "r-2" else m for m in v.members or []
    ]
    assert plan_rollout(replace(v, members=close)).action == "lower"
    # The leader's match index is not enough: the member's own applied index must be close too (a member
    # that restarted with an empty disk reports 0 until a snapshot arrives).
    reports = {**v.reports, "r-2": MemberReport("r-0", 0)}
    assert plan_rollout(replace(v, reports=reports)).reason == (
        f"before restarting r-1: r-2 is not caught up in Raft (applied index 0, leader commit index {COMMIT})"
    )
    reports = {**v.reports, "r-2": None}
    assert plan_rollout(replace(v, reports=reports)).reason == "before restarting r-1: r-2 does not answer"
    reports = {**v.reports, "r-2": MemberReport("", COMMIT)}
    assert plan_rollout(replace(v, reports=reports)).reason == (
        "before restarting r-1: r-2 follows no leader, not r-0"
    )
    unreachable = [replace(m, reachable=False) if m.id == "r-2" else m for m in v.members or []]
    assert plan_rollout(replace(v, members=unreachable)).reason == (
        "before restarting r-1: r-2 does not answer leader r-0"
    )
    learner = [replace(m, voter=False) if m.id == "r-2" else m for m in v.members or []]
    assert (
        plan_rollout(replace(v, members=learner)).reason == "before restarting r-1: r-2 is not a Raft voter"
    )
    # ... and the last restart is not finished (partition 0 reached, not caught up yet).
    v = view([NEW, NEW, NEW], partition=0, leader="r-2")
    step = plan_rollout(replace(v, reports={**v.reports, "r-0": None}))
    assert step == RolloutStep("wait", 0, "r-0 does not answer")


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"members": None, "leader": ""}, "no router answered"),
        ({"leader": ""}, "before restarting r-2: no Raft leader"),
        ({"observed": False}, "waiting for the StatefulSet controller to see the new template"),
        ({"settled": False}, "waiting for the membership change to finish"),
    ],
)
def test_an_unhealthy_cluster_waits_and_says_why(changes: dict[str, Any], reason: str) -> None:
    v = replace(view([OLD, OLD, OLD], partition=3, leader="r-1"), **changes)
    assert plan_rollout(v) == RolloutStep("wait", 3, reason)


def test_never_a_second_member_down_but_a_broken_target_may_be_replaced() -> None:
    # r-1 (not the next target) is not Ready: r-2 must not restart.
    v = view([OLD, OLD, OLD], partition=3, ready=[True, False, True])
    assert plan_rollout(v) == RolloutStep("wait", 3, "before restarting r-2: pod r-1 is not Ready")
    # r-2 itself is broken (e.g. a bad image, now reverted): replacing it takes nothing more down.
    v = view([OLD, OLD, OLD], partition=3, ready=[True, True, False])
    no_r2 = {k: r for k, r in v.reports.items() if k != "r-2"}
    assert plan_rollout(replace(v, reports=no_r2)) == RolloutStep(
        "lower", 2, "restarting r-2 (1 of 3)", "r-2"
    )


def test_members_already_on_the_new_revision_are_skipped() -> None:
    # A revert: r-1 and r-0 never left the revision that is now the update revision.
    v = view([NEW, NEW, OLD], partition=3, leader="r-0")
    assert plan_rollout(v) == RolloutStep("lower", 2, "restarting r-2 (1 of 3)", "r-2")
    v = view([NEW, NEW, NEW], partition=2, current_revision=OLD)
    assert plan_rollout(v) == RolloutStep("idle", 0)


def test_a_partition_above_the_size_counts_as_closed() -> None:
    v = view([OLD, OLD, OLD], partition=5)
    assert plan_rollout(v) == RolloutStep("lower", 2, "restarting r-2 (1 of 3)", "r-2")


def test_pod_views_read_revision_and_readiness() -> None:
    def pod(name: str, rev: str, phase: str, ready: str, deleting: bool = False) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": name, "labels": {"controller-revision-hash": rev}}
        if deleting:
            meta["deletionTimestamp"] = "2030-01-01T00:00:00Z"
        return {
            "metadata": meta,
            "status": {"phase": phase, "conditions": [{"type": "Ready", "status": ready}]},
        }

    pods = [
        pod("r-0", "a", "Running", "True"),
        pod("r-1", "b", "Pending", "False"),
        pod("r-2", "a", "Running", "True", deleting=True),
        pod("other-0", "a", "Running", "True"),
    ]
    assert pod_views("r", pods) == {0: PodView("a", True), 1: PodView("b", False)}


def test_the_template_hash_follows_the_pod_template_only() -> None:
    cr: dict[str, Any] = {
        "apiVersion": "etlrouter.io/v1alpha1",
        "kind": "EtlRouterCluster",
        "metadata": {"name": "x", "namespace": "ns", "uid": "u1"},
        "spec": {"image": "a:1"},
    }

    def template_hash(cr: dict[str, Any], replicas: int = 3, partition: int = 0) -> str:
        objs = desired_objects(
            cr,
            bootstrap_peers="x-0=a:1",
            statefulset_replicas=replicas,
            pdb_api_version="policy/v1",
            partition=partition,
        )
        sts = objs[3]
        assert sts["spec"]["updateStrategy"]["rollingUpdate"]["partition"] == partition
        return str(sts["metadata"]["annotations"][TEMPLATE_HASH])

    first = template_hash(cr)
    assert template_hash(cr, replicas=5, partition=2) == first
    assert template_hash({**cr, "spec": {"image": "a:2"}}) != first
    restarted = {**cr, "metadata": {**cr["metadata"], "annotations": {"etlrouter.io/restartedAt": "now"}}}
    assert template_hash(restarted) != first


def test_a_single_member_cluster_restarts_its_only_member() -> None:
    # Nobody can take over leadership: waiting for a transfer would hold the rollout forever.
    step = plan_rollout(view([OLD], partition=1))
    assert step.action == "lower" and step.partition == 0 and "only member" in step.reason
