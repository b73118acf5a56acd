"""The shadow phase on a real local Ray cluster: stable's requests mirrored to the canary,
answers compared, and the rollout leaving phase 0 only for a canary whose answers hold up."""

from __future__ import annotations

import re

import pytest
from rich.console import Console

from serve_canary.cli import status_view
from serve_canary.status import RolloutStatus

from .conftest import FAST_PHASES, app_args, background_traffic, wait_for

pytestmark = pytest.mark.integration
SHADOW = {
    "fraction": 1.0,
    "max_rps": 40,
    "min_pairs": 100,
    # Answers of ~60 ms on a loaded 2-core box: a mirrored request waits for the event loop and
    # CPU more often than a user's, so latency gets more room than its 5 % default.
    "comparators": [{"name": "latency", "max_rate": 0.15}, {"name": "empty_or_refusal"}, {"name": "exact_match"}],
}
TEMPERATURE_0 = {"temperature": 0}


def shadow_args(canary_engine: dict | None = None):
    return app_args(canary_engine, rollout={"interval_s": 0.5, "shadow": SHADOW, "phases": FAST_PHASES})


def served_by_canary(metrics: str, family: str) -> float:
    pattern = rf'^{family}_total{{arm="canary",[^}}]*outcome="ok"[^}}]*}} (\S+)$'
    return sum(float(value) for value in re.findall(pattern, metrics, re.MULTILINE))


@pytest.mark.parametrize("altered", ["empty_answer_rate", "different_answer_rate"])
def test_a_canary_answering_a_fifth_of_prompts_otherwise_is_rolled_back_in_the_shadow_phase(deploy, altered):
    app = deploy(shadow_args({altered: 0.2}))
    start = app.status()
    assert (start["phase"], start["canary_weight"]) == ("shadow", 0.0)
    with background_traffic(app, body=TEMPERATURE_0) as outcomes:
        status = wait_for(
            lambda: (s := app.status())["status"] != "running" or s["phase"] != "shadow" and s, 90, "a verdict"
        )
        status = app.status()
    assert status["status"] == "rolled_back" and status["phase"] == "shadow", status["events"]
    rollback = status["events"][-1]
    assert rollback["action"] == "auto_rollback" and "shadow_" in rollback["reason"], rollback
    failed = [c for c in rollback["evidence"]["checks"] if c["decision"] == "fail"]
    assert failed and all(c["stats"]["kind"] == "pairs" and c["stats"]["canary_worse"] > 0 for c in failed)
    assert [e["action"] for e in status["events"]] == ["start", "auto_rollback"]
    assert set(outcomes) == {"200"}
    metrics = app.http.get("/metrics").text
    assert served_by_canary(metrics, "serve_canary_requests") == 0  # no user was answered by it
    assert served_by_canary(metrics, "serve_canary_shadow_requests") >= SHADOW["min_pairs"] / 2
    assert re.search(
        r'serve_canary_shadow_pairs_total\{comparator="[a-z_]+",model="test-llm",worse="canary"\}', metrics
    )
    shadow = status["shadow"]
    assert shadow["pairs"] > 0 and shadow["examples"], shadow
    assert all(example["worse"] for example in shadow["examples"])
    # Examples are users' prompts and answers: over HTTP, only with the admin token.
    assert app.http.get("/-/canary/status").json()["shadow"]["examples"] == []
    assert app.admin("GET", "status").json()["shadow"]["examples"] == shadow["examples"]
    view = Console(record=True, width=200)
    view.print(status_view(RolloutStatus.model_validate(status)))
    assert f"shadow pairs: {shadow['pairs']} compared" in view.export_text()


def test_an_identical_canary_passes_the_shadow_phase_and_starts_at_the_first_weight(deploy):
    app = deploy(shadow_args())
    with background_traffic(app, body=TEMPERATURE_0) as outcomes:
        status = wait_for(lambda: (s := app.status())["phase"] != "shadow" and s, 90, "leaving the shadow phase")
        assert status["status"] == "running" and status["canary_weight"] == FAST_PHASES[0]["weight"], status["events"]
        promote = status["events"][1]
        assert (promote["action"], promote["phase"]) == ("promote", FAST_PHASES[0]["name"])
        assert promote["reason"] == "phase shadow healthy: every shadow comparison shown not worse"
        wait_for(
            lambda: served_by_canary(app.http.get("/metrics").text, "serve_canary_requests") > 0,
            30,
            "users served by the canary at 5 %",
        )
    assert set(outcomes) == {"200"}
