"""The simulated engine streams with its configured timing, token counts and faults."""

from __future__ import annotations

import time

import pytest
from scipy.stats import binomtest

from deployments.simulated import EngineError, SimulatedEngine, SimulatedEngineArgs
from serve_canary.protocol import ChatMessage, GenerationRequest


def request(max_tokens: int = 100, **kwargs) -> GenerationRequest:
    return GenerationRequest(request_id="r", prompt="one two three", max_tokens=max_tokens, **kwargs)


async def collect(engine: SimulatedEngine, req: GenerationRequest):
    started = time.perf_counter()
    stamps, chunks = [], []
    async for chunk in engine.generate(req):
        stamps.append(time.perf_counter() - started)
        chunks.append(chunk)
    return chunks, stamps


async def test_streams_output_tokens_with_ttft_and_itl():
    engine = SimulatedEngine(SimulatedEngineArgs(ttft_ms=60, itl_ms=15, output_tokens=6, jitter=0.0))
    chunks, stamps = await collect(engine, request())
    assert [c.num_tokens for c in chunks] == [1] * 6
    assert chunks[0].prompt_tokens == 3 and all(c.prompt_tokens is None for c in chunks[1:])
    assert [c.finish_reason for c in chunks] == [None] * 5 + ["stop"]
    assert stamps[0] >= 0.060
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert min(gaps) >= 0.015


async def test_max_tokens_caps_output_and_reports_length():
    engine = SimulatedEngine(SimulatedEngineArgs(ttft_ms=0, itl_ms=0, output_tokens=10))
    chunks, _ = await collect(engine, request(max_tokens=4))
    assert sum(c.num_tokens for c in chunks) == 4
    assert chunks[-1].finish_reason == "length"


async def test_chunks_can_hold_several_tokens():
    engine = SimulatedEngine(SimulatedEngineArgs(ttft_ms=0, itl_ms=0, output_tokens=10, tokens_per_chunk=4))
    chunks, _ = await collect(engine, request())
    assert [c.num_tokens for c in chunks] == [4, 4, 2]
    assert len("".join(c.text for c in chunks).split()) == 10


async def test_chat_prompt_tokens_count_every_message():
    engine = SimulatedEngine(SimulatedEngineArgs(ttft_ms=0, itl_ms=0, output_tokens=1))
    req = GenerationRequest(request_id="r", messages=(ChatMessage("system", "be brief"), ChatMessage("user", "hi")))
    chunks, _ = await collect(engine, req)
    assert chunks[0].prompt_tokens == 5  # 3 words + one per message


async def test_error_rate_fails_before_the_first_token_at_the_configured_rate():
    engine = SimulatedEngine(SimulatedEngineArgs(ttft_ms=0, itl_ms=0, output_tokens=2, error_rate=0.3, seed=7))
    failures = 0
    for _ in range(1000):
        try:
            chunks, _ = await collect(engine, request())
        except EngineError as exc:
            assert "before the first token" in str(exc)
            failures += 1
    assert binomtest(failures, 1000, 0.3).pvalue > 1e-3


async def test_midstream_errors_happen_after_some_tokens():
    engine = SimulatedEngine(SimulatedEngineArgs(ttft_ms=0, itl_ms=0, output_tokens=8, midstream_error_rate=1.0))
    received = []
    with pytest.raises(EngineError, match="mid-stream"):
        async for chunk in engine.generate(request()):
            received.append(chunk)
    assert len(received) == 4


async def test_same_seed_same_faults():
    def faults(seed: int):
        engine = SimulatedEngine(SimulatedEngineArgs(ttft_ms=0, itl_ms=0, output_tokens=1, error_rate=0.5, seed=seed))
        return engine

    async def pattern(engine):
        out = []
        for _ in range(50):
            try:
                await collect(engine, request())
                out.append(True)
            except EngineError:
                out.append(False)
        return out

    assert await pattern(faults(3)) == await pattern(faults(3))
    assert await pattern(faults(3)) != await pattern(faults(4))


def test_bad_engine_args_are_refused():
    with pytest.raises(ValueError, match="error_rate"):
        SimulatedEngineArgs(error_rate=1.5)
