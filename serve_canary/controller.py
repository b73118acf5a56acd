"""RolloutController: the actor that owns the rollout state and the versioned RoutingTable.

A thin shell around `rollout` (transitions), `judge` (verdicts) and `store` (durability):
it evaluates every `interval_s`, persists each new state *before* publishing its table, and
answers ingress replicas' long-polls. `ControllerClient` is the one way to talk to it, used
by the CLI and the ingress's HTTP admin routes alike.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, TypeVar

import ray
from pydantic import ValidationError
from ray import serve
from ray.actor import ActorHandle
from ray.exceptions import RayTaskError

from serve_canary import rollout
from serve_canary.collector import MetricsCollector, WindowSnapshot
from serve_canary.config import SHADOW_PHASE, CanaryConfig
from serve_canary.feedback import KEY_BYTES
from serve_canary.judge import Verdict, judge, judge_shadow
from serve_canary.metrics import ArmSummary
from serve_canary.notify import Notifier, message
from serve_canary.rollout import Event, RolloutState, TransitionError
from serve_canary.routing import ARMS, Arm, RoutingTable
from serve_canary.serving import failure_message
from serve_canary.shadow import ShadowTally, checked
from serve_canary.status import RolloutStatus, describe
from serve_canary.store import StateUnreadable, open_store

NAMESPACE = "serve_canary"
T = TypeVar("T")
logger = logging.getLogger("serve_canary.controller")


def controller_name(app_name: str) -> str:
    return f"{app_name}:controller"


def collector_name(app_name: str) -> str:
    return f"{app_name}:collector"


def rollout_id_for(config: CanaryConfig) -> str:
    """Same version pair, same rollout (a redeploy keeps it); a new pair starts a new one."""
    return f"{config.stable.served_version}..{config.canary.served_version}"


def table_for(state: RolloutState, config: CanaryConfig) -> RoutingTable:
    phase = config.rollout.plan[state.phase_index]
    shadow = config.rollout.shadow
    mirrored = shadow.fraction if shadow is not None and phase.name == SHADOW_PHASE and not state.terminal else 0.0
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
        shadow_fraction=mirrored,
    )


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class RolloutController:
    async def __init__(self, app_name: str, config: dict[str, Any]) -> None:  # type: ignore[misc]
        self._app_name = app_name
        # start_actors registers the collector before this actor, and a detached handle
        # stays valid across the collector's restarts.
        self._collector = ray.get_actor(collector_name(app_name), namespace=NAMESPACE)
        self._config = CanaryConfig.model_validate(config)
        self._store = open_store(self._config.state_store, app_name)
        self._feedback_key = secrets.token_bytes(KEY_BYTES)
        self._state: RolloutState | None = None
        self._table: RoutingTable | None = None
        self._changed = asyncio.Event()
        # Held from reading the state to publishing its successor, so that no transition is
        # computed from a state that another one is replacing.
        self._transition = asyncio.Lock()
        self._last_verdict: Verdict | None = None
        self._last_window: dict[Arm, ArmSummary] | None = None
        self._last_pairs: ShadowTally | None = None
        self._evaluated_at: float | None = None
        self._replicas: dict[Arm, int] = {}
        self._notifier = Notifier(lambda: self._config.notifications)
        self._judged_by: str | None = None  # the collector incarnation the last verdict read
        if self._load():
            await self.configure(self._config.model_dump(mode="json"))
        self._loop = asyncio.get_running_loop().create_task(self._evaluate_forever())

    def _load(self) -> bool:
        """Adopt the stored config, state and feedback key; False (and a `state_error` stand-in
        routing all traffic to stable) when the stored state cannot be read."""
        try:
            document = self._store.load()
            if document is not None:
                config = CanaryConfig.model_validate(document["config"])
                state = RolloutState.model_validate(document["state"])
                key = bytes.fromhex(document["feedback_key"]) if "feedback_key" in document else self._feedback_key
        except (StateUnreadable, ValidationError, KeyError, ValueError) as exc:
            reason = str(exc) if isinstance(exc, StateUnreadable) else f"{self._store.location}: {failure_message(exc)}"
            logger.error("rollout state unreadable; routing everything to stable: %s", reason)
            if self._state is None or self._state.status != "state_error":
                stand_in = rollout.unreadable(
                    rollout_id_for(self._config),
                    self._config.stable.served_version,
                    self._config.canary.served_version,
                    self._config.rollout.plan,
                    time.time(),
                    reason,
                )
                self._publish(stand_in)
                self._notify(stand_in)
            return False
        if document is not None:
            if "feedback_key" not in document:  # written before feedback tokens: keep the key from now on
                self._store.save({**document, "feedback_key": key.hex()})
            self._config, self._feedback_key = config, key
            self._publish(state)
        return True

    # -- state ----------------------------------------------------------------------------

    async def _commit(self, state: RolloutState) -> RolloutStatus:
        """Persist, then publish: a table is never visible unless its state is durable.
        Returns the published status. Callers hold `self._transition`.
        """
        document = {
            "config": self._config.model_dump(mode="json"),
            "state": state.model_dump(mode="json"),
            "feedback_key": self._feedback_key.hex(),
        }
        await asyncio.to_thread(self._store.save, document)
        self._publish(state)
        logger.info("rollout %s: %s", state.rollout_id, state.events[-1].reason)
        self._notify(state)
        return self._publish_status(state.events[-1])

    def _notify(self, state: RolloutState) -> None:
        """Send the transition that made `state` to the notification receivers (never waits)."""
        event = state.events[-1]
        self._notifier.send(message(self._app_name, self._config.model_name, state.rollout_id, event), event)

    def _publish(self, state: RolloutState) -> None:
        """Make `state` current and its table the one replicas route by."""
        if self._state is not None and state.window != self._state.window:
            self._last_verdict, self._last_window, self._last_pairs = None, None, None
        self._state = state
        self._table = table_for(state, self._config)
        self._changed.set()
        self._changed = asyncio.Event()

    def _publish_status(self, transition: Event | None) -> RolloutStatus:
        """Send the status (and the transition just made) to the collector, fire-and-forget,
        for the Prometheus gauges and counters; return it."""
        status = self.status()
        self._collector.rollout.remote(status, transition)
        return status

    async def configure(self, config: dict[str, Any]) -> None:
        """Adopt a (re)deployed config: a new version pair starts a new rollout, a changed
        config for the same pair is a `configure` transition, the same config changes nothing."""
        new_config = CanaryConfig.model_validate(config)
        async with self._transition:
            if self._state is not None and self._state.status == "state_error":  # never overwrite it
                return
            await self._adopt(new_config)

    async def _adopt(self, new_config: CanaryConfig) -> None:
        previous, rollout_id, now = self._state, rollout_id_for(new_config), time.time()
        if previous is not None and previous.rollout_id == rollout_id and new_config == self._config:
            return
        phases, self._config = new_config.rollout.plan, new_config
        if previous is None or previous.rollout_id != rollout_id:
            table_version = 1 if previous is None else previous.table_version + 1
            stable, canary = new_config.stable.served_version, new_config.canary.served_version
            state = rollout.start(rollout_id, stable, canary, phases, now, table_version)
        else:
            state = rollout.reconfigure(previous, phases, now, latest=self._last_verdict)
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

    async def _count_replicas(self) -> None:
        """Running replicas per arm, as Serve reports them (for the capacity finding)."""
        try:
            status = await asyncio.to_thread(serve.status)
            deployments = status.applications[self._app_name].deployments
            self._replicas = {
                arm: sum(n for state, n in deployments[arm].replica_states.items() if state == "RUNNING")
                for arm in ARMS
                if arm in deployments
            }
        except Exception as exc:  # Serve busy or restarting: no finding this interval
            logger.info("could not count replicas: %s", failure_message(exc))
            self._replicas = {}

    async def evaluate(self) -> RolloutStatus:
        """Judge the current window (with the evidence of the attempt's closed ones) and apply
        the verdict."""
        await self._count_replicas()
        state = self._current
        if state.status == "state_error":
            async with self._transition:
                if self._load():
                    if self._current.status == "state_error":  # the damaged document was removed
                        self._state = None
                        await self._adopt(self._config)
                        return self.status()
                    return await self._commit(rollout.recovered(self._current, self._config.rollout.plan, time.time()))
            return self._publish_status(None)
        if state.terminal:  # nothing to judge; the gauges stay current (also for a restarted collector)
            return self._publish_status(None)
        snapshot: WindowSnapshot = await self._collector.window.remote(state.window)
        window = snapshot.arms
        async with self._transition:
            if self._state is not state:  # an operator command moved the rollout meanwhile
                return self.status()
            health, phases = self._config.health, self._config.rollout.plan
            latest, judged_by = self._last_verdict, self._judged_by
            self._judged_by = snapshot.collector
            if latest is not None and judged_by != snapshot.collector:
                reason = "the metrics collector restarted and lost this window's records; judging a new window"
                return await self._commit(rollout.reopen_window(state, phases, time.time(), reason, latest=latest))
            phase, shadow = phases[state.phase_index], self._config.rollout.shadow
            if phase.name == SHADOW_PHASE and shadow is not None:
                comparisons = [(c.name, c.max_rate) for c in checked(shadow)]
                verdict = judge_shadow(snapshot.pairs, comparisons, health, phase.min_requests)
                self._last_pairs = snapshot.pairs
            else:
                verdict = judge(
                    window["stable"],
                    window["canary"],
                    health,
                    phase.min_requests,
                    health.alpha,
                    state.evidence,
                    weight=state.weight,
                    window_index=state.window_seq,
                    replicas=self._replicas,
                )
            self._last_verdict, self._evaluated_at = verdict, time.time()
            self._last_window = {arm: aggregate.summary() for arm, aggregate in window.items()}
            new_state = rollout.evaluate(state, verdict, phases, self._evaluated_at, self._config.rollout.auto_rollback)
            if new_state is state:
                return self._publish_status(None)
            return await self._commit(new_state)

    # -- routing ----------------------------------------------------------------------------

    async def get_table(self, known_version: int, timeout_s: float) -> RoutingTable:
        """Long-poll: return at once if the table moved past `known_version`, else on change or timeout."""
        assert self._table is not None, "configure() runs before any other call"
        if self._table.version == known_version:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout_s)
            except TimeoutError:
                pass
        return self._table

    # -- operator commands ----------------------------------------------------------------

    async def _command(self, transition: Callable[..., RolloutState], *args: Any) -> RolloutStatus:
        async with self._transition:
            phases, latest = self._config.rollout.plan, self._last_verdict
            return await self._commit(transition(self._current, phases, time.time(), *args, latest=latest))

    async def pause(self, reason: str) -> RolloutStatus:
        return await self._command(rollout.pause, reason)

    async def resume(self) -> RolloutStatus:
        return await self._command(rollout.resume)

    async def approve(self) -> RolloutStatus:
        return await self._command(rollout.approve)

    async def rollback(self, reason: str) -> RolloutStatus:
        return await self._command(rollout.rollback, reason)

    async def restart(self) -> RolloutStatus:
        return await self._command(rollout.restart)

    async def set_weight(self, weight: float) -> RolloutStatus:
        return await self._command(rollout.set_weight, weight)

    async def feedback_key(self) -> bytes:
        """The key feedback tokens are signed with (ingress replicas only)."""
        return self._feedback_key

    # -- status -------------------------------------------------------------------------------

    def history(self) -> tuple[Event, ...]:
        """Every event the rollout state keeps (the status carries only the recent ones)."""
        return self._current.events

    def status(self) -> RolloutStatus:
        return describe(
            self._app_name,
            self._config.model_name,
            self._current,
            self._config.rollout.plan,
            self._last_verdict,
            self._last_window,
            self._evaluated_at,
            time.time(),
            self._replicas,
            self._last_pairs,
        )


def start_actors(app_name: str, config: CanaryConfig) -> tuple[ActorHandle[Any], ActorHandle[Any]]:
    """Get or create the app's detached collector and controller (idempotent across replicas)."""
    common = dict(namespace=NAMESPACE, lifetime="detached", get_if_exists=True)
    # The collector first: the controller looks it up by name. (Ray's decorators hide `.options`.)
    collector = MetricsCollector.options(name=collector_name(app_name), **common)  # type: ignore[attr-defined]
    collector_handle = collector.remote(config.model_name, config.feedback.token_ttl_s)
    controller = RolloutController.options(name=controller_name(app_name), **common)  # type: ignore[attr-defined]
    return controller.remote(app_name, config.model_dump(mode="json")), collector_handle


class ControllerClient:
    """The one client of the controller: the CLI and the HTTP admin routes both use it."""

    def __init__(self, handle: ActorHandle[Any]) -> None:
        self._handle = handle

    @classmethod
    def for_app(cls, app_name: str) -> ControllerClient:
        return cls(ray.get_actor(controller_name(app_name), namespace=NAMESPACE))

    async def _call(self, returns: type[T], method: str, *args: Any) -> T:
        try:
            result = await getattr(self._handle, method).remote(*args)
        except RayTaskError as exc:
            if isinstance(exc.cause, TransitionError):
                raise TransitionError(str(exc.cause)) from None
            raise
        if not isinstance(result, returns):
            raise TypeError(f"the controller's {method} returned {type(result).__name__}, not {returns.__name__}")
        return result

    async def status(self) -> RolloutStatus:
        return await self._call(RolloutStatus, "status")

    async def history(self) -> tuple[Event, ...]:
        return await self._call(tuple, "history")

    async def configure(self, config: CanaryConfig) -> None:
        await self._call(type(None), "configure", config.model_dump(mode="json"))

    async def get_table(self, known_version: int, timeout_s: float) -> RoutingTable:
        return await self._call(RoutingTable, "get_table", known_version, timeout_s)

    async def pause(self, reason: str = "paused by operator") -> RolloutStatus:
        return await self._call(RolloutStatus, "pause", reason)

    async def resume(self) -> RolloutStatus:
        return await self._call(RolloutStatus, "resume")

    async def approve(self) -> RolloutStatus:
        return await self._call(RolloutStatus, "approve")

    async def rollback(self, reason: str = "rolled back by operator") -> RolloutStatus:
        return await self._call(RolloutStatus, "rollback", reason)

    async def restart(self) -> RolloutStatus:
        return await self._call(RolloutStatus, "restart")

    async def set_weight(self, weight: float) -> RolloutStatus:
        return await self._call(RolloutStatus, "set_weight", weight)

    async def feedback_key(self) -> bytes:
        return await self._call(bytes, "feedback_key")
