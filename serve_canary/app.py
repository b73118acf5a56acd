"""`build_app(args)`: the `import_path` of every serve-canary config."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from ray import serve
from ray.serve import Application

from serve_canary.config import ArmConfig, CanaryConfig, ConfigError, SimulatedEngineArgs, format_errors, parse_config
from serve_canary.ingress import CanaryIngress
from serve_canary.shadow import comparators_for

# A simulated engine sleeps, it does not compute: it needs no CPU of its own and takes many
# concurrent requests (Serve's default of 5 would queue users at the replica).
SIMULATED_DEPLOYMENT_OPTIONS: dict[str, Any] = {"ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": 1000}


def _arm_deployment(name: str, arm: ArmConfig) -> Application:
    """A simulated server, or Ray Serve LLM's `LLMServer` built by its own builder; vLLM is
    imported only here, and only for an arm that has an `llm_config`."""
    try:
        if arm.llm_config is None:
            from serve_canary.engines.simulated import SimulatedServer

            deployment = serve.deployment(SimulatedServer, name=name, **SIMULATED_DEPLOYMENT_OPTIONS)
            engine_args = arm.engine_args or SimulatedEngineArgs()
            return deployment.bind(arm.model_id, engine_args.model_dump())  # type: ignore[attr-defined,no-any-return]
        from serve_canary.engines.llm import build_arm

        return build_arm(name, arm.llm_config)
    except ValidationError as exc:  # LLMConfig's own validation of the llm_config
        raise ConfigError(format_errors(exc, prefix=f"{name}.llm_config")) from None


def build_app(args: dict[str, Any]) -> Application:
    """Validate the args, then bind the ingress to a stable and a canary model deployment."""
    config: CanaryConfig = parse_config(args)
    if config.rollout.shadow is not None:  # a comparator that does not import fails here, not in a replica
        comparators_for(config.rollout.shadow, config.health)
    return CanaryIngress.bind(  # type: ignore[attr-defined,no-any-return]
        _arm_deployment("stable", config.stable),
        _arm_deployment("canary", config.canary),
        config.model_dump(mode="json"),
    )
