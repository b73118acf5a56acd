"""A real Prometheus server scrapes the app; PromQL sees the per-arm error rate and the weight."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import httpx
import pytest
import ray
from scipy.stats import binomtest

from .conftest import HOLD, app_args, free_port, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def prometheus(tmp_path) -> Iterator[callable]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("the prometheus server is not installed (`.ci/run` installs Debian's `prometheus`)")
    processes = []

    def start(target: str, metrics_path: str) -> str:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: serve-canary\n    metrics_path: {metrics_path}\n"
            f"    static_configs: [{{targets: ['{target}']}}]\n"
        )
        port = free_port()
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "prometheus.log").open("w"),
        )
        processes.append(process)
        url = f"http://127.0.0.1:{port}"

        def ready():
            try:
                return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 30, "prometheus to start")
        return url

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=10)


def query(url: str, promql: str) -> list[dict]:
    response = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5)
    response.raise_for_status()
    return response.json()["data"]["result"]


def test_promql_sees_the_per_arm_error_rate_and_the_weight(deploy, prometheus, cluster):
    app = deploy(app_args(canary_engine={"error_rate": 0.3}, rollout=HOLD))
    url = prometheus(f"127.0.0.1:{cluster['port']}", f"/{app.name}/metrics")
    window = ray.get(app.controller.set_weight.remote(0.5)).window
    wait_for(lambda: app.chat(user="probe").json()["serve_canary"]["table_version"] >= 2, 5, "new table")
    for i in range(300):
        assert app.chat(user=f"user-{i}").status_code == 200

    error_rate = (
        'sum by (arm) (serve_canary_requests_total{outcome="error"})'
        ' / sum by (arm) (serve_canary_requests_total{outcome!="cancelled"})'
    )

    def scraped_everything() -> bool:
        recorded = app.window(window)["canary"].requests
        total = query(url, 'sum(serve_canary_requests_total{arm="canary"})')
        return bool(total) and float(total[0]["value"][1]) >= recorded >= 100

    wait_for(scraped_everything, 20, "a scrape with every request", poll_s=0.5)
    result = {r["metric"]["arm"]: float(r["value"][1]) for r in query(url, error_rate)}
    canary_total = query(url, 'sum(serve_canary_requests_total{arm="canary"})')
    canary_errors = query(url, 'sum(serve_canary_requests_total{arm="canary",outcome="error"})')
    n, k = int(float(canary_total[0]["value"][1])), int(float(canary_errors[0]["value"][1]))
    assert result["canary"] == pytest.approx(k / n)
    assert binomtest(k, n, 0.3).pvalue > 1e-3, (k, n)
    assert result.get("stable", 0.0) == 0.0

    assert float(query(url, "serve_canary_canary_weight")[0]["value"][1]) == 0.5
    app.admin("PUT", "weight", json={"weight": 0.7})
    wait_for(
        lambda: float(query(url, "serve_canary_canary_weight")[0]["value"][1]) == 0.7,
        10,
        "the weight gauge",
        poll_s=0.5,
    )
    paused = query(url, 'serve_canary_rollout_status{status="paused"}')
    assert float(paused[0]["value"][1]) == 1.0
