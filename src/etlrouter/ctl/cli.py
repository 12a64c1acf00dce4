"""`etlrouter ctl`: manage pipelines and inspect the router cluster.

Exit codes: 0 ok, 1 runtime error, 2 invalid input (bad DSL, bad flags), 3 cannot reach the cluster.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
import zlib
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import msgspec
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from etlrouter._proto.v1 import admin_grpc, admin_pb2, dataplane_grpc, dataplane_pb2
from etlrouter.cli_context import Context
from etlrouter.client.router import ClusterUnreachableError, RouterClient
from etlrouter.core.config import Config, ConfigError, CtlConfig
from etlrouter.ctl import contexts
from etlrouter.ctl.output import render
from etlrouter.dsl import EXPLAIN_FORMATS, DslErrors, explain_file, validate_file
from etlrouter.security.context import Security, SecurityError
from etlrouter.security.identity import SIDECAR

T = TypeVar("T")

EXIT_OK, EXIT_RUNTIME, EXIT_INVALID, EXIT_UNREACHABLE = 0, 1, 2, 3


def die(message: str, code: int) -> NoReturn:
    click.echo(message, err=True)
    sys.exit(code)


def read_pipeline_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        die(f"cannot read {path}: {e.strerror}", EXIT_INVALID)
    except UnicodeDecodeError as e:
        die(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})", EXIT_INVALID)


def _global_options() -> list[click.Option]:
    """The options every ctl command accepts, before or after its name (`ctl -o json list` is `ctl list -o
    json`, as with kubectl)."""
    return [
        click.Option(
            ["--router", "router_address"],
            metavar="HOST:PORT",
            help="Router address (also ETLROUTER_CTL__ROUTER); default: the current context's routers.",
        ),
        click.Option(
            ["--context", "context_name"],
            metavar="NAME",
            help="Context of the client config file to use (default: its current-context).",
        ),
        click.Option(["-o", "--output"], type=click.Choice(["table", "json", "yaml"]), help="Output format."),
        click.Option(["--ca"], metavar="FILE", help="CA bundle the routers' certificates chain to (tls.ca)."),
        click.Option(["--cert"], metavar="FILE", help="Client certificate (tls.cert); roles in its O=."),
        click.Option(["--key"], metavar="FILE", help="Key of the client certificate (tls.key)."),
        click.Option(
            ["--token"], metavar="TOKEN|@FILE", help="Bearer token instead of a certificate (ctl.token)."
        ),
    ]


_GLOBAL_NAMES = ("router_address", "context_name", "output", "ca", "cert", "key", "token")


def _remember(obj: Context, values: dict[str, Any]) -> None:
    overrides = dict(obj.ctl_overrides)
    for key, value in values.items():
        if value is not None:  # given after the command: wins over the same option before it
            overrides[key] = value
    obj.ctl_overrides = overrides


@click.group(help="Manage pipelines and inspect the router cluster.", params=_global_options())
@click.pass_obj
def ctl(obj: Context, /, **values: str | None) -> None:
    obj.ctl_overrides = {}
    _remember(obj, values)


def file_options(command: Callable[..., None]) -> Callable[..., None]:
    """A file given by `-f FILE` (as with kubectl) or, equally, as the positional argument."""
    command = click.argument("file_arg", metavar="[FILE]", required=False, type=click.Path(dir_okay=False))(
        command
    )
    return click.option(
        "-f", "--file", "file_opt", metavar="FILE", type=click.Path(dir_okay=False), help="The file."
    )(command)


def one_file(file_opt: str | None, file_arg: str | None) -> str:
    if file_opt and file_arg and file_opt != file_arg:
        die(f"two files given ({file_opt} and {file_arg}): give one, with -f", EXIT_INVALID)
    file = file_opt or file_arg
    if not file:
        die("no file given: -f FILE", EXIT_INVALID)
    return file


def _diagnostic_rows(errors: Sequence[Any]) -> list[dict[str, Any]]:
    return [
        {"file": e.filename, "line": e.line, "column": e.col, "message": e.message, "hint": e.hint or ""}
        for e in errors
    ]


@ctl.command(
    help="Check a pipeline file offline: syntax, options, kinds. Prints every problem with file:line:col."
)
@file_options
@click.pass_obj
def validate(obj: Context, file_opt: str | None, file_arg: str | None) -> None:
    file = one_file(file_opt, file_arg)
    read_pipeline_file(file)  # clear error for unreadable files before the DSL sees them
    errors = validate_file(file)
    fmt = _output(obj)
    if errors:
        if fmt == "table":
            more = [errors.more_line()] if errors.omitted else []
            die("\n\n".join([*(e.render() for e in errors), *more]), EXIT_INVALID)
        report: dict[str, object] = {"valid": False, "errors": _diagnostic_rows(errors)}
        if errors.omitted:
            report["more_errors"] = errors.omitted
        click.echo(render(report, fmt))
        sys.exit(EXIT_INVALID)
    click.echo(render({"valid": True, "file": file}, fmt) if fmt != "table" else f"{file}: valid")


@ctl.command(
    help="Show the merged DAGs a pipeline file produces: which pipelines share which stages. "
    "-o json|yaml prints the plan as data (--format json)."
)
@file_options
@click.option(
    "--format", "fmt", type=click.Choice(EXPLAIN_FORMATS), help="Default: tree (json with -o json)."
)
@click.pass_obj
def explain(obj: Context, file_opt: str | None, file_arg: str | None, fmt: str | None) -> None:
    file = one_file(file_opt, file_arg)
    read_pipeline_file(file)
    output = _output(obj)
    try:
        if fmt is None and output != "table":
            plan = json.loads(explain_file(file, "json"))
            click.echo(render(plan, output))
            return
        click.echo(explain_file(file, fmt or "tree").rstrip("\n"))  # type: ignore[arg-type]
    except DslErrors as e:
        if output != "table":
            click.echo(render({"valid": False, "errors": _diagnostic_rows(e.errors)}, output))
            sys.exit(EXIT_INVALID)
        die(str(e), EXIT_INVALID)


def _config(obj: Context) -> Config:
    overrides = {"output": obj.ctl_overrides["output"]} if obj.ctl_overrides.get("output") else {}
    if obj.ctl_overrides.get("router_address"):
        overrides["router"] = obj.ctl_overrides["router_address"]
    try:
        return obj.load({"ctl": overrides})
    except ConfigError as e:
        die(str(e), EXIT_INVALID)


def _output(obj: Context) -> str:
    return _config(obj).ctl.output


# ---------------------------------------------------------------------------------------------------------
# Commands that talk to the router cluster.


def _targets(obj: Context, config: Config) -> tuple[list[str], str]:
    """The router addresses to use and where they came from. The `--router` flag wins; then `--context`;
    then ctl.router from ETLROUTER_CTL__ROUTER or the config file; then the current context (what
    `etlrouter dev` writes); else the built-in default."""
    name = obj.ctl_overrides.get("context_name")
    if obj.ctl_overrides.get("router_address"):
        return [config.ctl.router], "--router"
    if config.ctl.router != CtlConfig().router and not name:
        return [config.ctl.router], "ctl.router (ETLROUTER_CTL__ROUTER or the config file)"
    try:
        entry = contexts.find(name)
    except contexts.ContextError as e:
        die(f"error: {e}", EXIT_INVALID)
    if entry and entry.get("routers"):
        where = f"context {entry.get('name')!r} of {contexts.config_path()}"
        return [str(a) for a in entry["routers"]], where
    return [config.ctl.router], f"the default (no current context in {contexts.config_path()})"


def _credentials(obj: Context, config: Config) -> Security:
    """How ctl authenticates: flags win, then tls.* / ctl.token (env or config file), then the context's
    `credentials` (what `etlrouter dev` writes)."""
    given = obj.ctl_overrides
    try:
        entry = contexts.find(given.get("context_name")) or {}
    except contexts.ContextError:
        entry = {}
    stored = entry.get("credentials") or {}

    def pick(flag: str, configured: str) -> str:
        return str(given.get(flag) or configured or stored.get(flag) or "")

    token = pick("token", config.ctl.token)
    if token.startswith("@"):
        try:
            token = Path(token[1:]).read_text(encoding="utf-8").strip()
        except OSError as e:
            die(f"--token {token}: cannot read: {e.strerror}", EXIT_INVALID)
    tls = {
        "ca": pick("ca", config.tls.ca),
        "cert": pick("cert", config.tls.cert),
        "key": pick("key", config.tls.key),
    }
    if token and not tls["ca"]:
        die("a token needs TLS: give --ca (the CA bundle of the cluster) too", EXIT_INVALID)
    domain = str(stored.get("trust_domain") or config.tls.trust_domain)
    try:
        return Security(
            msgspec.structs.replace(config.tls, trust_domain=domain, **tls), config.auth, client_token=token
        )
    except (SecurityError, ValueError) as e:
        die(f"error: {e}", EXIT_INVALID)


def _client(obj: Context) -> tuple[RouterClient, str, str]:
    config = _config(obj)
    addresses, source = _targets(obj, config)
    client = RouterClient(
        addresses,
        timeout=config.ctl.timeout_s,
        transport_config=config.transport,
        fail_fast_refused=True,
        security=_credentials(obj, config),
    )
    return client, config.ctl.output, source


def run_call(obj: Context, work: Callable[[RouterClient], Awaitable[T]]) -> tuple[T, str]:
    """Run one client interaction; map failures onto ctl's exit codes."""
    client, fmt, source = _client(obj)

    async def go() -> T:
        try:
            return await work(client)
        finally:
            client.close()

    try:
        return asyncio.run(go()), fmt
    except ClusterUnreachableError as e:
        hint = f"\nhint: the addresses came from {source}"
        if e.refused:
            hint += "; nothing listens there. Is the cluster (`make run` / `etlrouter dev`) running?"
        elif client.security is None or not client.security.enabled:
            hint += "; if the cluster serves TLS (etlrouter dev does), give --ca with --cert/--key or --token"
        die(f"error: {e}{hint}\nanother cluster: --router HOST:PORT or --context NAME", EXIT_UNREACHABLE)
    except OSError as e:
        die(f"error: {e}", EXIT_RUNTIME)
    except GRPCError as e:
        code = EXIT_INVALID if e.status in _INVALID_STATUSES else EXIT_RUNTIME
        die(f"error: {e.status.name}: {e.message}", code)


_INVALID_STATUSES = frozenset(
    {
        Status.INVALID_ARGUMENT,
        Status.NOT_FOUND,
        Status.ALREADY_EXISTS,
        Status.FAILED_PRECONDITION,
        Status.OUT_OF_RANGE,
    }
)
# Enum values are spelt as the GraphQL API spells them (api/static/schema.graphql), in every -o format.
_PHASES = {0: "UNKNOWN", 1: "PENDING", 2: "RUNNING", 3: "DEGRADED"}
_ACTIONS = {0: "UNKNOWN", 1: "CREATED", 2: "UPDATED", 3: "UNCHANGED", 4: "DELETED"}
_KINDS = {0: "UNKNOWN", 1: "SOURCE", 2: "TRANSFORM", 3: "SINK", 4: "LOOKUP"}
_HEALTH = {0: "UNKNOWN", 1: "SERVING", 2: "DEGRADED", 3: "NOT_SERVING"}


def _pipeline_row(p: admin_pb2.Pipeline) -> dict[str, Any]:
    return {
        "name": p.name,
        "phase": _PHASES.get(p.phase, "unknown"),
        "generation": p.generation,
        "dag": p.dag_id,
        "stages": len(p.stage_ids),
        "conditions": list(p.conditions),
    }


def _print_diagnostics(diagnostics: Sequence[admin_pb2.Diagnostic], fmt: str) -> None:
    if fmt == "table":
        for d in diagnostics:
            click.echo(f"{d.file}:{d.line}:{d.column}: error: {d.message}", err=True)
            if d.excerpt:
                click.echo(d.excerpt, err=True)
            if d.hint:
                click.echo(f"hint: {d.hint}", err=True)
    else:
        rows = [
            {"file": d.file, "line": d.line, "column": d.column, "message": d.message, "hint": d.hint}
            for d in diagnostics
        ]
        click.echo(render({"applied": False, "errors": rows}, fmt))


@ctl.command(
    help="Create or update every pipeline in FILE (idempotent). --prune deletes pipelines the file dropped."
)
@file_options
@click.option("--dry-run", is_flag=True, help="Check and report what would change, change nothing.")
@click.option(
    "--prune", is_flag=True, help="Delete pipelines applied earlier from this file that it no longer has."
)
@click.pass_obj
def apply(obj: Context, file_opt: str | None, file_arg: str | None, dry_run: bool, prune: bool) -> None:
    file = one_file(file_opt, file_arg)
    text = read_pipeline_file(file)
    errors = validate_file(file)  # offline first: a broken file never waits for a cluster
    if errors:
        fmt = _output(obj)
        if fmt == "table":
            die("\n\n".join(e.render() for e in errors), EXIT_INVALID)
        click.echo(render({"applied": False, "errors": _diagnostic_rows(errors)}, fmt))
        sys.exit(EXIT_INVALID)
    request = admin_pb2.ApplyPipelinesRequest(definition=text, filename=file, dry_run=dry_run, prune=prune)
    reply, fmt = run_call(
        obj, lambda c: c.call(admin_grpc.PipelineAdminStub, "ApplyPipelines", request, write=True)
    )
    if reply.diagnostics:
        _print_diagnostics(reply.diagnostics, fmt)
        sys.exit(EXIT_INVALID)
    rows = [
        {"pipeline": c.name, "action": _ACTIONS.get(c.action, "?"), "generation": c.generation}
        for c in reply.changes
    ]
    if fmt == "table":
        for row in rows:
            suffix = " (dry run)" if dry_run else ""
            action = str(row["action"]).lower()
            click.echo(f"pipeline/{row['pipeline']} {action} (generation {row['generation']}){suffix}")
    else:
        click.echo(render({"dry_run": dry_run, "revision": reply.revision, "changes": rows}, fmt))


@ctl.command(name="list", help="List pipelines with their phase.")
@click.option("--stale", is_flag=True, help="Answer from the contacted router without asking the leader.")
@click.pass_obj
def list_pipelines(obj: Context, stale: bool) -> None:
    request = admin_pb2.ListPipelinesRequest(consistency=_consistency(stale))
    reply, fmt = run_call(
        obj, lambda c: c.call(admin_grpc.PipelineAdminStub, "ListPipelines", request, any_node=stale)
    )
    click.echo(render([_pipeline_row(p) for p in reply.pipelines], fmt))


@ctl.command(help="Show one pipeline in short form (`list` shows all).")
@click.argument("name")
@click.pass_obj
def get(obj: Context, name: str) -> None:
    reply, fmt = run_call(
        obj,
        lambda c: c.call(
            admin_grpc.PipelineAdminStub, "GetPipeline", admin_pb2.GetPipelineRequest(name=name)
        ),
    )
    click.echo(render([_pipeline_row(reply.pipeline)], fmt))


@ctl.command(help="Show a pipeline in full: definition, conditions, stages and where each runs.")
@click.argument("name")
@click.pass_obj
def describe(obj: Context, name: str) -> None:
    async def work(c: RouterClient) -> tuple[admin_pb2.PipelineResponse, admin_pb2.ListPipelinesResponse]:
        one = await c.call(
            admin_grpc.PipelineAdminStub, "GetPipeline", admin_pb2.GetPipelineRequest(name=name)
        )
        listing = await c.call(
            admin_grpc.PipelineAdminStub, "ListPipelines", admin_pb2.ListPipelinesRequest()
        )
        sidecars = await c.call(admin_grpc.PipelineAdminStub, "ListSidecars", admin_pb2.ListSidecarsRequest())
        return one, listing, sidecars  # type: ignore[return-value]

    (one, listing, sidecars), fmt = run_call(obj, work)  # type: ignore[misc]
    p = one.pipeline
    where: dict[str, list[str]] = {}
    for sidecar in sidecars.sidecars:
        for stage in sidecar.stages:
            where.setdefault(stage.stage_id, []).append(f"{sidecar.sidecar_id}#{stage.replica}")
    dag = next((d for d in listing.dags if d.id == p.dag_id), None)
    stages = [
        {
            "id": s.id,
            "kind": _KINDS.get(s.kind, "?"),
            "service": s.service,
            "parallelism": s.parallelism,
            "shared_with": [x for x in s.pipelines if x != p.name],
            "running_on": where.get(s.id, []),
        }
        for s in (dag.stages if dag else [])
        if s.id in set(p.stage_ids)
    ]
    data = {**_pipeline_row(p), "revision": p.revision, "definition": p.definition, "stages": stages}
    if fmt != "table":
        click.echo(render(data, fmt))
        return
    click.echo(f"Name:        {p.name}\nPhase:       {data['phase']}")
    click.echo(f"Generation:  {p.generation}\nDAG:         {p.dag_id}")
    for condition in p.conditions:
        click.echo(f"Condition:   {condition}")
    click.echo("Stages:")
    click.echo("  " + render(stages, "table").replace("\n", "\n  "))
    click.echo("Definition:\n  " + p.definition.strip().replace("\n", "\n  "))


@ctl.command(help="Delete a pipeline.")
@click.argument("name")
@click.option("--generation", type=int, default=0, help="Only if the pipeline is at this generation.")
@click.pass_obj
def delete(obj: Context, name: str, generation: int) -> None:
    request = admin_pb2.DeletePipelineRequest(name=name, expected_generation=generation)
    reply, fmt = run_call(
        obj, lambda c: c.call(admin_grpc.PipelineAdminStub, "DeletePipeline", request, write=True)
    )
    if fmt == "table":
        click.echo(f"pipeline/{name} deleted")
    else:
        click.echo(render({"deleted": name, "revision": reply.revision}, fmt))


@ctl.command(help="List registered services.")
@click.pass_obj
def services(obj: Context) -> None:
    reply, fmt = run_call(
        obj, lambda c: c.call(admin_grpc.PipelineAdminStub, "ListServices", admin_pb2.ListServicesRequest())
    )
    rows = [
        {
            "name": s.name,
            "kind": _KINDS.get(s.kind, "?"),
            "endpoint": s.endpoint,
            "sidecar": s.sidecar_id or "(direct)",
        }
        for s in reply.services
    ]
    click.echo(render(rows, fmt))


@ctl.command(help="List sidecars with health, load and the stages they run.")
@click.pass_obj
def sidecars(obj: Context) -> None:
    reply, fmt = run_call(
        obj, lambda c: c.call(admin_grpc.PipelineAdminStub, "ListSidecars", admin_pb2.ListSidecarsRequest())
    )
    rows = [
        {
            "id": s.sidecar_id,
            "address": s.data_address,
            "health": _HEALTH.get(s.health, "unknown"),
            "heartbeat_age_ms": s.last_heartbeat_age_ms,
            "records_per_s": round(s.load.records_per_second, 1),
            "services": [x.name for x in s.services],
            "stages": len(s.stages),
        }
        for s in reply.sidecars
    ]
    click.echo(render(rows, fmt))


@ctl.group(help="The router cluster itself.")
def cluster() -> None:
    pass


@cluster.command(
    name="status",
    help="Members, leader, term, commit/apply index and per-member lag, as the leader sees them "
    "(asked through a follower, ctl asks the leader; if it cannot, it says the view is a follower's).",
)
@click.pass_obj
def cluster_status(obj: Context) -> None:
    async def work(c: RouterClient) -> tuple[admin_pb2.ClusterStatus, bool]:
        reply = await c.call(
            admin_grpc.PipelineAdminStub,
            "GetClusterStatus",
            admin_pb2.GetClusterStatusRequest(),
            any_node=True,
        )
        if reply.node_id == reply.leader_id or not reply.leader_address:
            return reply, reply.node_id == reply.leader_id
        try:  # only the leader tracks match index, lag and reachability of every member
            stub = admin_grpc.PipelineAdminStub(c.channel(reply.leader_address))
            leader = await stub.GetClusterStatus(admin_pb2.GetClusterStatusRequest(), timeout=c.timeout)
        except (GRPCError, OSError, TimeoutError, StreamTerminatedError):
            return reply, False
        return leader, leader.node_id == leader.leader_id

    (reply, leader_view), fmt = run_call(obj, work)
    members = [
        {
            "id": m.id,
            "address": m.address,
            "role": "leader" if m.leader else ("voter" if m.voter else "learner"),
            # a follower does not know the others' progress: unknown, not 0
            "match_index": m.match_index if leader_view or m.id == reply.node_id else None,
            "lag": m.lag if leader_view or m.id == reply.node_id else None,
            "reachable": m.reachable if leader_view or m.id == reply.node_id else None,
        }
        for m in reply.members
    ]
    view_of = "leader" if leader_view else "follower"
    if fmt != "table":
        data = {
            "leader": reply.leader_id,
            "term": reply.term,
            "commit_index": reply.commit_index,
            "applied_index": reply.applied_index,
            "answered_by": reply.node_id,
            "view": view_of,
            "members": members,
        }
        click.echo(render(data, fmt))
        return
    note = "" if leader_view else ", a follower: the leader is unreachable, other members' progress unknown"
    click.echo(
        f"leader {reply.leader_id or '(none)'}  term {reply.term}  commit {reply.commit_index}  "
        f"applied {reply.applied_index}  (answered by {reply.node_id}{note})"
    )
    click.echo(render(members, "table"))


def _membership(obj: Context, method: str, request: Any) -> None:
    reply, fmt = run_call(obj, lambda c: c.call(admin_grpc.PipelineAdminStub, method, request, write=True))
    members = [
        {"id": m.id, "address": m.address, "voter": m.voter, "leader": m.leader} for m in reply.members
    ]
    click.echo(render(members, fmt))


@cluster.command(
    name="add-member", help="Add a router (started with no peers and --join) as a learner, then a voter."
)
@click.argument("node_id")
@click.argument("address", metavar="HOST:PORT")
@click.option("--learner-only", is_flag=True, help="Do not promote it to a voter.")
@click.pass_obj
def cluster_add_member(obj: Context, node_id: str, address: str, learner_only: bool) -> None:
    request = admin_pb2.AddMemberRequest(node_id=node_id, address=address, learner_only=learner_only)
    _membership(obj, "AddMember", request)


@cluster.command(
    name="remove-member", help="Remove a router from the cluster (leadership moves first if needed)."
)
@click.argument("node_id")
@click.pass_obj
def cluster_remove_member(obj: Context, node_id: str) -> None:
    _membership(obj, "RemoveMember", admin_pb2.RemoveMemberRequest(node_id=node_id))


@cluster.command(
    name="transfer-leader", help="Move leadership to NODE_ID (default: the most up-to-date voter)."
)
@click.argument("node_id", required=False, default="")
@click.pass_obj
def cluster_transfer_leader(obj: Context, node_id: str) -> None:
    _membership(obj, "TransferLeadership", admin_pb2.TransferLeadershipRequest(node_id=node_id))


@ctl.group(help="Back up the replicated state, or restore it into a fresh cluster.")
def backup() -> None:
    pass


@backup.command(name="create", help="Write a consistent snapshot of the cluster state to FILE.")
@file_options
@click.pass_obj
def backup_create(obj: Context, file_opt: str | None, file_arg: str | None) -> None:
    file = one_file(file_opt, file_arg)

    async def work(c: RouterClient) -> tuple[admin_pb2.SnapshotInfo, bytes]:
        stub = admin_grpc.BackupServiceStub(c.channel(await _leader_address(c)))
        chunks = await stub.CreateSnapshot(admin_pb2.CreateSnapshotRequest(), timeout=c.timeout)
        data = b"".join(chunk.data for chunk in chunks)
        if zlib.crc32(data) != chunks[-1].crc32:
            raise GRPCError(Status.DATA_LOSS, "snapshot CRC mismatch while downloading")
        return chunks[0].info, data

    (info, snapshot), fmt = run_call(obj, work)
    Path(file).write_bytes(snapshot)
    data = {"file": file, "index": info.index, "term": info.term, "bytes": info.size}
    click.echo(
        render(data, fmt)
        if fmt != "table"
        else f"snapshot at index {info.index} ({info.size} bytes) -> {file}"
    )


@backup.command(
    name="restore", help="Replace the state of a fresh cluster (no pipelines) with the snapshot in FILE."
)
@file_options
@click.pass_obj
def backup_restore(obj: Context, file_opt: str | None, file_arg: str | None) -> None:
    file = one_file(file_opt, file_arg)
    try:
        data = Path(file).read_bytes()
    except OSError as e:
        die(f"cannot read {file}: {e.strerror}", EXIT_INVALID)

    async def work(c: RouterClient) -> admin_pb2.RestoreSnapshotResponse:
        address = await _leader_address(c)
        chunks = [
            admin_pb2.SnapshotChunk(data=data[i : i + (1 << 20)], last=i + (1 << 20) >= len(data))
            for i in range(0, max(len(data), 1), 1 << 20)
        ]
        chunks[-1].crc32 = zlib.crc32(data)
        stub = admin_grpc.BackupServiceStub(c.channel(address))
        return await stub.RestoreSnapshot(chunks, timeout=c.timeout)

    reply, fmt = run_call(obj, work)
    data_out = {"index": reply.index, "pipelines": reply.pipelines, "services": reply.services}
    click.echo(
        render(data_out, fmt)
        if fmt != "table"
        else f"restored: {reply.pipelines} pipelines, {reply.services} services"
    )


async def _leader_address(c: RouterClient) -> str:
    """Streaming calls go straight to the leader: ask any router where it is."""
    status = await c.call(
        admin_grpc.PipelineAdminStub, "GetClusterStatus", admin_pb2.GetClusterStatusRequest(), any_node=True
    )
    if not status.leader_address:
        raise ClusterUnreachableError(f"router {status.node_id} knows no leader (no quorum?)")
    return str(status.leader_address)


def _consistency(stale: bool) -> Any:
    return admin_pb2.READ_CONSISTENCY_STALE if stale else admin_pb2.READ_CONSISTENCY_LINEARIZABLE


# ---------------------------------------------------------------------------------------------------------
# Dead letters and taps live on the sidecars: ctl finds them through the router's sidecar list.


async def _sidecar_addresses(c: RouterClient) -> dict[str, str]:
    reply = await c.call(admin_grpc.PipelineAdminStub, "ListSidecars", admin_pb2.ListSidecarsRequest())
    return {s.sidecar_id: s.data_address for s in reply.sidecars}


_ERROR_CLASSES = {0: "UNSPECIFIED", 1: "TRANSIENT", 2: "PERMANENT", 3: "REJECTED"}


def _letter_row(sidecar_id: str, letter: Any) -> dict[str, Any]:
    return {
        "id": letter.id,
        "sidecar": sidecar_id,
        "pipeline": letter.pipeline,
        "stage": letter.stage_id,
        "service": letter.service,
        "class": _ERROR_CLASSES.get(letter.error_class, "?"),
        "reason": letter.reason,
        "error": letter.error,
    }


@ctl.group(help="Dead letters: records that failed permanently, kept by the sidecars with their provenance.")
def dlq() -> None:
    pass


@dlq.command(name="list", help="List dead letters across all sidecars.")
@click.option("--pipeline", default="", help="Only this pipeline.")
@click.option("--stage", "stage_id", default="", help="Only this stage id.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True, help="Per sidecar.")
@click.pass_obj
def dlq_list(obj: Context, pipeline: str, stage_id: str, limit: int) -> None:
    async def work(c: RouterClient) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for sidecar_id, address in (await _sidecar_addresses(c)).items():
            stub = dataplane_grpc.SidecarAdminStub(c.channel(address, SIDECAR))
            request = dataplane_pb2.ListDeadLettersRequest(pipeline=pipeline, stage_id=stage_id, limit=limit)
            reply = await stub.ListDeadLetters(request, timeout=c.timeout)
            rows += [_letter_row(sidecar_id, letter) for letter in reply.dead_letters]
        return rows

    rows, fmt = run_call(obj, work)
    click.echo(render(rows, fmt, columns=["id", "sidecar", "pipeline", "stage", "class", "reason", "error"]))


async def _find_letter(c: RouterClient, letter_id: str) -> tuple[str, str, Any]:
    for sidecar_id, address in (await _sidecar_addresses(c)).items():
        stub = dataplane_grpc.SidecarAdminStub(c.channel(address, SIDECAR))
        try:
            letter = await stub.GetDeadLetter(
                dataplane_pb2.GetDeadLetterRequest(id=letter_id), timeout=c.timeout
            )
        except GRPCError as e:
            if e.status == Status.NOT_FOUND:
                continue
            raise
        return sidecar_id, address, letter
    raise GRPCError(Status.NOT_FOUND, f"no sidecar holds dead letter {letter_id!r}")


@dlq.command(name="show", help="Show one dead letter with its record and provenance.")
@click.argument("letter_id")
@click.pass_obj
def dlq_show(obj: Context, letter_id: str) -> None:
    (sidecar_id, _, letter), fmt = run_call(obj, lambda c: _find_letter(c, letter_id))
    data = {
        **_letter_row(sidecar_id, letter),
        "attempts": letter.attempts,
        "batch_id": letter.batch_id,
        "source": f"{letter.source_id}/{letter.partition}",
        "record": {
            "offset": letter.record.offset,
            "event_time_ms": letter.record.event_time_ms,
            "key": letter.record.key.decode(errors="replace"),
            "value": letter.record.value.decode(errors="replace"),
            "headers": dict(letter.record.headers),
        },
    }
    click.echo(render(data, "yaml" if fmt == "table" else fmt))


@dlq.command(name="redrive", help="Send dead letters back into the stage they failed at (or --to STAGE).")
@click.argument("letter_ids", nargs=-1)
@click.option("--pipeline", default="", help="Redrive every letter of this pipeline (when no ids are given).")
@click.option("--to", "target_stage", default="", help="Stage id to send them to.")
@click.pass_obj
def dlq_redrive(obj: Context, letter_ids: Sequence[str], pipeline: str, target_stage: str) -> None:
    if not letter_ids and not pipeline:
        die("give dead-letter ids or --pipeline", EXIT_INVALID)

    async def work(c: RouterClient) -> tuple[int, dict[str, str]]:
        redriven, failed = 0, {}
        for address in (await _sidecar_addresses(c)).values():
            stub = dataplane_grpc.SidecarAdminStub(c.channel(address, SIDECAR))
            request = dataplane_pb2.RedriveDeadLettersRequest(
                ids=list(letter_ids), pipeline=pipeline, target_stage_id=target_stage
            )
            reply = await stub.RedriveDeadLetters(request, timeout=max(c.timeout, 60))
            redriven += reply.redriven
            failed.update({k: v for k, v in reply.failed.items() if not letter_ids or k in letter_ids})
        return redriven, failed

    (redriven, failed), fmt = run_call(obj, work)
    click.echo(
        render({"redriven": redriven, "failed": failed}, fmt) if fmt != "table" else f"redriven {redriven}"
    )
    for letter_id, why in failed.items():
        click.echo(f"not redriven {letter_id}: {why}", err=True)
    if failed:
        sys.exit(EXIT_RUNTIME)


@ctl.command(help="Show a live sample of the records passing a stage of a pipeline (Ctrl-C to stop).")
@click.argument("pipeline")
@click.argument("stage", metavar="STAGE")
@click.option(
    "--sample", "sample_rate", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True
)
@click.option("--limit", type=click.IntRange(min=0), default=20, show_default=True, help="0 = until Ctrl-C.")
@click.pass_obj
def tap(obj: Context, pipeline: str, stage: str, sample_rate: float, limit: int) -> None:
    """STAGE is a stage id or the name of the service the stage calls."""

    fmt = _output(obj)

    async def work(c: RouterClient) -> int:
        one = await c.call(
            admin_grpc.PipelineAdminStub, "GetPipeline", admin_pb2.GetPipelineRequest(name=pipeline)
        )
        listing = await c.call(
            admin_grpc.PipelineAdminStub, "ListPipelines", admin_pb2.ListPipelinesRequest()
        )
        dag = next(d for d in listing.dags if d.id == one.pipeline.dag_id)
        stage_ids = set(one.pipeline.stage_ids)
        matches = [s.id for s in dag.stages if s.id in stage_ids and stage in (s.id, s.service)]
        if not matches:
            raise GRPCError(
                Status.NOT_FOUND, f"pipeline {pipeline} has no stage {stage!r} (a stage id or service)"
            )
        sidecars = await c.call(admin_grpc.PipelineAdminStub, "ListSidecars", admin_pb2.ListSidecarsRequest())
        holders = [
            s.data_address for s in sidecars.sidecars if any(p.stage_id == matches[0] for p in s.stages)
        ]
        if not holders:
            raise GRPCError(Status.FAILED_PRECONDITION, f"stage {matches[0]} is not running on any sidecar")
        stub = dataplane_grpc.SidecarAdminStub(c.channel(holders[0], SIDECAR))
        request = dataplane_pb2.TapRequest(
            dag_id=dag.id, stage_id=matches[0], sample_rate=sample_rate, limit=limit
        )
        shown = 0
        async with stub.Tap.open() as stream:
            await stream.send_message(request, end=True)
            async for event in stream:
                record = event.record
                if fmt == "table":
                    click.echo(
                        f"offset={record.offset} key={record.key.decode(errors='replace')} "
                        f"value={record.value.decode(errors='replace')[:200]}"
                        + (f"  (dropped so far: {event.dropped})" if event.dropped else "")
                    )
                else:  # one JSON object per line (JSON Lines), or one YAML document per record
                    row = {
                        "offset": record.offset,
                        "event_time_ms": record.event_time_ms,
                        "key": record.key.decode(errors="replace"),
                        "value": record.value.decode(errors="replace"),
                        "headers": dict(record.headers),
                        "dropped": event.dropped,
                    }
                    text = msgspec.json.encode(row).decode() if fmt == "json" else render(row, "yaml")
                    click.echo(text if fmt == "json" else f"---\n{text}")
                shown += 1
        return shown

    run_call(obj, work)


def _install_global_options(command: click.Command) -> None:
    """Give every command and group under `ctl` the global options, so they may follow the verb."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _install_global_options(sub)
    if command is ctl:
        return
    command.params.extend(_global_options())
    callback = command.callback
    assert callback is not None

    @functools.wraps(callback)
    def with_globals(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name, None) for name in _GLOBAL_NAMES}
        obj = click.get_current_context().find_object(Context)
        if obj is not None:
            _remember(obj, values)
        return callback(*args, **kwargs)

    command.callback = with_globals


_install_global_options(ctl)
