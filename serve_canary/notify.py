"""Transition notifications: every rollout event POSTed as JSON to the configured receivers.

The body is Slack-compatible (`text`, one line a person reads) and carries the structured
event for machines. Sending never blocks the controller: each receiver has its own queue
and sender task, so a receiver that is down or slow costs its own retries and timeouts, and
neither delays a transition nor the other receivers; events reach each receiver in order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from serve_canary.config import NotificationTarget
from serve_canary.rollout import Event

logger = logging.getLogger("serve_canary.notify")
ATTEMPTS = 3
TIMEOUT_S = 5.0
MAX_PENDING = 1000  # per receiver; beyond it the newest event is dropped, with a warning


def message(app: str, model: str, rollout_id: str, event: Event) -> dict[str, Any]:
    """What a receiver gets for one event."""
    text = (
        f"[{app}] {model}: {event.action} → {event.to_status}, phase {event.phase} at "
        f"{event.weight:.0%}: {event.reason}"
    )
    return {"text": text, "app": app, "model": model, "rollout_id": rollout_id, "event": event.model_dump(mode="json")}


def subscribed(target: NotificationTarget, event: Event) -> bool:
    return not target.events or event.action in target.events or event.to_status in target.events


class Notifier:
    """Queues each event for the receivers subscribed to it; one sender task per receiver."""

    def __init__(self, targets: Callable[[], Sequence[NotificationTarget]], retry_s: float = 1.0) -> None:
        self._targets, self._retry_s = targets, retry_s
        self._queues: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self._senders: list[asyncio.Task[None]] = []

    def send(self, body: dict[str, Any], event: Event) -> None:
        for target in self._targets():
            if not subscribed(target, event):
                continue
            queue = self._queues.get(target.url)
            if queue is None:
                queue = self._queues[target.url] = asyncio.Queue(MAX_PENDING)
                self._senders.append(asyncio.get_running_loop().create_task(self._deliver(target.url, queue)))
            try:
                queue.put_nowait(body)
            except asyncio.QueueFull:
                logger.warning("notification to %s dropped: %d events already waiting", target.url, MAX_PENDING)

    async def _deliver(self, url: str, queue: asyncio.Queue[dict[str, Any]]) -> None:
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            while True:
                body = await queue.get()
                for attempt in range(1, ATTEMPTS + 1):
                    try:
                        (await client.post(url, json=body)).raise_for_status()
                        break
                    except httpx.HTTPError as exc:
                        if attempt == ATTEMPTS:
                            logger.warning("notification to %s failed %d times: %s", url, ATTEMPTS, exc)
                        else:
                            await asyncio.sleep(self._retry_s * attempt)
