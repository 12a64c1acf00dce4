"""Who may call what: the one permission table of every API, and the decision for one call.

Parts of the cluster are authorized by what they are (the kind in their certificate); people and tools by
the permissions their roles grant. Everything not in a table is denied. Pure: the caller supplies the
identity and, for the rules that depend on the request, the facts (docs/security.md has the table as prose).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from etlrouter.core.metrics import AUTH_DENIALS
from etlrouter.security.identity import Identity

log = logging.getLogger(__name__)


class Permission(StrEnum):
    VIEWER = "viewer"  # queries, subscriptions, listings, metrics
    TAP = "tap"  # record contents: tap, a dead letter's record (data is sensitive: its own permission)
    EDITOR = "editor"  # apply, delete, redrive
    ADMIN = "admin"  # backup and restore, membership, leadership transfer


# What each role grants. `tap` is not implied by `editor`: changing pipelines is not reading their data.
ROLE_PERMISSIONS: dict[str, frozenset[Permission]] = {
    "viewer": frozenset({Permission.VIEWER}),
    "tap": frozenset({Permission.VIEWER, Permission.TAP}),
    "editor": frozenset({Permission.VIEWER, Permission.EDITOR}),
    "admin": frozenset(Permission),
}

# How a sidecar may be allowed: "any" sidecar, only for its "self" (the request names the caller's own
# id), or "upstream": the caller holds a stage that feeds the stage it sends to.
SidecarRule = Literal["no", "any", "self", "upstream"]


@dataclass(frozen=True)
class Rule:
    permission: Permission | None = None  # people and tools holding it may call; None: no person may
    routers: bool = False
    sidecars: SidecarRule = "no"
    # For sidecars="self": the request field holding the sidecar id ("open.sender_sidecar_id" for a path).
    self_field: str = ""


_ROUTERS = Rule(routers=True)
_VIEW = Rule(Permission.VIEWER, routers=True)
_EDIT = Rule(Permission.EDITOR, routers=True)
_ADMIN = Rule(Permission.ADMIN, routers=True)

# Every gRPC method a router or sidecar serves. Routers may call each other's admin APIs (a follower
# forwards, a joining node adds itself) and sidecars' admin APIs (GraphQL resolvers, after checking the
# person's permission themselves).
GRPC_RULES: dict[str, Rule] = {
    # Raft: routers only.
    "/etlrouter.v1.RaftService/AppendEntries": _ROUTERS,
    "/etlrouter.v1.RaftService/RequestVote": _ROUTERS,
    "/etlrouter.v1.RaftService/InstallSnapshot": _ROUTERS,
    "/etlrouter.v1.RaftService/TimeoutNow": _ROUTERS,
    # Sidecars act for themselves only.
    "/etlrouter.v1.SidecarCoordinator/RegisterSidecar": Rule(
        routers=True, sidecars="self", self_field="sidecar_id"
    ),
    "/etlrouter.v1.SidecarCoordinator/Heartbeat": Rule(
        routers=True, sidecars="self", self_field="sidecar_id"
    ),
    # The first request's sidecar id is checked here; the handler holds the stream to that id.
    "/etlrouter.v1.SidecarCoordinator/HeartbeatStream": Rule(
        routers=True, sidecars="self", self_field="sidecar_id"
    ),
    "/etlrouter.v1.SidecarCoordinator/DeregisterSidecar": Rule(
        Permission.ADMIN, routers=True, sidecars="self", self_field="sidecar_id"
    ),
    # Services registered directly (without a sidecar) by a tool.
    "/etlrouter.v1.ServiceRegistry/Register": _EDIT,
    "/etlrouter.v1.ServiceRegistry/Heartbeat": _EDIT,
    "/etlrouter.v1.ServiceRegistry/Deregister": _EDIT,
    "/etlrouter.v1.ServiceRegistry/Watch": Rule(Permission.VIEWER, routers=True, sidecars="any"),
    # Pipelines.
    "/etlrouter.v1.PipelineAdmin/ApplyPipelines": _EDIT,
    "/etlrouter.v1.PipelineAdmin/CreatePipeline": _EDIT,
    "/etlrouter.v1.PipelineAdmin/UpdatePipeline": _EDIT,
    "/etlrouter.v1.PipelineAdmin/DeletePipeline": _EDIT,
    "/etlrouter.v1.PipelineAdmin/GetPipeline": _VIEW,
    "/etlrouter.v1.PipelineAdmin/ListPipelines": _VIEW,
    "/etlrouter.v1.PipelineAdmin/ValidatePipelines": _VIEW,
    "/etlrouter.v1.PipelineAdmin/ExplainPipelines": _VIEW,
    "/etlrouter.v1.PipelineAdmin/ListServices": _VIEW,
    "/etlrouter.v1.PipelineAdmin/ListSidecars": _VIEW,
    "/etlrouter.v1.PipelineAdmin/GetClusterStatus": Rule(Permission.VIEWER, routers=True, sidecars="any"),
    "/etlrouter.v1.PipelineAdmin/GetLiveStats": _VIEW,
    "/etlrouter.v1.PipelineAdmin/AddMember": _ADMIN,
    "/etlrouter.v1.PipelineAdmin/RemoveMember": _ADMIN,
    "/etlrouter.v1.PipelineAdmin/TransferLeadership": _ADMIN,
    "/etlrouter.v1.BackupService/CreateSnapshot": _ADMIN,
    "/etlrouter.v1.BackupService/RestoreSnapshot": _ADMIN,
    # The data plane: an edge only from a sidecar that runs a stage feeding the receiving stage (or, for
    # dead letters, any sidecar sending as itself); a push from the pod's own identity or an editor.
    "/etlrouter.v1.SidecarDataPlane/ReceiveRecords": Rule(
        sidecars="upstream", self_field="open.sender_sidecar_id"
    ),
    "/etlrouter.v1.SidecarDataPlane/PushRecords": Rule(Permission.EDITOR, sidecars="self"),
    # A sidecar's inspection API.
    "/etlrouter.v1.SidecarAdmin/ListDeadLetters": _VIEW,
    "/etlrouter.v1.SidecarAdmin/GetDeadLetter": Rule(Permission.TAP, routers=True),
    "/etlrouter.v1.SidecarAdmin/RedriveDeadLetters": _EDIT,
    "/etlrouter.v1.SidecarAdmin/Tap": Rule(Permission.TAP, routers=True),
}

# Served to every authenticated caller: health checks and reflection describe nothing private.
OPEN_TO_AUTHENTICATED = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def rule_for(method: str) -> Rule | None:
    """The rule of a gRPC method path; None for the open ones. Unknown methods get a rule nobody meets."""
    if method.startswith(OPEN_TO_AUTHENTICATED):
        return None
    return GRPC_RULES.get(method, _NOBODY)


_NOBODY = Rule()


def permissions_of(identity: Identity) -> frozenset[Permission]:
    granted: set[Permission] = set()
    for role in identity.roles:
        granted |= ROLE_PERMISSIONS.get(role, frozenset())
    return frozenset(granted)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    # What is still to check against the request: "" (nothing), "self" or "upstream".
    then: str = ""
    missing: str = ""  # the permission or kind a denial names

    @property
    def message(self) -> str:
        return f"permission denied: requires {self.missing}"


ALLOW = Decision(True)


def decide(rule: Rule | None, identity: Identity) -> Decision:
    """May `identity` call a method with `rule`? Checks needing the request come back in `then`."""
    if rule is None:
        return ALLOW
    if identity.kind == "router":
        return ALLOW if rule.routers else Decision(False, missing=_needs(rule))
    if identity.kind == "sidecar":
        if rule.sidecars == "any":
            return ALLOW
        if rule.sidecars in ("self", "upstream"):
            return Decision(True, then=rule.sidecars)
        return Decision(False, missing=_needs(rule))
    if rule.permission is not None and rule.permission in permissions_of(identity):
        return ALLOW
    return Decision(False, missing=_needs(rule))


def _needs(rule: Rule) -> str:
    """How a denial names what the method requires."""
    wanted = []
    if rule.permission is not None:
        wanted.append(f"permission {rule.permission.value!r}")
    if rule.routers:
        wanted.append("a router identity")
    if rule.sidecars != "no":
        wanted.append("the sidecar's own identity" if rule.sidecars == "self" else "an upstream sidecar")
    return " or ".join(wanted) or "nothing any caller holds"


class DenialLog:
    """Every denial is counted; each (identity, what, missing) is logged once, then at most every
    `interval_s` with a count, so a caller retrying in a loop cannot flood the log."""

    def __init__(self, interval_s: float = 300.0) -> None:
        self.interval_s = interval_s
        self._last: dict[tuple[str, str, str], float] = {}
        self._suppressed: dict[tuple[str, str, str], int] = {}

    def report(
        self, identity: Identity, what: str, missing: str, *, api: str, reason: str = "denied"
    ) -> None:
        AUTH_DENIALS.labels(api=api, reason=reason).inc()
        key = (str(identity), what, missing)
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        if len(self._last) > 10_000:  # bounded: a storm of distinct identities cannot grow it forever
            self._last.clear()
            self._suppressed.clear()
        self._last[key] = now
        log.warning(
            "request %s",
            reason,
            extra={
                "fields": {
                    "identity": str(identity),
                    "via": identity.via,
                    "call": what,
                    "requires": missing,
                    "suppressed_since_last": self._suppressed.pop(key, 0),
                }
            },
        )


DENIALS = DenialLog()


# GraphQL: the permission of each root field (`Type.field`); any other Query or Subscription field needs
# `viewer`, any other Mutation field `admin` (a new mutation is closed until it is listed here).
GRAPHQL_FIELDS: dict[str, Permission] = {
    "Query.deadLetter": Permission.TAP,  # carries the record; `deadLetters` lists without it
    "Mutation.applyPipelines": Permission.EDITOR,
    "Mutation.deletePipeline": Permission.EDITOR,
    "Mutation.redriveDeadLetters": Permission.EDITOR,
}
_GRAPHQL_DEFAULT = {
    "Query": Permission.VIEWER,
    "Subscription": Permission.VIEWER,
    "Mutation": Permission.ADMIN,
}

# The HTTP endpoints of every role. Probes and the dashboard's static page are open (they reveal nothing;
# the page asks for a token and calls /graphql with it); /graphql needs `viewer` to be reached at all, then
# each root field its own permission.
HTTP_OPEN_PATHS = ("/healthz", "/readyz", "/")
HTTP_OPEN_PREFIXES = ("/dashboard/",)
HTTP_PATHS: dict[str, Permission] = {"/metrics": Permission.VIEWER, "/graphql": Permission.VIEWER}


def graphql_field_permission(type_name: str, field: str) -> Permission:
    return GRAPHQL_FIELDS.get(f"{type_name}.{field}", _GRAPHQL_DEFAULT.get(type_name, Permission.ADMIN))


def http_path_permission(path: str) -> Permission | None:
    """None for the open paths; unknown paths need `admin` (nothing is served unlisted)."""
    if path in HTTP_OPEN_PATHS or path.startswith(HTTP_OPEN_PREFIXES):
        return None
    return HTTP_PATHS.get(path, Permission.ADMIN)


def holds(identity: Identity, permission: Permission) -> bool:
    """People and tools by their roles; a router holds every permission (it is the cluster)."""
    return identity.kind == "router" or permission in permissions_of(identity)
