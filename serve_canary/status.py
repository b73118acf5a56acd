"""The rollout status: one typed model that the controller builds and everyone else reads.

The CLI, the HTTP status route (and the page behind it), the Prometheus exporter and the
tests all read these fields; JSON is `model_dump(mode="json")`, and it parses back with
`RolloutStatus.model_validate`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict

from serve_canary.config import PhaseConfig
from serve_canary.judge import OVERLOAD, Verdict, replica_load
from serve_canary.metrics import ArmSummary
from serve_canary.rollout import Event, RolloutState, Status, waiting_for
from serve_canary.routing import Arm
from serve_canary.shadow import ShadowTally

RECENT_EVENTS = 20
QUEUE_FINDING_MS = 50.0  # canary requests waiting this much longer for a replica (p95) are a finding
LOAD_FINDING_MIN_REQUESTS = 100  # per arm, before a window's split of requests is read as load


class ReplicaInfo(BaseModel):
    """Which routing table the ingress replica that answered routes by."""

    id: str
    actor_id: str | None
    table_version: int
    table_adopted_at: float  # when this replica started routing by it (epoch seconds)
    canary_weight: float


class RolloutStatus(BaseModel):
    model_config = ConfigDict(frozen=True)

    app: str
    model: str
    rollout_id: str
    attempt: int
    stable_version: str
    canary_version: str
    status: Status
    phase: str
    phase_index: int
    phases: tuple[PhaseConfig, ...]
    canary_weight: float
    time_in_phase_s: float
    waiting_for: str | None
    table_version: int
    window: str
    evaluated_at: float | None
    last_verdict: Verdict | None
    arms: dict[Arm, ArmSummary] | None  # the current window, as last judged
    events: tuple[Event, ...]  # the most recent, oldest first
    capacity: str | None = None  # a canary arm too small for its weight, and what to scale
    # output tokens per second per running replica over the current window, per arm
    tokens_per_s_per_replica: dict[Arm, float] | None = None
    shadow: ShadowTally | None = None  # the shadow phase's compared pairs, as last judged
    replica: ReplicaInfo | None = None


def capacity_finding(
    weight: float, replicas: Mapping[Arm, int], arms: Mapping[Arm, ArmSummary] | None = None
) -> str | None:
    """What to scale when a canary replica takes more of the traffic than a stable one (by
    the weight, or in this window: a few heavy users hashed onto the canary), or the canary's
    requests queue longer (for a replica, or in the engine's queue).

    That is load, not the model: the judge compares times from the replica's receipt and holds
    a latency comparison on a replica loaded apart from stable; this names the cause and the fix.
    """
    canary, stable = replicas.get("canary", 0), replicas.get("stable", 0)
    by_weight = replica_load(1.0 - weight, weight, replicas)
    if not 0.0 < weight < 1.0 or by_weight is None:
        return None
    stable_requests, canary_requests = (
        (arms["stable"].requests, arms["canary"].requests) if arms and "stable" in arms and "canary" in arms else (0, 0)
    )
    by_window = (
        replica_load(stable_requests, canary_requests, replicas)
        if min(stable_requests, canary_requests) >= LOAD_FINDING_MIN_REQUESTS
        else None
    )
    findings, needed = [], canary
    if by_window is not None and by_window > max(by_weight, OVERLOAD):
        findings.append(
            f"each canary replica took {by_window:.1f}× a stable one's requests in this window "
            f"({canary_requests} on {canary} canary, {stable_requests} on {stable} stable at {weight:.0%}: "
            "the canary's users send more than their share)"
        )
        needed = math.ceil(canary * by_window)
    elif by_weight > OVERLOAD:
        findings.append(
            f"each canary replica takes {by_weight:.1f}× the traffic of a stable one "
            f"({canary} canary for {weight:.0%}, {stable} stable for {1.0 - weight:.0%})"
        )
        needed = math.ceil(canary * by_weight)
    canary_wait, stable_wait = (
        arms[arm].queue_ms.p95 if arms and arm in arms else None for arm in ("canary", "stable")
    )
    if canary_wait is not None and canary_wait > (stable_wait or 0.0) + QUEUE_FINDING_MS:
        stable_shown = "—" if stable_wait is None else f"{stable_wait:.0f} ms"
        findings.append(f"canary requests queue {canary_wait:.0f} ms at p95 (stable {stable_shown})")
        needed = max(needed, canary + 1)
    if not findings:
        return None
    return "; ".join(findings) + f": scale the canary to {needed} replicas"


def tokens_per_s_per_replica(
    arms: Mapping[Arm, ArmSummary], replicas: Mapping[Arm, int], seconds: float
) -> dict[Arm, float]:
    """Each arm's output tokens per second per running replica over `seconds` of its window."""
    return {
        arm: round(summary.output_tokens / seconds / replicas[arm], 3)
        for arm, summary in arms.items()
        if replicas.get(arm, 0) > 0 and seconds > 0.0
    }


def describe(
    app: str,
    model: str,
    state: RolloutState,
    phases: tuple[PhaseConfig, ...],
    latest: Verdict | None,
    arms: dict[Arm, ArmSummary] | None,
    evaluated_at: float | None,
    now: float,
    replicas: Mapping[Arm, int] | None = None,
    shadow: ShadowTally | None = None,
) -> RolloutStatus:
    """The status of `state` under `phases`, with the latest verdict on its current window."""
    return RolloutStatus(
        app=app,
        model=model,
        rollout_id=state.rollout_id,
        attempt=state.attempt,
        stable_version=state.stable_version,
        canary_version=state.canary_version,
        status=state.status,
        phase=phases[state.phase_index].name,
        phase_index=state.phase_index,
        phases=phases,
        canary_weight=state.weight,
        time_in_phase_s=round(now - state.phase_started_at, 3),
        waiting_for=waiting_for(state, phases, latest, now),
        table_version=state.table_version,
        window=state.window,
        evaluated_at=evaluated_at,
        last_verdict=latest,
        arms=arms,
        events=state.events[-RECENT_EVENTS:],
        capacity=capacity_finding(state.weight, replicas, arms) if replicas else None,
        tokens_per_s_per_replica=(
            tokens_per_s_per_replica(arms, replicas, evaluated_at - state.phase_started_at)
            if arms and replicas and evaluated_at is not None
            else None
        ),
        shadow=shadow,
    )
