"""CanaryIngress: the Serve deployment in front of the stable and canary ModelServers.

Per request: pick the arm from the replica's current RoutingTable (no remote call), stream
from that arm, fall back to stable if the canary fails before its first token, and append a
RequestRecord to a local buffer. Two background tasks per replica: a long-poll that swaps in
new tables, and a flush that ships the buffer to the collector fire-and-forget.
"""


import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from importlib import resources
from typing import Any, Literal

import ray
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from serve_canary.config import CanaryConfig
from serve_canary.controller import ControllerClient, start_actors
from serve_canary.metrics import RequestRecord
from serve_canary.openai_api import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    ResponseBuilder,
    parse_request,
    sse,
)
from serve_canary.protocol import GenerationChunk, GenerationRequest
from serve_canary.rollout import TransitionError
from serve_canary.routing import Arm, RoutingTable

ADMIN_TOKEN_ENV = "SERVE_CANARY_ADMIN_TOKEN"
FLUSH_INTERVAL_S = 0.5
LONG_POLL_TIMEOUT_S = 30.0
logger = logging.getLogger("serve_canary.ingress")

STATUS_PAGE = resources.files("serve_canary").joinpath("status_page.html").read_text()
api = FastAPI(title="serve-canary", docs_url=None, redoc_url=None)


@api.exception_handler(OpenAIError)
async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


class WeightBody(BaseModel):
    weight: float = Field(ge=0.0, le=1.0)


class FeedbackBody(BaseModel):
    request_id: str = Field(min_length=1)
    rating: float | None = None
    hallucination: bool | None = None


class _Tracker:
    """Times one served stream and turns it into a RequestRecord."""

    __slots__ = ("request_id", "table", "arm", "started", "first_at", "last_at", "tokens", "prompt_tokens", "finish_reason")

    def __init__(self, request_id: str, table: RoutingTable, arm: Arm, started: float) -> None:
        self.request_id, self.table, self.arm, self.started = request_id, table, arm, started
        self.first_at: float | None = None
        self.last_at = started
        self.tokens = 0
        self.prompt_tokens = 0
        self.finish_reason: str | None = None

    def on_chunk(self, chunk: GenerationChunk) -> None:
        self.last_at = time.perf_counter()
        if self.first_at is None:
            self.first_at = self.last_at
            self.prompt_tokens = chunk.prompt_tokens or 0
        self.tokens += chunk.num_tokens
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason

    def record(self, outcome: str, error_kind: str | None = None) -> RequestRecord:
        ttft = None if self.first_at is None else self.first_at - self.started
        itl = (self.last_at - self.first_at) / (self.tokens - 1) if self.first_at is not None and self.tokens > 1 else None
        return RequestRecord(
            self.request_id, self.table.window, self.arm, self.table.version_of(self.arm), outcome, error_kind,
            ttft, itl, time.perf_counter() - self.started, self.prompt_tokens, self.tokens, self.finish_reason,
            self.table.canary_weight,
        )


async def _json_body(request: Request) -> Any:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise OpenAIError(400, "the request body is not valid JSON") from None


def _failure_message(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(api)
class CanaryIngress:
    async def __init__(self, stable: DeploymentHandle, canary: DeploymentHandle, config: dict[str, Any]) -> None:
        self._config = CanaryConfig.model_validate(config)
        self._arms: dict[Arm, DeploymentHandle] = {
            "stable": stable.options(stream=True),
            "canary": canary.options(stream=True),
        }
        context = serve.get_replica_context()
        self._replica_id = context.replica_id.unique_id
        self._actor_id = ray.get_runtime_context().get_actor_id()
        controller, self._collector = start_actors(context.app_name, self._config)
        self._controller = ControllerClient(controller)
        self._admin_token = os.environ.get(ADMIN_TOKEN_ENV) or None
        await self._controller.configure(self._config)
        self._table: RoutingTable = await self._controller.get_table(-1, 0.0)
        self._records: list[RequestRecord] = []
        loop = asyncio.get_running_loop()
        self._background = (loop.create_task(self._follow_table()), loop.create_task(self._flush_forever()))

    # -- background ----------------------------------------------------------------------

    async def _follow_table(self) -> None:
        """Long-poll the controller; on failure keep routing on the last table and retry."""
        backoff = 0.1
        while True:
            try:
                self._table = await self._controller.get_table(self._table.version, LONG_POLL_TIMEOUT_S)
                backoff = 0.1
            except Exception as exc:
                logger.warning("controller unreachable (%s); routing on table v%d", _failure_message(exc), self._table.version)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            self._flush()

    def _flush(self) -> None:
        if self._records:
            batch, self._records = self._records, []
            self._collector.record.remote(batch)

    # -- the serving path ----------------------------------------------------------------

    def _routing_key(self, headers: Mapping[str, str] | None, user: str | None) -> str | None:
        if headers is not None:
            for name in self._config.routing.key_headers:
                value = headers.get(name)
                if value:
                    return value
        return user

    async def _open(
        self, generation: GenerationRequest, key: str | None
    ) -> tuple[_Tracker, GenerationChunk, DeploymentResponseGenerator]:
        """Route, and wait for the first chunk; a canary that fails first falls back to stable."""
        table = self._table
        arm = table.arm_for(key)
        while True:
            tracker = _Tracker(generation.request_id, table, arm, time.perf_counter())
            stream = self._arms[arm].generate.remote(generation)
            try:
                first = await stream.__anext__()
            except Exception as exc:
                self._records.append(tracker.record("error", "before_first_token"))
                if arm == "canary" and self._config.failover:
                    arm = "stable"
                    continue
                raise OpenAIError(
                    502, f"model version {table.version_of(arm)} failed before its first token: {_failure_message(exc)}",
                    "server_error",
                ) from None
            tracker.on_chunk(first)
            return tracker, first, stream

    async def _unary(self, builder: ResponseBuilder, tracker: _Tracker, first: GenerationChunk, stream: DeploymentResponseGenerator) -> dict[str, Any]:
        parts = [first.text]
        try:
            async for chunk in stream:
                tracker.on_chunk(chunk)
                parts.append(chunk.text)
        except Exception as exc:
            self._records.append(tracker.record("error", "midstream"))
            raise OpenAIError(502, f"model failed mid-generation: {_failure_message(exc)}", "server_error") from None
        self._records.append(tracker.record("ok"))
        return builder.unary("".join(parts), tracker.finish_reason, tracker.prompt_tokens, tracker.tokens)

    async def _chunks(
        self, builder: ResponseBuilder, tracker: _Tracker, first: GenerationChunk, stream: DeploymentResponseGenerator, include_usage: bool
    ) -> AsyncIterator[dict[str, Any]]:
        outcome, error_kind = "cancelled", None
        try:
            yield builder.chunk(first.text, first.finish_reason, first=True)
            try:
                async for chunk in stream:
                    tracker.on_chunk(chunk)
                    yield builder.chunk(chunk.text, chunk.finish_reason)
            except Exception as exc:
                outcome, error_kind = "error", "midstream"
                yield OpenAIError(502, f"model failed mid-generation: {_failure_message(exc)}", "server_error").body()
                return
            outcome = "ok"
            if include_usage:
                yield builder.usage_chunk(tracker.prompt_tokens, tracker.tokens)
        finally:
            if outcome == "cancelled":
                stream.cancel()
            self._records.append(tracker.record(outcome, error_kind))

    async def _serve(
        self, kind: Literal["chat", "text"], body: Any, headers: Mapping[str, str] | None
    ) -> tuple[_Tracker, dict[str, Any] | AsyncIterator[dict[str, Any]]]:
        request = parse_request(ChatCompletionRequest if kind == "chat" else CompletionRequest, body)
        if request.model != self._config.model_name:
            raise OpenAIError(404, f"the model {request.model!r} does not exist; this endpoint serves {self._config.model_name!r}", code="model_not_found", param="model")
        request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        tracker, first, stream = await self._open(request.to_generation(request_id), self._routing_key(headers, request.user))
        served_by = {"arm": tracker.arm, "version": tracker.table.version_of(tracker.arm), "table_version": tracker.table.version, "replica": self._replica_id}
        builder = ResponseBuilder(kind, request_id, self._config.model_name, served_by)
        if request.stream:
            include_usage = request.stream_options is not None and request.stream_options.include_usage
            return tracker, self._chunks(builder, tracker, first, stream, include_usage)
        return tracker, await self._unary(builder, tracker, first, stream)

    # -- Python handle API ------------------------------------------------------------------

    async def chat(self, body: dict[str, Any]) -> dict[str, Any] | AsyncIterator[dict[str, Any]]:
        """OpenAI chat completion; with `"stream": true` call via `handle.options(stream=True)`."""
        return (await self._serve("chat", body, None))[1]

    async def completions(self, body: dict[str, Any]) -> dict[str, Any] | AsyncIterator[dict[str, Any]]:
        """OpenAI text completion; with `"stream": true` call via `handle.options(stream=True)`."""
        return (await self._serve("text", body, None))[1]

    async def status(self) -> dict[str, Any]:
        """The rollout status, plus which table this replica routes by."""
        status = await self._controller.status()
        status["replica"] = {"id": self._replica_id, "actor_id": self._actor_id, "table_version": self._table.version, "canary_weight": self._table.canary_weight}
        return status

    async def feedback(self, body: dict[str, Any]) -> dict[str, Any]:
        """Attribute a rating or hallucination flag to the arm that served `request_id`."""
        feedback = parse_request(FeedbackBody, body)
        self._flush()
        attribution = await self._collector.feedback.remote(feedback.request_id, feedback.rating, feedback.hallucination)
        if attribution is None:
            raise OpenAIError(404, f"unknown request_id {feedback.request_id!r} (or too old to attribute)", param="request_id")
        return {"request_id": feedback.request_id, **attribution}

    # -- HTTP -------------------------------------------------------------------------------

    async def _http(self, kind: Literal["chat", "text"], request: Request) -> Response:
        tracker, result = await self._serve(kind, await _json_body(request), request.headers)
        headers = {
            "x-serve-canary-arm": tracker.arm,
            "x-serve-canary-version": tracker.table.version_of(tracker.arm),
        }
        if isinstance(result, dict):
            return JSONResponse(result, headers=headers)

        async def events() -> AsyncIterator[str]:
            async for chunk in result:
                yield sse(chunk)
            yield SSE_DONE

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @api.post("/v1/chat/completions")
    async def http_chat(self, request: Request) -> Response:
        return await self._http("chat", request)

    @api.post("/v1/completions")
    async def http_completions(self, request: Request) -> Response:
        return await self._http("text", request)

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
    async def http_status(self) -> dict[str, Any]:
        return await self.status()

    @api.post("/-/canary/feedback")
    async def http_feedback(self, request: Request) -> dict[str, Any]:
        return await self.feedback(await _json_body(request))

    def _authorize(self, request: Request) -> None:
        if self._admin_token is None:
            raise OpenAIError(403, f"the admin API is disabled: set {ADMIN_TOKEN_ENV} on the cluster to enable it", "permission_error")
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self._admin_token}".encode()):
            raise OpenAIError(401, "missing or wrong admin bearer token", "authentication_error")

    async def _admin(self, request: Request, command: str, *args: Any) -> dict[str, Any]:
        self._authorize(request)
        try:
            return await getattr(self._controller, command)(*args)
        except TransitionError as exc:
            raise OpenAIError(409, str(exc), "conflict") from None

    @api.post("/-/canary/pause")
    async def http_pause(self, request: Request) -> dict[str, Any]:
        return await self._admin(request, "pause")

    @api.post("/-/canary/resume")
    async def http_resume(self, request: Request) -> dict[str, Any]:
        return await self._admin(request, "resume")

    @api.post("/-/canary/approve")
    async def http_approve(self, request: Request) -> dict[str, Any]:
        return await self._admin(request, "approve")

    @api.post("/-/canary/rollback")
    async def http_rollback(self, request: Request) -> dict[str, Any]:
        return await self._admin(request, "rollback")

    @api.post("/-/canary/restart")
    async def http_restart(self, request: Request) -> dict[str, Any]:
        return await self._admin(request, "restart")

    @api.put("/-/canary/weight")
    async def http_weight(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        weight = parse_request(WeightBody, await _json_body(request)).weight
        return await self._admin(request, "set_weight", weight)
