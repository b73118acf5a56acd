"""Losing the canary's node of a multi-node cluster (`node_loss.py`, in a process of its own)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_losing_the_canary_node_costs_no_request_and_keeps_the_rollout():
    run = subprocess.run(
        [sys.executable, "-m", "tests.integration.node_loss"], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(next(line for line in reversed(run.stdout.splitlines()) if line.startswith("{")))
    assert result["canary_users_on_canary_before"] > 0 and result["canary_users_during"] > 0
    assert result["failed_total"] == 0, result  # unary requests in flight on the lost node failed over too
    assert result["canary_users_on_stable_during"] == result["canary_users_during"], result
    assert result["canary_back_after_s"] < 90, result
    assert result["state_after"] == result["state_before"], result
