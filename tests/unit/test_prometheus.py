"""The exposition: names, labels, vLLM buckets, and the rollout gauges."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from serve_canary import rollout
from serve_canary.config import HealthConfig, PhaseConfig
from serve_canary.judge import UnitStats, Verdict, judge
from serve_canary.metrics import ArmAggregate, RequestRecord
from serve_canary.prometheus import TTFT_BUCKETS, PrometheusExporter
from serve_canary.rollout import RolloutState
from serve_canary.status import RolloutStatus, describe


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
        None,
        arm,
        "v2" if arm == "canary" else "v1",
        outcome,
        "before_first_token" if outcome == "error" else None,
        ttft,
        0.01,
        0.5,
        4,
        10,
    )


PHASES = (
    PhaseConfig(name="init", weight=0.05),
    PhaseConfig(name="early", weight=0.2),
    PhaseConfig(name="full", weight=1.0),
)


def status(state: RolloutState, verdict: Verdict | None = None) -> RolloutStatus:
    return describe("app", "m", state, PHASES, verdict, None, None, state.events[-1].at)


def errors(requests: int, errors: int) -> ArmAggregate:
    aggregate = ArmAggregate()
    for i in range(requests):
        aggregate.add(record("stable", "error" if i < errors else "ok"))
    return aggregate


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
    started = rollout.start("v1..v2", "v1", "v2", PHASES, 0.0)
    verdict = judge(errors(400, 2), errors(100, 10), HealthConfig(), 100, 0.01, weight=0.2)
    exporter.rollout(status(started, verdict), started.events[-1])
    rolled_back = rollout.evaluate(started, verdict, PHASES, 1.0, auto_rollback=True)
    exporter.rollout(status(rolled_back), rolled_back.events[-1])
    exporter.rollout(status(rolled_back), None)  # republished by a later evaluation: not a second rollback
    got = samples(exporter)
    assert got[("serve_canary_canary_weight", (("model", "m"),))] == 0.0
    assert got[("serve_canary_rollout_status", (("model", "m"), ("status", "rolled_back")))] == 1.0
    assert got[("serve_canary_rollout_status", (("model", "m"), ("status", "running")))] == 0.0
    assert got[("serve_canary_rollbacks_total", (("model", "m"), ("reason", "automatic")))] == 1.0
    error_check = next(check for check in verdict.checks if check.metric == "error_rate")
    assert isinstance(error_check.stats, UnitStats) and error_check.stats.e_value > 100
    assert got[("serve_canary_judge_e_value", (("metric", "error_rate"), ("model", "m")))] == error_check.stats.e_value


def test_phase_gauge_keeps_one_series_per_model():
    exporter = PrometheusExporter("m")
    started = rollout.start("v1..v2", "v1", "v2", PHASES, 0.0)
    exporter.rollout(status(started), started.events[-1])
    promoted = rollout.evaluate(started, Verdict("pass", "healthy", (), 100, 100), PHASES, 1.0, auto_rollback=True)
    assert promoted.phase_index == 1
    exporter.rollout(status(promoted), promoted.events[-1])
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
