"""Outcomes per unit of randomisation: the user, not the request.

The router assigns whole users (routing keys) to an arm, so one user's requests are not
independent trials: a user whose requests all fail, or who always asks for long answers,
would weigh as hundreds of trials and swing any per-request test. The judge therefore tests
units. A unit is one routing key's requests within one metrics window, or a keyless request
on its own (keyless requests are routed one by one). For each unit the tally keeps whether
it saw an error or a hallucination flag, its mean rating, and its worst latency and longest
answer (output tokens: the cost) relative to the window's thresholds (stable's p95 and p99,
fixed once, see `metrics.fix_thresholds`), as a bin of a 1 % log grid, so "how many units
went above 1.5× stable's p95" is a count, at any tolerance.

Under "the canary is no different", which arm a unit is on is independent of what the unit
does, so each unit that is flagged is the canary's with probability equal to the canary's
weight, however many requests it sent: the conditional binomial of `sequential` applies to
flagged units exactly.

Across windows the same user comes back at a new weight, and its arm is no longer a fresh
draw: a user on the canary at 5 % is on it at 20 % for sure. The tests that multiply
evidence across windows therefore condition on what the earlier windows' weights already
tell about each user's hash position (`canary_share`): a keyed unit whose band between the
earlier weights lies on one side of the current weight carries no new evidence, the others
are the canary's with the share of their band the current weight covers. Keyless requests
are fresh draws at every weight. `UnitTally.strata` groups units by that share.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

MEASURES = ("ttft", "e2e", "itl", "tokens")  # three latencies (seconds) and output tokens per answer
QUANTILES = {"p95": 0.95, "p99": 0.99}
THRESHOLD_KEYS = tuple(f"{measure}_{name}" for measure in MEASURES for name in QUANTILES)
MAX_KEYED_UNITS = 100_000  # per arm and window; keys beyond it are counted request by request
RATIO_BINS = 700  # the grid's top bin holds every ratio above 1.01^700 (≈ 1,060×)
_LOG_STEP = math.log(1.01)
_SPACE = float(1 << 64)

Side = Literal["inner", "outer"]


def hash_position(unit: str) -> float:
    """A keyed unit's hash position in [0, 1) (its id is the position's 64 bits in hex)."""
    return int(unit, 16) / _SPACE


def canary_share(unit_position: float, weight: float, earlier_weights: Iterable[float]) -> float:
    """P(a unit at `unit_position` is on the canary at `weight` | which side of each of
    `earlier_weights` it lay on): the share of its band between earlier weights that `weight`
    covers, 0 or 1 when the band lies wholly on one side."""
    low, high = 0.0, 1.0
    for earlier in earlier_weights:
        if earlier <= unit_position:
            low = max(low, earlier)
        else:
            high = min(high, earlier)
    return min(max((weight - low) / (high - low), 0.0), 1.0)


def ratio_bin(ratio: float) -> int:
    """The grid bin of a ratio above 1: bin k holds (1.01^k, 1.01^(k+1)]."""
    return min(max(math.ceil(math.log(ratio) / _LOG_STEP) - 1, 0), RATIO_BINS)


def first_bin_over(limit: float, side: Side) -> int:
    """Counting the bins from this one counts units over `limit` (≥ 1): `inner` only units
    surely over it, `outer` every unit over it and perhaps some within 1 % below it; a test
    that must not overstate the canary counts its units `inner`, one that must not understate
    them `outer`."""
    position = math.log(limit) / _LOG_STEP
    first = math.ceil(position - 1e-9) if side == "inner" else math.floor(position + 1e-9)
    return min(max(first, 0), RATIO_BINS + (side == "inner"))


@dataclass(slots=True)
class UnitOutcome:
    requests: int = 0
    error: bool = False
    hallucination: bool = False
    ratings: int = 0
    rating_shortfall: float = 0.0  # summed over its ratings: (best − rating) / range
    worst: dict[str, int] = field(default_factory=dict)  # threshold key → bin of its worst ratio above 1


@dataclass
class UnitTally:
    """One arm's units in one window; `thresholds` (key → seconds, shared by both arms' tallies)
    are what the worst ratios are relative to."""

    thresholds: dict[str, float] = field(default_factory=dict)
    keyed: dict[str, UnitOutcome] = field(default_factory=dict)
    keyless: int = 0
    keyless_errors: int = 0
    keyless_hallucinations: int = 0
    keyless_shortfalls: list[float] = field(default_factory=list)  # one per rated keyless answer
    keyless_worst: dict[str, Counter[int]] = field(default_factory=dict)
    _changes: int = 0
    _counted: tuple[int, Census | None] = (-1, None)

    def _unit(self, unit: str | None) -> UnitOutcome | None:
        if unit is None:
            return None
        outcome = self.keyed.get(unit)
        if outcome is None and len(self.keyed) < MAX_KEYED_UNITS:
            outcome = self.keyed[unit] = UnitOutcome()
        return outcome

    def add(self, unit: str | None, error: bool, ratios: dict[str, float]) -> None:
        """One request of `unit` (None: keyless), with its latencies / thresholds."""
        self._changes += 1
        outcome = self._unit(unit)
        bins = {key: ratio_bin(ratio) for key, ratio in ratios.items() if ratio > 1.0}
        if outcome is None:
            self.keyless += 1
            self.keyless_errors += error
            for key, index in bins.items():
                self.keyless_worst.setdefault(key, Counter())[index] += 1
            return
        outcome.requests += 1
        outcome.error |= error
        for key, index in bins.items():
            if index > outcome.worst.get(key, -1):
                outcome.worst[key] = index

    def add_feedback(self, unit: str | None, hallucination: bool, shortfall: float | None) -> None:
        """One answer's feedback: a hallucination flag, and its rating's `shortfall` from the best
        rating as a share of the range (None: not rated)."""
        self._changes += 1
        outcome = self._unit(unit)
        if outcome is None:
            self.keyless_hallucinations += hallucination
            if shortfall is not None and len(self.keyless_shortfalls) < MAX_KEYED_UNITS:
                self.keyless_shortfalls.append(shortfall)
            return
        outcome.hallucination |= hallucination
        if shortfall is not None:
            outcome.ratings += 1
            outcome.rating_shortfall += shortfall

    @property
    def units(self) -> int:
        return len(self.keyed) + self.keyless

    def effective_size(self) -> float:
        """How many independent requests the arm's requests are worth when each unit's
        requests are alike: (Σ nᵢ)² / Σ nᵢ² over units of nᵢ requests (Kish's effective
        sample size). Per-request confidence bounds use it in place of the request count."""
        census = self.census()
        return census.requests**2 / census.squares if census.squares else 0.0

    @property
    def errors(self) -> int:
        """Units with at least one error."""
        return self.census().errors

    @property
    def hallucinations(self) -> int:
        """Units with at least one answer flagged as a hallucination."""
        return self.census().hallucinations

    @property
    def shortfalls(self) -> list[float]:
        """Each rating unit's mean shortfall from the best rating (0: all best, 1: all worst)."""
        return self.census().shortfalls

    def over(self, key: str, limit: float, side: Side) -> int:
        """Units whose worst `key` measure went above `limit` × the threshold."""
        return self.census().over(key, limit, side)

    def strata(self, weight: float, earlier_weights: tuple[float, ...]) -> dict[float, Census]:
        """The units by `canary_share` at `weight` given `earlier_weights` (keyless units: the
        weight itself), each share's counts apart; shares 0 and 1 hold the units whose arm the
        earlier weights already tell. One pass over the keyed units: the judge asks once a look."""
        strata: dict[float, Census] = {}
        if self.keyless:
            strata[weight] = self._keyless_census()
        for unit, outcome in self.keyed.items():
            share = canary_share(hash_position(unit), weight, earlier_weights) if earlier_weights else weight
            census = strata.get(share)
            if census is None:
                census = strata[share] = Census.empty()
            census.count(outcome)
        return strata

    def _keyless_census(self) -> Census:
        return Census(
            requests=self.keyless,
            squares=self.keyless,
            units=self.keyless,
            errors=self.keyless_errors,
            hallucinations=self.keyless_hallucinations,
            shortfalls=list(self.keyless_shortfalls),
            worst={name: Counter(self.keyless_worst.get(name, {})) for name in THRESHOLD_KEYS},
        )

    def census(self) -> Census:
        """Every count the judge reads, all units together, in one pass over the keyed units,
        kept until the next change (a look asks for each many times)."""
        changes, census = self._counted
        if changes != self._changes or census is None:
            census = self._keyless_census()
            for outcome in self.keyed.values():
                census.count(outcome)
            self._counted = (self._changes, census)
        return census


@dataclass
class Census:
    """A set of units' counts at one moment: requests (and their squares per unit), flagged
    units, and units per bin of their worst ratio to each threshold."""

    requests: int
    squares: int
    units: int
    errors: int
    hallucinations: int
    shortfalls: list[float]
    worst: dict[str, Counter[int]]

    @classmethod
    def empty(cls) -> Census:
        return cls(0, 0, 0, 0, 0, [], {name: Counter() for name in THRESHOLD_KEYS})

    def count(self, outcome: UnitOutcome) -> None:
        """Add one keyed unit."""
        self.requests += outcome.requests
        self.squares += outcome.requests * outcome.requests
        self.units += 1
        self.errors += outcome.error
        self.hallucinations += outcome.hallucination
        if outcome.ratings:
            self.shortfalls.append(outcome.rating_shortfall / outcome.ratings)
        for name, index in outcome.worst.items():
            self.worst[name][index] += 1

    def over(self, key: str, limit: float, side: Side) -> int:
        """Units whose worst `key` measure went above `limit` × the threshold."""
        first = first_bin_over(limit, side)
        return sum(count for index, count in self.worst[key].items() if index >= first)
