"""Every bad application arg fails with a message naming the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serve_canary.config import MAIN_LOOP_ENV, ConfigError, parse_config

ROOT = Path(__file__).resolve().parents[2]


def args(**overrides):
    base = {
        "model_name": "m",
        "stable": {"version": "v1", "engine": "simulated"},
        "canary": {"version": "v2", "engine": "simulated"},
    }
    base.update(overrides)
    return base


def test_defaults_are_the_seeds():
    config = parse_config(args())
    assert [(p.name, p.weight, p.min_duration_s, p.approval) for p in config.rollout.phases] == [
        ("init", 0.05, 600, False),
        ("early", 0.20, 1800, False),
        ("progress", 0.50, 3600, False),
        ("full", 1.0, 0, True),
    ]
    assert (config.health.max_error_rate, config.health.max_latency_ms, config.health.max_latency_increase) == (
        0.01,
        2000,
        1.5,
    )
    assert config.rollout.auto_rollback and config.failover
    assert config.routing.key_headers == ("x-user-id", "x-session-id")
    assert config.state_store == "gcs"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"rollout": {"phases": [{"name": "a", "weight": 1.5}, {"name": "b", "weight": 1.0}]}},
            "rollout.phases.0.weight: Input should be less than or equal to 1",
        ),
        (
            {
                "rollout": {
                    "phases": [{"name": "a", "weight": 0.5}, {"name": "b", "weight": 0.2}, {"name": "c", "weight": 1.0}]
                }
            },
            "rollout.phases: weights must strictly increase, got [0.5, 0.2, 1.0]",
        ),
        (
            {"rollout": {"phases": [{"name": "a", "weight": 0.5}, {"name": "b", "weight": 0.9}]}},
            "rollout.phases: the last phase's weight must be 1.0",
        ),
        (
            {"rollout": {"phases": [{"name": "a", "weight": 0.5}, {"name": "a", "weight": 1.0}]}},
            "rollout.phases: phase names must be unique",
        ),
        ({"canary": {"version": "v2", "engine": "tgi"}}, "canary.engine: Input should be 'simulated' (got 'tgi')"),
        ({"canary": {"version": "v1", "engine": "simulated"}}, "stable and canary versions must differ, both are 'v1'"),
        (
            {"canary": {"llm_config": {"engine_kwargs": {}}}},
            "canary: llm_config.model_loading_config.model_id is required",
        ),
        (
            {"canary": {"engine": "simulated", "llm_config": {"model_loading_config": {"model_id": "m"}}}},
            "canary: give either `engine: simulated` (with engine_args) or an `llm_config`, not both or neither",
        ),
        ({"canary": {"engine": "simulated"}}, "canary: version is required for a simulated arm"),
        (
            {
                "canary": {
                    "llm_config": {
                        "model_loading_config": {"model_id": "m"},
                        "experimental_configs": {"stream_batching_messages_per_s": 0},
                    }
                }
            },
            "canary: llm_config.experimental_configs.stream_batching_messages_per_s: Input should be greater than 0",
        ),
        (
            {"canary": {"version": "v2", "engine": "simulated", "engine_args": {"stream_batching_messages_per_s": -1}}},
            "canary.engine_args.stream_batching_messages_per_s: Input should be greater than 0",
        ),
        ({"state_store": "redis://x"}, "state_store: must be 'gcs' or 'file:///absolute/path', got 'redis://x'"),
        ({"rollout": {"interval_s": 0}}, "rollout.interval_s: Input should be greater than 0"),
        ({"health": {"max_error_rate": -0.1}}, "health.max_error_rate: Input should be greater than or equal to 0"),
        ({"routing": {"salt": "s", "key_header": "x"}}, "routing.key_header: Extra inputs are not permitted"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(overrides, expected):
    with pytest.raises(ConfigError) as error:
        parse_config(args(**overrides))
    assert expected in str(error.value)


def test_missing_keys_are_named():
    with pytest.raises(ConfigError) as error:
        parse_config({"stable": {"version": "v1"}})
    message = str(error.value)
    for key in ("model_name: Field required", "stable: give either `engine: simulated`", "canary: Field required"):
        assert key in message


def test_engine_args_of_each_arm_are_checked_with_their_key():
    with pytest.raises(ConfigError, match=r"canary.engine_args.error_rate: Input should be less than or equal to 1"):
        parse_config(args(canary={"version": "v2", "engine": "simulated", "engine_args": {"error_rate": 2}}))
    with pytest.raises(ConfigError, match=r"stable.engine_args.ttft: Extra inputs are not permitted"):
        parse_config(args(stable={"version": "v1", "engine": "simulated", "engine_args": {"ttft": 5}}))


@pytest.mark.parametrize("path", ["configs/local.yaml", "configs/canary.yaml", "configs/vllm-cpu.yaml"])
def test_shipped_configs_are_valid_and_keep_the_ingress_on_its_main_loop(path):
    document = yaml.safe_load((ROOT / path).read_text())
    for application in document["applications"]:
        config = parse_config(application["args"])
        assert config.stable.served_version != config.canary.served_version
        # Their ray_actor_options replace the ingress deployment's own, runtime env included.
        [ingress] = [d for d in application["deployments"] if d["name"] == "CanaryIngress"]
        assert ingress["ray_actor_options"]["runtime_env"]["env_vars"] == MAIN_LOOP_ENV


def test_local_config_starts_on_a_small_cpu_machine():
    document = yaml.safe_load((ROOT / "configs/local.yaml").read_text())
    for application in document["applications"]:
        assert {application["args"][arm]["engine"] for arm in ("stable", "canary")} == {"simulated"}
        assert all(d["ray_actor_options"]["num_cpus"] == 0 for d in application["deployments"])


def test_a_config_survives_its_own_json_round_trip_with_every_kind_of_arm():
    # The controller and the ingress replicas receive the config as `model_dump(mode="json")`.
    config = parse_config(
        args(
            stable={"version": "v1", "engine": "simulated", "engine_args": {"ttft_ms": 5}},
            canary={"llm_config": {"model_loading_config": {"model_id": "tiny"}}},
        )
    )
    assert parse_config(config.model_dump(mode="json")) == config
