"""Reference judges the benchmark compares serve-canary's judge with.

- `SeedJudge`: the mission seed's rule as DESIGN.md describes it: cumulative means, error
  rate ≤ 1 % and latency ≤ 2000 ms, canary ≤ 1.5 × stable for both (the latency factor reused
  for errors), and no requests counted as healthy.
- `FlaggerJudge`: Flagger-style: each interval, threshold checks on the canary's metrics over
  that interval (success rate ≥ 98 % by default, p99 latency ≤ a fixed bound); a failed-check
  counter rolls back at 5.
- `KayentaJudge`: Kayenta-style: a Mann-Whitney U test per metric on the window's samples,
  a Hodges-Lehmann shift with its confidence interval, an effect-size gate, and a score. Run
  the way Kayenta is used (`every_look=False`): one fixed-sample analysis per phase, when the
  phase has run its minimum time, at a Bonferroni-corrected confidence over the phases; or,
  as a live canary would misuse it, repeated at every look.

Each judge is `decide(look)` → "pass" | "wait" | "fail"; serve-canary's returns its whole
`Verdict` (its WAIT may be `awaiting_evidence`, which lets a phase short of full traffic step up).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import mannwhitneyu, norm

from serve_canary.config import HealthConfig
from serve_canary.judge import Verdict, WindowEvidence, judge
from serve_canary.metrics import ArmAggregate


@dataclass(frozen=True)
class Look:
    """What a judge sees at one evaluation."""

    stable: ArmAggregate  # the current window
    canary: ArmAggregate
    last_stable: ArmAggregate  # the latest interval only
    last_canary: ArmAggregate
    min_requests: int
    closed_windows: int  # windows of this attempt closed before this one
    weight: float
    window_seq: int
    intervals_in_window: int
    phase_min_intervals: int
    phases: int  # partial phases in the plan (Kayenta's Bonferroni correction)


class ServeCanaryJudge:
    """The controller's use of `judge`: each closed window enters later looks as the evidence
    of the last verdict on it."""

    name = "serve-canary"

    def __init__(self, health: HealthConfig) -> None:
        self.health = health
        self.reset()

    def reset(self) -> None:
        self._carried: list[WindowEvidence] = []
        self._closed = 0
        self._last: Verdict | None = None

    def decide(self, look: Look) -> Verdict:
        if look.closed_windows > self._closed:  # the window of the last look has closed
            self._closed = look.closed_windows
            if self._last is not None and self._last.evidence is not None:
                self._carried.append(self._last.evidence)
        self._last = judge(
            look.stable,
            look.canary,
            self.health,
            look.min_requests,
            self.health.alpha,
            self._carried,
            weight=look.weight,
            window_index=look.window_seq,
        )
        return self._last


class SeedJudge:
    name = "seed"

    def reset(self) -> None:
        """Stateless."""

    def decide(self, look: Look) -> str:
        stable, canary = look.stable, look.canary
        if canary.requests == 0:
            return "pass"  # as written: no traffic is healthy
        canary_err = canary.errors / canary.requests
        stable_err = stable.errors / stable.requests if stable.requests else 0.0
        canary_lat = float(np.mean(canary.e2e_s.values)) * 1000.0 if canary.e2e_s.values else 0.0
        stable_lat = float(np.mean(stable.e2e_s.values)) * 1000.0 if stable.e2e_s.values else 0.0
        healthy = (
            canary_err <= 0.01
            and canary_lat <= 2000.0
            and canary_err <= 1.5 * stable_err
            and canary_lat <= 1.5 * stable_lat
        )
        return "pass" if healthy else "fail"


class FlaggerJudge:
    name = "flagger"

    def __init__(self, p99_limit_ms: float, min_success: float = 0.98, threshold: int = 5) -> None:
        self.p99_limit_ms, self.min_success, self.threshold, self.failed = p99_limit_ms, min_success, threshold, 0

    def reset(self) -> None:
        self.failed = 0

    def decide(self, look: Look) -> str:
        last_canary = look.last_canary
        if last_canary.requests == 0:
            return "wait"
        success = 1.0 - last_canary.errors / last_canary.requests
        p99 = last_canary.e2e_s.quantile(0.99)
        if success >= self.min_success and (p99 is None or p99 * 1000.0 <= self.p99_limit_ms):
            return "pass"
        self.failed += 1
        return "fail" if self.failed >= self.threshold else "wait"


@dataclass(frozen=True)
class ShiftTest:
    p_value: float
    shift: float  # Hodges-Lehmann estimate of canary − stable
    low: float
    high: float


def hodges_lehmann(stable: np.ndarray, canary: np.ndarray, confidence: float) -> ShiftTest:
    """Two-sided Mann-Whitney p-value and the distribution-free CI of the location shift."""
    p_value = float(mannwhitneyu(canary, stable, alternative="two-sided").pvalue)
    differences = np.sort(np.subtract.outer(canary, stable).ravel())
    n, m = len(canary), len(stable)
    z = norm.ppf(0.5 + confidence / 2.0)
    k = int(math.floor(n * m / 2.0 - z * math.sqrt(n * m * (n + m + 1) / 12.0)))
    k = min(max(k, 0), len(differences) - 1)
    return ShiftTest(p_value, float(np.median(differences)), float(differences[k]), float(differences[-k - 1]))


def binary_mannwhitney_p(x_stable: int, n_stable: int, x_canary: int, n_canary: int) -> float:
    """Mann-Whitney's two-sided asymptotic p-value (tie- and continuity-corrected) for 0/1 data,
    from counts, so that error indicators of large windows need no arrays."""
    n1, n2 = n_canary, n_stable
    ones, zeros = x_canary + x_stable, (n1 - x_canary) + (n2 - x_stable)
    if ones == 0 or zeros == 0:
        return 1.0
    u = x_canary * (n2 - x_stable) + 0.5 * (x_canary * x_stable + (n1 - x_canary) * (n2 - x_stable))
    n = n1 + n2
    tie_term = (ones**3 - ones) + (zeros**3 - zeros)
    sigma = math.sqrt(n1 * n2 / 12.0 * ((n + 1) - tie_term / (n * (n - 1))))
    z = (abs(u - n1 * n2 / 2.0) - 0.5) / sigma
    return float(min(1.0, 2.0 * norm.sf(max(z, 0.0))))


class KayentaJudge:
    """Score = share of metrics not classified High; below 75 fails, else passes."""

    name = "kayenta"
    CI_SAMPLE = 300  # the shift's CI from a uniform subsample: all pairwise differences cost O(n·m)

    def __init__(
        self, confidence: float = 0.95, allowed_increase: float = 1.05, every_look: bool = False, name: str = "kayenta"
    ) -> None:
        self.confidence, self.allowed_increase, self.every_look, self.name = (
            confidence,
            allowed_increase,
            every_look,
            name,
        )

    def reset(self) -> None:
        """Stateless."""

    def _latency_high(self, stable: list[float], canary: list[float], confidence: float) -> bool:
        s, c = np.asarray(stable), np.asarray(canary)
        p_value = float(mannwhitneyu(c, s, alternative="two-sided").pvalue)
        if p_value >= 1.0 - confidence:
            return False
        shift = hodges_lehmann(s[: self.CI_SAMPLE], c[: self.CI_SAMPLE], confidence)
        significant = shift.low > 0.0
        return significant and float(np.mean(c)) > self.allowed_increase * float(np.mean(s))

    def decide(self, look: Look) -> str:
        stable, canary = look.stable, look.canary
        if min(stable.requests, canary.requests) < look.min_requests:
            return "wait"
        confidence = self.confidence
        if not self.every_look:
            if look.intervals_in_window < look.phase_min_intervals:
                return "wait"  # one analysis per phase, at its end
            confidence = 1.0 - (1.0 - self.confidence) / look.phases
        stable_rate, canary_rate = stable.errors / stable.requests, canary.errors / canary.requests
        error_high = (
            binary_mannwhitney_p(stable.errors, stable.requests, canary.errors, canary.requests) < 1.0 - confidence
            and canary_rate > self.allowed_increase * stable_rate
        )
        high = [error_high]
        for metric in ("ttft_s", "e2e_s"):
            s, c = getattr(stable, metric).values, getattr(canary, metric).values
            if s and c:
                high.append(self._latency_high(s, c, confidence))
        score = 100.0 * (1.0 - sum(high) / len(high))
        return "fail" if score < 75.0 else "pass"
