"""`serve-canary` against a running app: commands, errors, and the live `status --watch` view."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from .conftest import ADMIN_TOKEN, HOLD, app_args, operator_env, serve_canary_cli, wait_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def cli(cluster, app, *args: str) -> subprocess.CompletedProcess:
    return serve_canary_cli("--address", cluster["gcs_address"], "--app", app.name, *args)


def answer(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_over_http_with_the_admin_token_and_without(deploy, cluster):
    app = deploy(app_args(rollout=HOLD))

    def over_http(*args: str, token: str | None = ADMIN_TOKEN) -> subprocess.CompletedProcess:
        return serve_canary_cli("--url", app.url, *args, env=operator_env(SERVE_CANARY_ADMIN_TOKEN=token or ""))

    assert answer(over_http("--json", "status"))["canary_weight"] == 0.05
    moved = over_http("--json", "set-weight", "0.3")
    assert moved.returncode == 0 and json.loads(moved.stdout)["canary_weight"] == 0.3, moved.stderr
    refused = over_http("resume", token="wrong")
    assert refused.returncode == 1 and "401" in refused.stderr and "admin bearer token" in refused.stderr
    assert over_http("approve").stderr.strip() == "serve-canary: nothing awaits approval: the rollout is paused"
    assert app.status()["canary_weight"] == 0.3


def test_check_names_the_bad_key_of_a_serve_config_without_a_cluster(tmp_path):
    good = ROOT / "configs" / "local.yaml"
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("min_requests: 20}", "min_requests: -1}", 1))
    assert "min_requests: -1" in bad.read_text()
    checked = serve_canary_cli("check", str(good), timeout_s=30)
    assert checked.returncode == 0, checked.stderr
    refused = serve_canary_cli("check", str(bad), timeout_s=30)
    assert refused.returncode == 1 and "rollout.phases.0.min_requests" in refused.stderr


def test_commands_and_their_errors(deploy, cluster):
    app = deploy(app_args(rollout=HOLD))
    status = answer(cli(cluster, app, "--json", "status"))
    assert (status["status"], status["canary_weight"]) == ("running", 0.05)
    assert answer(cli(cluster, app, "--json", "pause"))["status"] == "paused"
    refused = cli(cluster, app, "approve")
    assert refused.returncode == 1 and "nothing awaits approval" in refused.stderr
    assert answer(cli(cluster, app, "--json", "rollback"))["status"] == "rolled_back"
    assert answer(cli(cluster, app, "--json", "restart"))["attempt"] == 2
    bad = cli(cluster, app, "set-weight", "1.5")
    assert bad.returncode == 2 and "within [0, 1]" in bad.stderr
    missing = serve_canary_cli("--address", cluster["gcs_address"], "--app", "nope", "status")
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
