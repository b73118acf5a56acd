"""What does a client see when a part of serve-canary dies under keyed load?

One app (2 ingress replicas, one stable and one canary replica at a 50 % weight, simulated
engines) takes unary chat requests from keyed clients without pause while, one after the
other, a canary replica, a stable replica, an ingress replica, the controller and the
collector are killed (`ray.kill`; Serve and Ray restart them). For each kill, the requests
answered from the kill until the end of its observation period (or until the killed part is
back, if later), those in flight at the kill included:

  failed       requests that did not get a 200 (or got no answer)
  stall        the longest time a request took (the baseline p99 is printed beside it)
  recovered    when the killed part was back (a replica: a new one runs in its place;
               an actor: it answers a call)
  lost / double  answers the clients received that the collector did not count, and
               counted answers no client received (Prometheus `serve_canary_requests_total`)

    python -m benchmarks.chaos           # ~2 min on 2 cores
    python -m benchmarks.chaos --quick   # smoke run: checks the harness

Writes benchmarks/results/chaos{,_quick}.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import ray
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeDeploySchema

from benchmarks.routing_overhead import ARMS, INGRESS_ACTOR_OPTIONS, start_local_serve
from serve_canary.controller import NAMESPACE, collector_name, controller_name

RESULTS = Path(__file__).parent / "results"
APP, MODEL = "chaos", "chaos-llm"
ENGINE = {"ttft_ms": 20, "itl_ms": 5, "output_tokens": 8, "jitter": 0.1}
RECOVERY_TIMEOUT_S = 120.0


@dataclass
class Load:
    """Keyed clients sending one request after another; every answer is kept."""

    url: str
    clients: int
    answers: list[tuple[float, float, int]] = field(default_factory=list)  # (start, end, status; 0: no answer)
    in_flight: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _paused: threading.Event = field(default_factory=threading.Event)

    async def _client(self, http: httpx.AsyncClient, user: str) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        while not self._stop.is_set():
            if self._paused.is_set():
                await asyncio.sleep(0.05)
                continue
            started, self.in_flight = time.time(), self.in_flight + 1
            try:
                status = (await http.post("/v1/chat/completions", json=body, headers={"x-user-id": user})).status_code
            except httpx.HTTPError:
                status = 0
            self.in_flight -= 1
            self.answers.append((started, time.time(), status))

    def quiesce(self) -> None:
        """Hold new requests until `resume`, once those in flight are answered and recorded."""
        self._paused.set()
        wait_until(lambda: self.in_flight == 0, 60.0)
        time.sleep(1.2)  # every ingress replica flushes its records (every 0.5 s)

    def resume(self) -> None:
        self._paused.clear()

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=60.0) as http:
            await asyncio.gather(*(self._client(http, f"user-{i}") for i in range(self.clients)))

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=asyncio.run, args=(self._run(),), daemon=True)
        thread.start()
        return thread

    def stop(self, thread: threading.Thread) -> None:
        self._stop.set()
        thread.join(timeout=60)


def deploy(port: int) -> None:
    args = {
        "model_name": MODEL,
        "stable": {"version": "v1", "engine": "simulated", "engine_args": {**ENGINE, "seed": 1}},
        "canary": {"version": "v2", "engine": "simulated", "engine_args": {**ENGINE, "seed": 2}},
        "rollout": {
            "interval_s": 1.0,
            "auto_rollback": False,  # the kills are what is measured, not the judge
            "phases": [{"name": "half", "weight": 0.5, "min_duration_s": 1e9}, {"name": "full", "weight": 1.0}],
        },
        "canary_first_token_timeout_s": 1.0,
    }
    config = ServeDeploySchema.model_validate(
        {
            "http_options": {"host": "127.0.0.1", "port": port},
            "applications": [
                {
                    "name": APP,
                    "route_prefix": f"/{APP}",
                    "import_path": "serve_canary.app:build_app",
                    "args": args,
                    "deployments": [
                        {
                            "name": "CanaryIngress",
                            "num_replicas": 2,
                            "ray_actor_options": INGRESS_ACTOR_OPTIONS,
                        },
                        *ARMS,
                    ],
                }
            ],
        }
    )
    _get_global_client().deploy_apps(config, _blocking=True)


def replica_names(deployment: str) -> set[str]:
    """The live replica actors of `deployment` in the app (Serve names them SERVE_REPLICA::app#deployment#id)."""
    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}


def replaced(deployment: str, killed: str, count: int) -> bool:
    """`count` replicas running, none of them the killed one. Serve's status alone says healthy
    until its controller notices the death, which read as "back after 0.05 s" before."""
    status = serve.status().applications[APP].deployments[deployment]
    names = replica_names(deployment)
    return killed not in names and len(names) == count and status.replica_states.get("RUNNING") == count


def answers_ok(actor_name: str, method: str) -> bool:
    try:
        actor = ray.get_actor(actor_name, namespace=NAMESPACE)
        ray.get(getattr(actor, method).remote(), timeout=2)
        return True
    except Exception:
        return False


def counted(url: str) -> int:
    """Answers the collector has counted (a failed-over request is one canary error and one
    answer from stable, outcome `failover`)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return int(
        sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "serve_canary_requests_total" and sample.labels["outcome"] in ("ok", "failover")
        )
    )


def wait_until(predicate: Callable[[], bool], timeout_s: float) -> float | None:
    started = time.time()
    while time.time() - started < timeout_s:
        if predicate():
            return time.time() - started
        time.sleep(0.1)
    return None


def scenarios() -> list[tuple[str, Callable[[], Callable[[], bool]]]]:
    """(what is killed, the kill, which returns whether it has recovered)."""

    def kill_replica(deployment: str, count: int) -> Callable[[], Callable[[], bool]]:
        def kill() -> Callable[[], bool]:
            name = sorted(replica_names(deployment))[0]
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
            return lambda: replaced(deployment, name, count)

        return kill

    def kill_actor(name: str, method: str) -> Callable[[], Callable[[], bool]]:
        def kill() -> Callable[[], bool]:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=False)
            return lambda: answers_ok(name, method)

        return kill

    return [
        ("canary replica", kill_replica("canary", 1)),
        ("stable replica", kill_replica("stable", 1)),
        ("ingress replica", kill_replica("CanaryIngress", 2)),
        ("controller", kill_actor(controller_name(APP), "status")),
        ("collector", kill_actor(collector_name(APP), "prometheus")),
    ]


def run(port: int, clients: int, observe_s: float) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/{APP}"
    deploy(port)
    load = Load(url, clients)
    thread = load.start()
    time.sleep(3.0)  # warm
    rows = []
    try:
        for what, kill in scenarios():
            load.quiesce()
            before_counted, before_answers = counted(url), len(load.answers)
            load.resume()
            time.sleep(2.0)  # under load again before the kill
            killed_at = time.time()
            recovered = kill()
            recovered_after = wait_until(recovered, RECOVERY_TIMEOUT_S)  # the next kill finds all parts up
            time.sleep(max(0.0, killed_at + observe_s - time.time()))
            # Requests in flight at the kill are the ones it hits: a window by start time left them out.
            window = [a for a in load.answers[before_answers:] if a[1] >= killed_at]
            baseline = [end - start for start, end, status in load.answers[before_answers:] if end < killed_at]
            load.quiesce()
            received = sum(1 for a in load.answers[before_answers:] if a[2] == 200)
            delta = counted(url) - before_counted
            load.resume()
            baseline_p99 = round(statistics.quantiles(baseline, n=100)[98], 3) if len(baseline) > 20 else None
            rows.append(
                {
                    "killed": what,
                    "requests": len(window),
                    "failed": sum(1 for a in window if a[2] != 200),
                    "failed_statuses": dict(Counter(str(a[2]) for a in window if a[2] != 200)),
                    "stall_s": round(max((end - start for start, end, _ in window), default=0.0), 3),
                    "baseline_p99_s": baseline_p99,
                    "recovered_after_s": None if recovered_after is None else round(recovered_after, 2),
                    "lost": max(0, received - delta),
                    "double_counted": max(0, delta - received),
                }
            )
            print(rows[-1], flush=True)
    finally:
        load.stop(thread)
    return {"clients": clients, "observe_s": observe_s, "machine": platform.platform(), "rows": rows}


def table(results: dict[str, Any]) -> str:
    lines = [
        "| killed | requests answered after the kill | client-visible failures | longest request (s) "
        "| baseline p99 (s) | recovered after (s) | answers not counted | counted twice |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        failed = f"{row['failed']} {row['failed_statuses'] or ''}".strip()
        lines.append(
            f"| {row['killed']} | {row['requests']} | {failed} | {row['stall_s']} | {row['baseline_p99_s']} "
            f"| {row['recovered_after_s']} | {row['lost']} | {row['double_counted']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer clients, shorter observation")
    args = parser.parse_args()
    port = start_local_serve()
    results = run(port, clients=8 if args.quick else 32, observe_s=6.0 if args.quick else 15.0)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"chaos{'_quick' if args.quick else ''}.json"
    path.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"wrote {path}")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
