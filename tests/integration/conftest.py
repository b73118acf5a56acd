"""One real local Ray cluster and one Serve instance per test session; each test deploys its
own application from a config dict, exactly as `serve run CONFIG` would."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import ray
from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeDeploySchema

from serve_canary.config import MAIN_LOOP_ENV
from serve_canary.controller import NAMESPACE, collector_name, controller_name
from serve_canary.metrics import ArmAggregate

ADMIN_TOKEN = "test-admin-token"
OUTPUT_TOKENS = 6
FAST_PHASES = [
    {"name": "init", "weight": 0.05, "min_duration_s": 1.0, "min_requests": 20},
    {"name": "early", "weight": 0.20, "min_duration_s": 1.0, "min_requests": 20},
    {"name": "progress", "weight": 0.50, "min_duration_s": 1.0, "min_requests": 20},
    {"name": "full", "weight": 1.0, "approval": True},
]


# A stopping replica still waits for its requests in flight; it looks every 0.1 s instead of
# Serve's 2 s, so deleting a test's app takes ~1 s instead of ~3 s.
DRAIN_POLL = {"graceful_shutdown_wait_loop_s": 0.1}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def cluster() -> Iterator[dict[str, Any]]:
    # Ray's default token auth stays on: a new local cluster makes a token (~/.ray/auth_token).
    # Two vLLM engines starting on 2 cores starve the proxy and the health checks for seconds.
    os.environ["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] = "60"
    os.environ["RAY_SERVE_LLM_DEFAULT_HEALTH_CHECK_TIMEOUT_S"] = "60"
    os.environ["SERVE_CANARY_ADMIN_TOKEN"] = ADMIN_TOKEN  # replicas inherit the driver's environment
    context = ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        namespace=NAMESPACE,
        logging_level="ERROR",
        log_to_driver=False,
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield {"port": port, "gcs_address": context.address_info["gcs_address"]}
    serve.shutdown()
    ray.shutdown()


# Keep automation out of the way: the first phase cannot complete within a test.
HOLD = {
    "interval_s": 0.5,
    "auto_rollback": False,
    "phases": [
        {"name": "init", "weight": 0.05, "min_duration_s": 3600, "min_requests": 1},
        {"name": "full", "weight": 1.0, "approval": True},
    ],
}


def app_args(canary_engine: dict | None = None, stable_engine: dict | None = None, **overrides: Any) -> dict[str, Any]:
    """Application args with fast simulated engines and phases compressed to seconds."""
    fast = {"ttft_ms": 20, "itl_ms": 5, "output_tokens": OUTPUT_TOKENS, "jitter": 0.1}
    args: dict[str, Any] = {
        "model_name": "test-llm",
        "stable": {"version": "v1", "engine": "simulated", "engine_args": {**fast, "seed": 1, **(stable_engine or {})}},
        "canary": {"version": "v2", "engine": "simulated", "engine_args": {**fast, "seed": 2, **(canary_engine or {})}},
        "rollout": {"interval_s": 0.5, "phases": FAST_PHASES},
        # Promotion needs evidence: ~45 clean canary requests bound its error rate under
        # 10 % (1 % would take ~600, minutes at a 5 % weight on this machine). Millisecond
        # inter-token gaps on a loaded 2-core box are mostly scheduler jitter, hence 2×.
        "health": {"max_error_rate": 0.1, "max_itl_increase": 2.0},
    }
    args.update(overrides)
    return args


class App:
    """A deployed serve-canary application under test."""

    def __init__(self, name: str, port: int, model: str = "test-llm") -> None:
        self.name, self.model = name, model
        self.url = f"http://127.0.0.1:{port}/{name}"
        self.handle = serve.get_app_handle(name)
        self.http = httpx.Client(base_url=self.url, timeout=30.0)

    def chat(self, user: str | None = None, **body: Any) -> httpx.Response:
        headers = {"x-user-id": user} if user else {}
        payload = {"model": self.model, "messages": [{"role": "user", "content": "hello canary"}], **body}
        return self.http.post("/v1/chat/completions", json=payload, headers=headers)

    def status(self) -> dict[str, Any]:
        """The status as JSON, as the HTTP route and the page see it (through the handle API)."""
        return self.handle.status.remote().result().model_dump(mode="json")

    def evaluations(self, count: int, timeout_s: float = 30.0) -> dict[str, Any]:
        """Wait for `count` more evaluations by the controller; return the status after them."""
        seen = {self.status()["evaluated_at"]}

        def evaluated() -> dict[str, Any] | None:
            status = self.status()
            seen.add(status["evaluated_at"])
            return status if len(seen) > count else None

        return wait_for(evaluated, timeout_s, f"{count} evaluations")

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.http.request(
            method, f"/-/canary/{path}", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, **kwargs
        )

    @property
    def controller(self) -> ray.actor.ActorHandle:
        return ray.get_actor(controller_name(self.name), namespace=NAMESPACE)

    def window(self, window_id: str) -> dict[str, ArmAggregate]:
        """The collector's per-arm aggregates of one metrics window."""
        return ray.get(ray.get_actor(collector_name(self.name), namespace=NAMESPACE).window.remote(window_id)).arms


def operator_env(**extra: str) -> dict[str, str]:
    """An operator's shell: no RAY_AUTH_MODE (ray.init set it in this process), the token on disk."""
    return {**{k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}, **extra}


def serve_canary_cli(
    *args: str, env: dict[str, str] | None = None, timeout_s: float = 60.0
) -> subprocess.CompletedProcess:
    """`serve-canary ARGS` in a process of its own, from an operator's shell by default."""
    return subprocess.run(
        [sys.executable, "-m", "serve_canary.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env or operator_env(),
    )


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.05) -> Any:
    """Poll until `predicate()` is truthy; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@pytest.fixture
def deploy(cluster: dict[str, Any]) -> Iterator[Callable[..., App]]:
    """Deploy apps through Serve's config path (the `deployments:` overrides included)."""
    deployed: list[str] = []

    def _deploy(
        args: dict[str, Any],
        ingress_replicas: int = 1,
        ingress_env: dict[str, str] | None = None,
        arm_replicas: dict[str, int] | None = None,
        arm_options: dict[str, dict[str, Any]] | None = None,
    ) -> App:
        name = deploy_app(
            cluster, args, ingress_replicas, ingress_env, arm_replicas=arm_replicas, arm_options=arm_options
        )
        deployed.append(name)
        return App(name, cluster["port"], args["model_name"])

    yield _deploy
    for name in deployed:
        delete_app(name)


@pytest.fixture(scope="module")
def held_app(cluster: dict[str, Any]) -> Iterator[App]:
    """One app held at its first phase, shared by a module's tests that only send requests and
    read what comes back (a deploy costs ~10 s of a 2-core machine). A test that changes the
    rollout, kills a part or counts a window deploys its own."""
    name = deploy_app(cluster, app_args(rollout={**HOLD, "interval_s": 10.0}))  # idle between its tests
    yield App(name, cluster["port"])
    delete_app(name)


# A Serve config is the whole set of applications: one without an app deletes it. So each
# deploy sends every app still in use (an unchanged one is left running as it is).
LIVE_APPS: dict[str, dict[str, Any]] = {}


def deploy_app(
    cluster: dict[str, Any],
    args: dict[str, Any],
    ingress_replicas: int = 1,
    ingress_env: dict[str, str] | None = None,
    timeout_s: float = 60.0,
    arm_replicas: dict[str, int] | None = None,
    arm_options: dict[str, dict[str, Any]] | None = None,
) -> str:
    """Deploy one app through Serve's config path (the `deployments:` overrides included;
    `arm_options`: more of them per arm, e.g. `max_ongoing_requests`)."""
    name = f"t{uuid.uuid4().hex[:8]}"
    ingress: dict[str, Any] = {
        "name": "CanaryIngress",
        "num_replicas": ingress_replicas,
        "ray_actor_options": {"num_cpus": 0, "runtime_env": {"env_vars": {**MAIN_LOOP_ENV, **(ingress_env or {})}}},
        **DRAIN_POLL,
    }
    arms = [
        {
            "name": arm,
            "num_replicas": (arm_replicas or {}).get(arm, 1),
            "ray_actor_options": {"num_cpus": 0},
            **DRAIN_POLL,
            **(arm_options or {}).get(arm, {}),
        }
        for arm in ("stable", "canary")
        if "llm_config" not in args[arm]
    ]
    LIVE_APPS[name] = {
        "name": name,
        "route_prefix": f"/{name}",
        "import_path": "serve_canary.app:build_app",
        "args": args,
        "deployments": [ingress, *arms],
    }
    config = {"http_options": {"host": "127.0.0.1", "port": cluster["port"]}, "applications": list(LIVE_APPS.values())}
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))

    def running() -> bool:
        app = serve.status().applications.get(name)
        if app is not None and app.status == "DEPLOY_FAILED":
            reasons = {d: s.message[-6000:] for d, s in app.deployments.items() if s.message}
            raise AssertionError(f"{name} failed to deploy: {app.message} {reasons}")
        return app is not None and app.status == "RUNNING"

    try:
        wait_for(running, timeout_s, f"application {name} to run", poll_s=0.2)
    except AssertionError:
        delete_app(name)
        raise
    return name


def delete_app(name: str) -> None:
    LIVE_APPS.pop(name, None)
    serve.delete(name)
    for actor in (controller_name(name), collector_name(name)):
        try:
            ray.kill(ray.get_actor(actor, namespace=NAMESPACE), no_restart=True)
        except ValueError:
            pass


@contextlib.contextmanager
def background_traffic(
    app: App, users: int = 10_000, concurrency: int = 24, body: dict[str, Any] | None = None
) -> Iterator[Counter[str]]:
    """Chat requests from random users, each with a prompt of its own (`body` sets other
    fields), until the block exits; yields a live count of outcomes."""
    stop = threading.Event()
    outcomes: Counter[str] = Counter()

    async def worker(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            prompt = [{"role": "user", "content": f"hi {random.randrange(1 << 30)}"}]
            payload = {"model": app.model, "messages": prompt, **(body or {})}
            try:
                response = await client.post(
                    "/v1/chat/completions", json=payload, headers={"x-user-id": f"u{random.randrange(users)}"}
                )
                outcomes[str(response.status_code)] += 1
            except httpx.HTTPError as exc:
                outcomes[type(exc).__name__] += 1
                await asyncio.sleep(0.05)

    async def send() -> None:
        async with httpx.AsyncClient(base_url=app.url, timeout=30.0) as client:
            await asyncio.gather(*(worker(client) for _ in range(concurrency)))

    thread = threading.Thread(target=asyncio.run, args=(send(),), daemon=True)
    thread.start()
    try:
        yield outcomes
    finally:
        stop.set()
        thread.join(timeout=30)
