"""Randomized, deterministic whole-cluster simulations of the Raft core.

Default: 3000 seeds (a few seconds per chunk). More: RAFT_SIM_SEEDS=20000. Replay one seed with
its full trace: RAFT_SIM_SEED=123 .venv/bin/python -m etlrouter.testing.raft_sim, or run only
that seed here with RAFT_SIM_SEED=123 pytest tests/raft/test_raft_simulation.py.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

from etlrouter.raft import core
from etlrouter.raft.types import Message
from etlrouter.testing.raft_sim import (
    SimOptions,
    Simulation,
    SimulationFailure,
    options_for_seed,
    run_seed,
)

CHUNK = 250


def _seed_ranges() -> list[range]:
    replay = os.environ.get("RAFT_SIM_SEED")
    if replay is not None:
        return [range(int(replay), int(replay) + 1)]
    total = int(os.environ.get("RAFT_SIM_SEEDS", "3000"))
    return [range(start, min(start + CHUNK, total)) for start in range(0, total, CHUNK)]


@pytest.mark.parametrize("seeds", _seed_ranges(), ids=lambda r: f"seeds{r.start}-{r.stop - 1}")
def test_random_runs_keep_raft_safe(seeds: range) -> None:
    exercised: Counter[str] = Counter()
    for seed in seeds:
        sim = run_seed(seed)  # raises SimulationFailure with the trace and a replay command
        exercised.update(sim.stats)
        exercised["acked_writes"] += len(sim.acked_writes)
        exercised["leaders"] += len(sim.leaders_by_term)
    if len(seeds) >= CHUNK:
        # Guard against a harness that silently stops exercising the interesting paths.
        assert exercised["acked_writes"] > 3 * len(seeds), exercised
        assert exercised["leaders"] > 2 * len(seeds), exercised
        for path in ("truncations", "snapshots_installed", "conf_changes", "transfers"):
            assert exercised[path] > 0, f"no {path} in {seeds}: {exercised}"


def test_same_seed_replays_the_same_run() -> None:
    first = run_seed(17)
    second = run_seed(17)
    assert first.trace == second.trace
    assert first.acked_writes == second.acked_writes


def test_seed_selects_every_variant() -> None:
    shapes = {(o.nodes, o.spare_nodes, o.check_quorum) for o in map(options_for_seed, range(10))}
    assert len(shapes) >= 4


def _first_failure(seeds: range, options: SimOptions | None = None) -> SimulationFailure | None:
    for seed in seeds:
        try:
            Simulation(seed, options or options_for_seed(seed)).run()
        except SimulationFailure as failure:
            return failure
    return None


def test_simulation_detects_votes_for_stale_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    # Broken election restriction: any candidate gets the vote, so committed entries get lost.
    monkeypatch.setattr(core.RaftCore, "_is_up_to_date", lambda self, index, term: True)
    failure = _first_failure(range(200))
    assert failure is not None
    text = str(failure)
    assert "leader completeness" in text or "state machine safety" in text or "acknowledged write" in text
    assert "replay: RAFT_SIM_SEED=" in text and "last events" in text


def test_simulation_detects_double_votes(monkeypatch: pytest.MonkeyPatch) -> None:
    original = core.RaftCore._handle_vote_request

    def forgetful_vote(self: core.RaftCore, msg: Message) -> None:
        self.vote = core.NO_NODE  # forgets whom it voted for: two leaders per term become possible
        self.leader = core.NO_NODE
        original(self, msg)

    monkeypatch.setattr(core.RaftCore, "_handle_vote_request", forgetful_vote)
    failure = _first_failure(range(200))
    assert failure is not None
    assert "violated" in str(failure)


def test_simulation_detects_unsafe_local_reads() -> None:
    options = SimOptions(read_mode="local", check_quorum=False, pre_vote=False)
    failure = _first_failure(range(300), options)
    assert failure is not None
    assert "not linearizable" in str(failure)
