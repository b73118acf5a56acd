"""Does the ingress pay less per token on its replica's main loop? One run, one cluster:

  main loop   CanaryIngress as serve-canary deploys it (`config.MAIN_LOOP_ENV`)
  separate    the same ingress on Serve's defaults: its code and its handles' routers each
              on a loop of their own, so every relayed batch crosses threads

Both apps serve N streams of 256 tokens from the simulated engine at 10 ms per token, batched
at the default interval, called by their Python handles; trials alternate which goes first
(`streaming.rotated`).
Per trial: the ingress replica's CPU seconds per 1,000 tokens, tokens/s, TTFT p50. At a load
the machine keeps up with (32 streams on 2 cores) tokens/s is the offered rate on both, and
the CPU figure is the cost of the relay.

    python -m benchmarks.ingress_loop            # 32 streams, 10 trials each (~2 min on 2 cores)
    python -m benchmarks.ingress_loop --quick    # smoke run: checks the harness, not speed

Writes benchmarks/results/ingress_loop{,_quick}.json and prints the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeDeploySchema

from benchmarks.routing_overhead import ARMS, INGRESS_ACTOR_OPTIONS, canary_args, start_local_serve
from benchmarks.streaming import ITL_MS, TOKENS, Trial, handle_trial, rotated, stream_engine
from serve_canary.batching import DEFAULT_INTERVAL_MS

RESULTS = Path(__file__).parent / "results"
VARIANTS = {"main_loop": INGRESS_ACTOR_OPTIONS, "separate": {"num_cpus": 0}}


def deploy(port: int) -> None:
    args = canary_args(stream_engine(DEFAULT_INTERVAL_MS))
    applications = [
        {
            "name": name,
            "route_prefix": f"/{name}",
            "import_path": "serve_canary.app:build_app",
            "args": args,
            "deployments": [{"name": "CanaryIngress", "ray_actor_options": options}, *ARMS],
        }
        for name, options in VARIANTS.items()
    ]
    config = {"http_options": {"host": "127.0.0.1", "port": port}, "applications": applications}
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)


async def run(streams: int, trials: int) -> dict[str, Any]:
    for name in VARIANTS:  # warm-up
        await handle_trial(name, "completions", 4)

    def trial(name: str) -> Trial:
        return lambda: handle_trial(name, "completions", streams)

    return await rotated({name: trial(name) for name in VARIANTS}, trials)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--trials", type=int, default=10)
    args = parser.parse_args()
    streams, trials = (4, 1) if args.quick else (args.streams, args.trials)
    port = start_local_serve()

    async def measure() -> dict[str, Any]:
        try:
            deploy(port)
            return await run(streams, trials)
        finally:
            await serve.shutdown_async()

    try:
        results: dict[str, Any] = {"variants": asyncio.run(measure())}
    finally:
        ray.shutdown()
    cpu = {name: v["ingress_cpu_s_per_1k_tokens"] for name, v in results["variants"].items()}
    results["cpu_main_loop_over_separate"] = cpu["main_loop"] / cpu["separate"]
    results["setup"] = {"streams": streams, "trials": trials, "itl_ms": ITL_MS, "tokens": TOKENS}
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__}
    print(json.dumps({"ingress_cpu_s_per_1k_tokens": cpu, "ratio": results["cpu_main_loop_over_separate"]}))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"ingress_loop{'_quick' if args.quick else ''}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
