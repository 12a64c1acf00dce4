"""The pure parts of security: identities, the token file, the permission table, GraphQL field checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from graphql import parse

from etlrouter.api.auth import denial
from etlrouter.core.config import ConfigError, load_config
from etlrouter.security import authz
from etlrouter.security.identity import Identity, IdentityError, from_peer_cert, parse_spiffe_id, spiffe_id
from etlrouter.security.tokens import TokenFile, TokenFileError, parse_tokens

TD = "etlrouter.test"


def test_spiffe_ids_round_trip_and_bad_ones_name_the_problem() -> None:
    assert parse_spiffe_id(spiffe_id(TD, "sidecar", "s-1", namespace="ops"), TD) == ("sidecar", "s-1")
    assert parse_spiffe_id(f"spiffe://{TD}/router/router-0", TD) == ("router", "router-0")
    for uri, problem in [
        ("https://x/router/a", "not a spiffe"),
        ("spiffe://other.domain/router/a", "trust domain"),
        (f"spiffe://{TD}/pod/a", "expected"),
        (f"spiffe://{TD}/router/", "expected"),
    ]:
        with pytest.raises(IdentityError, match=problem):
            parse_spiffe_id(uri, TD)


def test_a_peer_certificate_names_one_identity_and_a_users_roles() -> None:
    cert = {
        "subject": (
            (("commonName", "alice"),),
            (("organizationName", "tap"),),
            (("organizationName", "editor"),),
        ),
        "subjectAltName": (("URI", f"spiffe://{TD}/user/alice"), ("IP Address", "127.0.0.1")),
    }
    identity = from_peer_cert(cert, TD)
    assert identity == Identity(
        "user", "alice", frozenset({"tap", "editor"}), "certificate", f"spiffe://{TD}/user/alice"
    )
    assert from_peer_cert(None, TD) is None
    two = {"subjectAltName": (("URI", f"spiffe://{TD}/user/a"), ("URI", f"spiffe://{TD}/user/b"))}
    with pytest.raises(IdentityError, match="exactly one"):
        from_peer_cert(two, TD)
    # A sidecar's O= does not make it an admin: roles are for people.
    sidecar = {
        "subject": ((("organizationName", "admin"),),),
        "subjectAltName": (("URI", f"spiffe://{TD}/sidecar/s"),),
    }
    assert from_peer_cert(sidecar, TD).roles == frozenset()  # type: ignore[union-attr]


def test_token_file_errors_name_file_and_line(tmp_path: Path) -> None:
    good = "a" * 20
    table = parse_tokens(f'# comment\n{good},alice,1,"viewer,tap"\n', "t.csv")
    (identity,) = table.values()
    assert (identity.name, identity.roles, identity.via) == ("alice", frozenset({"viewer", "tap"}), "token")
    for text, problem in [
        ("short,bob,1,viewer\n", "t.csv:1: the token of 'bob' is shorter"),
        (f"{good},bob,1,root\n", "t.csv:1: unknown role 'root'"),
        (f"{good},bob,1,viewer\n{good},carol,2,viewer\n", "t.csv:2: the token of 'carol' is listed twice"),
        (f"\n{good}\n", "t.csv:2: expected token,user"),
    ]:
        with pytest.raises(TokenFileError, match=problem):
            parse_tokens(text, "t.csv")
    path = tmp_path / "tokens.csv"
    path.write_text(f"{good},alice,1,viewer\n")
    tokens = TokenFile.load(path)
    assert tokens.lookup(good) is not None and tokens.lookup("b" * 20) is None
    path.write_text(f"{'b' * 20},bob,1,editor\n")
    assert tokens.refresh() and tokens.lookup(good) is None and tokens.lookup("b" * 20) is not None
    path.write_text("broken\n")  # a bad edit keeps the previous table: nobody is locked out
    assert not tokens.refresh() and tokens.lookup("b" * 20) is not None


def person(*roles: str) -> Identity:
    return Identity("user", "p", frozenset(roles), "token")


def test_the_table_decides_by_kind_and_permission() -> None:
    rule = authz.rule_for
    router, sidecar = Identity("router", "router-0"), Identity("sidecar", "s")
    assert authz.decide(rule("/etlrouter.v1.RaftService/AppendEntries"), router).allowed
    assert not authz.decide(rule("/etlrouter.v1.RaftService/AppendEntries"), sidecar).allowed
    assert not authz.decide(rule("/etlrouter.v1.RaftService/AppendEntries"), person("admin")).allowed
    heartbeat = authz.decide(rule("/etlrouter.v1.SidecarCoordinator/Heartbeat"), sidecar)
    assert heartbeat.allowed and heartbeat.then == "self"
    edge = authz.decide(rule("/etlrouter.v1.SidecarDataPlane/ReceiveRecords"), sidecar)
    assert edge.allowed and edge.then == "upstream"
    restore = authz.decide(rule("/etlrouter.v1.BackupService/RestoreSnapshot"), person("editor"))
    assert not restore.allowed and "'admin'" in restore.missing
    assert authz.decide(rule("/etlrouter.v1.BackupService/RestoreSnapshot"), person("admin")).allowed
    tap = authz.decide(rule("/etlrouter.v1.SidecarAdmin/Tap"), person("editor"))
    assert not tap.allowed and "'tap'" in tap.missing
    assert authz.decide(rule("/etlrouter.v1.SidecarAdmin/Tap"), person("tap")).allowed
    # Unknown methods are closed; health and reflection are open to any authenticated caller.
    assert not authz.decide(rule("/etlrouter.v1.PipelineAdmin/DropEverything"), person("admin")).allowed
    assert authz.decide(rule("/grpc.health.v1.Health/Check"), sidecar).allowed


def test_graphql_root_fields_need_their_permission() -> None:
    query = parse(
        'query { pipelines { name } ...F } fragment F on Query { deadLetter(sidecar: "s", id: "x") { id } }'
    )
    assert "Query.deadLetter" in (denial(person("viewer"), query, None) or "")
    assert denial(person("tap"), query, None) is None
    mutation = parse('mutation { applyPipelines(definition: "") { applied } }')
    why = denial(person("viewer"), mutation, None)
    assert why is not None and "Mutation.applyPipelines" in why and "'editor'" in why
    assert denial(person("editor"), mutation, None) is None
    assert denial(None, mutation, None) is None  # security off
    assert denial(Identity("router", "r"), mutation, None) is None


def test_tls_settings_are_checked_together() -> None:
    with pytest.raises(ConfigError, match=r"tls\.cert and tls\.key must be set together"):
        load_config(environ={"ETLROUTER_TLS__CERT": "/x.crt"})
    with pytest.raises(ConfigError, match="tokens never travel in plaintext"):
        load_config(environ={"ETLROUTER_AUTH__TOKENS_FILE": "/t.csv"})


def test_every_method_the_parts_serve_has_a_rule_and_every_rule_a_method() -> None:
    """Default deny makes a forgotten method unusable by everyone: the table and the protos move together."""
    import inspect

    from etlrouter._proto.v1 import admin_grpc, control_grpc, dataplane_grpc, raft_grpc

    served = {
        f"/etlrouter.v1.{name.removesuffix('Base')}/{method}"
        for module in (admin_grpc, control_grpc, dataplane_grpc, raft_grpc)
        for name, cls in inspect.getmembers(module, inspect.isclass)
        if name.endswith("Base")
        for method, _ in inspect.getmembers(cls, inspect.isfunction)
        if method[0].isupper()
    }
    assert served == set(authz.GRPC_RULES)
