"""The client configuration file: named contexts (where a cluster is, and later how to authenticate to it)
and the current one, like a kubeconfig. `etlrouter dev` writes its context and makes it current; `etlrouter
ctl` uses the current context when no `--router` (flag, ETLROUTER_CTL__ROUTER or config file) is given.

Where: `$XDG_CONFIG_HOME/etlrouter/config`, else `~/.config/etlrouter/config` (tests set XDG_CONFIG_HOME;
no `ETLROUTER_*` variable is used, since those are configuration fields). The file is YAML:

    kind: EtlrouterConfig
    current-context: dev
    contexts:
      - name: dev
        routers: [127.0.0.1:17400, 127.0.0.1:17401, 127.0.0.1:17402]   # gRPC admin API
        http: [https://127.0.0.1:17480, …]                             # GraphQL at /graphql, dashboard at /
        credentials: {ca: …/ca.crt, cert: …/dev-admin.crt, key: …/dev-admin.key, trust_domain: …}
        owner: {pid: 4242, data_dir: /repo/.data/dev}                   # set by `etlrouter dev` only

Writers take an flock on `config.lock` beside it and replace the file atomically, so a dev starting while
another stops never loses the other's entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

KIND = "EtlrouterConfig"


def config_path() -> Path:
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg else Path.home() / ".config"
    return base / "etlrouter" / "config"


def load(path: Path | None = None) -> dict[str, Any]:
    path = path or config_path()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        data = None
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ContextError(f"cannot read {path}: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict) or not isinstance(data.get("contexts", []), list):
        raise ContextError(f"{path}: not an etlrouter client config (expected `contexts:` as a list)")
    data.setdefault("kind", KIND)
    data.setdefault("contexts", [])
    return data


class ContextError(Exception):
    pass


def find(name: str | None = None, path: Path | None = None) -> dict[str, Any] | None:
    """The named context, or the current one."""
    data = load(path)
    wanted = name or data.get("current-context")
    if not wanted:
        return None
    for entry in data["contexts"]:
        if isinstance(entry, dict) and entry.get("name") == wanted:
            return entry
    if name:
        known = ", ".join(str(c.get("name")) for c in data["contexts"] if isinstance(c, dict)) or "none"
        raise ContextError(f"no context {wanted!r} in {path or config_path()} (known: {known})")
    return None


@contextlib.contextmanager
def _editing(path: Path) -> Iterator[dict[str, Any]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = load(path)
        yield data
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        os.replace(tmp, path)


def put(entry: dict[str, Any], *, make_current: bool = True, path: Path | None = None) -> Path:
    """Add or replace the context `entry["name"]`; make it the current one."""
    path = path or config_path()
    with _editing(path) as data:
        data["contexts"] = [c for c in data["contexts"] if c.get("name") != entry["name"]] + [entry]
        if make_current:
            data["current-context"] = entry["name"]
    return path


def remove_if_owned(name: str, pid: int, path: Path | None = None) -> bool:
    """Remove the context only if it is still this process's (a later dev may have replaced it)."""
    path = path or config_path()
    if not path.exists():
        return False
    with _editing(path) as data:
        mine = [
            c for c in data["contexts"] if c.get("name") == name and (c.get("owner") or {}).get("pid") == pid
        ]
        if not mine:
            return False
        data["contexts"] = [c for c in data["contexts"] if c not in mine]
        if data.get("current-context") == name:
            data.pop("current-context")
    return True
