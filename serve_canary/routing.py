"""Which arm serves a request: a versioned, immutable table and a salted 64-bit hash.

A key lands at u = blake2b-64(salt ‖ 0x00 ‖ key) / 2^64 and goes to the canary iff
u < canary_weight. blake2b is the same on every process, machine and Python version
(unlike `hash()`), and comparing against the weight makes assignment monotone: a key on
the canary at weight w stays there at every larger weight.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Literal

Arm = Literal["stable", "canary"]
ARMS: tuple[Arm, Arm] = ("stable", "canary")
_SPACE = 1 << 64


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """The split every ingress replica routes by; `version` orders tables from the controller."""

    version: int
    rollout_id: str
    window: str  # metrics window: records are judged against the other arm's in the same window
    salt: str
    canary_weight: float
    stable_version: str
    canary_version: str
    phase: str
    status: str
    shadow_fraction: float = 0.0  # the share of requests mirrored to the canary (the shadow phase)
    _threshold: int = field(init=False, repr=False, compare=False)
    _hasher: hashlib._Hash = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.canary_weight <= 1.0:
            raise ValueError(f"canary_weight must be within [0, 1], got {self.canary_weight}")
        object.__setattr__(self, "_threshold", int(self.canary_weight * _SPACE))
        object.__setattr__(self, "_hasher", hashlib.blake2b(self.salt.encode() + b"\x00", digest_size=8))

    def __getstate__(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__ if not name.startswith("_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)
        self.__post_init__()

    def position(self, key: str) -> int:
        """The key's 64-bit position under this table's salt."""
        hasher = self._hasher.copy()
        hasher.update(key.encode())
        return int.from_bytes(hasher.digest(), "big")

    def arm_for(self, key: str | None) -> Arm:
        """The arm for a routing key; no key means a fresh random draw per request."""
        return self.route(key)[0]

    def route(self, key: str | None) -> tuple[Arm, str | None]:
        """The arm for a routing key and the key's unit id (its position, in hex: the key
        itself never leaves the ingress); a keyless request is a unit of its own (None)."""
        if key is None:
            return ("canary" if random.random() < self.canary_weight else "stable"), None
        position = self.position(key)
        return ("canary" if position < self._threshold else "stable"), f"{position:016x}"

    def version_of(self, arm: Arm) -> str:
        return self.canary_version if arm == "canary" else self.stable_version
