"""The dashboard in headless Chromium against a running local cluster (real routers, sidecars, services):
the merged DAG of the sample pipelines, live edge rates (on the leader and on a follower), backpressure when
a sink stalls, a DLQ record redriven from the page, a dead sidecar, and the page behind a path-prefix proxy
that goes away and returns.

Screenshots: test-artifacts/dashboard/*.png (gitignored)."""

from __future__ import annotations

import json
import time
from typing import Any

from tests.dashboard.conftest import GUARDED_RECORDS, DashboardSystem, graphql, screenshot
from tests.dashboard.proxy import prefix_proxy
from tests.e2e.processes import wait_until

TIMEOUT_MS = 20_000
EDGE_STATS = (
    "{ stats { edges { from to recordsPerSecond starvedRatio inFlightBatches oldestInFlightSeconds } } }"
)


def open_dashboard(page: Any, url: str) -> None:
    page.goto(url)
    page.get_by_text("● Live").wait_for(timeout=TIMEOUT_MS)


def stage(page: Any, stage_id: str) -> Any:
    return page.locator(f'[data-stage="{stage_id}"]')


def edge(page: Any, src: str, dst: str) -> Any:
    return page.locator(f'[data-edge="{src}>{dst}"]')


def svg_text(locator: Any) -> str:
    """SVG elements have no innerText: their text content, as a screen reader gets it."""
    return str(locator.text_content() or "")


def edge_rate(page: Any, src: str, dst: str) -> float:
    value = edge(page, src, dst).locator(".edge-rate").get_attribute("data-rate")
    return float(value) if value else 0.0


def poll(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_shows_the_merged_dag_of_the_sample_pipelines(system: DashboardSystem, page: Any) -> None:
    open_dashboard(page, f"http://127.0.0.1:{system.leader_http}/")
    dag = system.dag_of("valid-orders")
    assert sorted(dag["pipelines"]) == ["orders-archive", "orders-warehouse"]
    ids = {s["service"]: s["id"] for s in dag["stages"]}
    for service in ("orders", "valid-orders", "archive", "warehouse"):
        stage(page, ids[service]).wait_for(timeout=TIMEOUT_MS)
    # One source and one filter, shared by both pipelines, fanning out to two sinks: four stages, three edges.
    box = page.locator(".dag-box", has=stage(page, ids["valid-orders"]))
    assert box.locator("[data-stage]").count() == 4 and box.locator("[data-edge]").count() == 3
    assert "shared \u00d72" in svg_text(stage(page, ids["valid-orders"]))
    assert "shared \u00d72" in svg_text(stage(page, ids["orders"]))
    assert "shared" not in svg_text(stage(page, ids["archive"]))
    for a, b in (("orders", "valid-orders"), ("valid-orders", "archive"), ("valid-orders", "warehouse")):
        assert edge(page, ids[a], ids[b]).count() == 1
    # Keyboard: the filter stage is focusable and Enter opens its details with its assignment.
    stage(page, ids["valid-orders"]).focus()
    page.keyboard.press("Enter")
    details = page.locator("#details")
    details.get_by_text("sc-filter #0").wait_for(timeout=TIMEOUT_MS)
    assert "orders-archive, orders-warehouse" in details.inner_text()
    screenshot(page, "dag")


def test_edge_rate_rises_while_data_flows(system: DashboardSystem, page: Any) -> None:
    open_dashboard(page, f"http://127.0.0.1:{system.leader_http}/")
    src, mid = system.stage_id("orders"), system.stage_id("valid-orders")
    edge(page, src, mid).wait_for(timeout=TIMEOUT_MS)
    poll(lambda: edge_rate(page, src, mid) > 200, 20, "the orders -> valid-orders edge to show > 200 rec/s")
    label = svg_text(edge(page, src, mid).locator(".edge-rate"))
    assert "rec/s" in label
    # The same number over curl-style HTTP: the page shows only what the API serves.
    edges = graphql(system.leader_http, "{ stats { edges { from to recordsPerSecond } } }")["stats"]["edges"]
    assert any(e["from"] == src and e["to"] == mid and e["recordsPerSecond"] > 0 for e in edges)
    screenshot(page, "rates")


def test_the_page_on_a_follower_shows_edge_rates(system: DashboardSystem, page: Any) -> None:
    open_dashboard(page, f"http://127.0.0.1:{system.follower_http()}/")
    src, mid = system.stage_id("orders"), system.stage_id("valid-orders")
    edge(page, src, mid).wait_for(timeout=TIMEOUT_MS)
    poll(lambda: edge_rate(page, src, mid) > 200, 20, "the follower's page to show > 200 rec/s on the edge")
    # The follower fetched them from the leader, and the page says so; no "unavailable" note.
    assert "forwarded from the leader" in page.locator("#stats-source").inner_text()
    assert page.locator("#follower-note").is_hidden()
    screenshot(page, "follower")


def test_a_stalled_sink_shows_backpressure_on_its_edge(system: DashboardSystem, page: Any) -> None:
    open_dashboard(page, f"http://127.0.0.1:{system.leader_http}/")
    mid, sink = system.stage_id("valid-orders"), system.stage_id("warehouse")
    target = edge(page, mid, sink)
    target.wait_for(timeout=TIMEOUT_MS)
    poll(lambda: edge_rate(page, mid, sink) > 100, 30, "records flowing to the warehouse sink")
    assert "backpressure" not in (target.get_attribute("class") or "")
    stall = system.workdir / "warehouse.stall"
    stall.touch()  # the sink stops finishing WriteBatch: its edge runs out of credits
    try:
        stalled = time.monotonic()
        try:
            poll(
                lambda: "backpressure" in (target.get_attribute("class") or ""),
                15,
                "backpressure on the edge",
            )
        except AssertionError:
            edges = graphql(system.leader_http, EDGE_STATS)["stats"]["edges"]
            raise AssertionError(f"no backpressure shown; the API says {edges}") from None
        print(f"\nbackpressure shown {time.monotonic() - stalled:.1f} s after the sink stalled")
        assert "⚠ backpressure" in svg_text(target) and "warehouse not keeping up" in svg_text(target)
        assert target.get_attribute("data-origin") == "true"
        # Only the stalled branch's edge: its sibling into `archive` is idle, not starved.
        assert "backpressure" not in (
            edge(page, mid, system.stage_id("archive")).get_attribute("class") or ""
        )
        screenshot(page, "backpressure")
    finally:
        stall.unlink()
    poll(lambda: "backpressure" not in (target.get_attribute("class") or ""), 30, "the backpressure to clear")


def dead_letters(system: DashboardSystem) -> list[dict[str, Any]]:
    query = '{ deadLetters(pipeline: "guarded") { total letters { id sidecar } } }'
    letters: list[dict[str, Any]] = graphql(system.leader_http, query)["deadLetters"]["letters"]
    return letters


def audit_offsets(system: DashboardSystem) -> set[int]:
    path = system.workdir / "audit.jsonl"
    if not path.exists():
        return set()
    return {json.loads(line)["offset"] for line in path.read_text().split("\n")[:-1] if line.strip()}


def test_a_dead_letter_is_inspected_and_redriven_from_the_page(system: DashboardSystem, page: Any) -> None:
    poison = {n for n in range(GUARDED_RECORDS) if n % 100 == 0}
    wait_until(lambda: len(dead_letters(system)) == len(poison), 60, "the poison records in the DLQ")
    # The fix: the filter comes back with a safe expression on the same port.
    system.procs.kill("guard")
    port = system.ports["guard"]
    system.procs.start(
        "guard",
        ["-m", "etlrouter.connectors.filter", "--name", "guard", "--port", str(port), "--expr", "true"],
    )
    open_dashboard(page, f"http://127.0.0.1:{system.leader_http}/")
    rows = page.locator("#dlq-table tbody tr")
    rows.first.wait_for(timeout=TIMEOUT_MS)
    page.locator("#dlq-filter select[name=pipeline]").select_option("guarded")
    page.get_by_role("button", name="Show").click()
    poll(lambda: rows.count() == len(poison), 10, "the three dead letters listed")
    first = rows.first
    letter_id = first.get_attribute("data-letter")
    assert "sc-filter" in first.inner_text() and "PERMANENT" in first.inner_text()  # the GraphQL spelling
    first.get_by_role("button", name="Inspect").click()
    letter = page.locator("#letter")
    letter.get_by_text("provenance").wait_for(timeout=TIMEOUT_MS)
    assert "source ticks, partition 0" in letter.inner_text() and "division" in letter.inner_text().lower()
    screenshot(page, "dlq-inspect")

    def redrive() -> bool:
        page.locator(f'#dlq-table tr[data-letter="{letter_id}"]').get_by_role(
            "button", name="Redrive"
        ).click()
        outcome = page.locator("#dlq-outcome")
        # The page gives up after 70 s, so an answer (or "failed") always shows within this poll.
        poll(lambda: "Redriven" in outcome.inner_text() or "failed" in outcome.inner_text(), 75, "redrive")
        if "✔ Redriven 1 dead letter" not in outcome.inner_text():
            print(f"\nredrive not done yet: {outcome.inner_text()}")
            return False
        return True

    # The restarted filter may take a moment to be reachable; a redrive that failed leaves the letter listed.
    poll(redrive, 150, "a successful redrive from the page")
    poll(lambda: page.locator(f'tr[data-letter="{letter_id}"]').count() == 0, 10, "the letter gone")
    assert rows.count() == len(poison) - 1
    wait_until(lambda: len(audit_offsets(system) & poison) == 1, 30, "the redriven record in the sink")
    screenshot(page, "dlq-redriven")


def test_behind_a_path_prefix_and_when_the_api_goes_away(system: DashboardSystem, page: Any) -> None:
    with prefix_proxy(system.leader_http, "/etl") as proxy:
        open_dashboard(page, proxy.url)
        stage(page, system.stage_id("valid-orders")).wait_for(timeout=TIMEOUT_MS)
        proxy.set_down(True)
        alert = page.locator("#alert")
        alert.get_by_text("unreachable").wait_for(timeout=TIMEOUT_MS)
        assert f"{proxy.url}graphql".replace("http:", "ws:") in alert.inner_text()
        assert "Connection lost" in page.locator("#connection").inner_text()
        assert stage(page, system.stage_id("valid-orders")).count() == 1  # the last data stays on screen
        screenshot(page, "api-unreachable")
        proxy.set_down(False)
        page.get_by_text("reconnected at").wait_for(timeout=TIMEOUT_MS)
        assert alert.is_hidden()
        screenshot(page, "reconnected")


def test_killing_a_sidecar_turns_it_unhealthy(system: DashboardSystem, page: Any) -> None:
    open_dashboard(page, f"http://127.0.0.1:{system.leader_http}/")
    row = page.locator('#sidecar-table tr[data-sidecar="sc-warehouse"]')
    row.wait_for(timeout=TIMEOUT_MS)
    poll(lambda: row.get_attribute("data-health") == "SERVING", 10, "sc-warehouse serving")
    assert "✔ serving" in row.inner_text()
    system.procs.kill("sc-warehouse")
    killed = time.monotonic()
    poll(lambda: row.get_attribute("data-health") == "UNHEALTHY", 15, "sc-warehouse shown unhealthy")
    print(f"\nsidecar shown unhealthy {time.monotonic() - killed:.1f} s after it was killed")
    assert "✖" in row.inner_text()
    screenshot(page, "sidecar-killed")


def test_fits_a_laptop_screen_without_sideways_scrolling(system: DashboardSystem, page: Any) -> None:
    open_dashboard(page, f"http://127.0.0.1:{system.leader_http}/")
    page.locator("[data-edge]").first.wait_for(timeout=TIMEOUT_MS)
    for width, height in ((1280, 800), (1366, 768), (1024, 768)):
        page.set_viewport_size({"width": width, "height": height})
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        sticking_out = page.evaluate(
            """[...document.querySelectorAll('body *')]
                 .filter(e => e.getBoundingClientRect().right > window.innerWidth + 0.5)
                 .slice(0, 5).map(e => e.tagName.toLowerCase() + (e.id ? '#' + e.id : ''))"""
        )
        assert overflow <= 0, f"{overflow} px wider than a {width}x{height} window: {sticking_out}"
        screenshot(page, f"laptop-{width}x{height}")
