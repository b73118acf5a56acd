"""`serve-canary` against a running app: commands, errors, and the live `status --watch` view."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading

import pytest

from .conftest import app_args, wait_for
from .test_serving import HOLD

pytestmark = pytest.mark.integration


def cli(cluster, app, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serve_canary.cli", "--address", cluster["gcs_address"], "--app", app.name, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_commands_and_their_errors(deploy, cluster):
    app = deploy(app_args(rollout=HOLD))
    status = json.loads(cli(cluster, app, "--json", "status").stdout)
    assert (status["status"], status["canary_weight"]) == ("running", 0.05)
    assert json.loads(cli(cluster, app, "--json", "pause").stdout)["status"] == "paused"
    refused = cli(cluster, app, "approve")
    assert refused.returncode == 1 and "nothing awaits approval" in refused.stderr
    assert json.loads(cli(cluster, app, "--json", "rollback").stdout)["status"] == "rolled_back"
    assert json.loads(cli(cluster, app, "--json", "restart").stdout)["attempt"] == 2
    bad = cli(cluster, app, "set-weight", "1.5")
    assert bad.returncode == 2 and "within [0, 1]" in bad.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "serve_canary.cli", "--address", cluster["gcs_address"], "--app", "nope", "status"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 1 and "no rollout found for app 'nope'" in missing.stderr


def plain(output: bytearray) -> bytes:
    """The terminal output without ANSI escape sequences (styles, cursor moves)."""
    return re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", bytes(output))


def test_status_watch_redraws_after_a_set_weight(deploy, cluster, tmp_path):
    app = deploy(app_args(rollout=HOLD))
    env = {**os.environ, "TTY_INTERACTIVE": "1", "TTY_COMPATIBLE": "1", "COLUMNS": "140", "LINES": "60"}
    watch = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serve_canary.cli",
            "--address",
            cluster["gcs_address"],
            "--app",
            app.name,
            "status",
            "--watch",
            "--interval",
            "0.2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    output = bytearray()

    def read() -> None:
        for chunk in iter(lambda: watch.stdout.read1(4096), b""):
            output.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_for(lambda: b"canary weight 5%" in plain(output), 30, "the first frame")
        assert b"init 5%" in plain(output) and b"full 100%" in plain(output) and b"recent events" in plain(output)
        cli(cluster, app, "set-weight", "0.3")
        wait_for(lambda: b"canary weight 30%" in plain(output), 10, "a redraw with the new weight")
        assert b"status paused" in plain(output)
    finally:
        watch.terminate()
        watch.wait(timeout=10)
        reader.join(timeout=10)
    assert watch.returncode == 0 and b"Traceback" not in output, "SIGTERM stops the watch like Ctrl-C"
    capture = os.environ.get("SERVE_CANARY_SCREENSHOT_DIR")
    if capture:
        with open(os.path.join(capture, "status_watch.txt"), "wb") as out:
            out.write(plain(output))
