"""`build_app(args)`: the `import_path` of every serve-canary config."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from ray.serve import Application

from serve_canary.config import ArmConfig, CanaryConfig, ConfigError, format_errors, parse_config
from serve_canary.ingress import CanaryIngress


def _model_deployment(arm_name: str, arm: ArmConfig, config: CanaryConfig) -> Application:
    if arm.engine == "simulated":
        from deployments.simulated import SimulatedEngineArgs, SimulatedServer

        try:
            SimulatedEngineArgs.model_validate(arm.engine_args)
        except ValidationError as exc:
            raise ConfigError(format_errors(exc, prefix=f"{arm_name}.engine_args")) from None
        server = SimulatedServer
    else:
        from deployments.vllm_server import VLLMServer

        if "model" not in arm.engine_args:
            raise ConfigError(f"invalid serve-canary config:\n  {arm_name}.engine_args.model: required for engine 'vllm' (a model id or path)")
        server = VLLMServer
    return server.options(name=arm_name).bind(arm.version, config.model_name, arm.engine_args)


def build_app(args: dict[str, Any]) -> Application:
    """Validate the args, then bind the ingress to a stable and a canary model deployment."""
    config = parse_config(args)
    return CanaryIngress.bind(
        _model_deployment("stable", config.stable, config),
        _model_deployment("canary", config.canary, config),
        config.model_dump(mode="json"),
    )
