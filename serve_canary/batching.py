"""Stream batching with a first-item rule: the first item crosses Ray alone and at once, later
items are coalesced so that at most one message leaves per interval.

Every item crossing Ray is a message with a fixed cost of its own; above a few dozen
concurrent streams that cost, not the engine, sets the token rate. Batching pays for it with
latency, but only after the first item: the first item waits for nothing, so time to first
token is what the engine gives. Each later item waits at most one interval.

A fixed interval still lets messages grow with streams (256 streams at 50 ms are 5,120
messages a second to relay). So streams share a message budget (`StreamPacer`): with more
streams than the budget allows at the interval, each stream's interval widens to streams ÷
budget, counting the streams open on the replica or, if more, those its caller relays (an
ingress relays every arm's streams, so it says how many with each call). Tokens then arrive
in larger batches, not later in total: the last item of a stream is never held.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

# Chosen by `python -m benchmarks.streaming --intervals 0,20,50` (64 streams, 10 ms per token,
# 2 cores): through serve-canary's handle 3,175 tokens/s per token, 4,166 at 20 ms, 5,504 at
# 50 ms (0.92× direct). It is also Ray Serve LLM's default; TTFT does not pay for it.
DEFAULT_INTERVAL_MS = 50.0
# 64 streams at 50 ms, where serve-canary's handle path kept 0.96× direct's tokens/s. At 256
# streams on 2 saturated cores it streamed 1.75× (serve-canary) and 2.2× (direct) the tokens of
# a fixed 50 ms (`python -m benchmarks.streaming --budgets 1280,1e9`).
DEFAULT_MESSAGES_PER_S = 1280.0


@dataclass
class StreamPacer:
    """One model replica's stream messages: each open stream sends at most one per
    `interval_ms`, and all of them together about `messages_per_s` at most."""

    interval_ms: float = DEFAULT_INTERVAL_MS
    messages_per_s: float = DEFAULT_MESSAGES_PER_S
    open_streams: int = 0

    def interval_s(self, relayed_streams: int = 0) -> float:
        """The gap between one stream's messages now, for a stream whose caller relays
        `relayed_streams` streams (this one included)."""
        return max(self.interval_ms / 1000.0, max(self.open_streams, relayed_streams) / self.messages_per_s)


@dataclass
class OpenStreams:
    """The streams a relay (the ingress) has open, across every model replica it calls."""

    count: int = 0


async def batched(source: AsyncIterator[T], pacer: StreamPacer, relayed_streams: int = 0) -> AsyncIterator[list[T]]:
    """Yield `source`'s items as lists: an item that arrives at time a leaves at
    max(a, last send + `pacer.interval_s(relayed_streams)`), the stream counted open in
    `pacer` meanwhile. `pacer.interval_ms == 0` yields every item alone.

    An exception from `source` is raised after the items that came before it are yielded;
    closing the result early cancels the read of `source` (which aborts an engine request).
    """
    if pacer.interval_ms <= 0:
        async for item in source:
            yield [item]
        return
    pending: list[T] = []
    arrived = asyncio.Event()
    finished = asyncio.Event()

    async def pump() -> None:
        try:
            async for item in source:
                pending.append(item)
                arrived.set()
        finally:
            finished.set()
            arrived.set()

    loop = asyncio.get_running_loop()
    reader = asyncio.ensure_future(pump())
    last_sent = -float("inf")
    pacer.open_streams += 1
    try:
        while True:
            await arrived.wait()
            wait_s = last_sent + pacer.interval_s(relayed_streams) - loop.time()
            if wait_s > 0 and not finished.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(finished.wait(), wait_s)
            arrived.clear()
            if pending:
                batch = pending[:]
                pending.clear()
                yield batch
                last_sent = loop.time()
            if finished.is_set() and not pending:
                break
        reader.result()
    finally:
        pacer.open_streams -= 1
        if not reader.done():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
