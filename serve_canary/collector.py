"""MetricsCollector: the Ray actor that holds the cluster-wide MetricsLedger.

Ingress replicas send it batches fire-and-forget; the controller reads a window to judge it.
"""

from __future__ import annotations

import time
import uuid
from typing import NamedTuple

import ray

from serve_canary.feedback import Attribution, ReplayGuard
from serve_canary.metrics import ArmAggregate, MetricsLedger, RequestRecord
from serve_canary.prometheus import PrometheusExporter
from serve_canary.rollout import Event
from serve_canary.routing import Arm
from serve_canary.shadow import PairOutcome, ShadowTally
from serve_canary.status import RolloutStatus

RATED_CAPACITY = 1_000_000  # request ids remembered as rated (~100 MB at most)


class WindowSnapshot(NamedTuple):
    """A window's aggregates and which incarnation of the collector counted them (a restarted
    collector has lost what it counted before)."""

    collector: str
    arms: dict[Arm, ArmAggregate]
    pairs: ShadowTally


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class MetricsCollector:
    def __init__(self, model: str, token_ttl_s: float) -> None:
        self._incarnation = uuid.uuid4().hex
        self._ledger = MetricsLedger()
        self._exporter = PrometheusExporter(model)
        # Started or restarted, it forgets what was rated: answers given before now cannot be rated.
        self._rated = ReplayGuard(RATED_CAPACITY, horizon=time.time() + token_ttl_s)

    def record(self, records: list[RequestRecord]) -> None:
        self._ledger.add(records)
        self._exporter.record(records)

    def pairs(self, outcomes: list[PairOutcome]) -> None:
        """Compared shadow pairs, from an ingress replica."""
        self._ledger.add_pairs(outcomes)
        self._exporter.pairs(outcomes)

    def rollout(self, status: RolloutStatus, transition: Event | None) -> None:
        """The controller's latest status and the transition that made it, if any."""
        self._exporter.rollout(status, transition)

    def prometheus(self) -> bytes:
        return self._exporter.exposition()

    def window(self, window: str) -> WindowSnapshot:
        return WindowSnapshot(self._incarnation, self._ledger.window(window), self._ledger.pairs(window))

    def feedback(
        self, attribution: Attribution, rating: float | None, hallucination: bool | None, shortfall: float | None
    ) -> bool:
        """Count feedback on a request once; False (and nothing counted) if it was rated before."""
        if not self._rated.admit(attribution, time.time()):
            return False
        self._ledger.add_feedback(
            attribution.window, attribution.arm, attribution.unit, rating, hallucination, shortfall
        )
        self._exporter.feedback(attribution.arm, attribution.version, rating, hallucination)
        return True
