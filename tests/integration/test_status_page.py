"""The status page in headless Chromium: it loads, shows the phase, and updates in place
after a set-weight (the same page, driven over the DevTools protocol)."""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from .conftest import (
    ADMIN_TOKEN,
    HOLD,
    app_args,
    background_traffic,
    free_port,
    operator_env,
    serve_canary_cli,
    wait_for,
)

pytestmark = pytest.mark.integration
SCREENSHOT_DIR = os.environ.get("SERVE_CANARY_SCREENSHOT_DIR")  # set it to keep a screenshot of the page


class Page:
    """One Chromium tab over the DevTools protocol."""

    def __init__(self, websocket_url: str) -> None:
        self._socket = connect(websocket_url, max_size=None, open_timeout=10)
        self._ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        request_id = next(self._ids)
        self._socket.send(json.dumps({"id": request_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._socket.recv(timeout=30))
            if message.get("id") == request_id:
                assert "error" not in message, message
                return message["result"]

    def text(self, element_id: str) -> str | None:
        result = self.call(
            "Runtime.evaluate", expression=f"document.getElementById({element_id!r})?.textContent", returnByValue=True
        )
        return result["result"].get("value")

    def close(self) -> None:
        self._socket.close()


@pytest.fixture
def chromium(tmp_path) -> Iterator[callable]:
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail("chromium is not installed (`.ci/run` installs Debian's `chromium`)")
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--remote-debugging-port={port}",
            "--window-size=1280,1400",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pages = []

    def open_page(url: str) -> Page:
        def target():
            try:
                return next(
                    t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json() if t["type"] == "page"
                )
            except (httpx.HTTPError, StopIteration):
                return None

        page = Page(wait_for(target, 30, "chromium's DevTools endpoint")["webSocketDebuggerUrl"])
        pages.append(page)
        page.call("Page.navigate", url=url)
        return page

    yield open_page
    for page in pages:
        page.close()
    process.terminate()
    process.wait(timeout=10)


def test_status_page_shows_the_phase_and_follows_a_set_weight(deploy, chromium):
    app = deploy(app_args(rollout=HOLD))
    page_html = app.http.get("/-/canary/")
    assert page_html.status_code == 200 and "<script>" in page_html.text
    assert "http://" not in page_html.text and "https://" not in page_html.text  # self-contained

    page = chromium(f"{app.url}/-/canary/")
    wait_for(lambda: page.text("phase") == "init", 20, "the page to show the phase")
    assert page.text("weight") == "5%" and page.text("status") == "running"
    assert "test-llm: v1 → v2" == page.text("title")
    assert app.chat("u1").status_code == 200
    wait_for(lambda: "stable: queued p95" in page.text("load"), 20, "the page to show each arm's queueing")

    assert app.admin("PUT", "weight", json={"weight": 0.3}).status_code == 200
    wait_for(lambda: page.text("weight") == "30%", 10, "the page to follow the new weight")
    assert page.text("status") == "paused"
    assert "set the canary weight to 0.3" in page.text("events")

    screenshot = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
    assert screenshot.startswith(b"\x89PNG")
    if SCREENSHOT_DIR:
        Path(SCREENSHOT_DIR).mkdir(parents=True, exist_ok=True)
        (Path(SCREENSHOT_DIR) / "status_page.png").write_bytes(screenshot)


def test_page_actions_are_refused_without_the_admin_token_and_take_effect_with_it(deploy, chromium):
    app = deploy(app_args(rollout=HOLD))
    page = chromium(f"{app.url}/-/canary/")
    wait_for(lambda: page.text("status") == "running", 20, "the page to load")

    def click(command: str) -> None:
        page.call("Runtime.evaluate", expression=f"document.querySelector('[data-command={command}]').click()")

    click("pause")
    wait_for(lambda: (page.text("action-answer") or "").startswith("pause: 401"), 10, "the refusal shown")
    assert app.status()["status"] == "running"

    page.call(
        "Runtime.evaluate",
        expression=f"const t = document.getElementById('admin-token'); t.value = {ADMIN_TOKEN!r};"
        "t.dispatchEvent(new Event('input'));",
    )
    click("pause")
    wait_for(lambda: page.text("action-answer") == "pause: 200 paused at 5%", 10, "the pause answered")
    wait_for(lambda: page.text("status") == "paused", 10, "the page to show it paused")
    page.call("Runtime.evaluate", expression="document.getElementById('new-weight').value = '0.4'")
    click("weight")
    wait_for(lambda: page.text("weight") == "40%", 10, "the new weight")
    assert app.status()["canary_weight"] == 0.4
    stored = page.call(
        "Runtime.evaluate", expression="sessionStorage.getItem('serve-canary-admin-token')", returnByValue=True
    )
    assert stored["result"]["value"] == ADMIN_TOKEN  # held by the tab's session only


def test_the_rollout_report_opens_in_chromium_with_its_charts(deploy, chromium, tmp_path):
    phases = [{"name": "half", "weight": 0.5, "min_requests": 5}, {"name": "full", "weight": 1.0}]
    app = deploy(app_args(rollout={"interval_s": 0.5, "phases": phases}, canary_engine={"error_rate": 1.0}))
    with background_traffic(app):
        wait_for(lambda: app.status()["status"] == "rolled_back", 60, "the rollback")
    out = tmp_path / "report"
    token_env = operator_env(SERVE_CANARY_ADMIN_TOKEN=ADMIN_TOKEN)
    made = serve_canary_cli("--url", app.url, "report", "--out", str(out), env=token_env)
    assert made.returncode == 0, made.stderr
    assert (out / "weights.png").exists() and (out / "decision.png").exists()

    page = chromium((out / "report.html").as_uri())
    drawn = "[...document.images].filter((i) => i.complete && i.naturalWidth >= 900).length"
    wait_for(
        lambda: page.call("Runtime.evaluate", expression=drawn, returnByValue=True)["result"]["value"] == 2,
        10,
        "both charts drawn",
    )
    text = page.call("Runtime.evaluate", expression="document.body.innerText", returnByValue=True)["result"]["value"]
    assert "auto_rollback" in text and "test-llm: v1 → v2" in text and "error_rate" in text
    screenshot = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
    assert screenshot.startswith(b"\x89PNG")
    if SCREENSHOT_DIR:
        (Path(SCREENSHOT_DIR) / "report.png").write_bytes(screenshot)
