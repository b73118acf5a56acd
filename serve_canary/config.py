"""The application arguments: one pydantic schema, checked when `serve run` builds the app.

Every bad value fails with a `ConfigError` whose lines name the key (dotted path) and what
is allowed, so a typo in a Serve config file never reaches a replica.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serve_canary.batching import DEFAULT_INTERVAL_MS, DEFAULT_MESSAGES_PER_S, StreamPacer

ADMIN_TOKEN_ENV = "SERVE_CANARY_ADMIN_TOKEN"  # the admin bearer token, set on the cluster (and for `--url`)

# Serve runs a replica's code on a thread of its own by default, so every streamed batch the
# ingress relays crosses threads twice (in from the arm's router, out to the caller). The
# ingress never blocks its loop, so it runs on the replica's main loop, with its handles'
# routers there too: what Ray's throughput-optimized mode does, for that deployment only.
# Serve reads these when it starts the replica, from the ingress deployment's runtime env; a
# `ray_actor_options` given in a Serve config replaces the deployment's own, so serve-canary's
# configs spell the variables out.
MAIN_LOOP_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


class ConfigError(ValueError):
    """A bad application argument; the message names each offending key."""


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StreamBatching(BaseModel):
    """Stream batching of a model server (`batching`): the simulated engine's `engine_args`, or
    the same keys in an `llm_config`'s `experimental_configs` (where Ray Serve LLM keeps its own
    `stream_batching_interval_ms`, and keys of others are left alone)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    stream_batching_interval_ms: float = Field(default=DEFAULT_INTERVAL_MS, ge=0.0, description="0: every item alone")
    stream_batching_messages_per_s: float = Field(
        default=DEFAULT_MESSAGES_PER_S,
        gt=0.0,
        description="one replica's stream messages; with more open streams each one's interval widens",
    )

    def pacer(self) -> StreamPacer:
        return StreamPacer(self.stream_batching_interval_ms, self.stream_batching_messages_per_s)


class SimulatedEngineArgs(StreamBatching):
    """The simulated engine's knobs; times in milliseconds, rates in [0, 1]."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ttft_ms: float = Field(default=50.0, ge=0.0)
    itl_ms: float = Field(default=10.0, ge=0.0)
    jitter: float = Field(default=0.1, ge=0.0, le=1.0, description="each delay × uniform(1 ± jitter)")
    output_tokens: int = Field(default=32, ge=1)
    error_rate: float = Field(default=0.0, ge=0.0, le=1.0, description="fail before the first token")
    midstream_error_rate: float = Field(default=0.0, ge=0.0, le=1.0, description="fail halfway")
    empty_answer_rate: float = Field(
        default=0.0, ge=0.0, le=1.0, description="answer nothing, for this share of prompts (the same ones every time)"
    )
    different_answer_rate: float = Field(
        default=0.0, ge=0.0, le=1.0, description="answer other words, for this share of prompts (the same ones)"
    )
    max_model_len: int = Field(default=4096, ge=2, description="prompt + max_tokens above this → 400, as vLLM")
    max_num_seqs: int | None = Field(
        default=None, ge=1, description="requests generated at once; more wait in the engine's queue, as vLLM's"
    )
    seed: int | None = None


class ArmConfig(_Schema):
    """One model version the ingress can route to: a simulated engine, or a Ray Serve LLM
    `LLMConfig` (vLLM), written exactly as a Ray Serve LLM user writes it."""

    version: str | None = Field(default=None, min_length=1, description="default: the llm_config's model id")
    engine: Literal["simulated"] | None = None
    engine_args: SimulatedEngineArgs | None = Field(default=None, description="default: SimulatedEngineArgs()")
    llm_config: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_engine(self) -> ArmConfig:
        if (self.engine is None) == (self.llm_config is None):
            raise ValueError(
                "give either `engine: simulated` (with engine_args) or an `llm_config`, not both or neither"
            )
        if self.llm_config is not None:
            if self.engine_args is not None:
                raise ValueError("engine_args are for the simulated engine; vLLM takes llm_config.engine_kwargs")
            loading = self.llm_config.get("model_loading_config")
            if not isinstance(loading, dict) or not isinstance(loading.get("model_id"), str):
                raise ValueError("llm_config.model_loading_config.model_id is required (the id this arm serves)")
            try:
                StreamBatching.model_validate(self.llm_config.get("experimental_configs") or {})
            except ValidationError as error:
                lines = (_error_line(err, "llm_config.experimental_configs") for err in error.errors())
                raise ValueError("; ".join(lines)) from None
        elif self.version is None:
            raise ValueError("version is required for a simulated arm")
        return self

    @property
    def model_id(self) -> str:
        """The model id the arm's server answers to (LLMConfig's model id, or the version)."""
        if self.llm_config is not None:
            return str(self.llm_config["model_loading_config"]["model_id"])
        assert self.version is not None
        return self.version

    @property
    def served_version(self) -> str:
        return self.version or self.model_id


class RoutingConfig(_Schema):
    """How a request is turned into a routing key, and how keys are hashed."""

    key_headers: tuple[str, ...] = ("x-user-id", "x-session-id")
    salt: str | None = Field(default=None, description="None: the rollout id (a fresh cohort per rollout)")
    testers: frozenset[str] = Field(
        default=frozenset(),
        description="routing keys that may pick an arm with `x-serve-canary-force` (as may the admin token)",
    )

    @field_validator("key_headers")
    @classmethod
    def _lowercase(cls, headers: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(h.lower() for h in headers)


class PhaseConfig(_Schema):
    """One step of the rollout: a canary weight held for a minimum time and traffic."""

    name: str = Field(min_length=1)
    weight: float = Field(ge=0.0, le=1.0)
    min_duration_s: float = Field(default=0.0, ge=0.0)
    min_requests: int = Field(default=100, ge=1)
    approval: bool = Field(default=False, description="a human must approve entering this phase")


DEFAULT_PHASES = (
    PhaseConfig(name="init", weight=0.05, min_duration_s=600),
    PhaseConfig(name="early", weight=0.20, min_duration_s=1800),
    PhaseConfig(name="progress", weight=0.50, min_duration_s=3600),
    PhaseConfig(name="full", weight=1.0, approval=True),
)


SHADOW_PHASE = "shadow"
BUILTIN_COMPARATORS = ("error", "latency", "empty_or_refusal", "length_ratio", "finish_reason", "exact_match")


# A comparator's max_rate when none is given: failures and empty answers are tolerated least.
STRICT_COMPARATORS = {"error": 0.02, "empty_or_refusal": 0.02}


class ComparatorConfig(_Schema):
    """One comparison of paired answers: a built-in, or a function given by import path."""

    name: str = Field(
        pattern=r"^[A-Za-z_][\w.]*(:[A-Za-z_]\w*)?$",
        description=f"one of {', '.join(BUILTIN_COMPARATORS)}, or 'package.module:function'",
    )
    max_rate: float = Field(
        default=0.05,
        gt=0.0,
        lt=1.0,
        description="how much larger the share of pairs with the canary's answer worse may be than with stable's "
        f"(default 0.05; {', '.join(f'{k} {v:g}' for k, v in STRICT_COMPARATORS.items())})",
    )

    @model_validator(mode="before")
    @classmethod
    def _strict_default(cls, given: Any) -> Any:
        if isinstance(given, dict) and "max_rate" not in given and given.get("name") in STRICT_COMPARATORS:
            return {**given, "max_rate": STRICT_COMPARATORS[given["name"]]}
        return given

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if ":" not in name and name not in BUILTIN_COMPARATORS:
            raise ValueError(f"not a built-in comparator ({', '.join(BUILTIN_COMPARATORS)}) nor 'module:function'")
        return name


DEFAULT_COMPARATORS = (
    ComparatorConfig(name="empty_or_refusal"),
    ComparatorConfig(name="length_ratio"),
    ComparatorConfig(name="finish_reason"),
)


class ShadowConfig(_Schema):
    """Phase 0: mirror stable's requests to the canary, compare the answers, expose no user."""

    fraction: float = Field(default=0.1, gt=0.0, le=1.0, description="share of stable's requests mirrored")
    max_rps: float = Field(default=10.0, gt=0.0, description="mirrored requests per second, per ingress replica")
    min_pairs: int = Field(default=200, ge=1, description="compared pairs before the shadow phase can pass")
    comparators: tuple[ComparatorConfig, ...] = DEFAULT_COMPARATORS

    @field_validator("comparators")
    @classmethod
    def _unique(cls, comparators: tuple[ComparatorConfig, ...]) -> tuple[ComparatorConfig, ...]:
        names = [c.name for c in comparators]
        if len(set(names)) != len(names):
            raise ValueError(f"comparator names must be unique, got {names}")
        return comparators


class RolloutConfig(_Schema):
    """The phase plan and how often it is evaluated."""

    interval_s: float = Field(default=10.0, gt=0.0)
    shadow: ShadowConfig | None = Field(default=None, description="a shadow phase before the first phase")
    phases: tuple[PhaseConfig, ...] = DEFAULT_PHASES
    auto_rollback: bool = True

    @property
    def plan(self) -> tuple[PhaseConfig, ...]:
        """The phases the rollout moves through: the shadow phase (weight 0), if any, then `phases`."""
        if self.shadow is None:
            return self.phases
        return (PhaseConfig(name=SHADOW_PHASE, weight=0.0, min_requests=self.shadow.min_pairs), *self.phases)

    @model_validator(mode="after")
    def _shadow_name_free(self) -> RolloutConfig:
        if self.shadow is not None and any(p.name == SHADOW_PHASE for p in self.phases):
            raise ValueError(f"with a shadow phase, no phase may be named {SHADOW_PHASE!r}")
        return self

    @field_validator("phases")
    @classmethod
    def _phases_increase_to_full(cls, phases: tuple[PhaseConfig, ...]) -> tuple[PhaseConfig, ...]:
        if len(phases) < 2:
            raise ValueError("needs at least two phases: one or more partial weights, then 1.0")
        weights = [p.weight for p in phases]
        if any(b <= a for a, b in zip(weights, weights[1:])):
            raise ValueError(f"weights must strictly increase, got {weights}")
        if weights[0] <= 0.0:
            raise ValueError("the first phase's weight must be above 0")
        if weights[-1] != 1.0:
            raise ValueError(f"the last phase's weight must be 1.0 (full rollout), got {weights[-1]}")
        names = [p.name for p in phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be unique, got {names}")
        if phases[0].approval:
            raise ValueError("the first phase cannot require approval: deploying is the approval")
        return phases


class HealthConfig(_Schema):
    """What makes a canary unhealthy (absolute limits, sequential tests) and what proves it
    healthy (bounds on canary/stable below each metric's allowed increase)."""

    max_error_rate: float = Field(default=0.01, ge=0.0, le=1.0)
    max_latency_ms: float = Field(default=2000.0, gt=0.0, description="p95 end-to-end latency")
    max_ttft_ms: float = Field(default=1000.0, gt=0.0, description="p95 time to first token")
    max_error_rate_increase: float = Field(default=1.5, ge=1.0)
    max_latency_increase: float = Field(default=1.5, ge=1.0)
    max_ttft_increase: float = Field(default=1.5, ge=1.0)
    max_itl_increase: float = Field(default=1.5, ge=1.0)
    max_hallucination_increase: float = Field(default=1.5, ge=1.0)
    max_rating_decrease: float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        description="how much lower the canary users' mean rating may be than stable's, as a share of the rating range",
    )
    max_output_tokens_increase: float = Field(
        default=1.2, ge=1.0, description="p95 and p99 output tokens per answer: the cost of an answer"
    )
    alpha: float = Field(
        default=0.01,
        gt=0.0,
        lt=1.0,
        description="false-rollback budget of a whole rollout, split across judged phases and metrics",
    )
    promotion_alpha: float = Field(
        default=0.1,
        gt=0.0,
        lt=1.0,
        description="1 − confidence of the bounds that promotion needs",
    )


# What a notification can be subscribed to: the rollout's transition actions and the statuses
# they lead to (`rollout.py`; a unit test keeps the two lists equal).
NOTIFIABLE = frozenset(
    {
        *("start", "promote", "await_approval", "approve", "auto_rollback", "rollback", "pause", "resume"),
        *("set_weight", "restart", "configure", "state_error", "state_recovered", "reopen_window"),
        *("running", "paused", "awaiting_approval", "rolled_back", "complete"),
    }
)


class NotificationTarget(_Schema):
    """A receiver of transition events (Slack's incoming webhooks take the body as it is)."""

    url: str = Field(pattern=r"^https?://", description="POSTed one JSON body per event")
    events: frozenset[str] = Field(default=frozenset(), description="actions or statuses to send; none: every event")

    @field_validator("events")
    @classmethod
    def _known(cls, events: frozenset[str]) -> frozenset[str]:
        unknown = sorted(events - NOTIFIABLE)
        if unknown:
            raise ValueError(f"unknown events {unknown}; known: {sorted(NOTIFIABLE)}")
        return events


class FeedbackConfig(_Schema):
    """What feedback is accepted: ratings within a range, with a token no older than `token_ttl_s`."""

    rating_min: float = 1.0
    rating_max: float = 5.0
    token_ttl_s: float = Field(default=3600.0, gt=0.0, description="how long after its answer a request can be rated")
    max_per_s: float = Field(default=50.0, gt=0.0, description="feedback posts per second per ingress replica")

    def shortfall(self, rating: float) -> float:
        """How far `rating` is below the best, as a share of the range: what the judge averages
        per user (0 for the best rating, 1 for the worst)."""
        return (self.rating_max - rating) / (self.rating_max - self.rating_min)

    @model_validator(mode="after")
    def _range(self) -> FeedbackConfig:
        if not self.rating_min < self.rating_max:
            raise ValueError(f"rating_min must be below rating_max, got {self.rating_min} and {self.rating_max}")
        return self


class RequestLimits(_Schema):
    """What one request may be: bigger → 413, deeper or with more messages → 400."""

    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_depth: int = Field(default=32, ge=4, description="JSON nesting levels")
    max_messages: int = Field(default=2048, ge=1, description="chat messages per request")


class CanaryConfig(_Schema):
    """Everything `build_app` needs: the two arms, routing, the rollout plan and health."""

    model_name: str = Field(min_length=1)
    stable: ArmConfig
    canary: ArmConfig
    routing: RoutingConfig = RoutingConfig()
    rollout: RolloutConfig = RolloutConfig()
    health: HealthConfig = HealthConfig()
    failover: bool = Field(default=True, description="retry on stable when the canary fails before its first token")
    canary_first_token_timeout_s: float = Field(
        default=5.0,
        gt=0.0,
        description=(
            "with failover, a canary without a first token by then is left for stable (as `unavailable`); "
            "longer while stable's own first tokens are slow (a loaded cluster)"
        ),
    )
    feedback: FeedbackConfig = FeedbackConfig()
    limits: RequestLimits = RequestLimits()
    notifications: tuple[NotificationTarget, ...] = ()
    state_store: str = Field(default="gcs", description="'gcs' (Ray's GCS key-value store) or 'file:///abs/path'")

    @field_validator("state_store")
    @classmethod
    def _known_store(cls, uri: str) -> str:
        if uri != "gcs" and not uri.startswith("file:///"):
            raise ValueError(f"must be 'gcs' or 'file:///absolute/path', got {uri!r}")
        return uri

    @model_validator(mode="after")
    def _distinct_versions(self) -> CanaryConfig:
        if self.stable.served_version == self.canary.served_version:
            raise ValueError(f"stable and canary versions must differ, both are {self.stable.served_version!r}")
        return self


def parse_config(args: dict[str, Any]) -> CanaryConfig:
    """Validate application args; raise ConfigError listing every bad key."""
    try:
        return CanaryConfig.model_validate(args)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc)) from None


def format_errors(exc: ValidationError, prefix: str = "") -> str:
    """One line per error: dotted key, what is allowed, and what was given."""
    return "\n".join(["invalid serve-canary config:", *(f"  {_error_line(err, prefix)}" for err in exc.errors())])


def _error_line(err: Mapping[str, Any], prefix: str) -> str:
    """`dotted.key: what is allowed (got what was given)`."""
    key = ".".join(str(part) for part in (prefix, *err["loc"]) if part != "") or "(root)"
    message = err["msg"].removeprefix("Value error, ")
    given = f" (got {err['input']!r})" if err["type"] not in ("missing", "value_error") else ""
    return f"{key}: {message}{given}"
