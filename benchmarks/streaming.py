"""Tokens at engine speed? Streaming through three paths, batching off and on, one run:

  direct        handle → the simulated model deployment (no ingress, no HTTP)
  baseline      a bare pass-through ingress (benchmarks.routing_overhead)
  serve-canary  the real CanaryIngress

`handle/…` calls an ingress through its Python handle (the ingress's own cost); `http/…` adds
Serve's HTTP proxy and an HTTP client on the same 2 cores. N concurrent streams of 256 tokens
at a 10 ms inter-token gap (offered: N × 100 tokens/s), each with the model servers'
`stream_batching_interval_ms` at 0 (one message per token) and at the default (`--intervals`
compares others, e.g. `0,20,50`; 50 ms is Ray Serve LLM's default), batched streams within
the replica's default message budget (`batching.StreamPacer`). Per path: tokens/s,
client-side time to first token and gap between tokens (p50/p99), and CPU seconds per 1,000
tokens: the ingress replicas', this client's, and the whole machine's (with how busy its cores
were: where they are all busy, a path's tokens/s is set by its CPU per token). Ratios are
within this run.

    python -m benchmarks.streaming           # 64 and 256 streams, 3 trials (~10 min on 2 cores)
    python -m benchmarks.streaming --vllm    # real engines: tiny vLLM models, 8 and 32 streams
    python -m benchmarks.streaming --quick   # smoke run: checks the harness, not speed

Run under Ray Serve's own throughput-optimized mode (`RAY_SERVE_THROUGHPUT_OPTIMIZED=1` in
the environment: gRPC between replicas, user code and routers on the replica's main loop,
for every process of the cluster, direct's client too), the results file says so in its name.

Writes benchmarks/results/streaming{,_vllm}{,_throughput_optimized}{,_quick}.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import ray
from ray import serve

from benchmarks.routing_overhead import MODEL, _arm_request, body, deploy, start_local_serve
from serve_canary.batching import DEFAULT_INTERVAL_MS, DEFAULT_MESSAGES_PER_S

RESULTS = Path(__file__).parent / "results"
ITL_MS = 10
TOKENS = 256


def _ingress_processes(app: str) -> list[psutil.Process]:
    title = f"ServeReplica:{app}:"
    ingress = ("PassThroughIngress", "CanaryIngress")
    return [
        p
        for p in psutil.process_iter(["cmdline"])
        if any(f"{title}{name}" in " ".join(p.info["cmdline"] or ()) for name in ingress)
    ]


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    return sum(p.cpu_times().user + p.cpu_times().system for p in processes)


def _machine_busy_seconds() -> float:
    """CPU seconds all cores spent on anything but idling, since boot."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


class Meter:
    """Client-side timing of many streams: arrival of each token event, per stream."""

    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.gaps: list[float] = []
        self.tokens = 0

    def stream(self, started: float, arrivals: list[tuple[float, int]]) -> None:
        """`arrivals`: (time, tokens that arrived together) per message."""
        if not arrivals:
            return
        self.ttft.append(arrivals[0][0] - started)
        last = arrivals[0][0]
        for at, count in arrivals[1:]:
            self.gaps.append(at - last)
            self.gaps.extend([0.0] * (count - 1))
            last = at
        self.tokens += sum(count for _, count in arrivals)

    def summary(
        self, elapsed: float, ingress_cpu_s: float | None, client_cpu_s: float, machine_cpu_s: float
    ) -> dict[str, float | None]:
        """CPU seconds during the trial: of the ingress replicas (None without one), of this
        client and of the whole machine."""
        ttft = np.asarray(self.ttft) * 1000.0
        gaps = np.asarray(self.gaps or [0.0]) * 1000.0
        per_1k = 1000.0 / self.tokens
        return {
            "tokens_per_s": self.tokens / elapsed,
            "ttft_p50_ms": float(np.percentile(ttft, 50)),
            "ttft_p99_ms": float(np.percentile(ttft, 99)),
            "itl_p50_ms": float(np.percentile(gaps, 50)),
            "itl_p99_ms": float(np.percentile(gaps, 99)),
            "ingress_cpu_s_per_1k_tokens": None if ingress_cpu_s is None else ingress_cpu_s * per_1k,
            "client_cpu_s_per_1k_tokens": client_cpu_s * per_1k,
            "machine_cpu_s_per_1k_tokens": machine_cpu_s * per_1k,
            "machine_busy": machine_cpu_s / elapsed / (psutil.cpu_count() or 1),
        }


def _token_events(block: str) -> int:
    return sum(1 for event in block.split("\n\n") if event.startswith("data: {"))


async def _measure(
    streams: int, open_stream: Callable[[int], AsyncIterator[Any]], count: Callable[[Any], int], app: str | None
) -> dict:
    """Run `streams` streams at once; time each message that carries tokens, and the CPU of
    `app`'s ingress replicas."""
    meter = Meter()
    processes = _ingress_processes(app) if app else []

    async def one(i: int) -> None:
        arrivals: list[tuple[float, int]] = []
        started = time.perf_counter()
        async for message in open_stream(i):
            tokens = count(message)
            if tokens:
                arrivals.append((time.perf_counter(), tokens))
        meter.stream(started, arrivals)

    client = [psutil.Process()]
    before = (_cpu_seconds(processes), _cpu_seconds(client), _machine_busy_seconds())
    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(streams)))
    elapsed = time.perf_counter() - started
    after = (_cpu_seconds(processes), _cpu_seconds(client), _machine_busy_seconds())
    ingress, own, machine = (b - a for a, b in zip(before, after, strict=True))
    return meter.summary(elapsed, ingress if app else None, own, machine)


async def http_trial(
    http: httpx.AsyncClient, port: int, app: str, prefix: str, streams: int, vllm: bool = False
) -> dict:
    async def open_stream(i: int) -> AsyncIterator[str]:
        payload = {**body(i, True, TOKENS), "ignore_eos": True} if vllm else body(i, True, TOKENS)
        async with http.stream("POST", f"http://127.0.0.1:{port}/{prefix}/v1/completions", json=payload) as response:
            async for block in response.aiter_text():
                yield block

    return await _measure(streams, open_stream, _token_events, app)


async def failovers(http: httpx.AsyncClient, port: int) -> float:
    """serve-canary's requests answered by stable after the canary failed, so far (Prometheus)."""
    text = (await http.get(f"http://127.0.0.1:{port}/canary/metrics")).text
    lines = (line for line in text.splitlines() if line.startswith("serve_canary_requests_total{"))
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if 'outcome="failover"' in line)


async def handle_trial(app: str, method: str, streams: int, vllm: bool = False) -> dict:
    """Through an ingress by its Python handle (no proxy, no HTTP client): the ingress's own cost."""
    handle = getattr(serve.get_app_handle(app).options(stream=True), method)

    def payload(i: int) -> dict:
        return {**body(i, True, TOKENS), "ignore_eos": True} if vllm else body(i, True, TOKENS)

    return await _measure(streams, lambda i: handle.remote(payload(i)), _token_events, app)


async def direct_trial(streams: int, app: str = "baseline", request: Any = None) -> dict:
    handle = serve.get_deployment_handle("stable", app_name=app).options(stream=True)

    def count(batch: list[str]) -> int:
        return sum(1 for item in batch if item.startswith("data: {"))

    return await _measure(
        streams, lambda i: handle.completions.remote(request or _arm_request(body(i, True, TOKENS))), count, None
    )


def stream_engine(interval_ms: float, messages_per_s: float = DEFAULT_MESSAGES_PER_S) -> dict[str, float]:
    """The simulated engine's args: `TOKENS` tokens at `ITL_MS`, batched at `interval_ms` within
    `messages_per_s` per replica."""
    return {
        "ttft_ms": 0,
        "itl_ms": ITL_MS,
        "jitter": 0,
        "output_tokens": TOKENS,
        "stream_batching_interval_ms": interval_ms,
        "stream_batching_messages_per_s": messages_per_s,
    }


def batching_label(interval_ms: float, messages_per_s: float) -> str:
    if interval_ms == 0:
        return "batching_off"
    budget = "" if messages_per_s == DEFAULT_MESSAGES_PER_S else f"_{messages_per_s:g}_per_s"
    return f"batching_{interval_ms:g}ms{budget}"


def _median(trials: list[dict]) -> dict:
    out: dict[str, Any] = {}
    for key in trials[0]:
        values = [t[key] for t in trials if t[key] is not None]
        out[key] = statistics.median(values) if values else None
    out["tokens_per_s_trials"] = [round(t["tokens_per_s"]) for t in trials]
    for part in ("ingress", "machine"):
        key = f"{part}_cpu_s_per_1k_tokens"
        out[f"{key}_trials"] = [t[key] for t in trials if t[key] is not None]
    return out


async def http_trial_fresh(port: int, app: str, streams: int, vllm: bool = False) -> dict:
    """An HTTP trial on new connections: after a trial of hundreds of streams, reusing its
    kept-alive connections slowed whatever ran next over them (TTFT p50 ~1.2 s → ~5 s for the
    pass-through baseline and serve-canary alike), so no trial inherits another's."""
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(timeout=120.0, limits=limits) as http:
        return await http_trial(http, port, app, app, streams, vllm)


Trial = Callable[[], Awaitable[dict]]


def simulated_paths(http: httpx.AsyncClient, port: int, streams: int) -> dict[str, Trial]:
    async def serve_canary(trial: Trial) -> dict:
        before = await failovers(http, port)
        measured = await trial()
        return {**measured, "failovers": await failovers(http, port) - before}

    return {
        "direct": lambda: direct_trial(streams),
        "handle/baseline": lambda: handle_trial("baseline", "stream_completions", streams),
        "handle/serve-canary": lambda: serve_canary(lambda: handle_trial("canary", "completions", streams)),
        "http/baseline": lambda: http_trial_fresh(port, "baseline", streams),
        "http/serve-canary": lambda: serve_canary(lambda: http_trial_fresh(port, "canary", streams)),
    }


def vllm_paths(port: int, request: Any, streams: int) -> dict[str, Trial]:
    return {
        "direct": lambda: direct_trial(streams, "vllm", request),
        "handle/serve-canary": lambda: handle_trial("vllm", "completions", streams, vllm=True),
        "http/serve-canary": lambda: http_trial_fresh(port, "vllm", streams, vllm=True),
    }


async def rotated(paths: dict[str, Trial], trials: int) -> dict[str, dict]:
    """Each path's median over `trials`, each trial in another order: no path always runs
    right after another (what a path leaves behind, e.g. a loaded proxy, falls on all)."""
    runs: dict[str, list[dict]] = {name: [] for name in paths}
    order = list(paths)
    for trial in range(trials):
        for name in order[trial % len(order) :] + order[: trial % len(order)]:
            runs[name].append(await paths[name]())
    return {name: _median(r) for name, r in runs.items()}


async def run(
    port: int, concurrencies: tuple[int, ...], trials: int, intervals: tuple[float, ...], budgets: tuple[float, ...]
) -> dict:
    results: dict[str, Any] = {}
    settings = [(interval, budget) for interval in intervals for budget in (budgets if interval else budgets[:1])]
    async with httpx.AsyncClient(timeout=30.0) as http:  # for /metrics
        for interval, budget in settings:
            await asyncio.to_thread(deploy, port, stream_engine(interval, budget), 1)
            await http_trial_fresh(port, "baseline", 8)  # warm-up
            await http_trial_fresh(port, "canary", 8)
            label = batching_label(interval, budget)
            for streams in concurrencies:
                medians = await rotated(simulated_paths(http, port, streams), trials)
                direct = medians["direct"]["tokens_per_s"]
                ratios = {
                    f"{protocol}_canary_over_direct": medians[f"{protocol}/serve-canary"]["tokens_per_s"] / direct
                    for protocol in ("handle", "http")
                }
                results.setdefault(label, {})[f"s{streams}"] = {"paths": medians, **ratios}
                rates = {k: round(v["tokens_per_s"]) for k, v in medians.items()}
                print(f"{label} {streams} streams: {json.dumps(rates)} {json.dumps(ratios)}", flush=True)
    return results


async def unary_chat_latency(http: httpx.AsyncClient, port: int, requests: int) -> dict[str, float]:
    """One chat at a time (8 tokens), direct to `LLMServer` and through serve-canary over HTTP."""
    from ray.serve.llm.openai_api_models import ChatCompletionRequest

    handle = serve.get_deployment_handle("stable", app_name="vllm").options(stream=True)
    messages = [{"role": "user", "content": "hello canary"}]
    direct_ms, canary_ms = [], []
    for i in range(requests):
        started = time.perf_counter()
        request = ChatCompletionRequest(model="tiny-llama-a", messages=messages, max_tokens=8)
        [item async for item in handle.chat.remote(request)]
        direct_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        body = {"model": MODEL, "messages": messages, "max_tokens": 8, "user": f"user-{i}"}
        (await http.post(f"http://127.0.0.1:{port}/vllm/v1/chat/completions", json=body)).raise_for_status()
        canary_ms.append((time.perf_counter() - started) * 1000)
    direct_p50, canary_p50 = statistics.median(direct_ms), statistics.median(canary_ms)
    return {"direct_p50_ms": direct_p50, "serve_canary_http_p50_ms": canary_p50, "ratio": canary_p50 / direct_p50}


async def run_vllm(port: int, concurrencies: tuple[int, ...], trials: int) -> dict:
    """Direct `LLMServer` handle vs serve-canary over HTTP, on real (tiny) vLLM engines."""
    from ray.serve.llm.openai_api_models import CompletionRequest as VLLMCompletionRequest

    from benchmarks.tiny_models import make_models
    from serve_canary.app import build_app

    stable, canary = make_models(Path.home() / ".cache" / "serve-canary" / "tiny-models")

    def arm(model_id: str, path: Path) -> dict:
        return {
            "llm_config": {
                "model_loading_config": {"model_id": model_id, "model_source": str(path)},
                "accelerator_config": {"kind": "cpu"},
                "placement_group_config": {"bundles": [{"CPU": 0.5}]},
                "engine_kwargs": {"max_model_len": 2048, "dtype": "float32"},
                "deployment_config": {"ray_actor_options": {"num_cpus": 0}, "health_check_timeout_s": 60},
                "runtime_env": {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}},
            }
        }

    args = {
        "model_name": MODEL,
        "stable": arm("tiny-llama-a", stable),
        "canary": arm("tiny-llama-b", canary),
        # All traffic on stable, so both paths reach the same engine.
        "rollout": {"interval_s": 3600, "phases": [{"name": "off", "weight": 1e-9}, {"name": "full", "weight": 1.0}]},
    }
    started = time.perf_counter()
    serve.run(build_app(args), name="vllm", route_prefix="/vllm")
    results: dict[str, Any] = {"engines_ready_s": time.perf_counter() - started}
    request = VLLMCompletionRequest(
        model="tiny-llama-a",
        prompt="the canary",
        max_tokens=TOKENS,
        ignore_eos=True,
        stream=True,
        stream_options={"include_usage": True},
    )
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
    async with httpx.AsyncClient(timeout=120.0, limits=limits) as http:
        await direct_trial(4, "vllm", request)
        results["unary_chat"] = await unary_chat_latency(http, port, 5 if len(concurrencies) == 1 else 100)
        print(f"vllm unary chat: {json.dumps(results['unary_chat'])}", flush=True)
        for streams in concurrencies:
            medians = await rotated(vllm_paths(port, request, streams), trials)
            ratios = {
                f"{protocol}_canary_over_direct": medians[f"{protocol}/serve-canary"]["tokens_per_s"]
                / medians["direct"]["tokens_per_s"]
                for protocol in ("handle", "http")
            }
            results[f"s{streams}"] = {"paths": medians, **ratios}
            rates = {k: round(v["tokens_per_s"]) for k, v in medians.items()}
            print(f"vllm {streams} streams: {json.dumps(rates)} {json.dumps(ratios)}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument(
        "--intervals",
        help=f"stream_batching_interval_ms values, comma-separated (default: 0,{DEFAULT_INTERVAL_MS:g}; "
        f"the smoke run: {DEFAULT_INTERVAL_MS:g}, as each value redeploys the apps)",
    )
    parser.add_argument(
        "--budgets",
        help=f"stream_batching_messages_per_s values, comma-separated (default: {DEFAULT_MESSAGES_PER_S:g}; "
        "1e9 for no budget)",
    )
    parser.add_argument("--vllm", action="store_true", help="real vLLM engines instead of the simulated one")
    parser.add_argument("--streams", default="64,256", help="concurrent streams, comma-separated")
    args = parser.parse_args()
    port = start_local_serve()
    trials = 1 if args.quick else args.trials

    async def measure() -> dict:
        # Shut Serve down on the loop that ran the trials: with the routers on the caller's
        # loop (the throughput-optimized mode), they cannot be shut down after it closed.
        try:
            if args.vllm:
                return await run_vllm(port, (4,) if args.quick else (8, 32), trials)
            given = args.intervals or (f"{DEFAULT_INTERVAL_MS:g}" if args.quick else f"0,{DEFAULT_INTERVAL_MS:g}")
            intervals = tuple(float(ms) for ms in given.split(","))
            streams = (8,) if args.quick else tuple(int(n) for n in args.streams.split(","))
            budgets = tuple(float(n) for n in (args.budgets or f"{DEFAULT_MESSAGES_PER_S:g}").split(","))
            return await run(port, streams, trials, intervals, budgets)
        finally:
            await serve.shutdown_async()

    try:
        results = asyncio.run(measure())
    finally:
        ray.shutdown()
    optimized = os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1"
    results["setup"] = {"itl_ms": ITL_MS, "tokens": TOKENS, "model": MODEL, "trials": trials}
    results["setup"]["ray_serve_throughput_optimized"] = optimized
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__}
    name = (
        "streaming"
        + ("_vllm" if args.vllm else "")
        + ("_throughput_optimized" if optimized else "")
        + ("_quick" if args.quick else "")
    )
    results["command"] = " ".join(
        (["RAY_SERVE_THROUGHPUT_OPTIMIZED=1"] if optimized else [])
        + ["python", "-m", "benchmarks.streaming", *sys.argv[1:]]
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
