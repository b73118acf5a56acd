"""A three-node Ray cluster on this machine loses the canary's node under keyed load.

Run by `test_node_loss.py` in a process of its own (a process joins one Ray cluster, and the
test session's cluster is a single node): head (Serve's controller and proxy, the ingress),
a node for stable and a node for canary, pinned by custom resources. Prints one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any

import httpx
import ray
from ray import serve
from ray.cluster_utils import Cluster
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeDeploySchema

from serve_canary.routing import RoutingTable

APP, MODEL, USERS = "nodeloss", "node-llm", 200


def pinned(resource: str) -> dict[str, Any]:
    return {"ray_actor_options": {"num_cpus": 0, "resources": {resource: 0.01}}}


def deploy(port: int) -> None:
    engine = {"ttft_ms": 20, "itl_ms": 5, "output_tokens": 6, "jitter": 0.1}
    args = {
        "model_name": MODEL,
        "stable": {"version": "v1", "engine": "simulated", "engine_args": engine},
        "canary": {"version": "v2", "engine": "simulated", "engine_args": engine},
        "rollout": {
            "interval_s": 1.0,
            "auto_rollback": False,
            "phases": [{"name": "half", "weight": 0.5, "min_duration_s": 1e9}, {"name": "full", "weight": 1.0}],
        },
        "canary_first_token_timeout_s": 1.0,
    }
    config = ServeDeploySchema.model_validate(
        {
            "http_options": {"host": "127.0.0.1", "port": port, "location": "HeadOnly"},
            "applications": [
                {
                    "name": APP,
                    "route_prefix": f"/{APP}",
                    "import_path": "serve_canary.app:build_app",
                    "args": args,
                    "deployments": [
                        {"name": "CanaryIngress", **pinned("head")},
                        {"name": "stable", **pinned("stable_node")},
                        {"name": "canary", **pinned("canary_node")},
                    ],
                }
            ],
        }
    )
    _get_global_client().deploy_apps(config, _blocking=True)


class Load:
    """Keyed clients, one request after another; every (sent, answered, user, status, arm) kept."""

    def __init__(self, url: str) -> None:
        self.url, self.answers, self.stop = url, [], threading.Event()

    async def _client(self, http: httpx.AsyncClient, first: int) -> None:
        user = first
        while not self.stop.is_set():
            key = f"user-{user % USERS}"
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            sent = time.time()
            try:
                response = await http.post("/v1/chat/completions", json=body, headers={"x-user-id": key})
                arm = response.headers.get("x-serve-canary-arm")
                self.answers.append((sent, time.time(), key, response.status_code, arm))
            except httpx.HTTPError:
                self.answers.append((sent, time.time(), key, 0, None))
            user += 16

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=60.0) as http:
            await asyncio.gather(*(self._client(http, i) for i in range(16)))

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=asyncio.run, args=(self._run(),), daemon=True)
        thread.start()
        return thread


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"head": 1}})
    cluster.add_node(num_cpus=0, resources={"stable_node": 1})
    canary_node = cluster.add_node(num_cpus=0, resources={"canary_node": 1})
    ray.init(address=cluster.address, namespace="serve_canary", logging_level="ERROR", log_to_driver=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
    deploy(port)
    url = f"http://127.0.0.1:{port}/{APP}"
    before = httpx.get(f"{url}/-/canary/status", timeout=30).json()
    table = RoutingTable(1, before["rollout_id"], before["window"], before["rollout_id"], 0.5, "v1", "v2", "p", "s")
    canary_users = {f"user-{i}" for i in range(USERS) if table.arm_for(f"user-{i}") == "canary"}
    load = Load(url)
    thread = load.start()
    time.sleep(4.0)
    removing_at = time.time()
    cluster.remove_node(canary_node)
    removed_at = time.time()  # requests sent from now on cannot reach the canary
    time.sleep(10.0)
    cluster.add_node(num_cpus=0, resources={"canary_node": 1})
    returned_at = time.time()
    deadline = returned_at + 90
    while time.time() < deadline:
        recent = [a for a in load.answers[-64:] if a[0] > returned_at and a[2] in canary_users]
        if any(a[4] == "canary" for a in recent):
            break
        time.sleep(0.5)
    canary_back_after = time.time() - returned_at
    load.stop.set()
    thread.join(timeout=60)
    after = httpx.get(f"{url}/-/canary/status", timeout=30).json()
    during = [a for a in load.answers if a[0] >= removed_at and a[1] < returned_at]
    print(
        json.dumps(
            {
                "before_removal": sum(1 for a in load.answers if a[1] < removing_at),
                "during": len(during),
                "failed_during": sum(1 for a in during if a[3] != 200),
                "canary_users_during": sum(1 for a in during if a[2] in canary_users),
                "canary_users_on_stable_during": sum(1 for a in during if a[2] in canary_users and a[4] == "stable"),
                "canary_users_on_canary_before": sum(
                    1 for a in load.answers if a[1] < removing_at and a[2] in canary_users and a[4] == "canary"
                ),
                "canary_back_after_s": round(canary_back_after, 1),
                "failed_total": sum(1 for a in load.answers if a[3] != 200),
                "state_before": [before["rollout_id"], before["phase"], before["canary_weight"], before["attempt"]],
                "state_after": [after["rollout_id"], after["phase"], after["canary_weight"], after["attempt"]],
            }
        ),
        flush=True,
    )
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
