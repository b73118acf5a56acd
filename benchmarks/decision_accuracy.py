"""How often does each judge roll back a healthy canary, catch a bad one, and how fast?

Simulated rollouts at the seed's phase weights (5 → 20 → 50 %, then the approval gate),
evaluated every interval by serve-canary's judge and by reference judges
(`benchmarks/judges.py`), through serve-canary's own state machine (`rollout.evaluate`).
Traffic comes from keyless requests or from sticky users (routed by a hash position against
the weight, as the router does) whose error rates, latencies and activity differ; requests
enter serve-canary's own `ArmAggregate` and `UnitTally`, thresholds are fixed by
`metrics.fix_thresholds`.

    python -m benchmarks.decision_accuracy            # 500 rollouts per scenario (~50 min)
    python -m benchmarks.decision_accuracy --quick    # a smoke run of the harness
    python -m benchmarks.decision_accuracy --scenario "phase lengths"    # only those rows

Writes benchmarks/results/decision_accuracy.{json,png} and prints the table. With
`--scenario TEXT` (repeatable), only the scenarios whose names contain one of the texts run
(same seeds as in a full run), and their cells replace those rows in the results file.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.judges import FlaggerJudge, KayentaJudge, Look, SeedJudge, ServeCanaryJudge
from serve_canary import rollout
from serve_canary.config import DEFAULT_PHASES, HealthConfig, PhaseConfig
from serve_canary.judge import Verdict
from serve_canary.metrics import RESERVOIR_SIZE, ArmAggregate, fix_thresholds, new_window
from serve_canary.routing import Arm

RESULTS = Path(__file__).parent / "results"
INTERVAL_S = 10.0  # one look; phase durations below are in intervals
PHASES = (
    PhaseConfig(name="init", weight=0.05, min_duration_s=10, min_requests=100),
    PhaseConfig(name="early", weight=0.20, min_duration_s=15, min_requests=100),
    PhaseConfig(name="progress", weight=0.50, min_duration_s=20, min_requests=100),
    PhaseConfig(name="full", weight=1.0, approval=True),
)
# Argo's and Flagger's habit of many small steps: the same users come back at seven weights
FINE_PHASES = (
    *(
        PhaseConfig(name=f"step-{round(weight * 100)}", weight=weight, min_duration_s=6, min_requests=100)
        for weight in (0.05, 0.10, 0.15, 0.20, 0.30, 0.40, 0.50)
    ),
    PhaseConfig(name="full", weight=1.0, approval=True),
)
HORIZON = 150  # intervals; a rollout still undecided then counts as undecided
# serve-canary's default plan (10, 30, 60 minutes), in intervals
DEFAULT_LENGTH_PHASES = tuple(
    phase.model_copy(update={"min_duration_s": phase.min_duration_s / INTERVAL_S}) for phase in DEFAULT_PHASES
)
DEFAULT_LENGTH_HORIZON = 900
BASE_ERROR = 0.01
TTFT_MEDIAN_S, E2E_MEDIAN_S, ITL_MEDIAN_S, SIGMA = 0.2, 1.0, 0.02, 0.3
TOKENS_MEDIAN, TOKENS_SIGMA = 200.0, 0.3  # output tokens per answer


@dataclass(frozen=True)
class Scenario:
    """One simulated world. Unless said, both arms behave alike (`regression` says whether
    rolling back is the right answer)."""

    name: str
    regression: bool = False
    requests_per_interval: int = 1000
    users: int | None = None  # None: keyless requests, each its own unit
    user_spread: float = 0.0  # per-user error-rate multipliers, log-normal sd (latency: a quarter of it)
    failing_users: int = 0  # users whose every request fails, on whichever arm
    canary_error: float = BASE_ERROR
    canary_latency: float = 1.0
    canary_slow_share: float = 0.0  # canary requests 5× slower (a p99-only regression)
    canary_tokens: float = 1.0  # canary answers this much longer (a cost regression)
    e2e_median_s: float = E2E_MEDIAN_S
    bimodal: bool = False  # half the answers short (0.3×), half long (1.7×)
    tie_ms: float | None = None  # latencies rounded to this
    drift_per_interval: float = 0.0  # both arms slow down over time
    stable_burst: tuple[int, int] | None = None  # intervals [a, b): stable errors at 30 %
    load_linked: float = 0.0  # latency × (1 + this × the arm's load), one replica per arm
    max_error_rate_increase: float | None = None  # serve-canary's tolerance, if not the default
    max_error_rate: float | None = None  # serve-canary's absolute error limit, if not the default
    default_lengths: bool = False  # serve-canary's default phase lengths, not the short plan
    fine_steps: bool = False  # seven weights up to 50 % (`FINE_PHASES`), not three

    @property
    def phases(self) -> tuple[PhaseConfig, ...]:
        return DEFAULT_LENGTH_PHASES if self.default_lengths else FINE_PHASES if self.fine_steps else PHASES

    @property
    def horizon(self) -> int:
        return DEFAULT_LENGTH_HORIZON if self.default_lengths else HORIZON


SCENARIOS = (
    Scenario("A/A"),
    Scenario("A/A, 20,000 sticky users", users=20_000, user_spread=1.0),
    Scenario("A/A, sticky users, 3 always failing", users=20_000, user_spread=1.0, failing_users=3),
    Scenario("A/A, stable-only error burst", stable_burst=(4, 7)),
    Scenario("A/A, both over the 2 s SLO", e2e_median_s=1.6),
    Scenario("A/A, drifting latency (+0.5 %/interval)", drift_per_interval=0.005, e2e_median_s=0.5),
    Scenario("A/A, tied latencies (10 ms)", tie_ms=10.0),
    Scenario("A/A, bimodal latencies", bimodal=True, e2e_median_s=0.6),
    Scenario("A/A, 10 requests per interval", requests_per_interval=10),
    Scenario("A/A, load-linked latency, 5,000 users", users=5000, user_spread=0.5, load_linked=0.5, e2e_median_s=0.5),
    Scenario("latency +20 % (within 1.5×)", canary_latency=1.2),
    Scenario("errors 1%→2%", regression=True, canary_error=0.02),
    Scenario("errors 1%→5%", regression=True, canary_error=0.05),
    Scenario("errors 1%→1.3%", regression=True, canary_error=0.013),
    Scenario("A/A, max_error_rate_increase 1.2", max_error_rate_increase=1.2),
    Scenario(
        "errors 1%→1.3%, max_error_rate_increase 1.2", regression=True, canary_error=0.013, max_error_rate_increase=1.2
    ),
    Scenario("A/A, default phase lengths (10/30/60 min)", default_lengths=True),
    Scenario("errors 1%→1.3%, default phase lengths", regression=True, canary_error=0.013, default_lengths=True),
    Scenario("errors 1%→3%, sticky users", regression=True, canary_error=0.03, users=20_000, user_spread=1.0),
    Scenario("errors 2×, after a stable burst", regression=True, canary_error=0.02, stable_burst=(4, 7)),
    Scenario("latency 2×", regression=True, canary_latency=2.0),
    Scenario("p99 only: 2 % of answers 5× slower", regression=True, canary_slow_share=0.02),
    Scenario("+30 % output tokens, same latency", regression=True, canary_tokens=1.3),
    # appended, so every other scenario keeps its seeds
    Scenario(
        "A/A, 7 steps, 2,000 sticky users, 30 always failing",
        users=2000,
        user_spread=1.0,
        failing_users=30,
        fine_steps=True,
    ),
    # The same users with stable inside its error limit (about 2.5 % of requests fail on
    # either arm): the row above also waits whenever both arms are over the 1 % default.
    Scenario(
        "A/A, 7 steps, 2,000 sticky users, 30 always failing, max_error_rate 5 %",
        users=2000,
        user_spread=1.0,
        failing_users=30,
        fine_steps=True,
        max_error_rate=0.05,
    ),
    # A tighter tolerance needs more evidence, as a smaller regression does: both at the
    # default phase lengths, like "errors 1%→1.3%, default phase lengths".
    Scenario(
        "A/A, max_error_rate_increase 1.2, default phase lengths", max_error_rate_increase=1.2, default_lengths=True
    ),
    Scenario(
        "errors 1%→1.3%, max_error_rate_increase 1.2, default phase lengths",
        regression=True,
        canary_error=0.013,
        max_error_rate_increase=1.2,
        default_lengths=True,
    ),
)


def make_judges(scenario: Scenario | None = None) -> list:
    limits = {
        key: value
        for key in ("max_error_rate_increase", "max_error_rate")
        if scenario is not None and (value := getattr(scenario, key)) is not None
    }
    health = HealthConfig(**limits)
    baseline_p99_ms = E2E_MEDIAN_S * np.exp(2.326 * SIGMA) * 1000.0
    return [
        ServeCanaryJudge(health),
        KayentaJudge(name="kayenta, per phase (Bonferroni)"),
        KayentaJudge(every_look=True, name="kayenta, every look"),
        FlaggerJudge(p99_limit_ms=1.25 * baseline_p99_ms),
        SeedJudge(),
    ]


class World:
    """One rollout's population: users' hash positions, activity, error rates and speeds."""

    def __init__(self, scenario: Scenario, rng: np.random.Generator) -> None:
        self.scenario = scenario
        count = scenario.users or 0
        self.position = rng.random(count)
        self.unit_ids = [f"{int(position * 2**64):016x}" for position in self.position]  # as the router names units
        activity = rng.pareto(1.2, count) + 0.1
        self.activity = activity / activity.sum() if count else activity
        spread = scenario.user_spread
        self.error_scale = rng.lognormal(-(spread**2) / 2, spread, count)
        self.latency_scale = rng.lognormal(-(spread**2) / 32, spread / 4, count)
        self.always_fails = np.zeros(count, dtype=bool)
        self.always_fails[: scenario.failing_users] = True

    def requests(self, rng: np.random.Generator, n: int, weight: float) -> tuple[np.ndarray, np.ndarray]:
        """(user index or -1 for keyless, is canary) of this interval's requests."""
        if not self.scenario.users:
            return np.full(n, -1), rng.random(n) < weight
        users = rng.choice(len(self.activity), n, p=self.activity)
        return users, self.position[users] < weight


def _latencies(
    rng: np.random.Generator, median: float, scale: np.ndarray, scenario: Scenario, canary: bool, sigma: float
) -> np.ndarray:
    n = len(scale)
    values = median * scale * np.exp(sigma * rng.standard_normal(n))
    if scenario.bimodal:
        values *= np.where(rng.random(n) < 0.5, 0.3, 1.7)
    if canary:
        values *= scenario.canary_latency
        values *= np.where(rng.random(n) < scenario.canary_slow_share, 5.0, 1.0)
    if scenario.tie_ms:
        values = np.maximum(np.round(values * 1000.0 / scenario.tie_ms), 1.0) * scenario.tie_ms / 1000.0
    return values


def _serve(
    arms: dict[Arm, ArmAggregate],
    last: ArmAggregate,
    arm: Arm,
    users: np.ndarray,
    world: World,
    rng: np.random.Generator,
    interval: int,
    load: float,
) -> None:
    """This interval's requests of one arm into the window (with units) and the interval's aggregate."""
    scenario, n = world.scenario, len(users)
    if n == 0:
        return
    keyed = users >= 0
    error_rate = np.full(n, scenario.canary_error if arm == "canary" else BASE_ERROR)
    if arm == "stable" and scenario.stable_burst and scenario.stable_burst[0] <= interval < scenario.stable_burst[1]:
        error_rate[:] = 0.3
    error_rate[keyed] *= world.error_scale[users[keyed]]
    failed = rng.random(n) < np.minimum(error_rate, 1.0)
    failed[keyed] |= world.always_fails[users[keyed]]
    scale = np.ones(n)
    scale[keyed] = world.latency_scale[users[keyed]]
    scale *= (1.0 + scenario.drift_per_interval) ** interval * (1.0 + scenario.load_linked * load)
    canary = arm == "canary"
    ok = ~failed
    latencies = {
        "ttft": _latencies(rng, TTFT_MEDIAN_S, scale[ok], scenario, canary, SIGMA),
        "e2e": _latencies(rng, scenario.e2e_median_s, scale[ok], scenario, canary, SIGMA),
        "itl": _latencies(rng, ITL_MEDIAN_S, scale[ok], scenario, canary, 0.2),
        "tokens": np.round(
            TOKENS_MEDIAN
            * (scenario.canary_tokens if canary else 1.0)
            * np.exp(TOKENS_SIGMA * rng.standard_normal(ok.sum()))
        ),
    }
    for aggregate in (arms[arm], last):
        aggregate.requests += n
        aggregate.errors += int(failed.sum())
        aggregate.error_kinds["before_first_token"] += int(failed.sum())
        for latency, values in latencies.items():
            _reservoir_extend(aggregate.samples(latency), values, rng)
            if latency in ("ttft", "e2e"):  # no queueing simulated: users wait what the replica takes
                _reservoir_extend(aggregate.seen(latency), values, rng)
    if arm == "stable":
        fix_thresholds(arms)
    tally = arms[arm].units
    ratios = {key: np.zeros(n) for key in tally.thresholds}  # a failed request has no latency: ratio 0
    for key, threshold in tally.thresholds.items():
        ratios[key][ok] = latencies[key.split("_")[0]] / threshold
    for index in np.flatnonzero(~keyed):  # keyless: each request a unit of its own
        tally.add(None, bool(failed[index]), {key: float(r[index]) for key, r in ratios.items() if r[index] > 1.0})
    if keyed.any():  # each user's requests of this interval at once: the worst of each, any error
        order = np.flatnonzero(keyed)[np.argsort(users[keyed], kind="stable")]
        starts = np.r_[0, np.flatnonzero(np.diff(users[order])) + 1]
        any_failed = np.logical_or.reduceat(failed[order], starts)
        worst = {key: np.maximum.reduceat(r[order], starts) for key, r in ratios.items()}
        for group, start in enumerate(starts.tolist()):
            over = {key: float(w[group]) for key, w in worst.items() if w[group] > 1.0}
            tally.add(world.unit_ids[users[order[start]]], bool(any_failed[group]), over)


def _reservoir_extend(reservoir, values: np.ndarray, rng: np.random.Generator) -> None:
    """Algorithm R over a batch, vectorised; the same distribution as Reservoir.add per value."""
    room = max(0, reservoir.capacity - len(reservoir.values))
    reservoir.values.extend(values[:room].tolist())
    rest = values[room:]
    if len(rest):
        seen = reservoir.seen + room + np.arange(1, len(rest) + 1)
        slots = (rng.random(len(rest)) * seen).astype(np.int64)
        keep = slots < reservoir.capacity
        for slot, value in zip(slots[keep].tolist(), rest[keep].tolist()):
            reservoir.values[slot] = value
    reservoir.seen += len(values)


def run_rollout(judge, scenario: Scenario, seed: int) -> tuple[str, int, int]:
    """→ (outcome, requests and canary requests served until it): rolled_back | promoted | undecided."""
    rng = np.random.default_rng(seed)
    world = World(scenario, rng)
    judge.reset()
    phases = scenario.phases
    state = rollout.start("sim", "v1", "v2", phases, 0.0)
    window, arms = state.window, new_window()
    closed = intervals_in_window = 0
    served = served_canary = 0
    for interval in range(1, scenario.horizon + 1):
        if state.window != window:
            closed += 1
            window, arms, intervals_in_window = state.window, new_window(), 0
        intervals_in_window += 1
        users, is_canary = world.requests(rng, scenario.requests_per_interval, state.weight)
        n_canary = int(is_canary.sum())
        last = {"stable": ArmAggregate(), "canary": ArmAggregate()}
        half = scenario.requests_per_interval / 2  # one replica per arm, sized for half the traffic
        for arm, mask in (("stable", ~is_canary), ("canary", is_canary)):
            _serve(arms, last[arm], arm, users[mask], world, rng, interval, int(mask.sum()) / half)
        served += scenario.requests_per_interval
        served_canary += n_canary
        phase = phases[state.phase_index]
        look = Look(
            arms["stable"],
            arms["canary"],
            last["stable"],
            last["canary"],
            phase.min_requests,
            closed,
            state.weight,
            state.window_seq,
            intervals_in_window,
            int(phase.min_duration_s),
            len(phases) - 1,
        )
        verdict = judge.decide(look)
        if isinstance(verdict, str):
            verdict = Verdict(verdict, verdict, (), arms["stable"].requests, arms["canary"].requests)
        state = rollout.evaluate(state, verdict, phases, float(interval), auto_rollback=True)
        if state.status == "rolled_back":
            return "rolled_back", served, served_canary
        if state.status == "awaiting_approval":
            return "promoted", served, served_canary
    return "undecided", served, served_canary


def _run_cell(args: tuple[int, int, int]) -> dict:
    judge_index, scenario_index, rollouts = args
    scenario = SCENARIOS[scenario_index]
    judge = make_judges(scenario)[judge_index]
    outcomes = [run_rollout(judge, scenario, seed=10_000 * scenario_index + i) for i in range(rollouts)]
    rolled = [served for outcome, served, _ in outcomes if outcome == "rolled_back"]
    rolled_canary = [canary for outcome, _, canary in outcomes if outcome == "rolled_back"]
    promoted = [served for outcome, served, _ in outcomes if outcome == "promoted"]
    return {
        "judge": judge.name,
        "scenario": scenario.name,
        "regression": scenario.regression,
        "rollouts": rollouts,
        "rollback_rate": len(rolled) / rollouts,
        "promotion_rate": len(promoted) / rollouts,
        "undecided_rate": 1.0 - (len(rolled) + len(promoted)) / rollouts,
        "median_requests_to_rollback": float(np.median(rolled)) if rolled else None,
        "median_canary_requests_to_rollback": float(np.median(rolled_canary)) if rolled_canary else None,
        "median_requests_to_promotion": float(np.median(promoted)) if promoted else None,
    }


def table(cells: list[dict]) -> str:
    """One row per scenario, one column per judge: rolled back / promoted (median requests)."""
    judges = list(dict.fromkeys(c["judge"] for c in cells))
    lines = [
        "| scenario | " + " | ".join(judges) + " |",
        "|---" * (1 + len(judges)) + "|",
    ]
    for scenario in SCENARIOS:
        row = {c["judge"]: c for c in cells if c["scenario"] == scenario.name}
        cols = []
        for name in judges:
            if name not in row:
                cols.append("—")
                continue
            c = row[name]
            key = "median_requests_to_rollback" if scenario.regression else "median_requests_to_promotion"
            median = f" ({c[key]:,.0f})" if c[key] else ""
            cols.append(f"{c['rollback_rate']:.1%} / {c['promotion_rate']:.1%}{median}")
        label = f"**{scenario.name}**" if scenario.regression else scenario.name
        lines.append(f"| {label} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def chart(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judges = list(dict.fromkeys(c["judge"] for c in cells))
    fig, ax = plt.subplots(figsize=(14, 5))
    width = 0.8 / len(judges)
    for j, name in enumerate(judges):
        row = {c["scenario"]: c for c in cells if c["judge"] == name}
        xs = np.arange(len(SCENARIOS)) + j * width
        ax.bar(xs, [row[s.name]["rollback_rate"] if s.name in row else np.nan for s in SCENARIOS], width, label=name)
    ax.set_xticks(np.arange(len(SCENARIOS)) + 0.4 - width / 2)
    ax.set_xticklabels([s.name for s in SCENARIOS], rotation=30, ha="right", fontsize=7)
    ax.set_title("rollback rate (healthy scenarios: false rollbacks; regressions: detection)")
    ax.axhline(0.01, color="grey", linestyle=":", linewidth=1)
    ax.axhline(0.95, color="grey", linestyle=":", linewidth=1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=int, default=500, help="per scenario, for serve-canary's judge")
    parser.add_argument("--reference-rollouts", type=int, default=200, help="per scenario, for the other judges")
    parser.add_argument("--quick", action="store_true", help="2 rollouts per cell: checks the harness, not the figures")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--scenario", action="append", help="run only the scenarios whose names contain this (repeatable), and merge"
    )
    args = parser.parse_args()
    started = time.time()
    wanted = args.scenario
    chosen = [s for s, scenario in enumerate(SCENARIOS) if wanted is None or any(w in scenario.name for w in wanted)]
    if not chosen:
        parser.error(f"--scenario: no scenario's name contains any of {wanted}")
    jobs = [
        (j, s, 2 if args.quick else args.rollouts if j == 0 else args.reference_rollouts)
        for j in range(len(make_judges()))
        for s in chosen
        if j == 0 or not SCENARIOS[s].default_lengths  # the long plan is serve-canary's own
    ]
    with ProcessPoolExecutor(args.workers) as pool:
        cells = list(pool.map(_run_cell, jobs))
    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if args.quick else ""
    meta = {
        "horizon_intervals": HORIZON,
        "default_length_horizon_intervals": DEFAULT_LENGTH_HORIZON,
        "reservoir": RESERVOIR_SIZE,
        "phases": [p.model_dump() for p in PHASES],
        "default_length_phases": [p.model_dump() for p in DEFAULT_LENGTH_PHASES],
        "fine_phases": [p.model_dump() for p in FINE_PHASES],
        "scenarios": [asdict(s) for s in SCENARIOS],
        "seconds": round(time.time() - started, 1),
    }
    if wanted is not None:
        rerun = [SCENARIOS[s].name for s in chosen]
        earlier = json.loads((RESULTS / f"decision_accuracy{suffix}.json").read_text())
        cells = [c for c in earlier["cells"] if c["scenario"] not in rerun] + cells
        reruns = [*earlier["meta"].get("reruns", []), {"scenarios": rerun, "seconds": meta["seconds"]}]
        meta = {**earlier["meta"], **meta, "seconds": earlier["meta"]["seconds"], "reruns": reruns}
    (RESULTS / f"decision_accuracy{suffix}.json").write_text(json.dumps({"meta": meta, "cells": cells}, indent=2))
    chart(cells, RESULTS / f"decision_accuracy{suffix}.png")
    print(table(cells))
    print(f"\n{len(jobs)} cells in {time.time() - started:.1f} s")


if __name__ == "__main__":
    main()
