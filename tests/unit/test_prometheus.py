"""The exposition: names, labels, vLLM buckets, and the rollout gauges."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from serve_canary.metrics import RequestRecord
from serve_canary.prometheus import TTFT_BUCKETS, PrometheusExporter


def samples(exporter: PrometheusExporter) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(exporter.exposition().decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def record(arm: str, outcome: str = "ok", ttft: float = 0.05) -> RequestRecord:
    return RequestRecord(
        "r",
        "w",
        arm,
        "v2" if arm == "canary" else "v1",
        outcome,
        "before_first_token" if outcome == "error" else None,
        ttft,
        0.01,
        0.5,
        4,
        10,
        "stop",
        0.2,
    )


def status(**overrides) -> dict:
    base = {
        "rollout_id": "v1..v2",
        "attempt": 1,
        "phase": "early",
        "phase_index": 1,
        "status": "running",
        "canary_weight": 0.2,
        "events": [],
        "last_verdict": {"decision": "wait", "checks": [{"metric": "error_rate", "stats": {"e_value": 3.5}}]},
    }
    return {**base, **overrides}


def test_requests_and_latencies_are_labelled_by_model_arm_version():
    exporter = PrometheusExporter("m")
    exporter.record([record("canary"), record("canary", "error"), record("stable")])
    got = samples(exporter)
    canary = (("arm", "canary"), ("model", "m"), ("version", "v2"))
    assert (
        got[
            (
                "serve_canary_requests_total",
                tuple(sorted(canary + (("outcome", "error"), ("error_kind", "before_first_token")))),
            )
        ]
        == 1
    )
    assert got[("serve_canary_requests_total", tuple(sorted(canary + (("outcome", "ok"), ("error_kind", "")))))] == 1
    assert got[("serve_canary_time_to_first_token_seconds_count", canary)] == 1  # errors have no TTFT
    assert got[("serve_canary_generation_tokens_total", canary)] == 20
    buckets = sorted(
        float(dict(labels)["le"])
        for (name, labels) in got
        if name == "serve_canary_time_to_first_token_seconds_bucket" and dict(labels)["arm"] == "canary"
    )
    assert buckets[:-1] == list(TTFT_BUCKETS)


def test_rollout_gauges_follow_the_status_and_rollbacks_count_once():
    exporter = PrometheusExporter("m")
    exporter.rollout(status())
    rollback = {"action": "auto_rollback", "at": 10.0}
    exporter.rollout(status(status="rolled_back", canary_weight=0.0, events=[rollback]))
    exporter.rollout(status(status="rolled_back", canary_weight=0.0, events=[rollback]))
    got = samples(exporter)
    assert got[("serve_canary_canary_weight", (("model", "m"),))] == 0.0
    assert got[("serve_canary_rollout_status", (("model", "m"), ("status", "rolled_back")))] == 1.0
    assert got[("serve_canary_rollout_status", (("model", "m"), ("status", "running")))] == 0.0
    assert got[("serve_canary_rollbacks_total", (("model", "m"), ("reason", "automatic")))] == 1.0
    assert got[("serve_canary_judge_e_value", (("metric", "error_rate"), ("model", "m")))] == 3.5


def test_phase_gauge_keeps_one_series_per_model():
    exporter = PrometheusExporter("m")
    exporter.rollout(status(phase="init", phase_index=0))
    exporter.rollout(status(phase="early", phase_index=1))
    phases = [labels for (name, labels) in samples(exporter) if name == "serve_canary_rollout_phase"]
    assert phases == [(("model", "m"), ("phase", "early"), ("rollout_id", "v1..v2"))]


def test_feedback_counters():
    exporter = PrometheusExporter("m")
    exporter.feedback("canary", "v2", 4.0, True)
    exporter.feedback("canary", "v2", None, False)
    got = samples(exporter)
    labels = (("arm", "canary"), ("model", "m"), ("version", "v2"))
    assert got[("serve_canary_feedback_rating_sum_total", labels)] == 4.0
    assert got[("serve_canary_hallucination_reports_total", labels)] == 2
    assert got[("serve_canary_hallucinations_total", labels)] == 1
