"""Prometheus exposition of everything serve-canary measures, with prometheus_client.

Names follow vLLM's and Prometheus' conventions with the `serve_canary_` prefix; latency
histograms use vLLM's bucket edges so dashboards can put both side by side. Pure: the
collector actor feeds it records and rollout status and serves `exposition()`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from serve_canary.metrics import RequestRecord
from serve_canary.rollout import STATUSES, Event
from serve_canary.shadow import PairOutcome
from serve_canary.status import RolloutStatus

# vLLM's bucket edges (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
DECISION_VALUES = {"fail": -1.0, "wait": 0.0, "pass": 1.0}
ROLLBACK_ACTIONS = {"auto_rollback": "automatic", "rollback": "operator"}
ARM_LABELS = ("model", "arm", "version")


class PrometheusExporter:
    """Cumulative per-arm metrics and the rollout's current state, in its own registry."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "serve_canary_requests",
            "Finished requests by outcome (ok, error, cancelled, rejected, failover) and error kind.",
            (*ARM_LABELS, "outcome", "error_kind"),
            registry=registry,
        )
        self.forced_requests = Counter(
            "serve_canary_forced_requests",
            "Requests whose arm a tester picked (x-serve-canary-force): never judged.",
            (*ARM_LABELS, "outcome"),
            registry=registry,
        )
        self.shadow_requests = Counter(
            "serve_canary_shadow_requests",
            "Requests mirrored to the canary in the shadow phase: judged as pairs, not as requests.",
            (*ARM_LABELS, "outcome"),
            registry=registry,
        )
        self.shadow_pairs = Counter(
            "serve_canary_shadow_pairs",
            "Compared shadow pairs per comparator, by which answer was worse (canary, stable, same, failed).",
            ("model", "comparator", "worse"),
            registry=registry,
        )
        self.ttft = Histogram(
            "serve_canary_time_to_first_token_seconds",
            "Time to first token, as the ingress saw it.",
            ARM_LABELS,
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.queue = Histogram(
            "serve_canary_queue_seconds",
            "Time a request waited for a replica of its arm and in its engine's queue (part of its TTFT).",
            ARM_LABELS,
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.itl = Histogram(
            "serve_canary_inter_token_latency_seconds",
            "Mean gap between output tokens of a request.",
            ARM_LABELS,
            buckets=ITL_BUCKETS,
            registry=registry,
        )
        self.e2e = Histogram(
            "serve_canary_e2e_request_latency_seconds",
            "End-to-end latency of successful requests.",
            ARM_LABELS,
            buckets=E2E_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "serve_canary_prompt_tokens", "Prompt tokens processed.", ARM_LABELS, registry=registry
        )
        self.generation_tokens = Counter(
            "serve_canary_generation_tokens", "Output tokens generated.", ARM_LABELS, registry=registry
        )
        self.ratings = Counter("serve_canary_feedback_ratings", "User ratings received.", ARM_LABELS, registry=registry)
        self.rating_sum = Counter(
            "serve_canary_feedback_rating_sum", "Sum of user ratings received.", ARM_LABELS, registry=registry
        )
        self.hallucination_reports = Counter(
            "serve_canary_hallucination_reports",
            "Feedback items that said whether the answer hallucinated.",
            ARM_LABELS,
            registry=registry,
        )
        self.hallucinations = Counter(
            "serve_canary_hallucinations",
            "Feedback items that flagged a hallucination.",
            ARM_LABELS,
            registry=registry,
        )
        self.weight = Gauge(
            "serve_canary_canary_weight",
            "Canary share of traffic in the current routing table.",
            ("model",),
            registry=registry,
        )
        self.phase = Gauge(
            "serve_canary_rollout_phase",
            "Index of the current phase (0 = first); labels name it.",
            ("model", "rollout_id", "phase"),
            registry=registry,
        )
        self.status = Gauge(
            "serve_canary_rollout_status", "1 for the rollout's current status.", ("model", "status"), registry=registry
        )
        self.rollbacks = Counter(
            "serve_canary_rollbacks",
            "Rollbacks (automatic and by an operator).",
            ("model", "reason"),
            registry=registry,
        )
        self.judge_e_value = Gauge(
            "serve_canary_judge_e_value",
            "Latest e-value of the judge's 'canary is worse' test, per metric.",
            ("model", "metric"),
            registry=registry,
        )
        self.slo_alert = Gauge(
            "serve_canary_slo_alert",
            "1 while both arms are over an absolute limit (an incident the judge does not hold against the canary).",
            ("model", "metric"),
            registry=registry,
        )
        self.replica_throughput = Gauge(
            "serve_canary_output_tokens_per_second_per_replica",
            "Output tokens per second per running replica of an arm, over the current window.",
            ("model", "arm"),
            registry=registry,
        )
        self.judge_decision = Gauge(
            "serve_canary_judge_decision",
            "Latest verdict: -1 fail, 0 wait, 1 pass.",
            ("model",),
            registry=registry,
        )
        self._phase_labels: tuple[str, str] | None = None

    def record(self, records: list[RequestRecord]) -> None:
        for r in records:
            labels = (self.model, r.arm, r.version)
            if r.origin != "user":
                counter = self.forced_requests if r.origin == "tester" else self.shadow_requests
                counter.labels(*labels, r.outcome).inc()
                continue
            self.requests.labels(*labels, r.outcome, r.error_kind or "").inc()
            self.prompt_tokens.labels(*labels).inc(r.prompt_tokens)
            self.generation_tokens.labels(*labels).inc(r.output_tokens)
            if r.outcome != "ok":
                continue
            if r.ttft_s is not None:
                self.ttft.labels(*labels).observe(r.ttft_s)
            if r.queue_s is not None:
                self.queue.labels(*labels).observe(r.queue_s)
            if r.itl_s is not None:
                self.itl.labels(*labels).observe(r.itl_s)
            self.e2e.labels(*labels).observe(r.e2e_s)

    def pairs(self, outcomes: list[PairOutcome]) -> None:
        for outcome in outcomes:
            for comparator, worse in outcome.results.items():
                self.shadow_pairs.labels(self.model, comparator, worse).inc()

    def feedback(self, arm: str, version: str, rating: float | None, hallucination: bool | None) -> None:
        labels = (self.model, arm, version)
        if rating is not None:
            self.ratings.labels(*labels).inc()
            self.rating_sum.labels(*labels).inc(rating)
        if hallucination is not None:
            self.hallucination_reports.labels(*labels).inc()
            if hallucination:
                self.hallucinations.labels(*labels).inc()

    def rollout(self, status: RolloutStatus, transition: Event | None) -> None:
        """Mirror the controller's status in the gauges; count the transition that made it."""
        self.weight.labels(self.model).set(status.canary_weight)
        labels = (status.rollout_id, status.phase)
        if self._phase_labels is not None and self._phase_labels != labels:
            self.phase.remove(self.model, *self._phase_labels)
        self._phase_labels = labels
        self.phase.labels(self.model, *labels).set(status.phase_index)
        for name in STATUSES:
            self.status.labels(self.model, name).set(1.0 if status.status == name else 0.0)
        if transition is not None and transition.action in ROLLBACK_ACTIONS:
            self.rollbacks.labels(self.model, ROLLBACK_ACTIONS[transition.action]).inc()
        for arm, throughput in (status.tokens_per_s_per_replica or {}).items():
            self.replica_throughput.labels(self.model, arm).set(throughput)
        verdict = status.last_verdict
        if verdict is not None:
            self.judge_decision.labels(self.model).set(DECISION_VALUES[verdict.decision])
            for check in verdict.checks:
                if check.e_value is not None:
                    self.judge_e_value.labels(self.model, check.metric).set(check.e_value)
                if check.stats is not None and check.stats.kind == "limit":
                    self.slo_alert.labels(self.model, check.metric).set(1.0 if check.alert else 0.0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
