"""The `etlrouter` executable: one binary, the role chosen by subcommand or by --role / ETLROUTER_ROLE."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click
import msgspec
import yaml

from etlrouter import __version__
from etlrouter.cli_context import Context, fail_config
from etlrouter.core.config import ROLE_SECTIONS, ConfigError, effective
from etlrouter.core.logging import setup_logging
from etlrouter.ctl.cli import ctl

ROOT_OPTIONS_WITH_VALUE = ("--config", "--log-level", "--log-format", "--role")

ROOT_HELP = """\
ETL Router: move record batches between small gRPC services on Kubernetes.

\b
Roles (one executable, one asyncio loop per process):
  router     a member of the Raft-replicated router cluster: registry of services and
             sidecars, pipeline assignments, admin API, GraphQL, /metrics
  sidecar    runs beside a user service: discovers it by gRPC reflection, registers it,
             moves batches with credit-based backpressure, acks, DLQ and watermarks
  operator   turns EtlRouterCluster/EtlPipeline/EtlSource/EtlTransform/EtlSink custom
             resources into running clusters and pipelines; injects sidecars
  ctl        the command-line client of the router cluster's admin API
  dev        the whole system on one machine, on loopback, for trying it out

\b
In a container, `--role ROLE` (or ETLROUTER_ROLE=ROLE) selects the role without a subcommand.
Configuration: a YAML/TOML file (--config), then ETLROUTER_* environment variables, then flags.
`etlrouter config show --role ROLE` prints the effective configuration.
"""


def _drop_none(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None and v != ()}


@click.group(
    help=ROOT_HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(__version__, prog_name="etlrouter")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML or TOML config file.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="Log level.")
@click.option("--log-format", type=click.Choice(["auto", "text", "json"]), help="Text, JSON lines, or auto.")
@click.option(
    "--role",
    type=click.Choice(ROLE_SECTIONS),
    help="Run this role (same as the subcommand); also ETLROUTER_ROLE.",
)
@click.pass_context
def cli(
    ctx: click.Context,
    config_file: str | None,
    log_level: str | None,
    log_format: str | None,
    role: str | None,
) -> None:
    ctx.obj = Context(config_file=config_file, log_level=log_level, log_format=log_format)


@cli.command(help="Run a router node: Raft member, registry, placement, admin API, GraphQL, metrics.")
@click.option("--node-id", help="This node's id (must be among --peer ids when peers are given).")
@click.option("--grpc-port", type=int, help="Port of the gRPC server (Raft, control and admin APIs).")
@click.option("--http-port", type=int, help="Port of the HTTP server (GraphQL, /metrics, health).")
@click.option("--host", help="Address to listen on.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Where the Raft log and snapshots live.")
@click.option("--peer", "peers", multiple=True, metavar="ID=HOST:PORT", help="A bootstrap peer (repeat).")
@click.option(
    "--join",
    "join",
    multiple=True,
    metavar="HOST:PORT",
    help="Join an existing cluster through this router (repeat).",
)
@click.pass_obj
def router(
    obj: Context,
    node_id: str | None,
    grpc_port: int | None,
    http_port: int | None,
    host: str | None,
    data_dir: str | None,
    peers: Sequence[str],
    join: Sequence[str],
) -> None:
    section: dict[str, Any] = _drop_none({"node_id": node_id, "data_dir": data_dir})
    if grpc_port is not None or host:
        section["grpc"] = _drop_none({"port": grpc_port, "host": host})
    if http_port is not None or host:
        section["http"] = _drop_none({"port": http_port, "host": host})
    if peers:
        section["peers"] = [_parse_peer(p) for p in peers]
    if join:
        section["join"] = list(join)
    _run_role("router", obj, {"router": section} if section else {})


@cli.command(help="Run a sidecar beside a user service: discovery, registration, data plane.")
@click.option("--id", "sidecar_id", help="Stable sidecar id (the pod name); default: the host name.")
@click.option("--router", "routers", multiple=True, metavar="HOST:PORT", help="A router address (repeat).")
@click.option("--scan-ports", help='Local ports to scan for user services, e.g. "50051-50060".')
@click.option("--grpc-port", type=int, help="Port of the data-plane gRPC server.")
@click.option("--http-port", type=int, help="Port of the HTTP server (/metrics, health).")
@click.pass_obj
def sidecar(
    obj: Context,
    sidecar_id: str | None,
    routers: Sequence[str],
    scan_ports: str | None,
    grpc_port: int | None,
    http_port: int | None,
) -> None:
    section: dict[str, Any] = _drop_none({"id": sidecar_id, "scan_ports": scan_ports})
    if routers:
        section["routers"] = list(routers)
    if grpc_port is not None:
        section["grpc"] = {"port": grpc_port}
    if http_port is not None:
        section["http"] = {"port": http_port}
    _run_role("sidecar", obj, {"sidecar": section} if section else {})


@cli.command(help="Run the Kubernetes operator: CRD controllers and the sidecar injection webhook.")
@click.option("--namespace", help="Namespace to watch (default: all).")
@click.option(
    "--kubeconfig",
    type=click.Path(exists=True, dir_okay=False),
    help="Kubeconfig file (default: the pod's service account).",
)
@click.pass_obj
def operator(obj: Context, namespace: str | None, kubeconfig: str | None) -> None:
    section = _drop_none({"namespace": namespace, "kubeconfig": kubeconfig})
    _run_role("operator", obj, {"operator": section} if section else {})


@cli.command(
    help="Run a reference connector (a user service built on the SDK): etlrouter connector NAME [ARGS]...",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("name", required=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def connector(name: str | None, args: tuple[str, ...]) -> None:
    from etlrouter.connectors import CONNECTORS

    if name is None or name in ("-h", "--help"):
        click.echo("Usage: etlrouter connector NAME [ARGS]...  (NAME --help for its options)\n")
        click.echo("Connectors: " + ", ".join(sorted(CONNECTORS)))
        return
    main = CONNECTORS.get(name.replace("_", "-"))
    if main is None:
        raise click.UsageError(
            f"no connector {name!r}; choose one of: {', '.join(sorted(CONNECTORS))}",
            click.get_current_context(),
        )
    main(list(args))


@cli.command(help="Run a local cluster with sample services and pipelines on loopback.")
@click.argument("pipeline_file", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--data-dir", type=click.Path(file_okay=False), help="Logs, Raft logs, sink files (wiped on start)."
)
@click.option("--base-port", type=click.IntRange(0, 65535), help="First port of the layout; 0 = free ports.")
@click.option("--routers", type=click.IntRange(1, 7), help="Router nodes (default 3).")
@click.option(
    "--limit", type=click.IntRange(min=0), default=0, help="Stop after N records reached the sinks."
)
@click.option(
    "--rate", type=click.FloatRange(min=0), help="Generator records/s (default 1000; 0 = unlimited)."
)
@click.option(
    "--timeout", type=click.FloatRange(min=1), default=120.0, show_default=True, help="--limit deadline (s)."
)
@click.option("--no-view", is_flag=True, help="No live view: a summary line every few seconds instead.")
@click.option(
    "--example",
    type=click.Choice(["seed"]),
    help="Run a ready example with its servers: seed = examples/seed.etl (Kafka → filter → S3 and "
    "ClickHouse), starting the Kafka-protocol broker, S3 server and ClickHouse where installed and feeding "
    "the topic (--rate orders/s, default 200).",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Plaintext, no authentication (default: mutual TLS with a throw-away CA in the data dir).",
)
@click.pass_obj
def dev(
    obj: Context,
    pipeline_file: str | None,
    data_dir: str | None,
    base_port: int | None,
    routers: int | None,
    limit: int,
    rate: float | None,
    timeout: float,
    no_view: bool,
    example: str | None,
    insecure: bool,
) -> None:
    try:
        config = obj.load(
            {"dev": _drop_none({"data_dir": data_dir, "base_port": base_port, "routers": routers})}
        )
    except ConfigError as err:
        fail_config(err)
    from etlrouter.dev import DevOptions, SpecError, load_spec, run_dev  # imported late: keeps `--help` fast

    seed = None
    if example is not None:
        if pipeline_file is not None or limit:
            click.echo(
                "etlrouter dev: --example runs its own pipelines until stopped: no PIPELINE_FILE, no --limit",
                err=True,
            )
            sys.exit(2)
        from etlrouter.dev.example import SeedExample

        seed = SeedExample.find()
        spec = seed.spec()
    else:
        try:
            text = None if pipeline_file is None else open(pipeline_file, encoding="utf-8").read()  # noqa: SIM115
            spec = load_spec(text, pipeline_file or "sample.etl")
        except (OSError, SpecError) as err:
            click.echo(f"etlrouter dev: {err}", err=True)
            sys.exit(2)
    options = DevOptions(
        spec=spec,
        data_dir=Path(config.dev.data_dir),
        base_port=config.dev.base_port,
        routers=config.dev.routers,
        limit=limit,
        rate=rate,
        view=not no_view,
        timeout_s=timeout,
        insecure=insecure,
        example=seed,
    )
    sys.exit(run_dev(options))


@cli.group(name="config", help="Inspect configuration.")
def config_group() -> None:
    pass


@config_group.command(name="show", help="Print the effective configuration (defaults < file < env < flags).")
@click.option(
    "--role", type=click.Choice(ROLE_SECTIONS), help="Only this role's section and the shared ones."
)
@click.option("-o", "--output", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True)
@click.pass_obj
def config_show(obj: Context, role: str | None, output: str) -> None:
    try:
        data = effective(obj.load(), role)
    except ConfigError as err:
        fail_config(err)
    if output == "json":
        click.echo(msgspec.json.format(msgspec.json.encode(data)).decode())
    else:
        click.echo(yaml.safe_dump(data, sort_keys=False).rstrip())


cli.add_command(ctl)

# The conformance kit and the delivery oracle (src/etlrouter/conformance/); their bodies live there.
from etlrouter.conformance.command import conformance as _conformance  # noqa: E402
from etlrouter.conformance.command import verify as _verify  # noqa: E402

cli.add_command(_conformance)
cli.add_command(_verify)


def _parse_peer(spec: str) -> dict[str, str]:
    node, sep, address = spec.partition("=")
    if not sep or not node or not address:
        raise click.BadParameter(f"{spec!r}: expected ID=HOST:PORT", param_hint="--peer")
    return {"id": node, "address": address}


def _run_role(role: str, obj: Context, overrides: Mapping[str, Any]) -> None:
    try:
        config = obj.load(overrides)
    except ConfigError as err:
        fail_config(err)
    setup_logging(role, config.logging.level, config.logging.format)
    from etlrouter.roles import run_role  # imported late: keeps `--help` fast

    sys.exit(run_role(role, config))


def apply_role_argument(argv: list[str], environ: Mapping[str, str]) -> list[str]:
    """`etlrouter --role X ARGS` -> `etlrouter X ARGS`; ETLROUTER_ROLE=X likewise without a subcommand.

    Root options come first; the first argument that is not one of them either names a subcommand (which
    wins) or starts the role's own arguments, before which the role is inserted.
    """
    role: str | None = environ.get("ETLROUTER_ROLE") or None
    root: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if name == "--role":
            if "=" in arg:
                role = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                role = argv[i + 1]
                i += 1
        elif name in ROOT_OPTIONS_WITH_VALUE:
            root.append(arg)
            if "=" not in arg and i + 1 < len(argv):
                root.append(argv[i + 1])
                i += 1
        elif arg in ("-h", "--help", "--version"):
            root.append(arg)
        else:
            break
        i += 1
    rest = argv[i:]
    if rest and rest[0] in cli.commands:
        return root + rest
    if role and not (set(root) & {"-h", "--help", "--version"}):
        return [*root, role, *rest]
    return root + rest


def main(argv: Sequence[str] | None = None) -> None:
    args = apply_role_argument(list(sys.argv[1:] if argv is None else argv), os.environ)
    cli.main(args=args, prog_name="etlrouter")


if __name__ == "__main__":
    main()
