"""What a model replica tells the ingress about a request besides the answer: when the call
reached it.

The time between the ingress sending a request and a replica starting on it is queueing —
Serve's router holding the request while every replica of the arm is at
`max_ongoing_requests` — and it grows with the arm's load, not with what the model does. The
replica stamps its wall clock on the first item it yields (no extra message), only when the
ingress asks (`stamp=True`), so the arm's contract for anyone else stays `LLMServer`'s.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, NamedTuple


class Stamped(NamedTuple):
    """The first item of a stamped call."""

    received_at: float  # the replica's wall clock (epoch seconds) when the call reached it
    item: Any


async def stamped(items: AsyncIterator[Any], received_at: float | None = None) -> AsyncIterator[Any]:
    """`items` with the first one wrapped in `Stamped` (`received_at`: now, if not given)."""
    received_at = time.time() if received_at is None else received_at
    first = True
    async for item in items:
        yield Stamped(received_at, item) if first else item
        first = False


def unstamped(item: Any) -> tuple[Any, float | None]:
    """(the item, the replica's receipt time or None if the item was not stamped)."""
    return (item.item, item.received_at) if isinstance(item, Stamped) else (item, None)


def queueing(sent_at: float, received_at: float | None, first_item_s: float) -> float | None:
    """Seconds the request waited to reach a replica, within [0, the time to its first item]
    (the two wall clocks may disagree by a little across nodes)."""
    if received_at is None:
        return None
    return min(max(received_at - sent_at, 0.0), first_item_s)
