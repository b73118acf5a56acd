"""What does serve-canary cost per request? Three paths, one cluster, one run:

  direct       handle → simulated model deployment (zero latency)
  baseline     a bare pass-through ingress: two handles, pick one by hash, relay the stream
  serve-canary the real CanaryIngress: routing table, metrics, live-table refresh, failover

Unary requests at concurrency 1, 16, 64 through the Python handle and through HTTP (Serve's
proxy); 64 concurrent SSE streams of 128 tokens; the router decision in µs; and how long a
`set-weight` takes to reach both of 2 ingress replicas. Ratios are within this run.

    python -m benchmarks.routing_overhead           # full run (~25 min on 2 cores)
    python -m benchmarks.routing_overhead --quick   # smoke run: checks the harness, not speed

Writes benchmarks/results/routing_overhead{,_quick}.{json,png} and prints a table.
"""

import argparse
import asyncio
import hashlib
import json
import os
import platform
import socket
import statistics
import time
import timeit
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import ray
from fastapi import FastAPI, Request
from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ServeDeploySchema

from serve_canary.app import SIMULATED_DEPLOYMENT_OPTIONS
from serve_canary.config import MAIN_LOOP_ENV
from serve_canary.engines.simulated import SimulatedServer
from serve_canary.openai_api import CompletionRequest
from serve_canary.routing import RoutingTable

RESULTS = Path(__file__).parent / "results"
MODEL = "bench-llm"
ZERO = {"ttft_ms": 0, "itl_ms": 0, "jitter": 0, "output_tokens": 16}
STREAM_ITL_MS = 5  # the streaming comparison's inter-token delay

passthrough_api = FastAPI()


def _arm_request(body: dict) -> CompletionRequest:
    return CompletionRequest.model_validate({**body, "request_id": "bench"})


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(passthrough_api)
class PassThroughIngress:
    """What any Ray Serve composition pays: hash a key, pick a handle, relay what the model
    server yields (its response object, or its SSE batches as they come)."""

    def __init__(self, stable: DeploymentHandle, canary: DeploymentHandle) -> None:
        # The transport serve-canary's ingress uses (by value, gRPC): the ratio is its logic's cost.
        self._arms = tuple(arm.options(stream=True, _by_reference=False) for arm in (stable, canary))

    def _arm(self, user: str | None) -> DeploymentHandle:
        digest = hashlib.blake2b((user or "").encode(), digest_size=8).digest()
        return self._arms[int.from_bytes(digest, "big") % 2]

    async def completions(self, body: dict) -> dict:
        request = _arm_request(body)
        [response] = [item async for item in self._arm(request.user).completions.remote(request)]
        return response.model_dump()

    async def stream_completions(self, body: dict):
        """The streaming handle call: one SSE block per batch, as serve-canary's handle API."""
        request = _arm_request(body)
        async for batch in self._arm(request.user).completions.remote(request):
            yield "".join(batch)

    @passthrough_api.post("/v1/completions")
    async def http_completions(self, request: Request):
        from fastapi.responses import StreamingResponse

        parsed = _arm_request(await request.json())
        stream = self._arm(parsed.user).completions.remote(parsed)
        if not parsed.stream:
            return [item async for item in stream][0].model_dump()

        async def events():
            async for batch in stream:
                yield "".join(batch)

        return StreamingResponse(events(), media_type="text/event-stream")


def passthrough_app(args: dict) -> Any:
    engine = args["engine_args"]
    arm = serve.deployment(SimulatedServer, **SIMULATED_DEPLOYMENT_OPTIONS)
    return PassThroughIngress.bind(
        arm.options(name="stable").bind("v1", engine), arm.options(name="canary").bind("v2", engine)
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# An ingress as serve-canary deploys it (on its replica's main loop), without a CPU of its own.
INGRESS_ACTOR_OPTIONS = {"num_cpus": 0, "runtime_env": {"env_vars": MAIN_LOOP_ENV}}
ARMS = [{"name": arm, "ray_actor_options": {"num_cpus": 0}} for arm in ("stable", "canary")]


def canary_args(engine_args: dict) -> dict:
    """serve-canary at a fixed 50 % split with no automation in the way, so both arms serve
    like the pass-through's."""
    return {
        "model_name": MODEL,
        "stable": {"version": "v1", "engine": "simulated", "engine_args": engine_args},
        "canary": {"version": "v2", "engine": "simulated", "engine_args": engine_args},
        "rollout": {"interval_s": 3600, "phases": [{"name": "half", "weight": 0.5}, {"name": "full", "weight": 1.0}]},
    }


def deploy(port: int, engine_args: dict, ingress_replicas: int = 1) -> None:
    # Both ingresses on their replica's main loop, so the pass-through stays like for like.
    ingress = {"num_replicas": ingress_replicas, "ray_actor_options": INGRESS_ACTOR_OPTIONS}
    config = ServeDeploySchema.model_validate(
        {
            "http_options": {"host": "127.0.0.1", "port": port},
            "applications": [
                {
                    "name": "baseline",
                    "route_prefix": "/baseline",
                    "import_path": "benchmarks.routing_overhead:passthrough_app",
                    "args": {"engine_args": engine_args},
                    "deployments": [
                        {"name": "PassThroughIngress", **ingress},
                        *ARMS,
                    ],
                },
                {
                    "name": "canary",
                    "route_prefix": "/canary",
                    "import_path": "serve_canary.app:build_app",
                    "args": canary_args(engine_args),
                    "deployments": [{"name": "CanaryIngress", **ingress}, *ARMS],
                },
            ],
        }
    )
    _get_global_client().deploy_apps(config, _blocking=True)


def _summary(latencies: list[float], elapsed: float) -> dict[str, float]:
    ordered = np.sort(np.asarray(latencies)) * 1000.0
    return {
        "requests": len(latencies),
        "throughput_rps": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ordered, 50)),
        "p99_ms": float(np.percentile(ordered, 99)),
    }


async def _load(call, concurrency: int, total: int) -> dict[str, float]:
    latencies: list[float] = []
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            started = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return _summary(latencies, time.perf_counter() - started)


def body(i: int, stream: bool = False, max_tokens: int = 16) -> dict:
    return {
        "model": MODEL,
        "prompt": "benchmark prompt",
        "max_tokens": max_tokens,
        "user": f"user-{i}",
        "stream": stream,
    }


async def unary_trials(
    http: httpx.AsyncClient, port: int, concurrency: int, total: int, rotation: int = 0
) -> dict[str, dict]:
    """Every path once, starting at path number `rotation` (so no path always follows another)."""
    direct = serve.get_deployment_handle("stable", app_name="baseline").options(stream=True)
    handles = {"baseline": serve.get_app_handle("baseline"), "serve-canary": serve.get_app_handle("canary")}
    prompt = _arm_request(body(0))

    async def direct_call(_: int) -> None:
        [item async for item in direct.completions.remote(prompt)]

    calls = {"handle/direct": direct_call}
    for name, handle in handles.items():
        calls[f"handle/{name}"] = lambda i, h=handle: h.completions.remote(body(i))
    for name, prefix in (("baseline", "baseline"), ("serve-canary", "canary")):

        async def http_call(i: int, prefix: str = prefix) -> None:
            response = await http.post(f"http://127.0.0.1:{port}/{prefix}/v1/completions", json=body(i))
            response.raise_for_status()

        calls[f"http/{name}"] = http_call
    results = {}
    order = list(calls)
    for name in order[rotation % len(order) :] + order[: rotation % len(order)]:
        await _load(calls[name], concurrency, max(concurrency * 5, 50))  # warm-up
        results[name] = await _load(calls[name], concurrency, total)
    return {name: results[name] for name in calls}


async def stream_trial(http: httpx.AsyncClient, port: int, prefix: str, streams: int, tokens: int) -> dict[str, float]:
    gaps: list[float] = []
    received = 0

    async def one(i: int) -> None:
        nonlocal received
        last = None
        async with http.stream(
            "POST", f"http://127.0.0.1:{port}/{prefix}/v1/completions", json=body(i, True, tokens)
        ) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append(now - last)
                    last = now
                    received += 1

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(streams)))
    elapsed = time.perf_counter() - started
    ordered = np.sort(np.asarray(gaps)) * 1000.0
    return {
        "tokens_per_s": received / elapsed,
        "itl_p50_ms": float(np.percentile(ordered, 50)),
        "itl_p99_ms": float(np.percentile(ordered, 99)),
    }


def router_decision_us() -> dict[str, float]:
    table = RoutingTable(
        version=1,
        rollout_id="r",
        window="w",
        salt="rollout-salt",
        canary_weight=0.2,
        stable_version="v1",
        canary_version="v2",
        phase="p",
        status="running",
    )
    keys = [f"user-{i}" for i in range(1000)]
    runs = timeit.repeat(lambda: [table.arm_for(k) for k in keys], number=100, repeat=5)
    return {"arm_for_us": min(runs) / (100 * len(keys)) * 1e6}


async def propagation(changes: int) -> dict[str, float]:
    from serve_canary.controller import ControllerClient

    handle = serve.get_app_handle("canary")
    client = ControllerClient.for_app("canary")
    delays = []
    weight = 0.5
    for _ in range(changes):
        weight = 0.3 if weight == 0.5 else 0.5
        started = time.perf_counter()
        version = (await client.set_weight(weight)).table_version
        seen: dict[str, int] = {}
        while len(seen) < 2 or min(seen.values()) < version:
            statuses = await asyncio.gather(*(handle.status.remote() for _ in range(4)))
            for status in statuses:
                seen[status.replica.id] = status.replica.table_version
        delays.append(time.perf_counter() - started)
    ordered = np.sort(np.asarray(delays)) * 1000.0
    return {
        "changes": changes,
        "p50_ms": float(np.percentile(ordered, 50)),
        "p99_ms": float(np.percentile(ordered, 99)),
        "max_ms": float(ordered[-1]),
    }


def ratios(unary: dict[str, dict]) -> dict[str, dict[str, float]]:
    out = {}
    for protocol in ("handle", "http"):
        canary, baseline = unary[f"{protocol}/serve-canary"], unary[f"{protocol}/baseline"]
        out[protocol] = {
            "throughput_canary_over_baseline": canary["throughput_rps"] / baseline["throughput_rps"],
            "added_p50_ms": canary["p50_ms"] - baseline["p50_ms"],
        }
        if protocol == "handle":
            direct = unary["handle/direct"]
            out[protocol]["throughput_baseline_over_direct"] = baseline["throughput_rps"] / direct["throughput_rps"]
    return out


def _median_of(trials: list[dict]) -> dict:
    """Per-field median across trials (nested one level)."""
    merged = {}
    for key in trials[0]:
        merged[key] = {field: statistics.median(t[key][field] for t in trials) for field in trials[0][key]}
    return merged


async def run(args: argparse.Namespace, port: int) -> dict:
    # The smoke run skips 64: its warm-up alone took ~30 s of CI, and 16 runs the same code.
    levels = (1, 16) if args.quick else (1, 16, 64)
    per_level = {1: 30, 16: 100} if args.quick else {1: 300, 16: 2000, 64: 4000}
    trials = 1 if args.quick else args.trials
    results: dict[str, Any] = {"router": router_decision_us(), "unary": {}, "streaming": {}}
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
    async with httpx.AsyncClient(timeout=60.0, limits=limits) as http:
        for level in levels:
            runs = [await unary_trials(http, port, level, per_level[level], trial) for trial in range(trials)]
            unary = _median_of(runs)
            spread = [ratios(trial) for trial in runs]  # each trial's own ratios: the spread of the median
            results["unary"][f"c{level}"] = {"paths": unary, "ratios": ratios(unary), "trial_ratios": spread}
            print(f"concurrency {level}: {json.dumps(results['unary'][f'c{level}']['ratios'])}", flush=True)
        streams, tokens = (64, 128) if not args.quick else (8, 16)
        await asyncio.to_thread(deploy, port, {**ZERO, "itl_ms": STREAM_ITL_MS, "output_tokens": tokens}, 2)
        await stream_trial(http, port, "baseline", 8, 8)  # warm-up
        await stream_trial(http, port, "canary", 8, 8)
        stream_runs = [
            {
                "baseline": await stream_trial(http, port, "baseline", streams, tokens),
                "serve-canary": await stream_trial(http, port, "canary", streams, tokens),
            }
            for _ in range(trials)
        ]
        streaming = _median_of(stream_runs)
        streaming["ratio_tokens_per_s"] = (
            streaming["serve-canary"]["tokens_per_s"] / streaming["baseline"]["tokens_per_s"]
        )
        results["streaming"] = {"streams": streams, "tokens": tokens, **streaming}
    results["propagation"] = await propagation(5 if args.quick else 50)
    return results


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    levels = list(results["unary"])
    paths = list(results["unary"][levels[0]]["paths"])
    width = 0.8 / len(paths)
    for i, name in enumerate(paths):
        xs = np.arange(len(levels)) + i * width
        axes[0].bar(xs, [results["unary"][lv]["paths"][name]["throughput_rps"] for lv in levels], width, label=name)
        axes[1].bar(xs, [results["unary"][lv]["paths"][name]["p50_ms"] for lv in levels], width, label=name)
    for ax, title in zip(axes, ("throughput (requests/s)", "p50 latency (ms)")):
        ax.set_xticks(np.arange(len(levels)) + 0.4 - width / 2)
        ax.set_xticklabels([f"concurrency {lv[1:]}" for lv in levels])
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def start_local_serve() -> int:
    """A local 2-CPU cluster with Serve's proxy on a free port (returned)."""
    # The local cluster's workers inherit this, so Serve can import the baseline app from here.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")])
    )
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,
        namespace="serve_canary",
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    port = start_local_serve()
    try:
        deploy(port, ZERO, ingress_replicas=2)
        results = asyncio.run(run(args, port))
    finally:
        serve.shutdown()
        ray.shutdown()
    results["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "platform": platform.platform(),
    }
    results["command"] = "python benchmarks/routing_overhead.py" + (" --quick" if args.quick else "")
    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (RESULTS / f"routing_overhead{suffix}.json").write_text(json.dumps(results, indent=2))
    chart(results, RESULTS / f"routing_overhead{suffix}.png")
    print(json.dumps({k: results[k] for k in ("router", "streaming", "propagation")}, indent=2))


if __name__ == "__main__":
    main()
