"""The vLLM adapter against a fake engine that honours AsyncLLM's contract."""

from __future__ import annotations

import asyncio

import pytest

from deployments.vllm_server import VLLMEngineAdapter, VLLMServer
from serve_canary.protocol import ChatMessage, GenerationRequest

from . import fake_vllm


@pytest.fixture(autouse=True)
def vllm_module():
    fake_vllm.install()
    yield
    fake_vllm.uninstall()


def chat(max_tokens: int = 5) -> GenerationRequest:
    return GenerationRequest(
        request_id="req-1", messages=(ChatMessage("system", "terse"), ChatMessage("user", "hi there")),
        max_tokens=max_tokens, temperature=0.2, top_p=0.9, stop=("\n",), seed=3,
    )


async def test_chat_is_templated_and_sampling_params_are_passed_as_delta():
    engine = fake_vllm.AsyncLLM()
    chunks = [c async for c in VLLMEngineAdapter(engine).generate(chat())]
    assert engine.prompts == ["<|system|>terse<|user|>hi there<|assistant|>"]
    params = engine.params[0]
    assert (params.max_tokens, params.temperature, params.top_p, params.stop, params.seed) == (5, 0.2, 0.9, ["\n"], 3)
    assert params.output_kind == fake_vllm.RequestOutputKind.DELTA
    assert sum(c.num_tokens for c in chunks) == 5
    assert chunks[0].prompt_tokens == len(engine.prompts[0].split())  # the fake tokenizes by whitespace
    assert all(c.prompt_tokens is None for c in chunks[1:])
    assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])


async def test_coalesced_deltas_count_every_token():
    engine = fake_vllm.AsyncLLM(step_s=0.001)
    chunks = []
    async for chunk in VLLMEngineAdapter(engine).generate(chat(max_tokens=40)):
        chunks.append(chunk)
        await asyncio.sleep(0.01)  # a slow consumer: the engine coalesces tokens meanwhile
    assert sum(c.num_tokens for c in chunks) == 40
    assert len(chunks) < 40, "expected several tokens per output under a slow consumer"
    assert len("".join(c.text for c in chunks).split()) == 40


async def test_raw_prompt_is_not_templated():
    engine = fake_vllm.AsyncLLM()
    request = GenerationRequest(request_id="r", prompt="complete this", max_tokens=2)
    [c async for c in VLLMEngineAdapter(engine).generate(request)]
    assert engine.prompts == ["complete this"]


async def test_closing_the_stream_early_aborts_the_request():
    engine = fake_vllm.AsyncLLM(step_s=0.001)
    stream = VLLMEngineAdapter(engine).generate(chat(max_tokens=1000))
    await stream.__anext__()
    await stream.aclose()
    assert engine.aborted == ["req-1"]


async def test_a_dead_engine_fails_generate_and_health_checks():
    engine = fake_vllm.AsyncLLM()
    adapter = VLLMEngineAdapter(engine)
    await adapter.check_health()
    engine.dead = True
    with pytest.raises(fake_vllm.EngineDeadError):
        [c async for c in adapter.generate(chat())]
    with pytest.raises(fake_vllm.EngineDeadError):
        await adapter.check_health()


async def test_server_builds_the_engine_from_engine_args():
    server = VLLMServer.func_or_class("v2", "assistant", {"model": "org/model", "max_model_len": 4096})
    assert server.info() == {"version": "v2", "model": "assistant", "engine": "vllm"}
    engine = server._adapter._engine
    assert engine.engine_args.model == "org/model" and engine.engine_args.extra == {"max_model_len": 4096}
    chunks = [c async for c in server.generate(chat(max_tokens=3))]
    assert sum(c.num_tokens for c in chunks) == 3
