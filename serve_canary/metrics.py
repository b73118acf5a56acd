"""What happened to each request, and the per-window, per-arm aggregates the judge reads.

Pure: the ingress builds `RequestRecord`s, the collector actor feeds them to a `MetricsLedger`.
Latencies are kept in bounded reservoirs (uniform samples), for quantiles and absolute
limits, with memory that does not grow with traffic; what the judge's comparisons read is
the per-user `UnitTally` (`serve_canary.units`).

Attribution: a canary request that fails before its first token is a canary error; when it
is then answered by stable, that answer (outcome `failover`) is not one of stable's requests,
so a failing canary cannot make stable look busy or slow. A cancelled request is not a
request either, but the time it ran is a lower bound on its latency and enters the latency
figures: a client that gives up on a slow answer must not hide it from the tail.

Load is not the model: time spent queueing (`queue_s`: waiting to reach a replica, from the
replica's receipt stamp, and in the engine's own queue, as the engine reports it) is kept
apart. The user-facing TTFT and end-to-end latency (status, absolute limits: SLOs are about
what users wait) include it; what the judge compares between arms is the time from when the
model started on the request (`samples`), so a canary arm with too few replicas for its
weight reads as a capacity finding, not as a slower model.
"""

from __future__ import annotations

import math
import random
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, TypeVar

from pydantic import BaseModel

from serve_canary.routing import ARMS, Arm
from serve_canary.shadow import PairOutcome, ShadowTally
from serve_canary.units import MEASURES, QUANTILES, UnitTally

# Who asked: a user (judged), a tester picking an arm (`x-serve-canary-force`), or the ingress
# mirroring a request to the canary in the shadow phase (judged as pairs, `shadow`).
Origin = Literal["user", "tester", "shadow"]
T = TypeVar("T")
RESERVOIR_SIZE = 4096
WINDOW_CAPACITY = 4


class RequestRecord(NamedTuple):
    """One finished request as the ingress saw it (times in seconds)."""

    request_id: str
    window: str
    unit: str | None  # the routing key's position under the table's salt (hex); None: keyless
    arm: Arm
    version: str
    # "ok" | "error" | "cancelled" | "rejected" (the arm refused the client's request: 4xx) |
    # "failover" (stable answered after the canary failed: the request is the canary's error)
    outcome: str
    error_kind: str | None  # "before_first_token" | "midstream" | a failed finish reason | "client_error"
    ttft_s: float | None
    itl_s: float | None  # mean gap between chunks' tokens, None below two tokens
    e2e_s: float
    prompt_tokens: int
    output_tokens: int
    origin: Origin = "user"  # a tester's pick of arm, or a mirrored request: shown, never judged
    queue_s: float | None = None  # for a replica and in its engine's queue (in ttft_s and e2e_s); None: unknown

    def from_receipt(self, seconds: float) -> float:
        """`seconds` (this request's TTFT or end-to-end time) less its queueing: the model's
        time, from the replica's receipt."""
        return max(seconds - (self.queue_s or 0.0), 0.0)


class Reservoir:
    """A uniform sample of at most `capacity` values from a stream (Vitter's algorithm R)."""

    def __init__(self, capacity: int = RESERVOIR_SIZE, seed: int | None = None) -> None:
        self.capacity = capacity
        self.seen = 0
        self.values: list[float] = []
        self._rng = random.Random(seed)
        self._ordered: tuple[int, list[float]] = (0, [])

    def ordered(self) -> list[float]:
        """The values sorted (kept until the next value arrives: the judge reads them often)."""
        if self._ordered[0] != self.seen or len(self._ordered[1]) != len(self.values):
            self._ordered = (self.seen, sorted(self.values))
        return self._ordered[1]

    def add(self, value: float) -> None:
        self.seen += 1
        if len(self.values) < self.capacity:
            self.values.append(value)
            return
        slot = self._rng.randrange(self.seen)
        if slot < self.capacity:
            self.values[slot] = value

    def quantile(self, q: float) -> float | None:
        ordered = self.ordered()
        return sorted_quantile(ordered, q) if ordered else None


def quantile(values: list[float], q: float) -> float | None:
    """Linear-interpolated quantile (numpy's default); None for no data."""
    return sorted_quantile(sorted(values), q) if values else None


def sorted_quantile(ordered: list[float], q: float) -> float:
    """`quantile` of already sorted, non-empty values; q is clamped to [0, 1]."""
    pos = min(max(q, 0.0), 1.0) * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass
class ArmAggregate:
    """Everything measured for one arm in one window."""

    requests: int = 0
    errors: int = 0
    cancelled: int = 0
    rejected: int = 0
    failovers: int = 0
    error_kinds: Counter[str] = field(default_factory=Counter)
    output_tokens: int = 0
    ttft_s: Reservoir = field(default_factory=Reservoir)  # as users saw it, queueing included
    itl_s: Reservoir = field(default_factory=Reservoir)
    e2e_s: Reservoir = field(default_factory=Reservoir)  # as users saw it, queueing included
    queue_s: Reservoir = field(default_factory=Reservoir)  # for a replica and in its engine's queue
    replica_ttft_s: Reservoir = field(default_factory=Reservoir)  # from the replica's receipt
    replica_e2e_s: Reservoir = field(default_factory=Reservoir)
    tokens: Reservoir = field(default_factory=Reservoir)  # output tokens per answer
    ratings: int = 0
    rating_sum: float = 0.0
    hallucinations: int = 0
    hallucination_reports: int = 0
    units: UnitTally = field(default_factory=UnitTally)

    def samples(self, measure: str) -> Reservoir:
        """The reservoir of a `units.MEASURES` measure as the judge compares it (latencies from
        the replica's receipt)."""
        return {"ttft": self.replica_ttft_s, "e2e": self.replica_e2e_s, "itl": self.itl_s, "tokens": self.tokens}[
            measure
        ]

    def seen(self, latency: Literal["ttft", "e2e"]) -> Reservoir:
        """A latency as users saw it, queueing included (what absolute limits hold)."""
        return self.ttft_s if latency == "ttft" else self.e2e_s

    def add(self, record: RequestRecord) -> None:
        if record.outcome == "rejected":
            self.rejected += 1
            return
        if record.outcome == "failover":
            self.failovers += 1
            return
        latencies: dict[str, float | None] = {
            "e2e": record.e2e_s,
            "ttft": record.ttft_s,
            "itl": record.itl_s,
            "tokens": float(record.output_tokens),
        }
        if record.outcome == "cancelled":
            self.cancelled += 1
            latencies = {"e2e": record.e2e_s, "ttft": record.ttft_s or record.e2e_s}
        else:
            self.requests += 1
            self.output_tokens += record.output_tokens
        if record.outcome == "error":
            self.errors += 1
            self.error_kinds[record.error_kind or "unknown"] += 1
            latencies = {}
        if latencies and record.queue_s is not None:
            self.queue_s.add(record.queue_s)
        for latency in ("ttft", "e2e"):  # users waited the queue too; the model's time starts at the replica
            if (value := latencies.get(latency)) is not None:
                self.seen(latency).add(value)
                latencies[latency] = record.from_receipt(value)
        for latency, value in latencies.items():
            if value is not None:
                self.samples(latency).add(value)
        ratios = {
            key: value / max(threshold, 1e-9)
            for key, threshold in self.units.thresholds.items()
            if (value := latencies.get(key.split("_")[0])) is not None
        }
        self.units.add(record.unit, record.outcome == "error", ratios)

    def add_feedback(
        self, unit: str | None, rating: float | None, hallucination: bool | None, shortfall: float | None = None
    ) -> None:
        """One answer's feedback; `shortfall`: how far the rating is below the best, as a share
        of the rating range (`FeedbackConfig.shortfall`)."""
        if rating is not None:
            self.ratings += 1
            self.rating_sum += rating
        if hallucination is not None:
            self.hallucination_reports += 1
            self.hallucinations += int(hallucination)
        if hallucination or shortfall is not None:
            self.units.add_feedback(unit, bool(hallucination), shortfall)

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def mean_rating(self) -> float | None:
        return self.rating_sum / self.ratings if self.ratings else None

    def summary(self) -> ArmSummary:
        """The figures `status` shows, latencies in milliseconds."""

        def percentiles_ms(reservoir: Reservoir, scale: float = 1000.0) -> Percentiles:
            ordered = reservoir.ordered()

            def at(q: float) -> float | None:
                return round(sorted_quantile(ordered, q) * scale, 3) if ordered else None

            return Percentiles(p50=at(0.5), p95=at(0.95), p99=at(0.99))

        return ArmSummary(
            requests=self.requests,
            errors=self.errors,
            error_rate=self.error_rate,
            error_kinds=dict(self.error_kinds),
            ttft_ms=percentiles_ms(self.ttft_s),
            itl_ms=percentiles_ms(self.itl_s),
            e2e_ms=percentiles_ms(self.e2e_s),
            queue_ms=percentiles_ms(self.queue_s),
            tokens_per_answer=percentiles_ms(self.tokens, scale=1.0),
            output_tokens=self.output_tokens,
            mean_rating=self.mean_rating,
            hallucinations=self.hallucinations,
        )


class Percentiles(BaseModel):
    p50: float | None
    p95: float | None
    p99: float | None


class ArmSummary(BaseModel):
    """One arm's window at a glance (latencies in ms), as status shows it."""

    requests: int
    errors: int
    error_rate: float | None
    error_kinds: dict[str, int]
    ttft_ms: Percentiles
    itl_ms: Percentiles
    e2e_ms: Percentiles
    queue_ms: Percentiles  # for a replica and in its engine's queue (part of ttft_ms and e2e_ms)
    tokens_per_answer: Percentiles
    output_tokens: int
    mean_rating: float | None
    hallucinations: int


def new_window() -> dict[Arm, ArmAggregate]:
    """Both arms' aggregates for a new window, sharing its (not yet fixed) thresholds."""
    thresholds: dict[str, float] = {}
    return {arm: ArmAggregate(units=UnitTally(thresholds=thresholds)) for arm in ARMS}


def threshold_samples(level: float) -> int:
    """Stable samples a window needs before its `level` quantile is fixed: ~10 above it."""
    return round(10.0 / (1.0 - level))


def fix_thresholds(arms: dict[Arm, ArmAggregate]) -> None:
    """Fix each threshold (stable's quantile of a measure) once stable has `threshold_samples` of it.

    Fixed once, not re-estimated at every look: the units' flags are then events against a
    constant, which is what keeps the judge's sequential tests valid. Requests before that
    are not flagged against it on either arm.
    """
    stable, thresholds = arms["stable"], arms["stable"].units.thresholds
    if len(thresholds) == len(MEASURES) * len(QUANTILES):
        return
    for measure in MEASURES:
        samples = stable.samples(measure)
        for name, level in QUANTILES.items():
            key = f"{measure}_{name}"
            if key not in thresholds and samples.seen >= threshold_samples(level):
                thresholds[key] = sorted_quantile(samples.ordered(), level)


def _kept(windows: OrderedDict[str, T], window: str, new: Callable[[], T], capacity: int) -> T:
    """`windows[window]`, made with `new` if absent; the oldest windows beyond `capacity` go."""
    if window not in windows:
        windows[window] = new()
        while len(windows) > capacity:
            windows.popitem(last=False)
    return windows[window]


class MetricsLedger:
    """Aggregates per (window, arm) for the most recent windows.

    Only the current window is judged from samples; a closed window's evidence lives on in
    the rollout state (`judge.Verdict.evidence`), so the ledger keeps just the last
    `window_capacity` windows (late records of a closed one still land, for display).
    """

    def __init__(self, window_capacity: int = WINDOW_CAPACITY) -> None:
        self._windows: OrderedDict[str, dict[Arm, ArmAggregate]] = OrderedDict()
        self._pairs: OrderedDict[str, ShadowTally] = OrderedDict()
        self._window_capacity = window_capacity

    def window(self, window: str) -> dict[Arm, ArmAggregate]:
        """The window's aggregates (empty ones if it has no records), without keeping it."""
        return self._windows.get(window) or new_window()

    def _writable(self, window: str) -> dict[Arm, ArmAggregate]:
        return _kept(self._windows, window, new_window, self._window_capacity)

    @property
    def windows(self) -> list[str]:
        """The windows held, oldest first."""
        return list(self._windows)

    def add(self, records: list[RequestRecord]) -> None:
        for record in records:
            if record.origin != "user":
                continue
            arms = self._writable(record.window)
            arms[record.arm].add(record)
            if record.arm == "stable":
                fix_thresholds(arms)

    def add_feedback(
        self,
        window: str,
        arm: Arm,
        unit: str | None,
        rating: float | None,
        hallucination: bool | None,
        shortfall: float | None = None,
    ) -> None:
        """Count feedback in the window that served the request (also before its record arrives)."""
        self._writable(window)[arm].add_feedback(unit, rating, hallucination, shortfall)

    def add_pairs(self, outcomes: list[PairOutcome]) -> None:
        """Count compared shadow pairs in the window they were mirrored in."""
        by_window: dict[str, list[PairOutcome]] = {}
        for outcome in outcomes:
            by_window.setdefault(outcome.window, []).append(outcome)
        for window, in_window in by_window.items():
            _kept(self._pairs, window, ShadowTally, self._window_capacity).add(in_window)

    def pairs(self, window: str) -> ShadowTally:
        """The window's compared pairs (an empty tally if none)."""
        return self._pairs.get(window) or ShadowTally()
