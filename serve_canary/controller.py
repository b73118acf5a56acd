"""RolloutController: the actor that owns the rollout state and the versioned RoutingTable.

A thin shell around `rollout` (transitions), `judge` (verdicts) and `store` (durability):
it evaluates every `interval_s`, persists each new state *before* publishing its table, and
answers ingress replicas' long-polls. `ControllerClient` is the one way to talk to it, used
by the CLI and the ingress's HTTP admin routes alike.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray
from ray.exceptions import RayTaskError

from serve_canary import rollout
from serve_canary.collector import MetricsCollector
from serve_canary.config import CanaryConfig
from serve_canary.judge import Verdict, judge
from serve_canary.rollout import RolloutState, TransitionError
from serve_canary.routing import RoutingTable
from serve_canary.store import open_store

NAMESPACE = "serve_canary"
RECENT_EVENTS = 20
logger = logging.getLogger("serve_canary.controller")


def controller_name(app_name: str) -> str:
    return f"{app_name}:controller"


def collector_name(app_name: str) -> str:
    return f"{app_name}:collector"


def rollout_id_for(config: CanaryConfig) -> str:
    """Same version pair, same rollout (a redeploy keeps it); a new pair starts a new one."""
    return f"{config.stable.served_version}..{config.canary.served_version}"


def table_for(state: RolloutState, config: CanaryConfig) -> RoutingTable:
    phase = config.rollout.phases[state.phase_index]
    return RoutingTable(
        version=state.table_version,
        rollout_id=state.rollout_id,
        window=state.window,
        salt=config.routing.salt or state.rollout_id,
        canary_weight=state.weight,
        stable_version=state.stable_version,
        canary_version=state.canary_version,
        phase=phase.name,
        status=state.status,
    )


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class RolloutController:
    async def __init__(self, app_name: str, config: dict[str, Any]) -> None:  # type: ignore[misc]
        self._app_name = app_name
        # start_actors registers the collector before this actor, and a detached handle
        # stays valid across the collector's restarts.
        self._collector = ray.get_actor(collector_name(app_name), namespace=NAMESPACE)
        self._store = open_store(CanaryConfig.model_validate(config).state_store, app_name)
        persisted = self._store.load()
        self._config = CanaryConfig.model_validate(persisted["config"] if persisted else config)
        self._state: RolloutState | None = RolloutState.model_validate(persisted["state"]) if persisted else None
        self._changed = asyncio.Event()
        # Held from reading the state to publishing its successor, so that no transition is
        # computed from a state that another one is replacing.
        self._transition = asyncio.Lock()
        self._last_verdict: Verdict | None = None
        self._last_window: dict[str, dict] | None = None
        self._evaluated_at: float | None = None
        await self.configure(self._config.model_dump(mode="json"))
        self._loop = asyncio.get_running_loop().create_task(self._evaluate_forever())

    # -- state ----------------------------------------------------------------------------

    async def _commit(self, state: RolloutState) -> dict[str, Any]:
        """Persist, then publish: a table is never visible unless its state is durable.
        Returns the published status. Callers hold `self._transition`.
        """
        document = {"config": self._config.model_dump(mode="json"), "state": state.model_dump(mode="json")}
        await asyncio.to_thread(self._store.save, document)
        if self._state is not None and state.window != self._state.window:
            self._last_verdict, self._last_window = None, None
        self._state = state
        self._table = table_for(state, self._config)
        self._changed.set()
        self._changed = asyncio.Event()
        logger.info("rollout %s: %s", state.rollout_id, state.events[-1].reason)
        return self._publish_status()

    def _publish_status(self) -> dict[str, Any]:
        """Send the status to the collector (fire-and-forget, for the Prometheus gauges); return it."""
        status = self.status()
        self._collector.rollout.remote(status)
        return status

    async def configure(self, config: dict[str, Any]) -> None:
        """Adopt a (re)deployed config: a new version pair starts a new rollout."""
        async with self._transition:
            self._config = CanaryConfig.model_validate(config)
            phases = self._config.rollout.phases
            rollout_id = rollout_id_for(self._config)
            previous = self._state
            if previous is None or previous.rollout_id != rollout_id:
                state = rollout.start(
                    rollout_id,
                    self._config.stable.served_version,
                    self._config.canary.served_version,
                    phases,
                    time.time(),
                )
                if previous is not None:
                    state = state.model_copy(update={"table_version": previous.table_version + 1})
            else:
                state = previous.model_copy(update={"phase_index": min(previous.phase_index, len(phases) - 1)})
            await self._commit(state)

    # -- evaluation -----------------------------------------------------------------------

    async def _evaluate_forever(self) -> None:
        while True:
            await asyncio.sleep(self._config.rollout.interval_s)
            try:
                await self.evaluate()
            except Exception:
                logger.exception("evaluation failed; routing continues on the current table")

    @property
    def _current(self) -> RolloutState:
        assert self._state is not None, "configure() runs before any other call"
        return self._state

    async def evaluate(self) -> dict[str, Any]:
        """Judge the current window once and apply the verdict."""
        state = self._current
        if state.status in ("rolled_back", "complete"):
            return self.status()
        windows = await self._collector.windows.remote(state.attempt_windows)
        async with self._transition:
            if self._state is not state:  # an operator command moved the rollout meanwhile
                return self.status()
            window, earlier = windows[-1], [(w["stable"], w["canary"]) for w in windows[:-1]]
            health, phase = self._config.health, self._config.rollout.phases[state.phase_index]
            verdict = judge(window["stable"], window["canary"], health, phase.min_requests, health.alpha, earlier)
            self._last_verdict, self._evaluated_at = verdict, time.time()
            self._last_window = {arm: aggregate.summary() for arm, aggregate in window.items()}
            new_state = rollout.evaluate(
                state, verdict, self._config.rollout.phases, self._evaluated_at, self._config.rollout.auto_rollback
            )
            if new_state is state:
                return self._publish_status()
            return await self._commit(new_state)

    # -- routing ----------------------------------------------------------------------------

    async def get_table(self, known_version: int, timeout_s: float) -> RoutingTable:
        """Long-poll: return at once if the table moved past `known_version`, else on change or timeout."""
        if self._table.version == known_version:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout_s)
            except TimeoutError:
                pass
        return self._table

    # -- operator commands ----------------------------------------------------------------

    async def _command(self, transition, *args: Any) -> dict[str, Any]:
        async with self._transition:
            return await self._commit(transition(self._state, self._config.rollout.phases, time.time(), *args))

    async def pause(self, reason: str) -> dict[str, Any]:
        return await self._command(rollout.pause, reason)

    async def resume(self) -> dict[str, Any]:
        return await self._command(rollout.resume)

    async def approve(self) -> dict[str, Any]:
        return await self._command(rollout.approve)

    async def rollback(self, reason: str) -> dict[str, Any]:
        return await self._command(rollout.rollback, reason)

    async def restart(self) -> dict[str, Any]:
        return await self._command(rollout.restart)

    async def set_weight(self, weight: float) -> dict[str, Any]:
        return await self._command(rollout.set_weight, weight)

    # -- status -------------------------------------------------------------------------------

    def _waiting_for(self, now: float) -> str | None:
        state, phases = self._current, self._config.rollout.phases
        phase = phases[state.phase_index]
        if state.status == "complete":
            return None
        if state.status == "rolled_back":
            return "an operator restart (rolled back)"
        if state.status == "paused":
            return "an operator resume (automation paused)"
        if state.status == "awaiting_approval":
            return f"operator approval to enter phase {phases[state.phase_index + 1].name}"
        if self._last_verdict is None:
            return "the first evaluation of this phase"
        if self._last_verdict.decision != "pass":
            return self._last_verdict.reason
        remaining = phase.min_duration_s - (now - state.phase_started_at)
        return f"{remaining:.0f} s more in phase {phase.name} (min_duration_s {phase.min_duration_s:g})"

    def status(self) -> dict[str, Any]:
        state, phases, now = self._current, self._config.rollout.phases, time.time()
        phase = phases[state.phase_index]
        return {
            "app": self._app_name,
            "model": self._config.model_name,
            "rollout_id": state.rollout_id,
            "attempt": state.attempt,
            "stable_version": state.stable_version,
            "canary_version": state.canary_version,
            "status": state.status,
            "phase": phase.name,
            "phase_index": state.phase_index,
            "phases": [p.model_dump() for p in phases],
            "canary_weight": state.weight,
            "time_in_phase_s": round(now - state.phase_started_at, 3),
            "waiting_for": self._waiting_for(now),
            "table_version": state.table_version,
            "window": state.window,
            "evaluated_at": self._evaluated_at,
            "last_verdict": self._last_verdict.to_dict() if self._last_verdict else None,
            "arms": self._last_window,
            "events": [event.model_dump() for event in state.events[-RECENT_EVENTS:]],
        }


def start_actors(app_name: str, config: CanaryConfig) -> tuple[ray.actor.ActorHandle, ray.actor.ActorHandle]:
    """Get or create the app's detached collector and controller (idempotent across replicas)."""
    common = dict(namespace=NAMESPACE, lifetime="detached", get_if_exists=True)
    # The collector first: the controller looks it up by name. (Ray's decorators hide `.options`.)
    collector = MetricsCollector.options(name=collector_name(app_name), **common)  # type: ignore[attr-defined]
    collector_handle = collector.remote(config.model_name)
    controller = RolloutController.options(name=controller_name(app_name), **common)  # type: ignore[attr-defined]
    return controller.remote(app_name, config.model_dump(mode="json")), collector_handle


class ControllerClient:
    """The one client of the controller: the CLI and the HTTP admin routes both use it."""

    def __init__(self, handle: ray.actor.ActorHandle) -> None:
        self._handle = handle

    @classmethod
    def for_app(cls, app_name: str) -> ControllerClient:
        return cls(ray.get_actor(controller_name(app_name), namespace=NAMESPACE))

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self._handle, method).remote(*args)
        except RayTaskError as exc:
            if isinstance(exc.cause, TransitionError):
                raise TransitionError(str(exc.cause)) from None
            raise

    async def status(self) -> dict[str, Any]:
        return await self._call("status")

    async def configure(self, config: CanaryConfig) -> None:
        await self._call("configure", config.model_dump(mode="json"))

    async def get_table(self, known_version: int, timeout_s: float) -> RoutingTable:
        return await self._call("get_table", known_version, timeout_s)

    async def pause(self, reason: str = "paused by operator") -> dict[str, Any]:
        return await self._call("pause", reason)

    async def resume(self) -> dict[str, Any]:
        return await self._call("resume")

    async def approve(self) -> dict[str, Any]:
        return await self._call("approve")

    async def rollback(self, reason: str = "rolled back by operator") -> dict[str, Any]:
        return await self._call("rollback", reason)

    async def restart(self) -> dict[str, Any]:
        return await self._call("restart")

    async def set_weight(self, weight: float) -> dict[str, Any]:
        return await self._call("set_weight", weight)
