from __future__ import annotations

from pathlib import Path

import pytest

from etlrouter.core.config import ConfigError, effective, load_config, parse_port_list, split_address


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_need_no_file_or_env() -> None:
    config = load_config(None, environ={})
    assert config.router.raft.election_ticks == 10
    assert config.transport.max_frame_size == 1 << 20


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    file = write(
        tmp_path, "c.yaml", "router:\n  node_id: from-file\n  grpc: {port: 1111}\n  http: {port: 2222}\n"
    )
    env = {"ETLROUTER_ROUTER__GRPC__PORT": "3333", "ETLROUTER_ROUTER__HTTP__PORT": "4444"}
    config = load_config(file, environ=env, overrides={"router": {"http": {"port": 5555}}})
    assert config.router.node_id == "from-file"
    assert config.router.grpc.port == 3333
    assert config.router.http.port == 5555


def test_toml_file_and_env_collections(tmp_path: Path) -> None:
    file = write(tmp_path, "c.toml", '[sidecar]\nscan_ports = "50051-50053"\n')
    env = {"ETLROUTER_SIDECAR__ROUTERS": "[a:1, b:2]"}
    config = load_config(file, environ=env)
    assert parse_port_list(config.sidecar.scan_ports) == [50051, 50052, 50053]
    assert config.sidecar.routers == ("a:1", "b:2")


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("router:\n  raft:\n    election_ticks: many\n", {}, "`$.router.raft.election_ticks` (from file"),
        (
            "",
            {"ETLROUTER_ROUTER__RAFT__ELECTION_TICKS": "abc"},
            "(from env ETLROUTER_ROUTER__RAFT__ELECTION_TICKS)",
        ),
        ("router:\n  grpc: {port: 70000}\n", {}, "<= 65535 - at `$.router.grpc.port`"),
        (
            "router:\n  raft: {heartbeat_ticks: 20}\n",
            {},
            "heartbeat_ticks must be smaller than election_ticks",
        ),
        ("routr: {}\n", {}, "unknown field `routr`"),
        ("sidecar:\n  scan_ports: '9-x'\n", {}, "'9-x' is not a port or PORT-PORT range - at `$.sidecar`"),
        ("sidecar:\n  routers: [nohost]\n", {}, "invalid address 'nohost'"),
        ("router:\n  peers: [{id: a, address: 'h:1'}]\n", {}, "node_id 'router-0' is not among the peers"),
    ],
)
def test_errors_name_the_field_and_origin(
    tmp_path: Path, text: str, env: dict[str, str], expected: str
) -> None:
    file = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(file, environ=env)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    file = write(tmp_path, "broken.yaml", "router:\n  node_id: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:3:1"):
        load_config(file, environ={})


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", environ={})


def test_effective_config_for_one_role() -> None:
    data = effective(load_config(None, environ={}), "sidecar")
    assert set(data) == {"logging", "tracing", "transport", "tls", "auth", "sidecar"}
    with pytest.raises(ConfigError, match="unknown role"):
        effective(load_config(None, environ={}), "nope")


def test_addresses_and_port_lists() -> None:
    assert split_address("[::1]:80") == ("::1", 80)
    assert split_address("router-0.routers:7400") == ("router-0.routers", 7400)
    with pytest.raises(ValueError, match="HOST:PORT"):
        split_address("host:0")
    assert parse_port_list("1,3-4") == [1, 3, 4]
    with pytest.raises(ValueError, match="at most 4096 wide"):
        parse_port_list("1-65535")


@pytest.mark.parametrize(
    ("text", "env", "overrides", "origin"),
    [
        # An unknown key is blamed on whoever wrote that key, not on a flag that set a sibling.
        (
            "",
            {"ETLROUTER_ROUTER__NOSUCH": "1"},
            {"router": {"data_dir": "d"}},
            "env ETLROUTER_ROUTER__NOSUCH",
        ),
        (
            "router:\n  raft:\n    nosuch: 1\n",
            {},
            {"router": {"grpc": {"port": 1}}},
            "key router.raft.nosuch",
        ),
        ("routr: {}\n", {}, {}, "key routr"),
        # A bad list element is blamed on the layer that supplied the list.
        (
            "",
            {},
            {"router": {"node_id": "r0", "peers": [{"id": "r0", "address": "h:notaport"}]}},
            "flag --peer",
        ),
        ("router:\n  peers: [{id: router-0, address: 'h:x'}]\n", {}, {}, "key router.peers[0]"),
        # A struct-level check (node_id not among the peers) is blamed on the layer that set part of it.
        ("", {"ETLROUTER_ROUTER__PEERS": "[{id: a, address: 'h:1'}]"}, {}, "env ETLROUTER_ROUTER__PEERS"),
        # A later layer that set the same value wins.
        (
            "router:\n  grpc: {port: x}\n",
            {"ETLROUTER_ROUTER__GRPC__PORT": "y"},
            {},
            "env ETLROUTER_ROUTER__GRPC__PORT",
        ),
        ("router:\n  grpc: {port: 1}\n", {}, {"router": {"grpc": {"port": "y"}}}, "flag --grpc-port"),
    ],
)
def test_errors_name_the_true_origin(
    tmp_path: Path, text: str, env: dict[str, str], overrides: dict[str, object], origin: str
) -> None:
    from etlrouter.cli_context import FLAG_NAMES

    file = write(tmp_path, "c.yaml", text) if text else None
    with pytest.raises(ConfigError) as info:
        load_config(file, environ=env, overrides=overrides, flag_names=FLAG_NAMES)
    message = str(info.value)
    assert message.endswith(f"{origin})"), message
    if "key " in origin:
        assert f"(from file {file}, {origin})" in message


def test_kubernetes_service_link_variables_are_not_configuration() -> None:
    # The kubelet sets these for Services named etlrouter, etlrouter-client or etlrouter-webhook in the
    # pod's namespace (the operator's own Deployment has one): they must not fail the config.
    links = {
        "ETLROUTER_SERVICE_HOST": "10.0.0.9",
        "ETLROUTER_SERVICE_PORT": "7400",
        "ETLROUTER_PORT": "tcp://10.0.0.9:7400",
        "ETLROUTER_CLIENT_SERVICE_HOST": "10.0.0.5",
        "ETLROUTER_CLIENT_SERVICE_PORT": "7400",
        "ETLROUTER_CLIENT_SERVICE_PORT_GRPC": "7400",
        "ETLROUTER_CLIENT_PORT": "tcp://10.0.0.5:7400",
        "ETLROUTER_CLIENT_PORT_7400_TCP": "tcp://10.0.0.5:7400",
        "ETLROUTER_CLIENT_PORT_7400_TCP_PROTO": "tcp",
        "ETLROUTER_CLIENT_PORT_7400_TCP_PORT": "7400",
        "ETLROUTER_CLIENT_PORT_7400_TCP_ADDR": "10.0.0.5",
        "ETLROUTER_WEBHOOK_SERVICE_PORT_HTTPS": "443",
    }
    config = load_config(environ={**links, "ETLROUTER_ROUTER__GRPC__PORT": "7401"})
    assert config.router.grpc.port == 7401
    # Anything else without `__` is still refused, naming the variable.
    with pytest.raises(ConfigError, match="ETLROUTER_CLIENT_HOST"):
        load_config(environ={"ETLROUTER_CLIENT_HOST": "x"})
