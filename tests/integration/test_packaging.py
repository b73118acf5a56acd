"""Packaging: the KubeRay RayService ships configs/canary.yaml's application, valid for Ray Serve; simulated
arms build without Ray Serve LLM or vLLM."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from serve_canary.config import parse_config

ROOT = Path(__file__).resolve().parents[2]


def test_rayservice_serve_config_is_valid_and_is_the_gpu_config():
    service = yaml.safe_load((ROOT / "deployments/kuberay/rayservice.yaml").read_text())
    assert service["kind"] == "RayService" and service["spec"]["rayClusterConfig"]["rayVersion"] == "2.60.0"
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    [application] = serve_config["applications"]
    config = parse_config(application["args"])
    assert (
        config.canary.llm_config is not None and config.canary.llm_config["engine_kwargs"]["tensor_parallel_size"] == 2
    )

    gpu_config = yaml.safe_load((ROOT / "configs/canary.yaml").read_text())
    assert gpu_config["applications"] == serve_config["applications"]


def test_head_has_no_gpus_and_a_gpu_worker_group_hosts_the_arms():
    cluster = yaml.safe_load((ROOT / "deployments/kuberay/rayservice.yaml").read_text())["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    gpus = [
        g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
        for g in cluster["workerGroupSpecs"]
    ]
    assert all(int(g) >= 2 for g in gpus)  # tensor_parallel_size 2 fits on one worker


def test_simulated_arms_build_without_importing_ray_serve_llm_or_vllm():
    args = {
        "model_name": "m",
        "stable": {"version": "v1", "engine": "simulated"},
        "canary": {"version": "v2", "engine": "simulated"},
    }
    script = (
        "import sys; from serve_canary.app import build_app; "
        f"build_app({args!r}); "
        "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('ray.serve.llm')))"
    )
    imported = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert imported.stdout.strip() == "[]"
