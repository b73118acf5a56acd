"""The vLLM arm: Ray Serve LLM's `LLMServer`, built by Ray Serve LLM's own builder from the
user's `LLMConfig`, with four changes a canary needs.

- Stream batching with the first-item rule (`serve_canary.batching`): `LLMServer` holds even
  the first token for its 50 ms interval, which a canary would report as slower TTFT. Its
  streams share a message budget with the streams the ingress relays (`relayed_streams`).
- Warm-up: the replica answers a completion and a chat before its constructor returns, so
  Serve never routes users to a cold engine (a cold engine's first requests take seconds and would be
  judged as a slow canary).
- A receipt stamp (`serve_canary.stamps`) on the first item when the ingress asks for it, and
  vLLM's per-request metrics on by default, so time spent waiting for a replica or in the
  engine's queue is not read as the model's time to first token.
- Shutdown: the vLLM engine (and its worker processes) stops with the replica, so a GPU is
  free for the replacement at once.

Importing this module imports Ray Serve LLM and vLLM; `build_app` imports it only for arms
with an `llm_config`.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import Any

from ray.serve.deployment import Application
from ray.serve.llm import LLMConfig, LLMServer, build_llm_deployment
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

from serve_canary.batching import StreamPacer, batched
from serve_canary.config import StreamBatching
from serve_canary.stamps import stamped

logger = logging.getLogger("serve_canary.engines.llm")
WARM_UP_PROMPT = "warm up"
PER_REQUEST_METRICS = "enable_per_request_metrics"  # vLLM's engine argument


# The streams the caller of the current request relays: `LLMServer` builds the request's
# batched stream (`_batch_output_stream`) inside the call, in its context.
_relayed_streams: contextvars.ContextVar[int] = contextvars.ContextVar("relayed_streams", default=0)


class CanaryLLMServer(LLMServer):
    """`LLMServer` with first-item stream batching, warm-up, a receipt stamp and engine shutdown."""

    async def chat(  # type: ignore[override]  # two keywords more than LLMServer's
        self,
        request: ChatCompletionRequest,
        raw_request_info: Any = None,
        stamp: bool = False,
        relayed_streams: int = 0,
    ) -> AsyncIterator[Any]:
        _relayed_streams.set(relayed_streams)
        return await self._maybe_stamped(super().chat(request, raw_request_info), stamp)

    async def completions(  # type: ignore[override]
        self,
        request: CompletionRequest,
        raw_request_info: Any = None,
        stamp: bool = False,
        relayed_streams: int = 0,
    ) -> AsyncIterator[Any]:
        _relayed_streams.set(relayed_streams)
        return await self._maybe_stamped(super().completions(request, raw_request_info), stamp)

    @staticmethod
    async def _maybe_stamped(call: Awaitable[AsyncIterator[Any]], stamp: bool) -> AsyncIterator[Any]:
        """`LLMServer`'s answer to `call`, its first item stamped with when the call got here if asked."""
        received_at = time.time()
        items = await call
        return stamped(items, received_at) if stamp else items

    async def start(self) -> None:
        await super().start()  # type: ignore[no-untyped-call]  # Ray leaves it untyped
        started = time.perf_counter()
        model_id = self._llm_config.model_id
        completion = CompletionRequest.model_validate(
            {"model": model_id, "prompt": WARM_UP_PROMPT, "max_tokens": 1, "temperature": 0.0}
        )
        await self._warm_up(await self.completions(completion), model_id, required=True)
        # The chat path has cold costs of its own (template rendering: ~2 s on the first call
        # here); a model without a chat template answers 400, which is fine.
        chat = ChatCompletionRequest.model_validate(
            {"model": model_id, "messages": [{"role": "user", "content": WARM_UP_PROMPT}], "max_tokens": 1}
        )
        await self._warm_up(await self.chat(chat), model_id, required=False)
        logger.info("%s answered its warm-up generations in %.2f s", model_id, time.perf_counter() - started)

    @staticmethod
    async def _warm_up(stream: AsyncIterator[Any], model_id: str, required: bool) -> None:
        async for item in stream:
            error = getattr(item, "error", None)
            if error is not None and (required or int(error.code) >= 500):
                raise RuntimeError(f"warm-up generation of {model_id} failed: {error.message}")

    @functools.cached_property
    def _pacer(self) -> StreamPacer:
        return StreamBatching.model_validate(self._llm_config.experimental_configs).pacer()

    def _batch_output_stream(self, generator: AsyncGenerator[Any, None]) -> AsyncIterator[list[Any]]:  # type: ignore[override]
        return batched(generator, self._pacer, _relayed_streams.get())

    async def running_requests(self) -> int:
        """Requests the engine is generating now (an aborted request is no longer counted)."""
        return int(self.engine._engine_client.get_num_unfinished_requests())  # type: ignore[union-attr]

    async def __del__(self) -> None:
        await super().__del__()
        client = getattr(self.engine, "_engine_client", None)
        if client is not None:
            client.shutdown()


def build_arm(name: str, llm_config: dict[str, Any]) -> Application:
    """The arm's deployment, named `name` so a Serve config's `deployments:` can address it.

    vLLM's per-request metrics are on unless the config says otherwise: they carry the time
    each request waited in the engine's queue, which is load and not the model's (`serving`).
    """
    engine_kwargs = llm_config.get("engine_kwargs") or {}
    if isinstance(engine_kwargs, dict):  # anything else is LLMConfig's to refuse
        llm_config = {**llm_config, "engine_kwargs": {PER_REQUEST_METRICS: True, **engine_kwargs}}
    config = LLMConfig.model_validate(llm_config)
    return build_llm_deployment(config, deployment_cls=CanaryLLMServer, override_serve_options={"name": name})
