"""Test support shipped with the package so that later (multi-process) tests can reuse it.

- `linearizability`: a Wing-Gong/Lowe linearizability checker for key-value register histories.
- `raft_sim`: a deterministic simulated cluster of `RaftCore`s with safety checks after every step.
"""
