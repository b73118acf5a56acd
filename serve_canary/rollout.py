"""The rollout state machine: state in, state out, every transition an event with its reason.

Statuses: running → (awaiting_approval →) running … → complete; paused by an operator or a
manual weight; rolled_back on a FAIL verdict or an operator's rollback, terminal until
`restart`. The clock is a parameter (`now`), so every transition is testable without time.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from serve_canary.config import PhaseConfig
from serve_canary.judge import Verdict

Status = Literal["running", "paused", "awaiting_approval", "rolled_back", "complete"]
MAX_EVENTS = 200


class TransitionError(ValueError):
    """An operator command that the rollout's current status does not allow."""


class Event(BaseModel):
    model_config = ConfigDict(frozen=True)

    at: float
    action: str
    from_status: Status | None
    to_status: Status
    phase: str
    weight: float
    reason: str
    evidence: dict[str, Any] | None = None


class RolloutState(BaseModel):
    """Where one rollout of `canary_version` against `stable_version` stands."""

    model_config = ConfigDict(frozen=True)

    rollout_id: str
    stable_version: str
    canary_version: str
    attempt: int
    phase_index: int
    status: Status
    weight: float
    phase_started_at: float  # start of the current metrics window
    window_seq: int
    attempt_first_window: int
    table_version: int
    events: tuple[Event, ...]

    @property
    def window(self) -> str:
        """Metrics window id: canary and stable are judged on records from the same window."""
        return self._window_id(self.window_seq)

    @property
    def attempt_windows(self) -> list[str]:
        """Every window of this attempt, oldest first, the current one last."""
        return [self._window_id(seq) for seq in range(self.attempt_first_window, self.window_seq + 1)]

    def _window_id(self, seq: int) -> str:
        return f"{self.rollout_id}/{self.attempt}/{seq}"


def _move(
    state: RolloutState,
    phases: tuple[PhaseConfig, ...],
    now: float,
    *,
    action: str,
    to_status: Status,
    reason: str,
    phase_index: int | None = None,
    weight: float | None = None,
    attempt: int | None = None,
    evidence: dict[str, Any] | None = None,
) -> RolloutState:
    phase_index = state.phase_index if phase_index is None else phase_index
    weight = state.weight if weight is None else weight
    attempt = state.attempt if attempt is None else attempt
    new_window = (phase_index, weight, attempt) != (state.phase_index, state.weight, state.attempt)
    window_seq = state.window_seq + 1 if new_window else state.window_seq
    event = Event(
        at=now,
        action=action,
        from_status=state.status,
        to_status=to_status,
        phase=phases[phase_index].name,
        weight=weight,
        reason=reason,
        evidence=evidence,
    )
    return state.model_copy(
        update=dict(
            status=to_status,
            phase_index=phase_index,
            weight=weight,
            attempt=attempt,
            window_seq=window_seq,
            attempt_first_window=window_seq if attempt != state.attempt else state.attempt_first_window,
            phase_started_at=now if new_window else state.phase_started_at,
            table_version=state.table_version + 1,
            events=(*state.events, event)[-MAX_EVENTS:],
        )
    )


def start(
    rollout_id: str, stable_version: str, canary_version: str, phases: tuple[PhaseConfig, ...], now: float
) -> RolloutState:
    """A new rollout at the first phase."""
    first = phases[0]
    event = Event(
        at=now,
        action="start",
        from_status=None,
        to_status="running",
        phase=first.name,
        weight=first.weight,
        reason=f"rolling out {canary_version} against {stable_version}",
    )
    return RolloutState(
        rollout_id=rollout_id,
        stable_version=stable_version,
        canary_version=canary_version,
        attempt=1,
        phase_index=0,
        status="running",
        weight=first.weight,
        phase_started_at=now,
        window_seq=0,
        attempt_first_window=0,
        table_version=1,
        events=(event,),
    )


def _advance(
    state: RolloutState, phases: tuple[PhaseConfig, ...], now: float, action: str, reason: str
) -> RolloutState:
    index = state.phase_index + 1
    status: Status = "complete" if index == len(phases) - 1 else "running"
    return _move(
        state,
        phases,
        now,
        action=action,
        to_status=status,
        reason=reason,
        phase_index=index,
        weight=phases[index].weight,
    )


def evaluate(
    state: RolloutState, verdict: Verdict, phases: tuple[PhaseConfig, ...], now: float, auto_rollback: bool
) -> RolloutState:
    """Apply the judge's verdict on the current window."""
    if state.status in ("rolled_back", "complete"):
        return state
    if verdict.decision == "fail" and auto_rollback:
        return _move(
            state,
            phases,
            now,
            action="auto_rollback",
            to_status="rolled_back",
            reason=f"canary unhealthy: {verdict.reason}",
            weight=0.0,
            evidence=verdict.to_dict(),
        )
    if state.status != "running" or verdict.decision != "pass":
        return state
    phase = phases[state.phase_index]
    if now - state.phase_started_at < phase.min_duration_s:
        return state
    following = phases[state.phase_index + 1]
    if following.approval:
        return _move(
            state,
            phases,
            now,
            action="await_approval",
            to_status="awaiting_approval",
            reason=f"phase {phase.name} healthy; entering {following.name} needs approval",
            evidence=verdict.to_dict(),
        )
    return _advance(state, phases, now, "promote", f"phase {phase.name} healthy: {verdict.reason}")


def approve(state: RolloutState, phases: tuple[PhaseConfig, ...], now: float) -> RolloutState:
    if state.status != "awaiting_approval":
        raise TransitionError(f"nothing awaits approval: the rollout is {state.status}")
    following = phases[state.phase_index + 1]
    return _advance(state, phases, now, "approve", f"operator approved {following.name}")


def pause(state: RolloutState, phases: tuple[PhaseConfig, ...], now: float, reason: str) -> RolloutState:
    if state.status not in ("running", "awaiting_approval"):
        raise TransitionError(f"only a running or approval-waiting rollout can pause; it is {state.status}")
    return _move(state, phases, now, action="pause", to_status="paused", reason=reason)


def resume(state: RolloutState, phases: tuple[PhaseConfig, ...], now: float) -> RolloutState:
    """Back to automation at the current phase's weight (undoing any manual weight)."""
    if state.status != "paused":
        raise TransitionError(f"only a paused rollout can resume; it is {state.status}")
    phase = phases[state.phase_index]
    return _move(
        state,
        phases,
        now,
        action="resume",
        to_status="running",
        reason=f"operator resumed phase {phase.name}",
        weight=phase.weight,
    )


def set_weight(state: RolloutState, phases: tuple[PhaseConfig, ...], now: float, weight: float) -> RolloutState:
    """A manual weight; automation pauses until `resume`."""
    if not 0.0 <= weight <= 1.0:
        raise TransitionError(f"weight must be within [0, 1], got {weight}")
    if state.status == "rolled_back":
        raise TransitionError("the rollout is rolled back; restart it before setting a weight")
    return _move(
        state,
        phases,
        now,
        action="set_weight",
        to_status="paused",
        reason=f"operator set the canary weight to {weight:g}",
        weight=weight,
    )


def rollback(state: RolloutState, phases: tuple[PhaseConfig, ...], now: float, reason: str) -> RolloutState:
    if state.status == "rolled_back":
        raise TransitionError("the rollout is already rolled back")
    return _move(state, phases, now, action="rollback", to_status="rolled_back", reason=reason, weight=0.0)


def restart(state: RolloutState, phases: tuple[PhaseConfig, ...], now: float) -> RolloutState:
    """A new attempt from the first phase, after a rollback."""
    if state.status != "rolled_back":
        raise TransitionError(f"only a rolled-back rollout can restart; it is {state.status}")
    return _move(
        state,
        phases,
        now,
        action="restart",
        to_status="running",
        reason=f"attempt {state.attempt + 1} from phase {phases[0].name}",
        phase_index=0,
        weight=phases[0].weight,
        attempt=state.attempt + 1,
    )
