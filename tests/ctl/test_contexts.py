"""The client config file (contexts) and where ctl connects: --router > --context > ctl.router (env, file)
> the current context > the default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from etlrouter.cli import cli
from etlrouter.ctl import cli as ctl_cli
from etlrouter.ctl import contexts
from tests.ctl.test_grammar import FakeClient


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[list[str]]:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("ETLROUTER_CTL__ROUTER", raising=False)
    calls: list[list[str]] = []

    class Recording(FakeClient):
        def __init__(self, addresses: list[str], **kw: Any) -> None:
            calls.append(list(addresses))
            super().__init__(addresses, **kw)

    monkeypatch.setattr(ctl_cli, "RouterClient", Recording)
    return calls


def entry(name: str, pid: int, *routers: str) -> dict[str, Any]:
    return {"name": name, "routers": list(routers), "http": [], "credentials": {}, "owner": {"pid": pid}}


def test_the_file_lives_under_xdg_config_home(seen: list[list[str]], tmp_path: Path) -> None:
    assert contexts.config_path() == tmp_path / "etlrouter" / "config"


def test_where_ctl_connects(seen: list[list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    run = CliRunner().invoke
    assert run(cli, ["ctl", "list"]).exit_code == 0  # no file: the default
    contexts.put(entry("a", 1, "10.0.0.1:1", "10.0.0.2:1"))
    contexts.put(entry("b", 2, "10.0.0.3:1"))  # current now
    assert run(cli, ["ctl", "list"]).exit_code == 0
    assert run(cli, ["ctl", "list", "--context", "a"]).exit_code == 0
    assert run(cli, ["ctl", "list", "--context", "a", "--router", "10.9.9.9:1"]).exit_code == 0
    monkeypatch.setenv("ETLROUTER_CTL__ROUTER", "10.8.8.8:1")
    assert run(cli, ["ctl", "list"]).exit_code == 0
    assert run(cli, ["ctl", "--context", "a", "list"]).exit_code == 0
    assert seen == [
        ["127.0.0.1:7400"],
        ["10.0.0.3:1"],
        ["10.0.0.1:1", "10.0.0.2:1"],
        ["10.9.9.9:1"],
        ["10.8.8.8:1"],
        ["10.0.0.1:1", "10.0.0.2:1"],
    ]
    unknown = run(cli, ["ctl", "list", "--context", "nope"])
    assert (
        unknown.exit_code == 2 and "no context 'nope'" in unknown.output and "known: a, b" in unknown.output
    )


def test_a_dev_removes_only_its_own_context(seen: list[list[str]]) -> None:
    contexts.put(entry("dev", 1, "127.0.0.1:1"))
    contexts.put(entry("dev", 2, "127.0.0.1:2"))  # a second dev took it over
    assert not contexts.remove_if_owned("dev", 1)
    assert contexts.find()["owner"]["pid"] == 2  # type: ignore[index]
    assert contexts.remove_if_owned("dev", 2)
    assert contexts.find() is None and contexts.load()["contexts"] == []
