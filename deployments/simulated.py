"""A CPU model engine: streams tokens with configured timing and faults, no GPU, no weights.

It is how tests, benchmarks and the local demo produce healthy and unhealthy canaries.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from serve_canary.protocol import GenerationChunk, GenerationRequest, ModelInfo

_WORDS = ("the", "canary", "sings", "while", "stable", "models", "serve", "tokens", "to", "users")


class SimulatedEngineArgs(BaseModel):
    """The engine's knobs; times in milliseconds, rates in [0, 1]."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ttft_ms: float = Field(default=50.0, ge=0.0)
    itl_ms: float = Field(default=10.0, ge=0.0)
    jitter: float = Field(default=0.1, ge=0.0, le=1.0, description="each delay × uniform(1 ± jitter)")
    output_tokens: int = Field(default=32, ge=1)
    tokens_per_chunk: int = Field(default=1, ge=1)
    error_rate: float = Field(default=0.0, ge=0.0, le=1.0, description="fail before the first token")
    midstream_error_rate: float = Field(default=0.0, ge=0.0, le=1.0, description="fail halfway")
    seed: int | None = None


class EngineError(RuntimeError):
    """The simulated engine failed this request, as a real engine sometimes does."""


def count_prompt_tokens(request: GenerationRequest) -> int:
    if request.prompt is not None:
        return len(request.prompt.split())
    return sum(len(m.content.split()) + 1 for m in request.messages or ())


class SimulatedEngine:
    """Streams `output_tokens` tokens (capped by max_tokens): TTFT, then one chunk per ITL."""

    def __init__(self, args: SimulatedEngineArgs) -> None:
        self.args = args
        self._rng = random.Random(args.seed)

    def _delay(self, ms: float) -> float:
        jitter = self.args.jitter
        return ms / 1000.0 * self._rng.uniform(1.0 - jitter, 1.0 + jitter)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        args = self.args
        fails_early = self._rng.random() < args.error_rate
        fails_midway = self._rng.random() < args.midstream_error_rate
        await asyncio.sleep(self._delay(args.ttft_ms))
        if fails_early:
            raise EngineError("simulated engine failure before the first token")
        total = min(args.output_tokens, request.max_tokens)
        finish = "length" if request.max_tokens < args.output_tokens else "stop"
        sent = 0
        while sent < total:
            if sent > 0:
                await asyncio.sleep(self._delay(args.itl_ms * args.tokens_per_chunk))
            if fails_midway and sent >= total // 2:
                raise EngineError("simulated engine failure mid-stream")
            n = min(args.tokens_per_chunk, total - sent)
            text = "".join(f" {_WORDS[(sent + i) % len(_WORDS)]}" for i in range(n))
            yield GenerationChunk(
                text=text if sent else text.lstrip(),
                num_tokens=n,
                prompt_tokens=count_prompt_tokens(request) if sent == 0 else None,
                finish_reason=finish if sent + n == total else None,
            )
            sent += n


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class SimulatedServer:
    """ModelServer deployment around SimulatedEngine."""

    def __init__(self, version: str, model: str, engine_args: dict) -> None:
        self._info: ModelInfo = {"version": version, "model": model, "engine": "simulated"}
        self._engine = SimulatedEngine(SimulatedEngineArgs.model_validate(engine_args))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        async for chunk in self._engine.generate(request):
            yield chunk

    def info(self) -> ModelInfo:
        return self._info
