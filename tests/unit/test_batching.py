"""Stream batching: the first item alone and at once, then at most one message per interval."""

from __future__ import annotations

import asyncio
import time

import pytest

from serve_canary.batching import batched


async def paced(count: int, gap_s: float, log: list[str] | None = None):
    try:
        for i in range(count):
            if i:
                await asyncio.sleep(gap_s)
            yield i
    finally:
        if log is not None:
            log.append("closed")


async def timed_batches(source, interval_ms: float) -> list[tuple[float, list[int]]]:
    started = time.perf_counter()
    return [(time.perf_counter() - started, batch) async for batch in batched(source, interval_ms)]


async def test_interval_zero_sends_every_item_alone():
    batches = [batch async for batch in batched(paced(5, 0.0), 0)]
    assert batches == [[0], [1], [2], [3], [4]]


async def test_first_item_leaves_alone_then_items_coalesce_per_interval():
    interval_ms = 40.0
    result = await timed_batches(paced(40, 0.005), interval_ms)
    stamps, batches = zip(*result)
    assert batches[0] == [0]
    assert [item for batch in batches for item in batch] == list(range(40))
    # ~200 ms of items at 40 ms per message: far fewer messages than items.
    assert len(batches) <= 40 * 0.005 / (interval_ms / 1000) + 3
    gaps = [b - a for a, b in zip(stamps, stamps[1:-1])]
    assert min(gaps) >= interval_ms / 1000 * 0.9


async def test_an_item_after_a_quiet_spell_is_not_held_back():
    async def source():
        yield "first"
        await asyncio.sleep(0.15)  # longer than the interval: nothing is pending meanwhile
        yield "late"

    result = await timed_batches(source(), 50)
    assert [batch for _, batch in result] == [["first"], ["late"]]
    assert result[1][0] - 0.15 < 0.05  # sent on arrival, not one interval after it


async def test_an_error_arrives_after_the_items_before_it():
    async def source():
        yield 1
        yield 2
        raise RuntimeError("engine died")

    received = []
    with pytest.raises(RuntimeError, match="engine died"):
        async for batch in batched(source(), 20):
            received.extend(batch)
    assert received == [1, 2]


async def test_closing_early_closes_the_source():
    log: list[str] = []
    stream = batched(paced(1000, 0.001, log), 10)
    assert await stream.__anext__() == [0]
    await stream.aclose()
    assert log == ["closed"]
