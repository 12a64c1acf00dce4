"""The partition suite's own checks can fail: they are shown bad observations (no namespaces needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.partition.clients import leaders_by_term
from tests.partition.system import NetnsSystem

pytestmark = pytest.mark.partition


def test_two_leaders_in_one_term_are_seen() -> None:
    status = [(1.0, "router-0", 3, "router-0"), (1.1, "router-1", 3, "router-1"), (1.2, "router-2", 4, "")]
    assert leaders_by_term(status) == {3: {"router-0", "router-1"}}


def test_running_follows_assignments_and_revokes_from_the_sidecar_log(tmp_path: Path) -> None:
    lines = [
        {"msg": "assignment applied", "dag": "d1", "token": 7, "local": ["s1#0", "s2#0"]},
        {"msg": "revoked", "dag": "d1", "token": 7, "stages": ["s2"]},
        {"msg": "assignment applied", "dag": "d2", "token": 5, "local": ["s9#1"]},
        {"msg": "assignment applied", "dag": "d2", "token": 9, "local": []},
    ]
    (tmp_path / "sc-x.log").write_text("not json\n" + "\n".join(json.dumps(x) for x in lines) + "\n")
    running, tokens = NetnsSystem(tmp_path).running("sc-x")
    assert running == {"d1/s1#0"}
    assert tokens == [("d1", 7), ("d2", 5), ("d2", 9)]


def test_leadership_claims_come_from_role_changes(tmp_path: Path) -> None:
    entry = {"ts": 5.0, "msg": "raft role changed", "raft_role": "leader", "term": 2, "leader": "router-0"}
    (tmp_path / "router-0.log").write_text(json.dumps(entry) + "\n")
    (tmp_path / "router-1.log").write_text(json.dumps({**entry, "leader": ""}) + "\n")
    assert NetnsSystem(tmp_path).leadership_claims() == [(5.0, "router-0", 2, "router-0")]
