"""A CPU model server with configured timing and faults, no GPU, no weights.

It speaks Ray Serve LLM's `LLMServer` contract, so the ingress has one serving path: `chat`
and `completions` take an OpenAI request object and, called through a streaming handle, yield
one response object (or `ErrorResponse`) for a unary request, and lists of SSE strings for a
stream (the first item alone and at once, then one list per batching interval). Tests,
benchmarks and the local demo use it to make healthy and unhealthy canaries.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

from serve_canary.batching import batched
from serve_canary.config import SimulatedEngineArgs
from serve_canary.openai_api import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorInfo,
    ErrorResponse,
    Response,
    sse,
    usage,
)
from serve_canary.stamps import stamped

_WORDS = ("the", "canary", "sings", "while", "stable", "models", "serve", "tokens", "to", "users")


def count_prompt_tokens(request: ChatCompletionRequest | CompletionRequest) -> int:
    if isinstance(request, CompletionRequest):
        assert isinstance(request.prompt, str)
        return len(request.prompt.split())
    return sum(len(m.text().split()) + 1 for m in request.messages)


def prompt_position(request: ChatCompletionRequest | CompletionRequest) -> float:
    """Where the prompt falls in [0, 1): the same prompt always at the same place, as a model
    at temperature 0 answers the same prompt the same way."""
    text = request.prompt if isinstance(request, CompletionRequest) else [m.text() for m in request.messages]
    digest = hashlib.blake2b(repr(text).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _engine_error(message: str) -> ErrorResponse:
    return ErrorResponse(error=ErrorInfo(message=message, type="InternalServerError", code=500))


class SimulatedEngine:
    """Generates `output_tokens` words (capped by max_tokens): TTFT, then one token per ITL.

    Yields what vLLM's OpenAI serving layer yields: per-token SSE strings for a stream, one
    `Response` otherwise, an `ErrorResponse` for a failure before the first token, and an
    error event for a failure mid-stream. Beyond `max_num_seqs` requests wait in its queue,
    and, as vLLM with `enable_per_request_metrics`, it reports each request's wait there
    (`metrics.queue_time_ms`) with the usage.
    """

    def __init__(self, model_id: str, args: SimulatedEngineArgs) -> None:
        self.model_id = model_id
        self.args = args
        self._rng = random.Random(args.seed)
        self._slots: AbstractAsyncContextManager[Any] = (
            contextlib.nullcontext() if args.max_num_seqs is None else asyncio.Semaphore(args.max_num_seqs)
        )

    def _delay(self, ms: float) -> float:
        jitter = self.args.jitter
        return ms / 1000.0 * self._rng.uniform(1.0 - jitter, 1.0 + jitter)

    async def generate(self, request: ChatCompletionRequest | CompletionRequest) -> AsyncIterator[Any]:
        args = self.args
        chat = isinstance(request, ChatCompletionRequest)
        limit = (request.max_completion_tokens if chat else None) or request.max_tokens  # type: ignore[union-attr]
        prompt_tokens = count_prompt_tokens(request)
        if prompt_tokens + (limit or 1) > args.max_model_len:
            message = (
                f"This model's maximum context length is {args.max_model_len} tokens; the prompt has "
                f"{prompt_tokens} and {limit or 1} output tokens were requested"
            )
            yield ErrorResponse(
                error=ErrorInfo(message=message, type="BadRequestError", param="input_tokens", code=400)
            )
            return
        queued_at = time.perf_counter()
        async with self._slots:
            metrics = {"queue_time_ms": (time.perf_counter() - queued_at) * 1000.0}
            async for item in self._generate(request, limit, prompt_tokens, metrics):
                yield item

    async def _generate(
        self,
        request: ChatCompletionRequest | CompletionRequest,
        limit: int | None,
        prompt_tokens: int,
        metrics: dict[str, float],
    ) -> AsyncIterator[Any]:
        args, chat = self.args, isinstance(request, ChatCompletionRequest)
        fails_early = self._rng.random() < args.error_rate
        fails_midway = self._rng.random() < args.midstream_error_rate
        await asyncio.sleep(self._delay(args.ttft_ms))
        if fails_early:
            yield _engine_error("simulated engine failure before the first token")
            return
        total = min(args.output_tokens, limit or args.output_tokens)
        finish = "length" if total < args.output_tokens else "stop"
        position = prompt_position(request)
        shift = 1 if 0.0 <= position - args.empty_answer_rate < args.different_answer_rate else 0
        words = [_WORDS[(i + shift) % len(_WORDS)] for i in range(total)]
        if position < args.empty_answer_rate:  # one token, the end of the answer, and no text
            total, finish, words = 1, "stop", [""]
        prefix = "chatcmpl" if chat else "cmpl"
        envelope = {
            "id": f"{prefix}-{request.request_id}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_id,
        }
        if not request.stream:
            for _ in range(total - 1):
                await asyncio.sleep(self._delay(args.itl_ms))
            if fails_midway:
                yield _engine_error("simulated engine failure mid-generation")
                return
            text = " ".join(words)
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            body = {**envelope, "object": "chat.completion" if chat else "text_completion", "choices": [choice]}
            yield Response.model_validate({**body, "usage": usage(prompt_tokens, total), "metrics": metrics})
            return

        def chunk(text: str, finish_reason: str | None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": text} if role else {"content": text}
                return sse({**envelope, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})
            return sse({**envelope, "choices": [{"index": 0, "text": text, "finish_reason": finish_reason}]})

        if chat:
            yield chunk("", None, role=True)
        for i, word in enumerate(words):
            if i > 0:
                await asyncio.sleep(self._delay(args.itl_ms))
            if fails_midway and i >= total // 2:
                yield sse(_engine_error("simulated engine failure mid-stream").model_dump())
                yield SSE_DONE
                return
            yield chunk(word if i == 0 else f" {word}", finish if i == total - 1 else None)
        if request.include_usage:
            yield sse({**envelope, "choices": [], "usage": usage(prompt_tokens, total), "metrics": metrics})
        yield SSE_DONE


class SimulatedServer:
    """A model server with `LLMServer`'s `chat`/`completions` contract (`build_app` makes it a
    Serve deployment; unit tests call it in-process)."""

    def __init__(self, model_id: str, engine_args: dict[str, Any]) -> None:
        self._engine = SimulatedEngine(model_id, SimulatedEngineArgs.model_validate(engine_args))
        self._pacer = self._engine.args.pacer()

    def _run(
        self, request: ChatCompletionRequest | CompletionRequest, stamp: bool, relayed_streams: int
    ) -> AsyncIterator[Any]:
        """`stamp`: wrap the first item in `stamps.Stamped` (the ingress asks, to see queueing);
        `relayed_streams`: the streams the caller relays now (`batching.batched`)."""
        items = self._engine.generate(request)
        if request.stream:
            items = batched(items, self._pacer, relayed_streams)
        return stamped(items) if stamp else items

    async def chat(
        self,
        request: ChatCompletionRequest,
        raw_request_info: object = None,
        stamp: bool = False,
        relayed_streams: int = 0,
    ) -> AsyncIterator[Any]:
        async for item in self._run(request, stamp, relayed_streams):
            yield item

    async def completions(
        self,
        request: CompletionRequest,
        raw_request_info: object = None,
        stamp: bool = False,
        relayed_streams: int = 0,
    ) -> AsyncIterator[Any]:
        async for item in self._run(request, stamp, relayed_streams):
            yield item
