"""Feedback that cannot be forged, replayed or aimed at someone else's answer.

Every answer carries a feedback token: the request id, the arm, version and metrics window
that served it and an expiry, signed with HMAC-SHA256 under a per-app key that only the
controller and the ingress replicas hold. Feedback is accepted only with a valid, unexpired
token for that request id, so it needs no lookup of who served the request (an answer whose
record is still buffered on another replica is attributed at once), and a client can rate
only answers it was given. `ReplayGuard` lets each request be rated once, with memory bounded
by the tokens' lifetime; `RateLimit` bounds what one replica accepts per second.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass

from pydantic import BaseModel, Field

from serve_canary.routing import ARMS, Arm

KEY_BYTES = 32


class FeedbackRefused(ValueError):
    """A token that does not entitle its holder to rate this request (→ 403)."""


@dataclass(frozen=True)
class Attribution:
    """Who served a request, as its feedback token vouches."""

    request_id: str
    arm: Arm
    version: str
    window: str
    unit: str | None  # the user it counts for (`RequestRecord.unit`)
    expires_at: float


class FeedbackBody(BaseModel):
    request_id: str = Field(min_length=1, max_length=256)
    feedback_token: str = Field(min_length=1, max_length=2048)
    rating: float | None = Field(default=None, allow_inf_nan=False)
    hallucination: bool | None = None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(key: bytes, payload: str) -> str:
    return _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())


def issue(key: bytes, attribution: Attribution) -> str:
    """`payload.signature`, both base64url: what the client hands back with its feedback."""
    payload = _b64(json.dumps(asdict(attribution), separators=(",", ":")).encode())
    return f"{payload}.{_signature(key, payload)}"


def verify(key: bytes, token: str, request_id: str, now: float) -> Attribution:
    """The attribution the token vouches for; `FeedbackRefused` unless it is genuine, for
    `request_id`, and unexpired."""
    payload, _, signature = token.partition(".")
    if not hmac.compare_digest(signature.encode(), _signature(key, payload).encode()):
        raise FeedbackRefused("the feedback token is not valid")
    fields = json.loads(_unb64(payload))
    attribution = Attribution(**fields)
    if attribution.arm not in ARMS:
        raise FeedbackRefused("the feedback token is not valid")
    if attribution.request_id != request_id:
        raise FeedbackRefused("the feedback token is for another request")
    if attribution.expires_at < now:
        raise FeedbackRefused("the feedback token has expired: the answer is too old to rate")
    return attribution


class ReplayGuard:
    """Remembers rated request ids until their tokens expire, so each is rated once.

    Bounded: past `capacity` the earliest rated ids are forgotten, and from then on tokens
    expiring no later than any forgotten one are refused, so a forgotten id can never be
    rated twice.
    """

    def __init__(self, capacity: int, horizon: float = -math.inf) -> None:
        """`horizon`: tokens expiring no later are refused (a restarted guard passes its start
        plus the token lifetime: it cannot know what was rated before)."""
        self._rated: OrderedDict[str, float] = OrderedDict()  # request id → expiry, oldest first
        self._capacity = capacity
        self._horizon = horizon

    def admit(self, attribution: Attribution, now: float) -> bool:
        """True the first time a request id is rated (recording it); False after."""
        while self._rated and next(iter(self._rated.values())) < now:
            self._rated.popitem(last=False)
        if attribution.request_id in self._rated or attribution.expires_at <= self._horizon:
            return False
        self._rated[attribution.request_id] = attribution.expires_at
        while len(self._rated) > self._capacity:
            _, expiry = self._rated.popitem(last=False)
            self._horizon = max(self._horizon, expiry)
        return True


class RateLimit:
    """A token bucket: `rate` per second on average, bursts up to `rate` (one second's worth)."""

    def __init__(self, rate: float, now: float) -> None:
        self._rate, self._tokens, self._at = rate, rate, now

    def allow(self, now: float) -> bool:
        self._tokens = min(self._rate, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True
