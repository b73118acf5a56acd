"""ModelServer on vLLM's AsyncLLM (GPU nodes). vLLM is imported only inside this module's
functions, so CPU machines can import the package and build CPU-only apps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from serve_canary.protocol import FinishReason, GenerationChunk, GenerationRequest, ModelInfo

_FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}


class VLLMEngineAdapter:
    """Turns GenerationRequests into AsyncLLM calls and RequestOutputs into GenerationChunks."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    async def _prompt_text(self, request: GenerationRequest) -> str:
        if request.prompt is not None:
            return request.prompt
        tokenizer = await self._engine.get_tokenizer()
        messages = [{"role": m.role, "content": m.content} for m in request.messages or ()]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            stop=list(request.stop) or None,
            seed=request.seed,
            output_kind=RequestOutputKind.DELTA,
        )
        outputs = self._engine.generate(await self._prompt_text(request), params, request.request_id)
        first = True
        try:
            async for output in outputs:
                completion = output.outputs[0]
                num_tokens = len(completion.token_ids)
                if num_tokens == 0 and not output.finished:
                    continue
                yield GenerationChunk(
                    text=completion.text,
                    num_tokens=num_tokens,
                    prompt_tokens=len(output.prompt_token_ids or ()) if first else None,
                    finish_reason=_FINISH_REASONS.get(completion.finish_reason or "", "stop")
                    if output.finished
                    else None,
                )
                first = False
        finally:
            # Closing AsyncLLM's generator early aborts the request inside the engine.
            await outputs.aclose()

    async def check_health(self) -> None:
        await self._engine.check_health()


@serve.deployment(max_ongoing_requests=128)
class VLLMServer:
    """ModelServer deployment: one AsyncLLM engine per replica (set `num_gpus` in the config)."""

    def __init__(self, version: str, model: str, engine_args: dict[str, Any]) -> None:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self._info: ModelInfo = {"version": version, "model": model, "engine": "vllm"}
        self._adapter = VLLMEngineAdapter(AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args)))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        async for chunk in self._adapter.generate(request):
            yield chunk

    async def check_health(self) -> None:
        await self._adapter.check_health()

    def info(self) -> ModelInfo:
        return self._info
