"""README's demo, as a user runs it: identical simulated engines must not roll each other back."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from .conftest import background_traffic

DEMO_CONFIG = Path(__file__).parents[2] / "configs" / "local.yaml"
CLIENTS = 32
DURATION_S = 180


def test_the_demo_config_under_32_keyed_clients_does_not_roll_back_its_identical_canary(deploy):
    demo = yaml.safe_load(DEMO_CONFIG.read_text())["applications"][0]
    ingress = next(d for d in demo["deployments"] if d["name"] == "CanaryIngress")
    app = deploy(demo["args"], ingress_replicas=ingress["num_replicas"])
    started = time.monotonic()
    with background_traffic(app, users=CLIENTS, concurrency=CLIENTS) as outcomes:
        while time.monotonic() - started < DURATION_S:
            status = app.evaluations(1)
            assert status["status"] != "rolled_back", status["events"][-1]
    actions = [event["action"] for event in app.status()["events"]]
    assert "auto_rollback" not in actions, actions
    assert sum(outcomes.values()) > 1000 and set(outcomes) == {"200"}, outcomes
