"""The serving path, with no Ray in it: route one OpenAI request to an arm, fail over, relay
what the arm yields, and record what happened.

Both kinds of arm speak Ray Serve LLM's `LLMServer` contract: called as a stream, `chat` and
`completions` yield one response object (or an `ErrorResponse`) for a unary request, and
lists of SSE strings for a stream. The ingress passes each arm in as an `ArmEndpoint` whose
`open` starts a call, and a sink for the records; tests pass the simulated server itself.
The arm stamps its first item with when the call reached it (`stamps`): the wait before that
is queueing, recorded apart from the time to first token.

What the ingress reads, and what it does not: a batch's arrival time, a cheap prefix check of
each item for an error event, and the stream's last few items (finish reason and usage, which
the ingress always asks the arm for and strips when the client did not). It never parses or
re-frames a token chunk, so a batch crosses to the client as one write.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from serve_canary.metrics import Origin, RequestRecord
from serve_canary.openai_api import Envelope, OpenAIError, validation_error
from serve_canary.routing import Arm, RoutingTable
from serve_canary.shadow import Answer
from serve_canary.stamps import queueing, unstamped

Kind = Literal["chat", "completions"]
RecordSink = Callable[[RequestRecord], None]
AnswerSink = Callable[[Arm, Answer], None]  # a finished (not cancelled) answer, whole
ERROR_EVENT_PREFIX = 'data: {"error"'
DONE_EVENT = "data: [DONE]"
# A finish reason that means the engine failed, or the model degenerated into repetition.
FAILED_FINISH_REASONS = frozenset({"error", "repetition"})
# The `id` a client sees, which feedback names: vLLM (and the simulated engine) prefix ours.
RESPONSE_ID_PREFIX: dict[Kind, str] = {"chat": "chatcmpl", "completions": "cmpl"}


@dataclass(frozen=True)
class ArmEndpoint:
    """One arm as the serving path sees it."""

    name: Arm
    version: str
    model_id: str
    request_models: dict[Kind, type[BaseModel]]
    open: Callable[[Kind, Any], AsyncIterator[Any]]  # closing the iterator cancels the call

    def request(self, kind: Kind, body: dict[str, Any], request_id: str, stream: bool) -> Any:
        """The arm's own request object: its model id, our request id, usage always on."""
        payload = {**body, "model": self.model_id, "request_id": request_id}
        if stream:
            options = body.get("stream_options")
            payload["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        try:
            return self.request_models[kind].model_validate(payload)
        except ValidationError as exc:
            raise validation_error(exc) from None


@dataclass(frozen=True)
class Served:
    """A request that an arm accepted: who served it, and a body or a stream of SSE blocks."""

    arm: Arm
    version: str
    request_id: str
    window: str  # the metrics window it is recorded in
    unit: str | None  # the unit it counts for (`RequestRecord.unit`)
    body: dict[str, Any] | None = None
    stream: AsyncIterator[str] | None = None
    feedback_token: str = ""  # set by the ingress


class FirstItemDeadline:
    """How long to wait for the canary's first item before leaving its request to stable: the
    configured floor, or longer while stable itself is slow to answer.

    A loaded cluster slows both arms. Failing a canary request over for a wait that stable
    would have made its user wait too helps no one, adds a second request to the load, and
    counts load as the canary's error. So the deadline follows stable's recent first-item
    times as TCP's retransmission timer follows round trips (Jacobson/Karels, RFC 6298): a
    smoothed time plus four smoothed deviations, never below the floor.
    """

    def __init__(self, floor_s: float) -> None:
        self.floor_s = floor_s
        self._smoothed: float | None = None
        self._deviation = 0.0

    def observe(self, first_item_s: float) -> None:
        """Stable answered its first item after `first_item_s`."""
        if self._smoothed is None:
            self._smoothed, self._deviation = first_item_s, first_item_s / 2.0
            return
        self._deviation += (abs(self._smoothed - first_item_s) - self._deviation) / 4.0
        self._smoothed += (first_item_s - self._smoothed) / 8.0

    @property
    def seconds(self) -> float:
        if self._smoothed is None:
            return self.floor_s
        return max(self.floor_s, self._smoothed + 4.0 * self._deviation)


class ReplicaLost(Exception):
    """The arm's replica died with the call before it answered. Nothing reached the client,
    and another replica of the arm (or Serve's replacement for this one) can take the request."""


def _error_of(item: Any) -> tuple[int, str] | None:
    """(status, message) when `item` is an `ErrorResponse` (vLLM's, Ray's or ours)."""
    error = getattr(item, "error", None)
    if error is None:
        return None
    return int(getattr(error, "code", 500) or 500), str(getattr(error, "message", error))


def failure_message(exc: BaseException) -> str:
    """`Type: first line` of an exception, or of the cause a Ray error wraps."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).splitlines()[0] if str(cause) else ""
    return f"{type(cause).__name__}: {text}"


class _Attempt:
    """Times one call to one arm and turns it into a RequestRecord."""

    def __init__(
        self, request_id: str, table: RoutingTable, arm: Arm, unit: str | None, clock: Callable[[], float]
    ) -> None:
        self.request_id, self.table, self.arm, self.unit, self.clock = request_id, table, arm, unit, clock
        self.failed_over = False  # stable answering a canary request that failed: not stable's request
        self.origin: Origin = "user"
        self.started = clock()
        self.sent_at = time.time()  # wall clock, to compare with the replica's receipt stamp
        self.queue_s: float | None = None
        self.first_at: float | None = None
        self.last_at = self.started

    def record(
        self,
        outcome: str,
        error_kind: str | None = None,
        prompt_tokens: int = 0,
        output_tokens: int = 0,
        engine_queue_s: float | None = None,
    ) -> RequestRecord:
        """`engine_queue_s`: the wait in the engine's own queue, as the engine reported it."""
        now = self.clock()
        if self.failed_over and outcome in ("ok", "cancelled"):  # stable answered the canary's request
            outcome = "failover"
        ttft = None if self.first_at is None else self.first_at - self.started
        queue = self.queue_s
        if engine_queue_s is not None and ttft is not None:  # within the time to the first item
            queue = min((queue or 0.0) + engine_queue_s, ttft)
        itl = None  # unobservable in one piece: a unary answer, or a stream that came in one batch
        if self.first_at is not None and output_tokens > 1 and self.last_at > self.first_at:
            itl = (self.last_at - self.first_at) / (output_tokens - 1)
        return RequestRecord(
            self.request_id,
            self.table.window,
            self.unit,
            self.arm,
            self.table.version_of(self.arm),
            outcome,
            error_kind,
            ttft,
            itl,
            now - self.started,
            prompt_tokens,
            output_tokens,
            self.origin,
            queue,
        )


def engine_queue_s(body: dict[str, Any]) -> float | None:
    """The seconds a request waited in the engine's queue, from the per-request metrics vLLM
    adds to the usage (`enable_per_request_metrics`; the simulated engine does the same)."""
    metrics = body.get("metrics")
    waited = metrics.get("queue_time_ms") if isinstance(metrics, dict) else None
    if isinstance(waited, bool) or not isinstance(waited, int | float) or not 0.0 <= waited < math.inf:
        return None
    return waited / 1000.0


def _finish_reasons(choices: Any) -> list[str]:
    if not isinstance(choices, list):
        return []
    return [c["finish_reason"] for c in choices if isinstance(c, dict) and c.get("finish_reason")]


def _outcome(finish_reasons: list[str]) -> tuple[str, str | None]:
    failed = [reason for reason in finish_reasons if reason in FAILED_FINISH_REASONS]
    return ("error", failed[0]) if failed else ("ok", None)


class _StreamTail:
    """The last few data items of a stream, parsed once at its end for usage and finish reason."""

    def __init__(self) -> None:
        self.items: deque[str] = deque(maxlen=4)

    def summary(self) -> tuple[int, int, str | None, float | None]:
        """(prompt tokens, completion tokens, finish reason, seconds in the engine's queue) as
        the arm reported them."""
        prompt = completion = 0
        finish: str | None = None
        queued: float | None = None
        for item in reversed(self.items):
            if item.startswith(DONE_EVENT) or not item.startswith("data: "):
                continue
            try:
                chunk = json.loads(item[6:])
            except json.JSONDecodeError:
                continue
            if not isinstance(chunk, dict):
                continue
            if isinstance(chunk.get("usage"), dict) and not completion:
                prompt = int(chunk["usage"].get("prompt_tokens") or 0)
                completion = int(chunk["usage"].get("completion_tokens") or 0)
                queued = engine_queue_s(chunk)
            reasons = _finish_reasons(chunk.get("choices"))
            if reasons and finish is None:
                failed = [r for r in reasons if r in FAILED_FINISH_REASONS]
                finish = failed[0] if failed else reasons[0]
        return prompt, completion, finish, queued


def _is_usage_only(item: str) -> bool:
    return item.startswith("data: {") and '"choices":[]' in item and '"usage"' in item


async def _close(stream: AsyncIterator[Any]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


async def serve_request(
    kind: Kind,
    body: Any,
    key: str | None,
    table: RoutingTable,
    arms: dict[Arm, ArmEndpoint],
    record: RecordSink,
    *,
    request_id: str,
    failover: bool,
    canary_first_item_timeout_s: float | None = None,
    forced: Arm | None = None,
    origin: Literal["tester", "shadow"] = "tester",
    capture: AnswerSink | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Served:
    """Route `body` by `key`, call the arm and wait for its first item.

    A canary that fails before its first item (an exception, or a 5xx `ErrorResponse`) is
    recorded as a canary error and, with `failover`, the request goes to stable; so is a
    canary that yields nothing within `canary_first_item_timeout_s` (no live replica, a hung
    engine: error kind `unavailable`), so its users never stall behind it. Any other arm whose
    replica is lost with the call (`ReplicaLost`, also `unavailable`) is called once more:
    Serve gives the call another replica, or holds it for the replacement, so a stable user
    waits instead of getting a 502. A 4xx from an arm
    is the client's error: it is raised as such, never failed over, never held against the
    arm (recorded as `rejected`). A `forced` arm (a tester's pick) serves the request whatever
    the table says, without failover, and its record is marked with `origin` (a tester's pick,
    or a shadow request) so the judge never reads it. `capture`, if given, receives the whole
    answer when it is finished (the text of a stream is kept only then).
    """
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    try:
        envelope = Envelope.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    arm, unit = (forced, None) if forced is not None else table.route(key)
    failed_over = retried = False
    while True:
        endpoint = arms[arm]
        request = endpoint.request(kind, body, request_id, envelope.stream)
        attempt = _Attempt(f"{RESPONSE_ID_PREFIX[kind]}-{request_id}", table, arm, unit, clock)
        attempt.failed_over = failed_over
        attempt.origin = "user" if forced is None else origin
        stream = endpoint.open(kind, request)
        can_fail_over = arm == "canary" and failover and forced is None
        timeout_s = canary_first_item_timeout_s if can_fail_over else None
        error_kind, replica_lost = "before_first_token", False
        try:
            first = await asyncio.wait_for(anext(stream), timeout_s)
        except TimeoutError:
            failure: tuple[int, str] | None = (504, f"no first token within {timeout_s:g} s")
            error_kind = "unavailable"
        except ReplicaLost as exc:
            failure, error_kind, replica_lost = (502, str(exc)), "unavailable", True
        except Exception as exc:
            failure = (502, failure_message(exc))
        else:
            attempt.first_at = attempt.last_at = clock()
            first, received_at = unstamped(first)
            attempt.queue_s = queueing(attempt.sent_at, received_at, attempt.first_at - attempt.started)
            failure = _error_of(first[0] if isinstance(first, list) and first else first)
        if failure is None:
            break
        status, message = failure
        await _close(stream)
        if 400 <= status < 500:
            record(attempt.record("rejected", "client_error"))
            raise OpenAIError(status, message)
        record(attempt.record("error", error_kind))
        if can_fail_over:
            arm, failed_over = "stable", True
            continue
        if replica_lost and not retried:
            retried = True
            continue
        raise OpenAIError(
            502, f"model version {endpoint.version} failed before its first token: {message}", "server_error"
        )
    if not envelope.stream:
        body = _unary(first, endpoint, attempt, record, capture)
        # Drain, not close: the end of a one-item stream is already on its way, and closing it
        # early would cost a cancellation message per request. The answer is whole and
        # recorded: an arm lost now (its node gone) is not the client's failure.
        with contextlib.suppress(Exception):
            async for _ in stream:
                pass
        return Served(arm, endpoint.version, attempt.request_id, table.window, unit, body=body)
    relayed = _relay(first, stream, attempt, record, envelope.include_usage, capture)
    return Served(arm, endpoint.version, attempt.request_id, table.window, unit, stream=relayed)


def _answer(finished: RequestRecord, text: str, finish: str | None) -> Answer:
    error = None if finished.outcome in ("ok", "failover") else f"{finished.outcome}: {finished.error_kind}"
    return Answer(text, finish, finished.output_tokens, finished.from_receipt(finished.e2e_s), error)


def _choice_text(choice: Any) -> str:
    """The text of a choice, a chunk's choice or a whole one, chat or completion."""
    if not isinstance(choice, dict):
        return ""
    part = choice.get("delta") or choice.get("message")
    text = part.get("content") if isinstance(part, dict) else choice.get("text")
    return text if isinstance(text, str) else ""


def stream_text(items: list[str]) -> str:
    """The first choice's text, put together from a stream's SSE items."""
    parts = []
    for block in items:
        for line in block.split("\n"):
            if not line.startswith("data: {"):
                continue
            try:
                chunk = json.loads(line[6:])
            except json.JSONDecodeError:
                continue
            choices = chunk.get("choices") if isinstance(chunk, dict) else None
            if isinstance(choices, list) and choices:
                parts.append(_choice_text(choices[0]))
    return "".join(parts)


def _unary(
    response: Any, endpoint: ArmEndpoint, attempt: _Attempt, record: RecordSink, capture: AnswerSink | None
) -> dict[str, Any]:
    body: dict[str, Any] = response.model_dump(mode="json") if hasattr(response, "model_dump") else dict(response)
    tokens = body.get("usage") or {}
    reasons = _finish_reasons(body.get("choices"))
    outcome, error_kind = _outcome(reasons)
    finished = attempt.record(
        outcome,
        error_kind,
        int(tokens.get("prompt_tokens") or 0),
        int(tokens.get("completion_tokens") or 0),
        engine_queue_s(body),
    )
    record(finished)
    if capture is not None:
        choices = body.get("choices")
        text = _choice_text(choices[0]) if isinstance(choices, list) and choices else ""
        capture(endpoint.name, _answer(finished, text, reasons[0] if reasons else None))
    body["serve_canary"] = {"arm": endpoint.name, "version": endpoint.version, "table_version": attempt.table.version}
    return body


async def _relay(
    first: list[Any],
    stream: AsyncIterator[list[Any]],
    attempt: _Attempt,
    record: RecordSink,
    include_usage: bool,
    capture: AnswerSink | None,
) -> AsyncIterator[str]:
    """Yield each batch as one SSE block; record the stream when it ends, however it ends."""
    tail = _StreamTail()
    kept: list[str] = []  # every item, only for a captured answer
    received = 0
    finished = whole = False
    outcome, error_kind = "ok", None
    try:
        batch: list[Any] | None = first
        while batch is not None:
            items: list[str] = []
            for item in batch:
                if not isinstance(item, str):
                    status, message = _error_of(item) or (500, str(item))
                    item = f"data: {json.dumps({'error': {'message': message, 'code': status}})}\n\n"
                if item.startswith(ERROR_EVENT_PREFIX):
                    outcome, error_kind = "error", "midstream"
                items.append(item)
            received += len(items)
            tail.items.extend(items[-3:])
            if capture is not None:
                kept.extend(items)
            if not include_usage:
                items = items[:-2] + [item for item in items[-2:] if not _is_usage_only(item)]
            # A client may leave once it has `[DONE]` (OpenAI's SDK does) before the arm's
            # stream has ended: the answer it got is whole, not cancelled.
            whole = whole or any(item.startswith(DONE_EVENT) for item in items)
            if items:
                yield "".join(items)
            try:
                batch = await stream.__anext__()
                attempt.last_at = attempt.clock()
            except StopAsyncIteration:
                batch = None
        finished = True
    except Exception as exc:
        if whole:  # the arm was lost after its last event: the client has the whole answer
            return
        finished = True
        outcome, error_kind = "error", "midstream"
        message = failure_message(exc)
        yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error', 'code': 502}})}\n\n"
    finally:
        prompt, completion, finish, queued = tail.summary()
        if not finished:  # the client went away: cancel the generation, even after an error event
            await _close(stream)
        if outcome == "ok" and not (finished or whole):
            outcome, completion = "cancelled", completion or received
        elif outcome == "ok":
            outcome, error_kind = _outcome([finish] if finish else [])
        finished_record = attempt.record(outcome, error_kind, prompt, completion, queued)
        record(finished_record)
        if capture is not None and (finished or whole):
            capture(attempt.arm, _answer(finished_record, stream_text(kept), finish))
