"""The shipped monitoring (k8s/monitoring/) against a real Prometheus (Debian's 2.42) scraping a running
`etlrouter dev` with its mutual TLS: promtool accepts the rules, every target is up through HTTPS with the
bearer token, every alert and dashboard expression evaluates, every metric they name exists in the roles'
/metrics, and the router-down alert fires when a router freezes (SIGSTOP). promtool's rule unit tests
(rules_test.yml) show every alert firing on its fault's series."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import free_port, missing_dependency

MONITORING = Path(__file__).resolve().parents[2] / "k8s" / "monitoring"
METRIC = re.compile(r"\b(etlrouter_[a-z0-9_]+|process_[a-z0-9_]+)\b")
SUFFIXES = ("_bucket", "_sum", "_count", "_created", "_total")
LABELS = {"etlrouter_cluster", "etlrouter_role"}  # target labels the scrape configs add, not metrics


def rule_groups() -> dict[str, Any]:
    """The PrometheusRule's spec: exactly a Prometheus rules file."""
    return dict(yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())["spec"])


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups()["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    # Grafana's variables, as Grafana substitutes them with "All" selected.
    return [e.replace("$__rate_interval", "1m").replace("$namespace", ".*") for e in exprs]


def metric_names(exprs: list[str]) -> set[str]:
    return {m for e in exprs for m in METRIC.findall(e)} - LABELS


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing_dependency(f"{name} is not installed (Debian package prometheus; scripts/system-deps.sh)")
    return path


def test_promtool_accepts_the_rules(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(rule_groups()))
    result = subprocess.run([tool("promtool"), "check", "rules", str(rules)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_every_alert_fires_on_its_faults_series_and_not_on_a_healthy_cluster(tmp_path: Path) -> None:
    groups = rule_groups()
    for group in groups["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)  # compared verbatim by promtool; `check rules` checks them
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(groups))
    shutil.copy(Path(__file__).with_name("rules_test.yml"), tmp_path / "rules_test.yml")
    result = subprocess.run(
        [tool("promtool"), "test", "rules", "rules_test.yml"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", (tmp_path / "rules_test.yml").read_text()))
    assert tested == {rule["alert"] for rule in alert_rules()}  # every alert has its test


# -- etlrouter dev + Prometheus ----------------------------------------------------------------------------


@dataclass
class Dev:
    data: Path
    proc: subprocess.Popen[bytes]
    out: Path
    endpoints: dict[str, str]  # process name -> its /metrics URL

    def children(self) -> dict[str, int]:
        return dict(json.loads((self.data / "dev.json").read_text())["children"])


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[Dev]:
    data, out = tmp_path / "dev", tmp_path / "dev.out"
    command = [sys.executable, "-m", "etlrouter", "dev", "--no-view", "--data-dir", str(data)]
    with out.open("wb") as sink:
        proc = subprocess.Popen([*command, "--base-port", "0", "--rate", "500"], stdout=sink, stderr=sink)

    def endpoints() -> dict[str, str]:
        lines = [line.split() for line in out.read_text().splitlines() if line.startswith("/metrics")]
        return {words[1]: words[2] for words in lines} if len(lines) == 7 else {}

    try:
        found = wait_for(lambda: endpoints() or proc.poll() is not None, 90, "dev's /metrics lines")
        assert proc.poll() is None, out.read_text()[-3000:]
        yield Dev(data, proc, out, found)
    finally:
        for pid in (
            json.loads((data / "dev.json").read_text())["children"].values()
            if (data / "dev.json").exists()
            else ()
        ):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as reply:
            return json.loads(reply.read())

    def query(self, expr: str) -> dict[str, Any]:
        try:
            return dict(self.get("/api/v1/query", query=expr))
        except urllib.error.HTTPError as e:  # 400 with the error in the body
            return dict(json.loads(e.read()))

    def targets(self) -> list[dict[str, Any]]:
        return list(self.get("/api/v1/targets")["data"]["activeTargets"])

    def firing(self) -> set[str]:
        alerts = self.get("/api/v1/alerts")["data"]["alerts"]
        return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}


def scrape_config(dev: Dev, token_file: Path, rules: Path) -> dict[str, Any]:
    """The shipped jobs (k8s/monitoring/prometheus-scrape.yaml) with dev's processes as static targets and
    dev's CA and token as the files; the TLS and authorization settings are the shipped ones."""
    shipped = yaml.safe_load((MONITORING / "prometheus-scrape.yaml").read_text())["scrape_configs"]
    jobs = []
    for job in shipped:
        role = "router" if job["job_name"].endswith("-routers") else "sidecar"
        targets = [
            {
                "targets": [urllib.parse.urlparse(url).netloc],
                "labels": {"pod": name, "namespace": "", "etlrouter_cluster": "dev", "etlrouter_role": role},
            }
            for name, url in dev.endpoints.items()
            if name.startswith("router-") == (role == "router")
        ]
        job = {k: v for k, v in job.items() if k not in ("kubernetes_sd_configs", "relabel_configs")}
        # dev's certificates name 127.0.0.1 and localhost (dev/secure.py), not the cluster's DNS SAN.
        job["tls_config"] = {
            **job["tls_config"],
            "ca_file": str(dev.data / "pki" / "ca.crt"),
            "server_name": "localhost",
        }
        job["authorization"] = {**job["authorization"], "credentials_file": str(token_file)}
        jobs.append({**job, "static_configs": targets})
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": jobs,
    }


@pytest.fixture
def prometheus(dev: Dev, tmp_path: Path) -> Iterator[Prometheus]:
    binary = tool("prometheus")
    tokens = (dev.data / "pki" / "tokens.csv").read_text().splitlines()
    token_file = tmp_path / "token"
    token_file.write_text(next(line for line in tokens if not line.startswith("#")).split(",")[0])
    # The shipped alerts, each with its hold time (`for`) removed so that the test need not wait it out;
    # the expressions are unchanged.
    groups = rule_groups()
    for group in groups["groups"]:
        for rule in group["rules"]:
            rule["for"] = "0s"
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(groups))
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(dev, token_file, rules)))
    check = subprocess.run([tool("promtool"), "check", "config", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=log,
    )
    server = Prometheus(f"http://127.0.0.1:{port}")

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    try:
        wait_for(lambda: ready() or proc.poll() is not None, 60, "Prometheus ready")
        assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def exported_names(dev: Dev) -> set[str]:
    """Every metric family a router and a sidecar export (with no sample yet, too: the # TYPE lines)."""
    token = next(
        line
        for line in (dev.data / "pki" / "tokens.csv").read_text().splitlines()
        if not line.startswith("#")
    ).split(",")[0]
    context = ssl.create_default_context(cafile=str(dev.data / "pki" / "ca.crt"))
    names: set[str] = set()
    for url in dev.endpoints.values():
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10, context=context) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith("# TYPE "):
                    names.add(line.split()[2])
                elif line and not line.startswith("#"):
                    names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def exists(name: str, exported: set[str]) -> bool:
    return name in exported or any(name.endswith(s) and name[: -len(s)] in exported for s in SUFFIXES)


def test_prometheus_scrapes_dev_evaluates_every_rule_and_a_frozen_router_fires_its_alert(
    dev: Dev, prometheus: Prometheus
) -> None:
    def all_up() -> bool:
        targets = prometheus.targets()
        return len(targets) == 7 and all(t["health"] == "up" for t in targets)

    try:
        wait_for(all_up, 60, "all 7 targets up")
    except TimeoutError:
        raise AssertionError(json.dumps(prometheus.targets(), indent=1)[:4000]) from None

    used = metric_names([rule["expr"] for rule in alert_rules()]) | metric_names(dashboard_exprs())
    exported = exported_names(dev)
    assert sorted(n for n in used if not exists(n, exported)) == []

    # Records flow (the dashboard has something to show) before the expressions are judged.
    wait_for(
        lambda: prometheus.query("sum(etlrouter_source_acked_events_total) > 0")["data"]["result"], 60, "acks"
    )
    for expr in [rule["expr"] for rule in alert_rules()] + dashboard_exprs():
        answer = prometheus.query(expr)
        assert answer["status"] == "success", (expr, answer)

    # The fault: a router freezes (SIGSTOP). Its scrapes time out; the cluster goes on with two of three.
    # (A stalled sink cannot be staged in dev: its sidecar's discovery drops a service that stops answering
    # within 1.5 s; the starved-edge alert is shown by promtool's rule tests and test_starved_edge.py.)
    assert "EtlrouterRouterDown" not in prometheus.firing()
    router = dev.children()["router-2"]
    os.kill(router, signal.SIGSTOP)
    try:
        wait_for(lambda: "EtlrouterRouterDown" in prometheus.firing(), 60, "EtlrouterRouterDown firing")
        down = prometheus.query('ALERTS{alertname="EtlrouterRouterDown", alertstate="firing"}')
        assert {r["metric"]["pod"] for r in down["data"]["result"]} == {"router-2"}
    finally:
        os.kill(router, signal.SIGCONT)
