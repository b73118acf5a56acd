"""A faithful stand-in for the slice of vLLM's API the adapter uses (vLLM needs CUDA).

It mirrors AsyncLLM's contract: `generate(prompt, SamplingParams, request_id)` is an async
generator of RequestOutput; with DELTA output, tokens produced while the consumer was busy
are coalesced into one output; closing the generator aborts the request; a dead engine
raises EngineDeadError from `generate` and `check_health`. `install()` registers it as the
`vllm` package so the adapter's function-level imports find it.
"""

from __future__ import annotations

import asyncio
import enum
import sys
import types
from dataclasses import dataclass, field


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] | None = None
    seed: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: None = None
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool


class EngineDeadError(RuntimeError):
    pass


@dataclass
class AsyncEngineArgs:
    model: str
    extra: dict = field(default_factory=dict)

    def __init__(self, model: str, **extra):
        self.model, self.extra = model, extra


class FakeTokenizer:
    def apply_chat_template(self, messages, tokenize: bool, add_generation_prompt: bool) -> str:
        assert tokenize is False
        text = "".join(f"<|{m['role']}|>{m['content']}" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")


class AsyncLLM:
    """Produces `vocabulary` words, one token each, every `step_s` on a background task."""

    def __init__(self, step_s: float = 0.001, vocabulary: tuple[str, ...] = ("a", "b", "c", "d")) -> None:
        self.step_s, self.vocabulary = step_s, vocabulary
        self.dead = False
        self.aborted: list[str] = []
        self.prompts: list[str] = []
        self.params: list[SamplingParams] = []

    @classmethod
    def from_engine_args(cls, args: AsyncEngineArgs) -> "AsyncLLM":
        engine = cls()
        engine.engine_args = args
        return engine

    async def get_tokenizer(self) -> FakeTokenizer:
        return FakeTokenizer()

    async def check_health(self) -> None:
        if self.dead:
            raise EngineDeadError("EngineCore encountered an issue")

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def generate(self, prompt: str, sampling_params: SamplingParams, request_id: str):
        if self.dead:
            raise EngineDeadError("EngineCore encountered an issue")
        assert sampling_params.output_kind == RequestOutputKind.DELTA, "the adapter must ask for DELTA outputs"
        self.prompts.append(prompt)
        self.params.append(sampling_params)
        pending: list[int] = []
        done = asyncio.Event()
        state = {"finished": False}

        async def produce() -> None:
            for i in range(sampling_params.max_tokens or 16):
                await asyncio.sleep(self.step_s)
                if self.dead:
                    break
                pending.append(i)
                done.set()
            state["finished"] = True
            done.set()

        producer = asyncio.create_task(produce())
        prompt_ids = list(range(len(prompt.split())))
        try:
            while True:
                await done.wait()
                done.clear()
                if self.dead:
                    raise EngineDeadError("EngineCore encountered an issue")
                tokens, pending[:] = list(pending), []
                finished = state["finished"]
                if not tokens and not finished:
                    continue
                text = "".join(f" {self.vocabulary[t % len(self.vocabulary)]}" for t in tokens)
                yield RequestOutput(
                    request_id, prompt, prompt_ids,
                    [CompletionOutput(0, text, tokens, finish_reason="length" if finished else None)], finished,
                )
                if finished:
                    return
        except (asyncio.CancelledError, GeneratorExit):
            await self.abort(request_id)
            raise
        finally:
            producer.cancel()


def install() -> None:
    """Register this module as `vllm`, `vllm.sampling_params` and `vllm.v1.engine.async_llm`."""
    vllm = types.ModuleType("vllm")
    vllm.SamplingParams, vllm.AsyncEngineArgs, vllm.AsyncLLMEngine = SamplingParams, AsyncEngineArgs, AsyncLLM
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.SamplingParams, sampling.RequestOutputKind = SamplingParams, RequestOutputKind
    async_llm = types.ModuleType("vllm.v1.engine.async_llm")
    async_llm.AsyncLLM = AsyncLLM
    for name, module in {
        "vllm": vllm, "vllm.sampling_params": sampling, "vllm.v1": types.ModuleType("vllm.v1"),
        "vllm.v1.engine": types.ModuleType("vllm.v1.engine"), "vllm.v1.engine.async_llm": async_llm,
    }.items():
        sys.modules[name] = module


def uninstall() -> None:
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        del sys.modules[name]
