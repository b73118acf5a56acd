"""MetricsCollector: the Ray actor that holds the cluster-wide MetricsLedger.

Ingress replicas send it batches fire-and-forget; the controller reads a window to judge it.
"""

from __future__ import annotations

import ray

from serve_canary.metrics import ArmAggregate, MetricsLedger, RequestRecord
from serve_canary.prometheus import PrometheusExporter
from serve_canary.rollout import Event
from serve_canary.routing import Arm
from serve_canary.status import RolloutStatus


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class MetricsCollector:
    def __init__(self, model: str) -> None:
        self._ledger = MetricsLedger()
        self._exporter = PrometheusExporter(model)

    def record(self, records: list[RequestRecord]) -> None:
        self._ledger.add(records)
        self._exporter.record(records)

    def rollout(self, status: RolloutStatus, transition: Event | None) -> None:
        """The controller's latest status and the transition that made it, if any."""
        self._exporter.rollout(status, transition)

    def prometheus(self) -> bytes:
        return self._exporter.exposition()

    def window(self, window: str) -> dict[Arm, ArmAggregate]:
        return self._ledger.window(window)

    def feedback(self, request_id: str, rating: float | None, hallucination: bool | None) -> dict[str, str] | None:
        """Attribute feedback to the arm that served the request; None when the id is unknown."""
        attribution = self._ledger.add_feedback(request_id, rating, hallucination)
        if attribution is None:
            return None
        self._exporter.feedback(attribution.arm, attribution.version, rating, hallucination)
        return {"arm": attribution.arm, "version": attribution.version}
