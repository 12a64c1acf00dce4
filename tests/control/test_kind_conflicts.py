"""kind_conflicts: which offered services clash on kind with another registration (the router strips them
from a RegisterSidecar so the rest register), and that apply still enforces the same rule."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from etlrouter.control import (
    ControlState,
    DeregisterService,
    DeregisterSidecar,
    RegisterService,
    RegisterSidecar,
    ServiceInstance,
    encode_command,
)
from etlrouter.control.state import KindConflict
from etlrouter.dsl import StageKind

from .helpers import Driver


def offer(sidecar_id: str, *services: tuple[str, StageKind]) -> RegisterSidecar:
    return RegisterSidecar(
        sidecar_id=sidecar_id,
        data_address=f"{sidecar_id}.pods:7000",
        services=tuple(
            ServiceInstance(name=name, kind=kind, endpoint=f"127.0.0.1:{9000 + n}")
            for n, (name, kind) in enumerate(services)
        ),
    )


def test_a_name_held_with_another_kind_is_a_conflict_and_unrelated_services_are_not() -> None:
    d = Driver()
    d.ok(offer("a", ("orders", "source")))
    b = offer("b", ("orders", "sink"), ("audit", "sink"), ("orders", "sink"))
    assert d.state.kind_conflicts("b", b.services) == [KindConflict("orders", "source", "sink")]
    # The command as it stands is rejected whole, with the message it always had (old logs replay alike).
    result = d.run(b)
    assert result.error is not None and result.error.code == "failed_precondition"
    assert result.error.message == (
        "RegisterSidecar 'b': service `orders` is already registered as a source, not a sink"
    )
    assert d.state.sidecar("b") is None


def test_without_its_conflicts_the_command_applies_and_the_conflict_goes_when_the_holder_leaves() -> None:
    d = Driver()
    d.ok(offer("a", ("orders", "source")))
    b = offer("b", ("orders", "sink"), ("audit", "sink"))
    clashing = {(c.service, c.offered) for c in d.state.kind_conflicts("b", b.services)}
    kept = tuple(s for s in b.services if (s.name, s.kind) not in clashing)
    d.ok(RegisterSidecar(sidecar_id="b", data_address=b.data_address, services=kept))
    record = d.state.sidecar("b")
    assert record is not None and record.service_names() == {"audit"}
    assert d.state.kind_conflicts("b", b.services) == [KindConflict("orders", "source", "sink")]

    d.ok(DeregisterSidecar(sidecar_id="a"))
    assert d.state.kind_conflicts("b", b.services) == []
    d.ok(b)
    assert d.state.kind_of("orders") == "sink"


def test_the_sidecars_own_services_do_not_count_but_a_second_holder_does() -> None:
    d = Driver()
    d.ok(offer("a", ("orders", "source")))
    # `a` alone holds `orders`: it may change its kind (its old list is replaced).
    changed = offer("a", ("orders", "sink"))
    assert d.state.kind_conflicts("a", changed.services) == []
    # With a second holder, the change clashes with that one.
    d.ok(offer("c", ("orders", "source")))
    assert d.state.kind_conflicts("a", changed.services) == [KindConflict("orders", "source", "sink")]
    # An unknown sidecar has nothing to replace.
    assert d.state.kind_conflicts("new", changed.services) == [KindConflict("orders", "source", "sink")]


def test_directly_registered_services_count_too() -> None:
    d = Driver()
    direct = d.ok(RegisterService(instance=ServiceInstance(name="lookup-geo", kind="lookup"), ttl_ms=1000))
    b = offer("b", ("lookup-geo", "transform"), ("x", "sink"))
    assert d.state.kind_conflicts("b", b.services) == [KindConflict("lookup-geo", "lookup", "transform")]
    d.ok(DeregisterService(instance_id=direct.instance_id))
    assert d.state.kind_conflicts("b", b.services) == []


def test_entries_disagreeing_within_the_list_are_left_to_apply_which_rejects_them() -> None:
    d = Driver()
    b = offer("b", ("orders", "source"), ("orders", "sink"))
    assert d.state.kind_conflicts("b", b.services) == []
    # Against a registered name, every clashing entry is reported, so stripping them all is enough.
    d.ok(offer("a", ("orders", "source")))
    mixed = offer("b", ("orders", "transform"), ("orders", "sink"), ("orders", "source"))
    assert d.state.kind_conflicts("b", mixed.services) == [
        KindConflict("orders", "source", "transform"),
        KindConflict("orders", "source", "sink"),
    ]
    result = d.run(b)
    assert result.error is not None and result.error.code == "invalid_argument"
    assert result.error.message == (
        "RegisterSidecar 'b': services[1] `orders` is a sink but an earlier entry says source"
    )


def _consistent(services: list[tuple[str, StageKind]]) -> bool:
    """No entry disagrees with an earlier one of the same name."""
    first: dict[str, StageKind] = {}
    return all(first.setdefault(name, kind) == kind for name, kind in services)


NAMES = st.sampled_from(["n1", "n2", "n3"])
KINDS: st.SearchStrategy[StageKind] = st.sampled_from(["source", "transform", "sink", "lookup"])
OFFERS = st.lists(st.tuples(NAMES, KINDS), max_size=4)


@settings(max_examples=300, deadline=None)
@given(
    existing=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), OFFERS), max_size=4),
    sidecar_id=st.sampled_from(["a", "b", "z"]),
    offered=OFFERS,
)
def test_stripping_the_conflicts_is_exactly_what_apply_needs(
    existing: list[tuple[str, list[tuple[str, StageKind]]]],
    sidecar_id: str,
    offered: list[tuple[str, StageKind]],
) -> None:
    d = Driver()
    for holder, services in existing:
        d.run(offer(holder, *services))  # some of these are rejected: that is part of the setup
    revision = d.state.revision
    command = offer(sidecar_id, *offered)
    conflicts = d.state.kind_conflicts(sidecar_id, command.services)
    for conflict in conflicts:
        assert d.state.kind_of(conflict.service) == conflict.registered != conflict.offered

    # The whole list, applied at this point, is refused when anything clashes with the registry.
    whole = ControlState.from_snapshot(d.state.snapshot()).apply(d.index + 1, encode_command(command))
    if conflicts:
        assert whole.error is not None
    elif _consistent(offered):
        assert whole.error is None, whole.error

    # Without the conflicts it applies, unless the list contradicts itself (the sidecar's own error).
    clashing = {(c.service, c.offered) for c in conflicts}
    kept = tuple(s for s in command.services if (s.name, s.kind) not in clashing)
    stripped = d.run(RegisterSidecar(sidecar_id=sidecar_id, data_address=command.data_address, services=kept))
    if _consistent([(s.name, s.kind) for s in kept]):
        assert stripped.error is None, stripped.error
        assert d.state.kind_conflicts(sidecar_id, kept) == []
    else:
        assert stripped.error is not None and stripped.error.code == "invalid_argument"
        assert d.state.revision == revision  # a rejected command changes nothing
