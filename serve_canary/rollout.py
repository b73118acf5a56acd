"""The rollout state machine: state in, state out, every transition an event with its reason.

Statuses: running → (awaiting_approval →) running … → complete; paused by an operator or a
manual weight; rolled_back on a FAIL verdict or an operator's rollback, terminal until
`restart`; state_error when the stored state cannot be read (stable only, nothing moves
until it can be read again). The clock is a parameter (`now`), so every transition is
testable without time.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, field_validator

from serve_canary.config import PhaseConfig
from serve_canary.judge import Verdict, WindowEvidence

Status = Literal["running", "paused", "awaiting_approval", "rolled_back", "complete", "state_error"]
STATUSES: tuple[Status, ...] = get_args(Status)
# Automation has nothing to do: the rollout ended, or its stored state cannot be read.
TERMINAL: frozenset[Status] = frozenset({"rolled_back", "complete", "state_error"})
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
    table_version: int
    events: tuple[Event, ...]
    # The judge's evidence from each closed window of this attempt (its last verdict's segments),
    # so the sequential tests span phases without the samples, and survive any restart.
    evidence: tuple[WindowEvidence, ...] = ()

    @field_validator("evidence", mode="before")
    @classmethod
    def _weighted(cls, windows: Any) -> Any:
        """A window stored before evidence carried its weight ({metric: segment}, every
        segment at the window's weight) reads as that weight's one segment per metric."""
        if not isinstance(windows, list | tuple):
            return windows
        return [
            {"weight": next(iter(window.values()))[2], "segments": {k: [v] for k, v in window.items()}}
            if isinstance(window, dict) and window and "segments" not in window
            else window
            for window in windows
        ]

    @property
    def window(self) -> str:
        """Metrics window id: canary and stable are judged on records from the same window."""
        return f"{self.rollout_id}/{self.attempt}/{self.window_seq}"

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


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
    latest: Verdict | None = None,
    close_window: bool = False,
) -> RolloutState:
    """`latest`: the latest verdict on the current window, kept as its evidence if it closes
    (it does when the phase, weight or attempt changes, or on `close_window`)."""
    phase_index = state.phase_index if phase_index is None else phase_index
    weight = state.weight if weight is None else weight
    attempt = state.attempt if attempt is None else attempt
    new_window = close_window or (phase_index, weight, attempt) != (state.phase_index, state.weight, state.attempt)
    window_seq = state.window_seq + 1 if new_window else state.window_seq
    carried = state.evidence
    if attempt != state.attempt:
        carried = ()
    elif new_window and latest is not None and latest.evidence:
        carried = (*carried, latest.evidence)
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
            evidence=carried,
            phase_started_at=now if new_window else state.phase_started_at,
            table_version=state.table_version + 1,
            events=(*state.events, event)[-MAX_EVENTS:],
        )
    )


def start(
    rollout_id: str,
    stable_version: str,
    canary_version: str,
    phases: tuple[PhaseConfig, ...],
    now: float,
    table_version: int = 1,
) -> RolloutState:
    """A new rollout at the first phase (`table_version` continues a replaced rollout's)."""
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
        table_version=table_version,
        events=(event,),
    )


def unreadable(
    rollout_id: str,
    stable_version: str,
    canary_version: str,
    phases: tuple[PhaseConfig, ...],
    now: float,
    reason: str,
) -> RolloutState:
    """The stand-in for a rollout whose stored state cannot be read: all traffic on stable
    (the one table that is safe without knowing how far the canary got), no automation, no
    command, until the state can be read again. Never saved over the damaged state."""
    event = Event(
        at=now,
        action="state_error",
        from_status=None,
        to_status="state_error",
        phase=phases[0].name,
        weight=0.0,
        reason=reason,
    )
    return RolloutState(
        rollout_id=rollout_id,
        stable_version=stable_version,
        canary_version=canary_version,
        attempt=0,
        phase_index=0,
        status="state_error",
        weight=0.0,
        phase_started_at=now,
        window_seq=0,
        table_version=0,
        events=(event,),
    )


def recovered(state: RolloutState, phases: tuple[PhaseConfig, ...], now: float) -> RolloutState:
    """The stored state (read again after a `state_error`), with the recovery as an event."""
    return _move(
        state,
        phases,
        now,
        action="state_recovered",
        to_status=state.status,
        reason="the stored state is readable again",
    )


def reopen_window(
    state: RolloutState, phases: tuple[PhaseConfig, ...], now: float, reason: str, *, latest: Verdict | None
) -> RolloutState:
    """Close the current window with the latest verdict's evidence and judge a new one at the
    same weight: what the collector counted in it is gone (it restarted), what the judge saw is not."""
    _readable(state)
    return _move(
        state,
        phases,
        now,
        action="reopen_window",
        to_status=state.status,
        reason=reason,
        latest=latest,
        close_window=True,
    )


def _readable(state: RolloutState) -> None:
    if state.status == "state_error":
        raise TransitionError(f"the rollout's stored state cannot be read ({state.events[-1].reason}); nothing moves")


def _advance(
    state: RolloutState, phases: tuple[PhaseConfig, ...], now: float, action: str, reason: str, latest: Verdict | None
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
        latest=latest,
    )


def _may_step(state: RolloutState, phases: tuple[PhaseConfig, ...], verdict: Verdict) -> bool:
    following = state.phase_index + 1
    needs_proof = phases[following].approval or following == len(phases) - 1
    return verdict.decision == "pass" or (verdict.awaiting_evidence and not needs_proof)


def evaluate(
    state: RolloutState, verdict: Verdict, phases: tuple[PhaseConfig, ...], now: float, auto_rollback: bool
) -> RolloutState:
    """Apply the judge's verdict on the current window: FAIL rolls back. After the phase's
    `min_duration_s`, a step that leaves the canary short of full traffic needs no failing
    check (PASS, or WAIT only for evidence: Argo's and Flagger's rule, while the rollback tests
    watch every look and gain power at each higher weight); the step into the last phase or
    into an approval gate needs PASS, the canary shown within every tolerance."""
    if state.terminal:
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
            latest=verdict,
        )
    if state.status != "running" or not _may_step(state, phases, verdict):
        return state
    phase, following = phases[state.phase_index], phases[state.phase_index + 1]
    if now - state.phase_started_at < phase.min_duration_s:
        return state
    if verdict.decision == "wait":
        reason = f"phase {phase.name} met its minimums and no check fails; full traffic will need proof"
        return _advance(state, phases, now, "promote", reason, verdict)
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
    return _advance(state, phases, now, "promote", f"phase {phase.name} healthy: {verdict.reason}", verdict)


def approve(
    state: RolloutState, phases: tuple[PhaseConfig, ...], now: float, *, latest: Verdict | None = None
) -> RolloutState:
    _readable(state)
    if state.status != "awaiting_approval":
        raise TransitionError(f"nothing awaits approval: the rollout is {state.status}")
    following = phases[state.phase_index + 1]
    return _advance(state, phases, now, "approve", f"operator approved {following.name}", latest)


def pause(
    state: RolloutState, phases: tuple[PhaseConfig, ...], now: float, reason: str, *, latest: Verdict | None = None
) -> RolloutState:
    _readable(state)
    if state.status not in ("running", "awaiting_approval"):
        raise TransitionError(f"only a running or approval-waiting rollout can pause; it is {state.status}")
    return _move(state, phases, now, action="pause", to_status="paused", reason=reason, latest=latest)


def resume(
    state: RolloutState, phases: tuple[PhaseConfig, ...], now: float, *, latest: Verdict | None = None
) -> RolloutState:
    """Back to automation at the current phase's weight (undoing any manual weight)."""
    _readable(state)
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
        latest=latest,
    )


def set_weight(
    state: RolloutState, phases: tuple[PhaseConfig, ...], now: float, weight: float, *, latest: Verdict | None = None
) -> RolloutState:
    """A manual weight; automation pauses until `resume`."""
    _readable(state)
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
        latest=latest,
    )


def rollback(
    state: RolloutState, phases: tuple[PhaseConfig, ...], now: float, reason: str, *, latest: Verdict | None = None
) -> RolloutState:
    _readable(state)
    if state.status == "rolled_back":
        raise TransitionError("the rollout is already rolled back")
    return _move(
        state, phases, now, action="rollback", to_status="rolled_back", reason=reason, weight=0.0, latest=latest
    )


def restart(
    state: RolloutState, phases: tuple[PhaseConfig, ...], now: float, *, latest: Verdict | None = None
) -> RolloutState:
    """A new attempt from the first phase, after a rollback."""
    _readable(state)
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


def reconfigure(
    state: RolloutState, phases: tuple[PhaseConfig, ...], now: float, *, latest: Verdict | None = None
) -> RolloutState:
    """Adopt a changed config for the same version pair.

    The rollout keeps its place, clamped to the new plan: a shorter plan never promotes by
    itself (an unfinished rollout stays below the last, full phase), and a running rollout
    takes its phase's (possibly new) weight; a manual or rolled-back weight stays.
    """
    _readable(state)
    last_partial = len(phases) - 2
    if state.status == "complete":
        index = len(phases) - 1
    else:
        index = min(state.phase_index, last_partial)
    status = state.status
    if status == "awaiting_approval" and not phases[index + 1].approval:
        status = "running"
    weight = phases[index].weight if status in ("running", "awaiting_approval", "complete") else state.weight
    return _move(
        state,
        phases,
        now,
        action="configure",
        to_status=status,
        reason="adopted a changed config",
        phase_index=index,
        weight=weight,
        latest=latest,
    )


def waiting_for(state: RolloutState, phases: tuple[PhaseConfig, ...], latest: Verdict | None, now: float) -> str | None:
    """What the rollout waits for before its next move, in words; None once complete."""
    phase = phases[state.phase_index]
    if state.status == "complete":
        return None
    if state.status == "rolled_back":
        return "an operator restart (rolled back)"
    if state.status == "state_error":
        return f"a readable state store ({state.events[-1].reason})"
    if state.status == "paused":
        return "an operator resume (automation paused)"
    if state.status == "awaiting_approval":
        return f"operator approval to enter phase {phases[state.phase_index + 1].name}"
    if latest is None:
        return "the first evaluation of this phase"
    if not _may_step(state, phases, latest):
        return latest.reason
    remaining = phase.min_duration_s - (now - state.phase_started_at)
    return f"{remaining:.0f} s more in phase {phase.name} (min_duration_s {phase.min_duration_s:g})"
