"""CanaryIngress: the Serve deployment in front of the stable and canary model servers.

Per request (`serving.serve_request`): pick the arm from the replica's current RoutingTable (no remote call), relay
from that arm, fall back to stable if the canary fails before its first token, and append a
RequestRecord to a local buffer. In the shadow phase, some of stable's answered requests are
then asked of the canary too, in a task of their own, and each pair of answers is compared
(`shadow`). Two background tasks per replica: a long-poll that swaps in new tables, and a
flush that ships the buffers to the collector fire-and-forget.
"""

import asyncio
import hmac
import logging
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any, Literal

import ray
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field, TypeAdapter
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from serve_canary import feedback, shadow
from serve_canary.batching import OpenStreams
from serve_canary.config import ADMIN_TOKEN_ENV, MAIN_LOOP_ENV, ArmConfig, CanaryConfig, RequestLimits
from serve_canary.controller import ControllerClient, start_actors
from serve_canary.feedback import Attribution, FeedbackBody, RateLimit
from serve_canary.metrics import RequestRecord
from serve_canary.openai_api import OpenAIError, parse_json, parse_request
from serve_canary.rollout import Event, TransitionError
from serve_canary.routing import ARMS, Arm, RoutingTable
from serve_canary.serving import (
    ArmEndpoint,
    FirstItemDeadline,
    Kind,
    ReplicaLost,
    Served,
    failure_message,
    serve_request,
)
from serve_canary.shadow import Answer, PairOutcome, ShadowPair
from serve_canary.status import ReplicaInfo, RolloutStatus

FLUSH_INTERVAL_S = 0.5
LONG_POLL_TIMEOUT_S = 30.0
FORCE_HEADER = "x-serve-canary-force"  # a tester's pick of arm: admin token or a listed routing key
logger = logging.getLogger("serve_canary.ingress")

STATUS_PAGE = resources.files("serve_canary").joinpath("status_page.html").read_text()
HISTORY = TypeAdapter(tuple[Event, ...])
api = FastAPI(title="serve-canary", docs_url=None, redoc_url=None)


@api.exception_handler(OpenAIError)
async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


class WeightBody(BaseModel):
    weight: float = Field(ge=0.0, le=1.0)


async def _json_body(request: Request, limits: RequestLimits) -> Any:
    """The body as JSON, read no further than `limits.max_body_bytes` (413 beyond)."""
    too_large = OpenAIError(413, f"the request body is larger than {limits.max_body_bytes} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise too_large
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limits.max_body_bytes:
            raise too_large
    return parse_json(bytes(raw), limits.max_depth)


@dataclass(frozen=True)
class AdminCommand:
    """An operator command over HTTP: its method, its body (if any) and the controller call."""

    method: Literal["POST", "PUT"]
    run: Callable[[ControllerClient, Any], Awaitable[RolloutStatus]]
    body: type[BaseModel] | None = None


ADMIN_COMMANDS: dict[str, AdminCommand] = {
    "pause": AdminCommand("POST", lambda client, _: client.pause()),
    "resume": AdminCommand("POST", lambda client, _: client.resume()),
    "approve": AdminCommand("POST", lambda client, _: client.approve()),
    "rollback": AdminCommand("POST", lambda client, _: client.rollback()),
    "restart": AdminCommand("POST", lambda client, _: client.restart()),
    "weight": AdminCommand("PUT", lambda client, body: client.set_weight(body.weight), WeightBody),
}


def request_models(arm: ArmConfig) -> dict[Kind, type[BaseModel]]:
    """The request models the arm's server takes: vLLM's for `LLMServer`, ours for simulated."""
    if arm.llm_config is not None:
        from ray.serve.llm import openai_api_models as vllm_models

        return {"chat": vllm_models.ChatCompletionRequest, "completions": vllm_models.CompletionRequest}
    from serve_canary import openai_api

    return {"chat": openai_api.ChatCompletionRequest, "completions": openai_api.CompletionRequest}


async def _cancel_on_close(
    response: DeploymentResponseGenerator[Any], counted: OpenStreams | None
) -> AsyncIterator[Any]:
    """Relay a handle stream, counted in `counted` while open; closing it before the end cancels
    the call (and the generation). The replica dying with the call is `ReplicaLost` to the
    serving path."""
    if counted is not None:
        counted.count += 1
    finished = False
    try:
        async for item in response:
            yield item
        finished = True
    except RayActorError as exc:
        raise ReplicaLost(failure_message(exc)) from exc
    finally:
        if counted is not None:
            counted.count -= 1
        if not finished:
            response.cancel()  # type: ignore[no-untyped-call]  # Ray leaves it untyped


def _endpoint(name: Arm, arm: ArmConfig, handle: DeploymentHandle[Any], relayed: OpenStreams) -> ArmEndpoint:
    # By value over Serve's gRPC transport between replicas (what Ray's throughput-optimized
    # mode turns on): the ingress relays values and never needs an ObjectRef of an arm's
    # batch, and each batch then costs it about a third less CPU than as a Ray object.
    streaming = handle.options(stream=True, _by_reference=False)

    def open_call(kind: Kind, request: Any) -> AsyncIterator[Any]:
        """Call the arm; a stream is told how many streams this replica relays, its own
        included, so that the arm batches them within its message budget (`batching`)."""
        if not getattr(request, "stream", False):
            return _cancel_on_close(getattr(streaming, kind).remote(request, stamp=True), None)
        call = getattr(streaming, kind).remote(request, stamp=True, relayed_streams=relayed.count + 1)
        return _cancel_on_close(call, relayed)

    return ArmEndpoint(name, arm.served_version, arm.model_id, request_models(arm), open_call)


def _result(served: Served) -> dict[str, Any] | AsyncIterator[str]:
    return served.stream if served.stream is not None else served.body  # type: ignore[return-value]


# Streams hold a slot for their whole length and cost the ingress little while they wait.
@serve.deployment(max_ongoing_requests=1000, ray_actor_options={"runtime_env": {"env_vars": MAIN_LOOP_ENV}})
@serve.ingress(api)
class CanaryIngress:
    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self, stable: DeploymentHandle[Any], canary: DeploymentHandle[Any], config: dict[str, Any]
    ) -> None:
        self._config = CanaryConfig.model_validate(config)
        relayed = OpenStreams()
        self._arms: dict[Arm, ArmEndpoint] = {
            "stable": _endpoint("stable", self._config.stable, stable, relayed),
            "canary": _endpoint("canary", self._config.canary, canary, relayed),
        }
        context = serve.get_replica_context()
        self._replica_id = context.replica_id.unique_id
        self._actor_id = ray.get_runtime_context().get_actor_id()
        controller, self._collector = start_actors(context.app_name, self._config)
        self._controller = ControllerClient(controller)
        self._admin_token = os.environ.get(ADMIN_TOKEN_ENV) or None
        await self._controller.configure(self._config)
        self._feedback_key = await self._controller.feedback_key()
        self._feedback_rate = RateLimit(self._config.feedback.max_per_s, time.monotonic())
        self._table: RoutingTable = await self._controller.get_table(-1, 0.0)
        self._table_adopted_at = time.time()
        self._records: list[RequestRecord] = []
        self._canary_deadline = FirstItemDeadline(self._config.canary_first_token_timeout_s)
        shadow_config = self._config.rollout.shadow
        self._comparators = shadow.comparators_for(shadow_config, self._config.health) if shadow_config else {}
        self._mirror_rate = RateLimit(shadow_config.max_rps if shadow_config else 0.0, time.monotonic())
        self._pairs: list[PairOutcome] = []
        self._mirrors: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        self._background = (loop.create_task(self._follow_table()), loop.create_task(self._flush_forever()))

    # -- background ----------------------------------------------------------------------

    async def _follow_table(self) -> None:
        """Long-poll the controller; on failure keep routing on the last table and retry."""
        backoff = 0.1
        while True:
            try:
                table = await self._controller.get_table(self._table.version, LONG_POLL_TIMEOUT_S)
                if table.version != self._table.version:
                    self._table, self._table_adopted_at = table, time.time()
                    # The key changes only when a damaged state is read again; follow it.
                    self._feedback_key = await self._controller.feedback_key()
                backoff = 0.1
            except Exception as exc:
                logger.warning(
                    "controller unreachable (%s); routing on table v%d", failure_message(exc), self._table.version
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            self._flush()

    def _record(self, record: RequestRecord) -> None:
        # Not `self._records.append`: a stream ends after flushes have swapped the list.
        self._records.append(record)
        if record.arm == "stable" and record.ttft_s is not None:
            self._canary_deadline.observe(record.ttft_s)

    def _flush(self) -> None:
        if self._records:
            batch, self._records = self._records, []
            self._collector.record.remote(batch)
        if self._pairs:
            pairs, self._pairs = self._pairs, []
            self._collector.pairs.remote(pairs)

    # -- the serving path ----------------------------------------------------------------

    def _routing_key(self, headers: Mapping[str, str] | None, user: Any) -> str | None:
        if headers is not None:
            for name in self._config.routing.key_headers:
                value = headers.get(name)
                if value:
                    return value
        return user if isinstance(user, str) and user else None

    def _forced_arm(self, headers: Mapping[str, str] | None, key: str | None) -> Arm | None:
        """The arm a tester picked, if they may pick one (the admin token, or a tester's key)."""
        wanted = headers.get(FORCE_HEADER) if headers is not None else None
        if not wanted:
            return None
        if wanted not in ARMS:
            raise OpenAIError(400, f"{FORCE_HEADER} must be 'stable' or 'canary', got {wanted!r}", param=FORCE_HEADER)
        assert headers is not None
        if (key is not None and key in self._config.routing.testers) or self._is_admin(headers):
            return wanted
        raise OpenAIError(
            403, f"{FORCE_HEADER} needs the admin bearer token or a tester's routing key", "permission_error"
        )

    async def _serve(self, kind: Kind, body: Any, headers: Mapping[str, str] | None) -> Served:
        messages = body.get("messages") if isinstance(body, dict) else None
        if isinstance(messages, list) and len(messages) > self._config.limits.max_messages:
            limit = self._config.limits.max_messages
            raise OpenAIError(400, f"at most {limit} messages per request, got {len(messages)}", param="messages")
        if isinstance(body, dict) and body.get("model") != self._config.model_name:
            raise OpenAIError(
                404,
                f"the model {body.get('model')!r} does not exist; this endpoint serves {self._config.model_name!r}",
                code="model_not_found",
                param="model",
            )
        key = self._routing_key(headers, body.get("user") if isinstance(body, dict) else None)
        forced = self._forced_arm(headers, key)
        table = self._table
        served = await serve_request(
            kind,
            body,
            key,
            table,
            self._arms,
            self._record,
            request_id=uuid.uuid4().hex,
            failover=self._config.failover,
            canary_first_item_timeout_s=self._canary_deadline.seconds,
            forced=forced,
            capture=self._shadow_of(kind, body, table) if forced is None and self._mirrors_next(table) else None,
        )
        if forced is not None:  # a tester's answer is not rated into the judge
            if served.body is not None:
                served.body["serve_canary"].update(replica=self._replica_id, forced=True)
            return served
        attribution = Attribution(
            served.request_id,
            served.arm,
            served.version,
            served.window,
            served.unit,
            time.time() + self._config.feedback.token_ttl_s,
        )
        served = replace(served, feedback_token=feedback.issue(self._feedback_key, attribution))
        if served.body is not None:
            served.body["serve_canary"].update(replica=self._replica_id, feedback_token=served.feedback_token)
        return served

    # -- the shadow phase ----------------------------------------------------------------

    def _mirrors_next(self, table: RoutingTable) -> bool:
        """Whether to mirror the next request: its share of the table's fraction, within max_rps."""
        return (
            table.shadow_fraction > 0.0
            and random.random() < table.shadow_fraction
            and self._mirror_rate.allow(time.monotonic())
        )

    def _shadow_of(self, kind: Kind, body: dict[str, Any], table: RoutingTable) -> Callable[[Arm, Answer], None]:
        """What to do with stable's answer once its user has it: ask the canary in a task of its own."""

        def answered(arm: Arm, answer: Answer) -> None:
            if arm == "stable":
                task = asyncio.get_running_loop().create_task(self._mirror(kind, body, answer, table))
                self._mirrors.add(task)
                task.add_done_callback(self._mirrors.discard)

        return answered

    async def _mirror(self, kind: Kind, body: dict[str, Any], stable: Answer, table: RoutingTable) -> None:
        """Ask the canary what stable was asked (unary, marked as shadow) and compare the answers."""
        unary = {name: value for name, value in body.items() if name not in ("stream", "stream_options")}
        answers: list[Answer] = []
        try:
            await serve_request(
                kind,
                unary,
                None,
                table,
                self._arms,
                self._record,
                request_id=f"shadow-{uuid.uuid4().hex}",
                failover=False,
                forced="canary",
                origin="shadow",
                capture=lambda _, answer: answers.append(answer),
            )
        except OpenAIError as exc:
            answers.append(Answer("", None, 0, 0.0, error=f"{exc.status}: {exc.message}"))
        pair = ShadowPair(body, stable, answers[0])
        results = await shadow.compare(pair, self._comparators)
        self._pairs.append(PairOutcome(table.window, results, shadow.example_of(pair, results)))

    # -- Python handle API ------------------------------------------------------------------

    async def chat(self, body: dict[str, Any]) -> dict[str, Any] | AsyncIterator[str]:
        """OpenAI chat completion: a response dict, or with `"stream": true` (call via
        `handle.options(stream=True)`) SSE blocks, one per batch of chunks."""
        return _result(await self._serve("chat", body, None))

    async def completions(self, body: dict[str, Any]) -> dict[str, Any] | AsyncIterator[str]:
        """OpenAI text completion; streams as `chat` does."""
        return _result(await self._serve("completions", body, None))

    async def status(self) -> RolloutStatus:
        """The rollout status, plus which table this replica routes by."""
        replica = ReplicaInfo(
            id=self._replica_id,
            actor_id=self._actor_id,
            table_version=self._table.version,
            table_adopted_at=self._table_adopted_at,
            canary_weight=self._table.canary_weight,
        )
        try:
            status = await self._controller.status()
        except Exception as exc:  # the controller is restarting or gone: say so, not 500
            message = f"the rollout controller is unreachable: {failure_message(exc)}"
            raise OpenAIError(503, message, "server_error") from None
        return status.model_copy(update={"replica": replica})

    async def feedback(self, body: dict[str, Any]) -> dict[str, Any]:
        """Rate an answer, once, with the feedback token it came with (see `feedback`)."""
        given = parse_request(FeedbackBody, body)
        limits = self._config.feedback
        if given.rating is not None and not limits.rating_min <= given.rating <= limits.rating_max:
            raise OpenAIError(
                400,
                f"rating must be within [{limits.rating_min:g}, {limits.rating_max:g}], got {given.rating:g}",
                param="rating",
            )
        if given.rating is None and given.hallucination is None:
            raise OpenAIError(400, "give a rating, a hallucination flag, or both")
        if not self._feedback_rate.allow(time.monotonic()):
            raise OpenAIError(429, "too much feedback at once; retry shortly", "rate_limit_error")
        try:
            attribution = feedback.verify(self._feedback_key, given.feedback_token, given.request_id, time.time())
        except feedback.FeedbackRefused as exc:
            raise OpenAIError(403, str(exc), "permission_error", param="feedback_token") from None
        shortfall = None if given.rating is None else limits.shortfall(given.rating)
        if not await self._collector.feedback.remote(attribution, given.rating, given.hallucination, shortfall):
            raise OpenAIError(409, f"request {given.request_id!r} was already rated", "conflict", param="request_id")
        return {"request_id": given.request_id, "arm": attribution.arm, "version": attribution.version}

    # -- HTTP -------------------------------------------------------------------------------

    async def _http(self, kind: Kind, request: Request) -> Response:
        served = await self._serve(kind, await _json_body(request, self._config.limits), request.headers)
        headers = {
            "x-serve-canary-arm": served.arm,
            "x-serve-canary-version": served.version,
            "x-serve-canary-request-id": served.request_id,
        }
        if served.feedback_token:
            headers["x-serve-canary-feedback-token"] = served.feedback_token
        if served.stream is None:
            return JSONResponse(served.body, headers=headers)
        return StreamingResponse(served.stream, media_type="text/event-stream", headers=headers)

    @api.post("/v1/chat/completions")
    async def http_chat(self, request: Request) -> Response:
        return await self._http("chat", request)

    @api.post("/v1/completions")
    async def http_completions(self, request: Request) -> Response:
        return await self._http("completions", request)

    @api.get("/v1/models")
    async def http_models(self) -> dict[str, Any]:
        model = {"id": self._config.model_name, "object": "model", "created": 0, "owned_by": "serve-canary"}
        return {"object": "list", "data": [model]}

    @api.get("/metrics")
    async def http_metrics(self) -> Response:
        """Prometheus exposition of every replica's requests and the rollout's state."""
        self._flush()
        return Response(await self._collector.prometheus.remote(), media_type=CONTENT_TYPE_LATEST)

    @api.get("/-/canary/")
    async def http_status_page(self) -> HTMLResponse:
        """A self-contained page (no external assets) that polls the status route."""
        return HTMLResponse(STATUS_PAGE)

    @api.get("/-/canary/status")
    async def http_status(self, request: Request) -> Response:
        """The status; the shadow phase's example pairs (users' prompts and answers) only with
        the admin token."""
        status = await self.status()
        if status.shadow is not None and not self._is_admin(request.headers):
            status = status.model_copy(update={"shadow": status.shadow.model_copy(update={"examples": []})})
        return Response(status.model_dump_json(), media_type="application/json")

    @api.get("/-/canary/history")
    async def http_history(self) -> Response:
        """Every event of the rollout, with the judge's evidence (what `serve-canary report` reads)."""
        events = await self._controller.history()
        return Response(HISTORY.dump_json(events), media_type="application/json")

    @api.post("/-/canary/feedback")
    async def http_feedback(self, request: Request) -> dict[str, Any]:
        return await self.feedback(await _json_body(request, self._config.limits))

    def _is_admin(self, headers: Mapping[str, str]) -> bool:
        given = headers.get("authorization", "")
        return self._admin_token is not None and hmac.compare_digest(
            given.encode(), f"Bearer {self._admin_token}".encode()
        )

    def _authorize(self, request: Request) -> None:
        if self._admin_token is None:
            raise OpenAIError(
                403, f"the admin API is disabled: set {ADMIN_TOKEN_ENV} on the cluster to enable it", "permission_error"
            )
        if not self._is_admin(request.headers):
            raise OpenAIError(401, "missing or wrong admin bearer token", "authentication_error")

    @api.post("/-/canary/{command}")
    @api.put("/-/canary/{command}")
    async def http_admin(self, command: str, request: Request) -> Response:
        """Every operator command, authorized in one place (see `ADMIN_COMMANDS`)."""
        admin = ADMIN_COMMANDS.get(command)
        if admin is None or admin.method != request.method:
            raise OpenAIError(404, f"no admin command {request.method} /-/canary/{command}", code="not_found")
        self._authorize(request)
        body = (
            parse_request(admin.body, await _json_body(request, self._config.limits))
            if admin.body is not None
            else None
        )
        try:
            status = await admin.run(self._controller, body)
        except TransitionError as exc:
            raise OpenAIError(409, str(exc), "conflict") from None
        return Response(status.model_dump_json(), media_type="application/json")
