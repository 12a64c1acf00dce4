"""The dashboard with authentication on, in headless Chromium: it asks for a token, then works with it."""

from __future__ import annotations

from typing import Any

from tests.dashboard.conftest import ARTIFACTS
from tests.security.conftest import SecureCluster


def test_the_dashboard_asks_for_a_token_and_works_with_one(
    secure_cluster: SecureCluster, browser: Any
) -> None:
    port = secure_cluster.routers.http_ports[secure_cluster.routers.ids[0]]
    # The test CA is not the browser's: accept its certificate for this context only.
    context = browser.new_context(viewport={"width": 1280, "height": 800}, ignore_https_errors=True)
    page = context.new_page()
    try:
        page.goto(f"https://127.0.0.1:{port}/")
        login = page.locator("#login")
        login.wait_for(state="visible", timeout=20_000)
        assert "token" in page.locator("#login-why").inner_text().lower()
        assert "Live" not in page.locator("#connection").inner_text()
        page.fill("#login input[name=token]", secure_cluster.pki.tokens["viewer"])
        page.click("#login button[type=submit]")
        page.get_by_text("● Live").wait_for(timeout=20_000)
        page.locator("#dags").get_by_text("clean").first.wait_for(timeout=20_000)
        assert login.is_hidden()
        # A viewer cannot redrive: the mutation's 403 names the permission (shown, not swallowed).
        answer = page.evaluate(
            """async (token) => {
                 const query = 'mutation { redriveDeadLetters { redriven } }';
                 const headers = {'Content-Type': 'application/json', Authorization: `Bearer ${token}`};
                 const r = await fetch('graphql', {method: 'POST', headers, body: JSON.stringify({query})});
                 return [r.status, (await r.json()).errors[0].message];
               }""",
            secure_cluster.pki.tokens["viewer"],
        )
        assert answer[0] == 403 and "'editor'" in answer[1]
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "auth-final.png"), full_page=True)
        context.close()
