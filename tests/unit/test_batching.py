"""Stream batching: the first item alone and at once, then at most one message per interval,
and one replica's streams together within its message budget."""

from __future__ import annotations

import asyncio
import time

import pytest

from serve_canary.batching import StreamPacer, batched


async def paced(count: int, gap_s: float, log: list[str] | None = None):
    try:
        for i in range(count):
            if i:
                await asyncio.sleep(gap_s)
            yield i
    finally:
        if log is not None:
            log.append("closed")


async def timed_batches(
    source, interval_ms: float, pacer: StreamPacer | None = None, relayed_streams: int = 0
) -> list[tuple[float, list[int]]]:
    started = time.perf_counter()
    pacer = pacer or StreamPacer(interval_ms)
    return [(time.perf_counter() - started, batch) async for batch in batched(source, pacer, relayed_streams)]


async def test_interval_zero_sends_every_item_alone():
    batches = [batch async for batch in batched(paced(5, 0.0), StreamPacer(0))]
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
        async for batch in batched(source(), StreamPacer(20)):
            received.extend(batch)
    assert received == [1, 2]


async def test_closing_early_closes_the_source():
    log: list[str] = []
    stream = batched(paced(1000, 0.001, log), StreamPacer(10))
    assert await stream.__anext__() == [0]
    await stream.aclose()
    assert log == ["closed"]


def test_the_interval_widens_once_open_streams_exceed_the_message_budget():
    pacer = StreamPacer(interval_ms=50, messages_per_s=1280)
    pacer.open_streams = 64  # 64 streams at 50 ms: 1,280 messages a second, within the budget
    assert pacer.interval_s() == pytest.approx(0.05)
    pacer.open_streams = 256
    assert pacer.interval_s() == pytest.approx(0.2)  # 256 / 1,280: the budget holds
    pacer.open_streams = 128  # the other half of the caller's streams are on another replica
    assert pacer.interval_s(relayed_streams=256) == pytest.approx(0.2)
    assert pacer.interval_s(relayed_streams=1) == pytest.approx(0.1)


async def test_streams_of_one_replica_share_its_message_budget():
    pacer = StreamPacer(interval_ms=10, messages_per_s=100)  # 5 streams: 50 ms each
    results = await asyncio.gather(*(timed_batches(paced(150, 0.002), 10, pacer) for _ in range(5)))
    for result in results:
        stamps, batches = zip(*result)
        assert [item for batch in batches for item in batch] == list(range(150))
        gaps = [b - a for a, b in zip(stamps[1:], stamps[2:-1])]  # after the first item, before the last
        assert min(gaps) >= 0.05 * 0.9
    assert pacer.open_streams == 0


async def test_a_lone_stream_keeps_the_interval_and_its_last_item_is_not_held():
    pacer = StreamPacer(interval_ms=40, messages_per_s=1)  # one open stream: 1 s by the budget
    started = time.perf_counter()
    batches = [batch async for batch in batched(paced(3, 0.01), pacer)]
    assert batches == [[0], [1, 2]]
    assert time.perf_counter() - started < 0.5  # the source's end sends what waits


async def test_a_stream_that_fails_or_is_closed_early_leaves_the_budget():
    async def failing():
        yield 1
        raise RuntimeError("engine died")

    pacer = StreamPacer(interval_ms=20)
    with pytest.raises(RuntimeError):
        async for _ in batched(failing(), pacer):
            pass
    stream = batched(paced(1000, 0.001), pacer)
    await stream.__anext__()
    assert pacer.open_streams == 1
    await stream.aclose()
    assert pacer.open_streams == 0


async def test_a_stream_whose_caller_relays_many_is_batched_for_all_of_them():
    pacer = StreamPacer(interval_ms=10, messages_per_s=100)  # alone on this replica: 10 ms
    result = await timed_batches(paced(100, 0.002), 10, pacer, relayed_streams=5)
    stamps, batches = zip(*result)
    assert [item for batch in batches for item in batch] == list(range(100))
    gaps = [b - a for a, b in zip(stamps[1:], stamps[2:-1])]
    assert min(gaps) >= 0.05 * 0.9  # 5 relayed streams within 100 messages a second
