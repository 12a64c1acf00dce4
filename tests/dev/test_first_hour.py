"""The first hour (#22): `etlrouter dev` in one terminal, `etlrouter ctl` with no flags in another; a second
dev on the same data directory changes nothing of the first one's."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, free_port
from tests.dev.test_dev_system import children, dev_command


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_ctl_finds_dev_by_its_context_and_a_second_dev_destroys_nothing(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config-home")}
    config_file = tmp_path / "config-home" / "etlrouter" / "config"
    proc = subprocess.Popen(
        dev_command(data, "--rate", "200"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "etlrouter", "ctl", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=tmp_path,  # nowhere near the repository: nothing but the context says where the cluster is
        )

    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            if config_file.exists():
                listed = ctl("-o", "json", "list")
                if listed.returncode == 0 and len(json.loads(listed.stdout)) == 2:
                    break
            assert time.monotonic() < deadline, "dev did not come up with its context"
            time.sleep(0.5)

        config = yaml.safe_load(config_file.read_text())
        assert config["current-context"] == "dev"
        (context,) = config["contexts"]
        assert context["owner"] == {"pid": proc.pid, "data_dir": str(data)}
        assert len(context["routers"]) == 3 and "credentials" in context

        table = ctl("list")
        assert table.returncode == 0, table.stderr
        assert "orders-archive" in table.stdout and "NAME" in table.stdout
        before, after = ctl("-o", "json", "list"), ctl("list", "-o", "json")
        assert before.returncode == after.returncode == 0, before.stderr + after.stderr
        names = lambda out: sorted(p["name"] for p in json.loads(out))  # noqa: E731
        assert names(before.stdout) == names(after.stdout) == ["orders-archive", "orders-warehouse"]
        assert {p["phase"] for p in json.loads(after.stdout)} <= {"PENDING", "RUNNING"}

        # The file dev says it runs is what it applied.
        same = subprocess.run(
            [sys.executable, "-m", "etlrouter", "ctl", "apply", "-f", "examples/dev.etl", "-o", "json"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=ROOT,
        )
        assert same.returncode == 0, same.stderr
        assert [c["action"] for c in json.loads(same.stdout)["changes"]] == ["UNCHANGED", "UNCHANGED"]

        # `cluster status` through a follower shows the leader's view of every member.
        status = json.loads(ctl("cluster", "status", "-o", "json").stdout)
        follower = next(m["address"] for m in status["members"] if m["id"] != status["leader"])
        through = ctl("cluster", "status", "--router", follower, "-o", "json")
        assert through.returncode == 0, through.stderr
        view = json.loads(through.stdout)
        assert view["view"] == "leader" and view["answered_by"] == status["leader"]
        assert all(m["reachable"] and m["match_index"] > 0 for m in view["members"]), view

        # The README's curl, with the address and the credentials the context gives (dev is secure by
        # default: https, its own CA, its admin certificate).
        creds = context["credentials"]
        assert context["http"][0].startswith("https://") and set(creds) >= {"ca", "cert", "key"}
        tls = ssl.create_default_context(cafile=creds["ca"])
        tls.load_cert_chain(creds["cert"], creds["key"])
        with pytest.raises(urllib.error.HTTPError) as refused:  # without credentials: 401
            urllib.request.urlopen(
                urllib.request.Request(
                    context["http"][0] + "/graphql", data=b"{}", headers={"content-type": "application/json"}
                ),
                timeout=10,
                context=ssl.create_default_context(cafile=creds["ca"]),
            )
        assert refused.value.code == 401
        request = urllib.request.Request(
            context["http"][0] + "/graphql",
            data=json.dumps(
                {"query": "{ cluster { leaderId term commitIndex } pipelines { name phase dagId } }"}
            ).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10, context=tls) as reply:
            answer = json.loads(reply.read())
        assert "errors" not in answer, answer
        assert sorted(p["name"] for p in answer["data"]["pipelines"]) == [
            "orders-archive",
            "orders-warehouse",
        ]
        assert {p["phase"] for p in answer["data"]["pipelines"]} <= {"PENDING", "RUNNING"}

        # A second dev on the same data directory, while the first one is frozen (so nothing it writes moves
        # the hashes): it stops with its message and changes not one byte.
        pids = [proc.pid, *children(data).values()]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            hashes = tree_hashes(data)
            assert any(name.startswith("sinks/") for name in hashes) and any("routers/" in n for n in hashes)
            second = subprocess.run(
                dev_command(data, "--limit", "10"), capture_output=True, text=True, timeout=60, env=env
            )
            assert tree_hashes(data) == hashes
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"{data} is in use by another `etlrouter dev` (pid {proc.pid}); nothing was changed" in (
            second.stderr
        )
        assert yaml.safe_load(config_file.read_text())["contexts"][0]["owner"]["pid"] == proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=90)[0]
    assert proc.returncode == 0, out[-3000:]
    # Its context goes with it; ctl then fails at once, naming where it looked.
    assert yaml.safe_load(config_file.read_text()).get("contexts") == []
    env["ETLROUTER_CTL__TIMEOUT_S"] = "60"  # a retrying ctl would take a minute; a failing-fast one, moments
    started = time.monotonic()
    gone = ctl("list", "--router", f"127.0.0.1:{free_port()}")  # not 7400: another cluster may be there
    assert gone.returncode == 3
    assert time.monotonic() - started < 20
    assert "connection refused" in gone.stderr and "--router" in gone.stderr
