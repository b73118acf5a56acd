"""Every transition of the rollout state machine, with an injected clock."""

from __future__ import annotations

import pytest

from serve_canary.config import PhaseConfig
from serve_canary.judge import MetricCheck, Verdict, WindowEvidence
from serve_canary.rollout import (
    TransitionError,
    approve,
    evaluate,
    pause,
    reconfigure,
    recovered,
    reopen_window,
    restart,
    resume,
    rollback,
    set_weight,
    start,
    unreadable,
    waiting_for,
)

PHASES = (
    PhaseConfig(name="init", weight=0.05, min_duration_s=10),
    PhaseConfig(name="early", weight=0.2, min_duration_s=10),
    PhaseConfig(name="progress", weight=0.5, min_duration_s=10),
    PhaseConfig(name="full", weight=1.0, approval=True),
)
PASS = Verdict("pass", "healthy", (), 100, 100)
WAIT = Verdict("wait", "waiting for traffic", (), 3, 100)
FAIL = Verdict("fail", "error_rate 20% above 1%", (), 100, 100)
EVIDENCE = WindowEvidence(0.05, {"error_rate": ((1, 20, 0.05),)})
PASS_WITH_EVIDENCE = Verdict(
    "pass",
    "healthy",
    (MetricCheck("error_rate", 0.01, 0.01, 1.5, "pass", "shown", None, ((1, 20, 0.05),)),),
    100,
    100,
    weight=0.05,
)


def fresh(now: float = 0.0):
    return start("v1..v2", "v1", "v2", PHASES, now)


def walk_to_approval():
    state = fresh()
    for t in (10, 20, 30):
        state = evaluate(state, PASS, PHASES, t, auto_rollback=True)
    return state


def test_start_is_running_at_the_first_phase():
    state = fresh()
    assert (state.status, state.phase_index, state.weight, state.table_version) == ("running", 0, 0.05, 1)
    assert state.events[0].action == "start"


def test_pass_before_min_duration_stays():
    state = fresh()
    assert evaluate(state, PASS, PHASES, 9.9, True) is state


def test_wait_never_advances_however_long():
    state = fresh()
    assert evaluate(state, WAIT, PHASES, 1e9, True) is state


UNPROVEN = Verdict("wait", "error_rate: not yet shown within 1.5×", (), 100, 100, awaiting_evidence=True)


def test_a_phase_short_of_full_traffic_steps_up_on_its_minimums_when_no_check_fails():
    state = fresh()
    assert evaluate(state, UNPROVEN, PHASES, 9.9, True) is state
    assert waiting_for(state, PHASES, UNPROVEN, 4) == "6 s more in phase init (min_duration_s 10)"
    early = evaluate(state, UNPROVEN, PHASES, 10, True)
    assert (early.status, early.weight, early.events[-1].action) == ("running", 0.2, "promote")
    assert "full traffic will need proof" in early.events[-1].reason
    progress = evaluate(early, UNPROVEN, PHASES, 20, True)
    assert progress.weight == 0.5
    # the approval gate (and full traffic) needs the canary shown within its tolerances
    assert evaluate(progress, UNPROVEN, PHASES, 1e9, True) is progress
    assert waiting_for(progress, PHASES, UNPROVEN, 1e9) == UNPROVEN.reason
    assert evaluate(progress, PASS, PHASES, 30, True).status == "awaiting_approval"


def test_a_plan_of_one_step_to_full_traffic_needs_proof():
    phases = (PhaseConfig(name="a", weight=0.1), PhaseConfig(name="b", weight=1.0))
    state = start("r", "v1", "v2", phases, 0)
    assert evaluate(state, UNPROVEN, phases, 1e9, True) is state


def test_pass_after_min_duration_promotes_and_opens_a_new_window():
    state = fresh()
    promoted = evaluate(state, PASS, PHASES, 10, True)
    assert (promoted.status, promoted.phase_index, promoted.weight) == ("running", 1, 0.2)
    assert promoted.window != state.window and promoted.phase_started_at == 10
    assert promoted.table_version == state.table_version + 1
    event = promoted.events[-1]
    assert (event.action, event.from_status, event.to_status, event.phase, event.weight, event.at) == (
        "promote",
        "running",
        "running",
        "early",
        0.2,
        10,
    )


def test_approval_gate_holds_until_approved_then_completes():
    state = walk_to_approval()
    assert (state.status, state.phase_index, state.weight) == ("awaiting_approval", 2, 0.5)
    assert evaluate(state, PASS, PHASES, 1e9, True) is state
    done = approve(state, PHASES, 100)
    assert (done.status, done.phase_index, done.weight) == ("complete", 3, 1.0)
    assert evaluate(done, FAIL, PHASES, 101, True) is done  # complete is final for the judge


@pytest.mark.parametrize("status_maker", [fresh, walk_to_approval, lambda: pause(fresh(), PHASES, 1, "look")])
def test_fail_rolls_back_at_once_from_any_live_status(status_maker):
    state = status_maker()
    rolled = evaluate(state, FAIL, PHASES, 50, True)
    assert (rolled.status, rolled.weight) == ("rolled_back", 0.0)
    assert rolled.events[-1].action == "auto_rollback"
    assert "error_rate" in rolled.events[-1].reason
    assert rolled.events[-1].evidence["decision"] == "fail"


def test_fail_without_auto_rollback_only_stays():
    state = fresh()
    assert evaluate(state, FAIL, PHASES, 50, auto_rollback=False) is state


def test_rolled_back_stays_rolled_back_until_restart():
    rolled = evaluate(fresh(), FAIL, PHASES, 5, True)
    for t in (10, 100, 1000):
        assert evaluate(rolled, PASS, PHASES, t, True) is rolled
    with pytest.raises(TransitionError):
        resume(rolled, PHASES, 6)
    with pytest.raises(TransitionError):
        set_weight(rolled, PHASES, 6, 0.5)
    with pytest.raises(TransitionError):
        rollback(rolled, PHASES, 6, "again")
    again = restart(rolled, PHASES, 7)
    assert (again.status, again.phase_index, again.weight, again.attempt) == ("running", 0, 0.05, 2)
    assert again.window != rolled.window


def test_restart_only_after_rollback():
    with pytest.raises(TransitionError, match="only a rolled-back rollout can restart"):
        restart(fresh(), PHASES, 1)


def test_manual_weight_pauses_and_resume_restores_the_phase_weight():
    state = set_weight(fresh(), PHASES, 3, 0.4)
    assert (state.status, state.weight) == ("paused", 0.4)
    assert evaluate(state, PASS, PHASES, 1e6, True) is state  # automation paused
    resumed = resume(state, PHASES, 4)
    assert (resumed.status, resumed.weight, resumed.phase_started_at) == ("running", 0.05, 4)
    with pytest.raises(TransitionError):
        set_weight(fresh(), PHASES, 1, 1.2)


def test_pause_and_resume_keep_the_window_when_the_weight_is_unchanged():
    state = fresh()
    paused = pause(state, PHASES, 3, "investigating")
    resumed = resume(paused, PHASES, 4)
    assert resumed.window == state.window and resumed.phase_started_at == 0
    with pytest.raises(TransitionError):
        pause(paused, PHASES, 5, "twice")


def test_approve_without_a_gate_is_refused():
    with pytest.raises(TransitionError, match="nothing awaits approval"):
        approve(fresh(), PHASES, 1)


def test_operator_rollback_from_complete_is_allowed():
    done = approve(walk_to_approval(), PHASES, 40)
    rolled = rollback(done, PHASES, 41, "customer complaints")
    assert (rolled.status, rolled.weight, rolled.events[-1].reason) == ("rolled_back", 0.0, "customer complaints")


def test_phases_without_approval_complete_on_their_own():
    phases = (PhaseConfig(name="a", weight=0.1), PhaseConfig(name="b", weight=1.0))
    state = evaluate(start("r", "v1", "v2", phases, 0), PASS, phases, 0, True)
    assert (state.status, state.weight) == ("complete", 1.0)


def test_state_round_trips_through_json():
    from serve_canary.rollout import RolloutState

    state = walk_to_approval()
    assert RolloutState.model_validate_json(state.model_dump_json()) == state


def test_a_state_stored_before_evidence_carried_its_weight_still_loads():
    from serve_canary.rollout import RolloutState

    stored = fresh().model_dump(mode="json") | {"evidence": [{"error_rate": [1, 20, 0.05]}]}
    assert RolloutState.model_validate(stored).evidence == (EVIDENCE,)


def test_closed_windows_leave_their_last_evidence_to_their_attempt_only():
    state = fresh()
    for t in (10, 20, 30):  # init → early → progress → awaiting approval: two windows closed
        state = evaluate(state, PASS_WITH_EVIDENCE, PHASES, t, auto_rollback=True)
    assert state.evidence == (EVIDENCE, EVIDENCE)
    assert approve(state, PHASES, 31, latest=PASS_WITH_EVIDENCE).evidence == (EVIDENCE,) * 3
    assert pause(state, PHASES, 31, "look", latest=PASS_WITH_EVIDENCE).evidence == (EVIDENCE,) * 2  # same window
    again = restart(evaluate(state, FAIL, PHASES, 40, True), PHASES, 41)
    assert again.evidence == () and again.window.startswith("v1..v2/2/")
    assert set_weight(again, PHASES, 42, 0.3, latest=None).evidence == ()  # nothing judged: nothing to carry


def test_a_shorter_plan_is_adopted_as_an_event_and_never_promotes_by_itself():
    at_progress = evaluate(evaluate(fresh(), PASS, PHASES, 10, True), PASS, PHASES, 20, True)
    shorter = (PHASES[0], PHASES[1], PhaseConfig(name="full", weight=1.0))
    adopted = reconfigure(at_progress, shorter, 25)
    assert (adopted.phase_index, adopted.weight, adopted.status) == (1, 0.2, "running")
    assert adopted.events[-1].action == "configure" and adopted.window != at_progress.window
    awaiting = evaluate(at_progress, PASS, PHASES, 30, True)
    no_gate = (*PHASES[:3], PhaseConfig(name="full", weight=1.0))
    assert awaiting.status == "awaiting_approval"
    assert reconfigure(awaiting, no_gate, 31).status == "running"
    manual = set_weight(at_progress, PHASES, 21, 0.3)
    assert reconfigure(manual, PHASES, 22).weight == 0.3  # a manual weight stays


def test_waiting_for_says_what_the_next_move_needs():
    state = fresh()
    assert waiting_for(state, PHASES, None, 1) == "the first evaluation of this phase"
    assert waiting_for(state, PHASES, WAIT, 1) == "waiting for traffic"
    assert waiting_for(state, PHASES, PASS, 4) == "6 s more in phase init (min_duration_s 10)"
    awaiting = walk_to_approval()
    assert waiting_for(awaiting, PHASES, PASS, 31) == "operator approval to enter phase full"
    assert waiting_for(rollback(awaiting, PHASES, 32, "bad"), PHASES, None, 33) == "an operator restart (rolled back)"


def test_an_unreadable_state_routes_to_stable_and_refuses_every_command():
    stand_in = unreadable("v1..v2", "v1", "v2", PHASES, 5.0, "/s/state.json: not JSON")
    assert (stand_in.status, stand_in.weight, stand_in.terminal) == ("state_error", 0.0, True)
    assert evaluate(stand_in, FAIL, PHASES, 6, True) is stand_in
    for command in (approve, resume, restart, reconfigure):
        with pytest.raises(TransitionError, match="cannot be read"):
            command(stand_in, PHASES, 6)
    with pytest.raises(TransitionError, match="cannot be read"):
        set_weight(stand_in, PHASES, 6, 0.5)
    assert waiting_for(stand_in, PHASES, None, 6) == "a readable state store (/s/state.json: not JSON)"
    back = recovered(fresh(), PHASES, 7)
    assert (back.events[-1].action, back.status, back.window) == ("state_recovered", "running", fresh().window)


def test_a_reopened_window_keeps_what_the_judge_saw_and_starts_counting_afresh():
    state = fresh()
    reopened = reopen_window(state, PHASES, 3, "collector restarted", latest=PASS_WITH_EVIDENCE)
    assert reopened.window != state.window and (reopened.phase_index, reopened.weight) == (0, 0.05)
    assert reopened.evidence == (EVIDENCE,) and reopened.events[-1].action == "reopen_window"
    assert reopened.status == "running" and reopened.phase_started_at == 3
