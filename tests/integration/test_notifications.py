"""Transition notifications to a real local HTTP receiver, next to one that is down."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from .conftest import app_args, free_port, wait_for

pytestmark = pytest.mark.integration
HOLD = {
    "interval_s": 0.5,
    "phases": [{"name": "init", "weight": 0.05, "min_duration_s": 3600}, {"name": "full", "weight": 1.0}],
}


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[dict]]]:
    """A webhook receiver on localhost: its URL and the bodies it was sent, in order."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
            received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            """Quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()


def test_transitions_reach_the_receiver_in_order_while_a_down_one_retries(deploy, receiver):
    url, received = receiver
    down = f"http://127.0.0.1:{free_port()}/nobody-listens"
    targets = [{"url": down}, {"url": url, "events": ["start", "pause", "rolled_back"]}]
    app = deploy(app_args(rollout=HOLD, notifications=targets))
    wait_for(lambda: len(received) >= 1, 30, "the start notification")
    assert app.admin("POST", "pause").status_code == 200
    assert app.admin("POST", "resume").status_code == 200  # not subscribed
    assert app.admin("POST", "rollback").status_code == 200
    wait_for(lambda: len(received) >= 3, 30, "the rollback notification")
    assert [body["event"]["action"] for body in received] == ["start", "pause", "rollback"]
    assert received[-1]["text"].startswith(f"[{app.name}] test-llm: rollback → rolled_back")
    restarted = app.admin("POST", "restart")  # the controller answers while the down receiver is retried
    assert restarted.status_code == 200 and restarted.json()["attempt"] == 2
