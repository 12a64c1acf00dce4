"""Configuration: msgspec Structs loaded from a YAML/TOML file, then `ETLROUTER_*` env vars, then flags.

Precedence (later wins): defaults < file < environment < command-line flags. Every layer is a nested dict
of plain values; the merged dict is converted once into `Config`, so validation happens in one place and
every error names the field path and the layer that supplied the bad value:

    config error: Expected `int`, got `str` - at `$.router.raft.election_timeout_ms`
    (from env ETLROUTER_ROUTER__RAFT__ELECTION_TIMEOUT_MS)

Environment variables use `__` between levels: `ETLROUTER_SIDECAR__SCAN_PORTS=50051-50060`,
`ETLROUTER_LOGGING__LEVEL=debug`. A value starting with `[` or `{` is parsed as a YAML flow collection.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from etlrouter import __version__

ENV_PREFIX = "ETLROUTER_"
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
PositiveMs = Annotated[int, msgspec.Meta(gt=0)]
Bytes = Annotated[int, msgspec.Meta(gt=0)]

_HOSTPORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})$")


class ConfigError(Exception):
    """A configuration problem; `str()` is one line naming the field and where the value came from."""


def split_address(address: str) -> tuple[str, int]:
    """'host:port' -> (host, port); raises ValueError naming the problem."""
    m = _HOSTPORT.match(address)
    if not m or not 0 < int(m["port"]) < 65536:
        raise ValueError(f"invalid address {address!r}: expected HOST:PORT with a port from 1 to 65535")
    return m["host"].strip("[]"), int(m["port"])


def parse_port_list(spec: str) -> list[int]:
    """'50051-50053,50060' -> [50051, 50052, 50053, 50060]; raises ValueError naming the bad part."""
    ports: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        lo_s, sep, hi_s = part.partition("-")
        try:
            lo, hi = int(lo_s), int(hi_s) if sep else int(lo_s)
        except ValueError:
            raise ValueError(
                f"invalid port list {spec!r}: {part!r} is not a port or PORT-PORT range"
            ) from None
        if not (0 < lo <= hi < 65536) or hi - lo > 4096:
            raise ValueError(
                f"invalid port list {spec!r}: range {part!r} must lie in 1..65535, at most 4096 wide"
            )
        ports.extend(range(lo, hi + 1))
    return ports


class LoggingConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    # "auto": human-readable text on a terminal, JSON lines otherwise (containers).
    format: Literal["auto", "text", "json"] = "auto"


class TracingConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """OpenTelemetry tracing (docs/observability.md). Each key, when empty, falls back to its standard
    OTEL_* environment variable; with no endpoint from either, tracing is off."""

    endpoint: str = ""  # OTLP gRPC collector, e.g. http://otel-collector:4317 (OTEL_EXPORTER_OTLP_ENDPOINT)
    # Plaintext to the collector; None = as the endpoint's scheme says (OTEL_EXPORTER_OTLP_INSECURE).
    insecure: bool | None = None
    sampler: str = ""  # OTEL_TRACES_SAMPLER: parentbased_traceidratio, always_on, ...
    sampler_arg: str = ""  # OTEL_TRACES_SAMPLER_ARG: the ratio for *traceidratio
    service_name: str = ""  # OTEL_SERVICE_NAME; default etlrouter-<role>
    resource_attributes: dict[str, str] = {}  # merged over OTEL_RESOURCE_ATTRIBUTES


class TransportConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """gRPC/HTTP2 settings shared by every role (see docs/adr/0002-transport-tuning.md)."""

    # Skip h2's per-frame repr and advertise max_frame_size; off only for A/B measurements.
    h2_tuning: bool = True
    max_frame_size: Annotated[int, msgspec.Meta(ge=16_384, le=16_777_215)] = 1 << 20
    # Largest gRPC message any server or client accepts; larger ones fail with RESOURCE_EXHAUSTED before
    # their bytes are buffered.
    max_message_bytes: Annotated[int, msgspec.Meta(ge=1024, le=1 << 31)] = 64 << 20
    stream_window_bytes: Annotated[int, msgspec.Meta(ge=65_535, le=(1 << 31) - 1)] = 4 << 20
    connection_window_bytes: Annotated[int, msgspec.Meta(ge=65_535, le=(1 << 31) - 1)] = 16 << 20


class TlsConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Mutual TLS of every listener and channel (docs/security.md). Empty `ca` = plaintext, with a warning."""

    ca: str = ""  # PEM bundle the peers' certificates must chain to
    cert: str = ""  # this party's certificate (PEM); its URI SAN is its identity
    key: str = ""
    trust_domain: str = "etlrouter.local"
    # How often the files are checked for a rotation (new connections use the new pair).
    reload_interval_ms: PositiveMs = 5_000
    # A connection that has not finished its TLS handshake by then is closed.
    handshake_timeout_ms: PositiveMs = 10_000
    # Established connections per peer identity (or per address, for token callers) on one listener.
    max_connections_per_peer: Annotated[int, msgspec.Meta(ge=1)] = 64
    # Kubernetes sidecars (docs/security.md): get cert/key/CA from the operator's issuer at start
    # (a CSR plus the pod's projected ServiceAccount token) and renew them; they replace ca/cert/key.
    issuer_url: str = ""
    issuer_ca: str = ""  # the issuer's CA: a PEM file, or the PEM text itself (the webhook injects it)
    issuer_token_file: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("tls.cert and tls.key must be set together")
        if self.issuer_url and not (self.issuer_ca and self.issuer_token_file):
            raise ValueError("tls.issuer_url needs tls.issuer_ca and tls.issuer_token_file")
        if self.cert and not self.ca:
            raise ValueError("tls.cert needs tls.ca (the CA bundle peers are verified against)")
        if not re.fullmatch(r"[a-z0-9.-]+", self.trust_domain):
            raise ValueError(
                f"trust_domain {self.trust_domain!r}: lower-case letters, digits, '.' and '-' only"
            )


class AuthConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """How people and tools authenticate besides client certificates."""

    # Bearer tokens, Kubernetes static-token format (token,user,uid,"roles"); re-read when it changes.
    tokens_file: str = ""
    # Serve /metrics without credentials (still over TLS): for scrapers that cannot present a token.
    metrics_open: bool = False
    # Accept the tokens on gRPC too. With a token file the gRPC handshake then does not require a client
    # certificate; false keeps it required there (tokens for HTTP only: the operator's routers, whose one
    # token is the scraper's).
    grpc_tokens: bool = True


class ListenConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    host: str = "127.0.0.1"
    port: Port = 0  # 0 = pick a free port (tests, `etlrouter dev`)


class PeerConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    id: str
    address: str  # HOST:PORT of the peer's gRPC listener

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("peer id must not be empty")
        split_address(self.address)


class RaftConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    tick_ms: PositiveMs = 50
    election_ticks: Annotated[int, msgspec.Meta(ge=2)] = 10
    heartbeat_ticks: Annotated[int, msgspec.Meta(ge=1)] = 1
    pre_vote: bool = True
    check_quorum: bool = True
    # fsync the WAL before acknowledging; off only for benchmarks and throwaway dev clusters.
    fsync: bool = True
    snapshot_every_entries: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    max_append_entries: Annotated[int, msgspec.Meta(ge=1)] = 512
    max_inflight_appends: Annotated[int, msgspec.Meta(ge=1)] = 64

    def __post_init__(self) -> None:
        if self.heartbeat_ticks >= self.election_ticks:
            raise ValueError("heartbeat_ticks must be smaller than election_ticks")


class WorkPoolConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Worker processes for CPU-heavy admin requests (DSL parse/check/explain), off the Raft event loop."""

    workers: Annotated[int, msgspec.Meta(ge=1)] = 1
    # Requests that may wait for a worker; beyond workers + queue, RESOURCE_EXHAUSTED with a retry hint.
    queue: Annotated[int, msgspec.Meta(ge=0)] = 4
    # A job still running at its deadline is stopped (its worker is killed and replaced).
    deadline_ms: PositiveMs = 10_000


class RouterConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    node_id: str = "router-0"
    cluster_id: str = "etlrouter"
    grpc: ListenConfig = ListenConfig(port=7400)
    http: ListenConfig = ListenConfig(port=7480)
    data_dir: str = "./.data/router-0"
    # Static bootstrap peers, this node included. Empty = a single-node cluster of this node.
    peers: tuple[PeerConfig, ...] = ()
    # Join an existing cluster through the admin API of any of these addresses instead of bootstrapping.
    join: tuple[str, ...] = ()
    raft: RaftConfig = RaftConfig()
    sidecar_heartbeat_timeout_ms: PositiveMs = 15_000
    # After a leader change, sidecars get this long to heartbeat before they can be expired.
    leader_grace_ms: PositiveMs = 15_000
    work: WorkPoolConfig = WorkPoolConfig()

    def __post_init__(self) -> None:
        for addr in self.join:
            split_address(addr)
        ids = [p.id for p in self.peers]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate peer ids in {ids}")
        if self.peers and self.node_id not in ids:
            raise ValueError(f"node_id {self.node_id!r} is not among the peers {ids}")


class SidecarConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    id: str = ""  # "" = the host name
    routers: tuple[str, ...] = ("127.0.0.1:7400",)
    grpc: ListenConfig = ListenConfig(port=7500)
    http: ListenConfig = ListenConfig(port=7580)
    # Local ports where user services may listen: "50051", "50051-50060" or "50051,50061".
    scan_ports: str = "50051-50060"
    scan_host: str = "127.0.0.1"
    scan_interval_ms: PositiveMs = 10_000
    heartbeat_interval_ms: PositiveMs = 5_000
    # Per-edge buffer bounds: credits are granted from these.
    edge_buffer_records: Annotated[int, msgspec.Meta(ge=1)] = 20_000
    edge_buffer_bytes: Bytes = 16 << 20
    data_dir: str = "./.data/sidecar"
    drain_timeout_ms: PositiveMs = 30_000
    # Event-time watermarks: how late a record may be, and how long a silent source partition holds
    # the watermark back.
    watermark_lateness_ms: Annotated[int, msgspec.Meta(ge=0)] = 0
    watermark_idle_ms: PositiveMs = 30_000

    def __post_init__(self) -> None:
        for addr in self.routers:
            split_address(addr)
        parse_port_list(self.scan_ports)


class OperatorConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    namespace: str = ""  # "" = all namespaces
    kubeconfig: str = ""  # "" = the pod's service account (in-cluster)
    lease_name: str = "etlrouter-operator"
    lease_namespace: str = ""  # "" = the operator's own namespace (POD_NAMESPACE), else "default"
    lease_duration_s: Annotated[int, msgspec.Meta(ge=2)] = 15
    # Every known object is reconciled again this often, event or not: drift repair.
    resync_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    # "" = the apiserver calls the webhook through the webhook_service Service; a URL for operators
    # running outside the cluster (tests).
    webhook_url: str = ""
    webhook: ListenConfig = ListenConfig(host="0.0.0.0", port=9443)
    webhook_service: str = "etlrouter-webhook"
    http: ListenConfig = ListenConfig(port=7680)
    # The image this package version is released as (Dockerfile label, k8s/ manifests): etlrouter:VERSION.
    sidecar_image: str = f"etlrouter:{__version__}"
    # Admission policy when the webhook cannot inject: "fail" blocks the pod, "ignore" lets it run without.
    failure_policy: Literal["Fail", "Ignore"] = "Ignore"


class CtlConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    router: str = "127.0.0.1:7400"
    # A bearer token (or `@FILE` to read it from a file) when no client certificate is used.
    token: str = ""
    output: Literal["table", "json", "yaml"] = "table"
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0

    def __post_init__(self) -> None:
        split_address(self.router)


class DevConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    data_dir: str = "./.data/dev"
    base_port: Port = 17400
    routers: Annotated[int, msgspec.Meta(ge=1, le=7)] = 3


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    logging: LoggingConfig = LoggingConfig()
    tracing: TracingConfig = TracingConfig()
    transport: TransportConfig = TransportConfig()
    tls: TlsConfig = TlsConfig()
    auth: AuthConfig = AuthConfig()
    router: RouterConfig = RouterConfig()
    sidecar: SidecarConfig = SidecarConfig()
    operator: OperatorConfig = OperatorConfig()
    ctl: CtlConfig = CtlConfig()
    dev: DevConfig = DevConfig()

    def __post_init__(self) -> None:
        if self.auth.tokens_file and not self.tls.ca:
            raise ValueError(
                "auth.tokens_file needs TLS (tls.ca, tls.cert, tls.key): tokens never travel in plaintext"
            )


ROLE_SECTIONS = ("router", "sidecar", "operator", "ctl", "dev")
SHARED_SECTIONS = ("logging", "tracing", "transport", "tls", "auth")


def read_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or TOML config file into a dict; errors name the file (and line where the parser knows)."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"config error: cannot read {p}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config error: {p}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
            "a config file is YAML or TOML"
        ) from None
    if "\x00" in text:  # valid UTF-8 all the same: a binary file
        raise ConfigError(
            f"config error: {p}: a binary file (NUL at offset {text.index(chr(0))}); expected YAML or TOML"
        )
    try:
        data: Any = tomllib.loads(text) if p.suffix == ".toml" else yaml.safe_load(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config error: {p}: {_one_line(str(e))}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError(
            f"config error: {p}{where}: {_one_line(str(getattr(e, 'problem', None) or e))}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {p}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _one_line(text: str) -> str:
    return " ".join(text.split())


# What the kubelet sets for every Service in a pod's namespace (`enableServiceLinks`, on by default): a
# Service named `etlrouter-webhook` or `etlrouter-client` gives ETLROUTER_WEBHOOK_SERVICE_HOST,
# ETLROUTER_CLIENT_PORT_7400_TCP_ADDR, … They never contain `__`, which every config variable does.
_SERVICE_LINK = re.compile(
    r"ETLROUTER_[A-Z0-9_]*?(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_[0-9]+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)?)"
)


def env_layer(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """ETLROUTER_A__B=v -> {"a": {"b": v}}, plus a map from "$.a.b" to the variable name (for errors).
    Kubernetes service-link variables (`_SERVICE_LINK`) are not configuration: skipped."""
    layer: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in ("ETLROUTER_ROLE", "ETLROUTER_CONFIG"):
            continue
        if "__" not in name and _SERVICE_LINK.fullmatch(name):
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        value: Any = raw
        if raw[:1] in ("[", "{"):
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                raise ConfigError(f"config error: env {name}: not a valid YAML flow value: {raw!r}") from None
        _set_path(layer, path, value)
        origins["$." + ".".join(path)] = f"env {name}"
    return layer, origins


def _set_path(target: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        nxt = target.setdefault(key, {})
        if not isinstance(nxt, dict):
            nxt = target[key] = {}
        target = nxt
    target[path[-1]] = value


def deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# Each layer's contribution, in precedence order (later wins): the leaf paths it supplied ("$.a.b") and
# how to name each one in an error; _KEY in a name stands for the key path the error points at.
_Layer = dict[str, str]
_KEY = "\x00key"


def _under(path: str, ancestor: str) -> bool:
    """`path` is `ancestor` or lies inside it ("$.a.b[0]" lies in "$.a.b" and in "$.a")."""
    return path == ancestor or path.startswith((ancestor + ".", ancestor + "["))


def _origin_of(message: str, layers: list[_Layer]) -> str:
    """The layer that supplied the bad value the error points at; "defaults" when none did."""
    m = re.search(r"at `(\$[^`]*)`", message)
    path = m.group(1) if m else "$"
    unknown = re.match(r"Object contains unknown field `([^`]*)`", message)
    if unknown:  # the error points at the enclosing struct; the culprit is the key itself
        path = f"{path}.{unknown.group(1)}"
    # A layer that set this value or one enclosing it (a list, a whole section): the highest one wins.
    for layer in reversed(layers):
        for supplied, origin in layer.items():
            if _under(path, supplied):
                return origin.replace(_KEY, path[2:])
    # An error about a whole struct (e.g. node_id not among the peers): the layer that set part of it.
    for layer in reversed(layers):
        inside = [supplied for supplied in layer if _under(supplied, path)]
        if inside:
            supplied = max(inside, key=len)
            return layer[supplied].replace(_KEY, supplied[2:])
    return "defaults"


def load_config(
    file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    flag_names: Mapping[str, str] | None = None,
) -> Config:
    """Merge the layers and validate once. Raises ConfigError with one line naming field and origin.

    `flag_names` maps a dotted override path ("router.peers") to the flag that set it ("--peer").
    """
    environ = os.environ if environ is None else environ
    file = file or environ.get("ETLROUTER_CONFIG") or None
    layers: list[_Layer] = []
    merged: dict[str, Any] = {}
    if file:
        merged = read_file(file)
        layers.append({_json_path(p): f"file {file}, key {_KEY}" for p in _leaf_paths(merged)})
    env, env_origins = env_layer(environ)
    merged = deep_merge(merged, env)
    layers.append(env_origins)
    if overrides:
        merged = deep_merge(merged, overrides)
        names = flag_names or {}
        layers.append(
            {
                _json_path(p): f"flag {names[_dotted(p)]}" if _dotted(p) in names else "command-line flag"
                for p in _leaf_paths(overrides)
            }
        )
    try:
        return msgspec.convert(merged, Config, strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError(f"config error: {e} (from {_origin_of(str(e), layers)})") from None


def _json_path(path: tuple[str, ...]) -> str:
    return "$." + ".".join(path)


def _dotted(path: tuple[str, ...]) -> str:
    return ".".join(path)


def _leaf_paths(d: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for key, value in d.items():
        key = str(key)  # YAML keys may be ints or bools
        if isinstance(value, Mapping) and value:
            out.extend(_leaf_paths(value, (*prefix, key)))
        else:
            out.append((*prefix, key))
    return out


def effective(config: Config, role: str | None = None) -> dict[str, Any]:
    """The config as plain data; with a role, only that role's section and the shared ones."""
    data: dict[str, Any] = msgspec.to_builtins(config)
    if role is None:
        return data
    if role not in ROLE_SECTIONS:
        raise ConfigError(f"config error: unknown role {role!r}; expected one of {', '.join(ROLE_SECTIONS)}")
    return {key: data[key] for key in (*SHARED_SECTIONS, role)}
