"""The simulated engine streams with its configured timing, token counts and faults, in the
shapes vLLM's OpenAI serving layer yields."""

from __future__ import annotations

import json
import time

import pytest
from scipy.stats import binomtest

from serve_canary.config import SimulatedEngineArgs
from serve_canary.engines.simulated import SimulatedEngine, SimulatedServer
from serve_canary.openai_api import ChatCompletionRequest, CompletionRequest, ErrorResponse


def completion(max_tokens: int | None = None, stream: bool = True, **kwargs) -> CompletionRequest:
    return CompletionRequest(
        model="m", request_id="r", prompt="one two three", max_tokens=max_tokens, stream=stream, **kwargs
    )


def events(items: list) -> list[dict]:
    return [json.loads(item[6:]) for item in items if isinstance(item, str) and item != "data: [DONE]\n\n"]


async def collect(engine: SimulatedEngine, request):
    started = time.perf_counter()
    stamps, items = [], []
    async for item in engine.generate(request):
        stamps.append(time.perf_counter() - started)
        items.append(item)
    return items, stamps


async def test_streams_one_event_per_token_with_ttft_and_itl():
    engine = SimulatedEngine("m", SimulatedEngineArgs(ttft_ms=60, itl_ms=15, output_tokens=6, jitter=0.0))
    items, stamps = await collect(engine, completion(stream_options={"include_usage": True}))
    assert items[-1] == "data: [DONE]\n\n"
    chunks = events(items)
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * 5 + ["stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 6,
        "total_tokens": 9,
    }
    assert stamps[0] >= 0.060
    gaps = [b - a for a, b in zip(stamps, stamps[1:6])]
    assert min(gaps) >= 0.015


async def test_max_tokens_caps_output_and_reports_length():
    engine = SimulatedEngine("m", SimulatedEngineArgs(ttft_ms=0, itl_ms=0, output_tokens=10))
    [response] = [item async for item in engine.generate(completion(max_tokens=4, stream=False))]
    body = response.model_dump()
    assert len(body["choices"][0]["text"].split()) == 4
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 4


async def test_chat_stream_starts_with_the_role_and_counts_every_message():
    engine = SimulatedEngine("m", SimulatedEngineArgs(ttft_ms=0, itl_ms=0, output_tokens=1))
    request = ChatCompletionRequest(
        model="m",
        request_id="r",
        stream=True,
        stream_options={"include_usage": True},
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ],
    )
    chunks = events((await collect(engine, request))[0])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[0]["id"] == "chatcmpl-r" and chunks[0]["model"] == "m"
    assert chunks[-1]["usage"]["prompt_tokens"] == 5  # 3 words + one per message


async def test_error_rate_fails_before_the_first_token_at_the_configured_rate():
    engine = SimulatedEngine("m", SimulatedEngineArgs(ttft_ms=0, itl_ms=0, output_tokens=2, error_rate=0.3, seed=7))
    failures = 0
    for _ in range(1000):
        items, _ = await collect(engine, completion())
        if isinstance(items[0], ErrorResponse):
            assert items[0].error.code == 500 and len(items) == 1
            failures += 1
    assert binomtest(failures, 1000, 0.3).pvalue > 1e-3


async def test_midstream_errors_are_error_events_after_some_tokens():
    engine = SimulatedEngine("m", SimulatedEngineArgs(ttft_ms=0, itl_ms=0, output_tokens=8, midstream_error_rate=1.0))
    items, _ = await collect(engine, completion())
    assert items[-1] == "data: [DONE]\n\n"
    assert items[-2].startswith('data: {"error"')
    assert len(items) == 4 + 2


async def test_a_prompt_longer_than_the_context_is_a_client_error():
    engine = SimulatedEngine("m", SimulatedEngineArgs(max_model_len=8))
    [item] = [item async for item in engine.generate(completion(max_tokens=6))]
    assert isinstance(item, ErrorResponse) and item.error.code == 400


async def test_same_seed_same_faults():
    async def pattern(seed: int) -> list[bool]:
        engine = SimulatedEngine(
            "m", SimulatedEngineArgs(ttft_ms=0, itl_ms=0, output_tokens=1, error_rate=0.5, seed=seed)
        )
        return [not isinstance((await collect(engine, completion()))[0][0], ErrorResponse) for _ in range(50)]

    assert await pattern(3) == await pattern(3)
    assert await pattern(3) != await pattern(4)


def test_bad_engine_args_are_refused():
    with pytest.raises(ValueError, match="error_rate"):
        SimulatedEngineArgs(error_rate=1.5)


def test_fields_the_engine_cannot_honour_are_refused():
    with pytest.raises(ValueError, match="tools"):
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=[{"type": "function"}])
    with pytest.raises(ValueError, match="text"):
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [{"type": "text", "text": 123}]}])


async def test_the_server_batches_a_stream_for_the_streams_its_caller_relays():
    args = {"ttft_ms": 0, "itl_ms": 2, "jitter": 0.0, "output_tokens": 100, "stream_batching_interval_ms": 10}
    server = SimulatedServer("m", {**args, "stream_batching_messages_per_s": 100})

    async def batches(relayed_streams: int) -> int:
        return len([b async for b in server.completions(completion(), relayed_streams=relayed_streams)])

    # ~200 ms of tokens: ~20 batches at the 10 ms interval, ~5 when 10 streams share 100 a second.
    alone, relayed = await batches(0), await batches(10)
    assert alone >= 12
    assert relayed <= 7
