"""Notifications: what a receiver gets, who is subscribed, and names a config can subscribe to."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from serve_canary import rollout
from serve_canary.config import NOTIFIABLE, ConfigError, NotificationTarget, PhaseConfig, parse_config
from serve_canary.notify import message, subscribed

PHASES = (PhaseConfig(name="init", weight=0.05), PhaseConfig(name="full", weight=1.0))


def test_a_rollback_reads_as_one_slack_line_and_carries_the_event():
    started = rollout.start("r1", "v1", "v2", PHASES, 0.0)
    rolled_back = rollout.rollback(started, PHASES, 1.0, "by hand")
    body = message("llm", "demo-llm", "r1", rolled_back.events[-1])
    assert body["text"] == "[llm] demo-llm: rollback → rolled_back, phase init at 0%: by hand"
    assert body["event"]["action"] == "rollback" and body["rollout_id"] == "r1"


def test_receivers_get_the_actions_or_statuses_they_subscribed_to():
    started = rollout.start("r1", "v1", "v2", PHASES, 0.0)
    event = rollout.rollback(started, PHASES, 1.0, "by hand").events[-1]
    assert subscribed(NotificationTarget(url="http://x"), event)
    assert subscribed(NotificationTarget(url="http://x", events=frozenset({"rolled_back"})), event)
    assert not subscribed(NotificationTarget(url="http://x", events=frozenset({"promote"})), event)


def test_the_subscribable_names_are_the_rollouts_actions_and_statuses():
    source = Path(rollout.__file__).read_text()
    actions = set(re.findall(r'action="(\w+)"', source)) | set(
        re.findall(r'_advance\(state, phases, now, "(\w+)"', source)
    )
    assert NOTIFIABLE == actions | set(rollout.STATUSES)


def test_an_unknown_event_name_is_a_config_error_naming_the_key():
    args = {
        "model_name": "m",
        "stable": {"version": "v1", "engine": "simulated"},
        "canary": {"version": "v2", "engine": "simulated"},
        "notifications": [{"url": "http://hooks.example/x", "events": ["rollbak"]}],
    }
    with pytest.raises(ConfigError, match=r"notifications\.0\.events: unknown events \['rollbak'\]"):
        parse_config(args)
