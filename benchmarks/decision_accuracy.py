"""How often does each judge roll back a healthy canary, catch a bad one, and how fast?

Simulated rollouts at the seed's phase weights (5 → 20 → 50 %, then the approval gate),
evaluated every interval by serve-canary's judge and by reference judges
(`benchmarks/judges.py`), through serve-canary's own state machine (`rollout.evaluate`).

    python -m benchmarks.decision_accuracy            # 500 rollouts per scenario (~10 min)
    python -m benchmarks.decision_accuracy --quick    # a smoke run of the harness

Writes benchmarks/results/decision_accuracy.{json,png} and prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.judges import FlaggerJudge, KayentaJudge, SeedJudge, ServeCanaryJudge
from serve_canary import rollout
from serve_canary.config import HealthConfig, PhaseConfig
from serve_canary.judge import Verdict
from serve_canary.metrics import RESERVOIR_SIZE, ArmAggregate

RESULTS = Path(__file__).parent / "results"
REQUESTS_PER_INTERVAL = 1000  # 100 requests/s, evaluated every 10 s
PHASES = (
    PhaseConfig(name="init", weight=0.05, min_duration_s=10, min_requests=100),
    PhaseConfig(name="early", weight=0.20, min_duration_s=15, min_requests=100),
    PhaseConfig(name="progress", weight=0.50, min_duration_s=20, min_requests=100),
    PhaseConfig(name="full", weight=1.0, approval=True),
)
HORIZON = 150  # intervals; a rollout still undecided then counts as undecided
BASE = {"error": 0.01, "ttft_median_s": 0.2, "e2e_median_s": 1.0, "itl_median_s": 0.02, "sigma": 0.3}


@dataclass(frozen=True)
class Scenario:
    name: str
    error: float = BASE["error"]
    latency_scale: float = 1.0
    sigma: float = BASE["sigma"]  # heavier tail at the same mean when larger

    @property
    def regression(self) -> bool:
        return self != Scenario(self.name)


SCENARIOS = (
    Scenario("A/A"),
    Scenario("errors 1%→2%", error=0.02),
    Scenario("errors 1%→5%", error=0.05),
    Scenario("p95 latency +20%", latency_scale=1.2),
    Scenario("p95 latency +50%", latency_scale=1.5),
    Scenario("heavy tail, same mean", sigma=0.6),
)


def make_judges() -> list:
    health = HealthConfig()
    baseline_p99_ms = BASE["e2e_median_s"] * np.exp(2.326 * BASE["sigma"]) * 1000.0
    return [
        ServeCanaryJudge(health),
        KayentaJudge(),
        KayentaJudge(confidence=0.9995, name="kayenta (99.95 %)"),
        KayentaJudge(confidence=0.99995, name="kayenta (99.995 %)"),
        FlaggerJudge(p99_limit_ms=1.25 * baseline_p99_ms),
        SeedJudge(),
    ]


def _add_interval(
    aggregate: ArmAggregate, rng: np.random.Generator, n: int, scenario: Scenario, arm_is_canary: bool
) -> None:
    error_rate = scenario.error if arm_is_canary else BASE["error"]
    scale = scenario.latency_scale if arm_is_canary else 1.0
    sigma = scenario.sigma if arm_is_canary else BASE["sigma"]
    mu_shift = (BASE["sigma"] ** 2 - sigma**2) / 2.0  # keeps the mean when sigma grows
    errors = int(rng.binomial(n, error_rate))
    ok = n - errors
    aggregate.requests += n
    aggregate.errors += errors
    aggregate.error_kinds["before_first_token"] += errors
    for reservoir, median in ((aggregate.ttft_s, BASE["ttft_median_s"]), (aggregate.e2e_s, BASE["e2e_median_s"])):
        values = scale * median * np.exp(mu_shift + sigma * rng.standard_normal(ok))
        _reservoir_extend(reservoir, values, rng)
    _reservoir_extend(aggregate.itl_s, scale * BASE["itl_median_s"] * np.exp(0.2 * rng.standard_normal(ok)), rng)


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
    judge.reset()
    state = rollout.start("sim", "v1", "v2", PHASES, 0.0)
    window, stable, canary = state.window, ArmAggregate(), ArmAggregate()
    earlier: list[tuple[ArmAggregate, ArmAggregate]] = []
    served = served_canary = 0
    for interval in range(1, HORIZON + 1):
        if state.window != window:
            earlier.append((stable, canary))
            window, stable, canary = state.window, ArmAggregate(), ArmAggregate()
        n_canary = int(rng.binomial(REQUESTS_PER_INTERVAL, state.weight))
        last_stable, last_canary = ArmAggregate(), ArmAggregate()
        for aggregate_pair, n, is_canary in (
            ((stable, last_stable), REQUESTS_PER_INTERVAL - n_canary, False),
            ((canary, last_canary), n_canary, True),
        ):
            for aggregate in aggregate_pair:
                _add_interval(aggregate, np.random.default_rng((seed, interval, is_canary)), n, scenario, is_canary)
        served += REQUESTS_PER_INTERVAL
        served_canary += n_canary
        decision = judge.decide(
            stable, canary, last_stable, last_canary, PHASES[state.phase_index].min_requests, earlier
        )
        verdict = Verdict(decision, decision, (), stable.requests, canary.requests)
        state = rollout.evaluate(state, verdict, PHASES, float(interval), auto_rollback=True)
        if state.status == "rolled_back":
            return "rolled_back", served, served_canary
        if state.status == "awaiting_approval":
            return "promoted", served, served_canary
    return "undecided", served, served_canary


def _run_cell(args: tuple[int, int, int]) -> dict:
    judge_index, scenario_index, rollouts = args
    judge, scenario = make_judges()[judge_index], SCENARIOS[scenario_index]
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
    judges = list(dict.fromkeys(c["judge"] for c in cells))
    lines = [
        "| judge | A/A false rollbacks | A/A promoted (median requests) | "
        + " | ".join(
            f"{s.name}: detected (median requests, canary requests) / wrongly promoted"
            for s in SCENARIOS
            if s.regression
        )
        + " |",
        "|---" * (3 + sum(s.regression for s in SCENARIOS)) + "|",
    ]
    for name in judges:
        row = {c["scenario"]: c for c in cells if c["judge"] == name}
        aa = row["A/A"]
        promo = f"{aa['promotion_rate']:.1%} ({aa['median_requests_to_promotion'] or 0:,.0f})"
        cols = []
        for s in SCENARIOS:
            if s.regression:
                c = row[s.name]
                median = (
                    f"{c['median_requests_to_rollback']:,.0f}, {c['median_canary_requests_to_rollback']:,.0f}"
                    if c["median_requests_to_rollback"]
                    else "—"
                )
                cols.append(f"{c['rollback_rate']:.1%} ({median}) / {c['promotion_rate']:.1%}")
        lines.append(f"| {name} | {aa['rollback_rate']:.1%} | {promo} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def chart(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judges = list(dict.fromkeys(c["judge"] for c in cells))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(judges)
    for j, name in enumerate(judges):
        row = {c["scenario"]: c for c in cells if c["judge"] == name}
        xs = np.arange(len(SCENARIOS)) + j * width
        axes[0].bar(xs, [row[s.name]["rollback_rate"] for s in SCENARIOS], width, label=name)
        axes[1].bar(xs, [row[s.name]["median_requests_to_rollback"] or 0 for s in SCENARIOS], width, label=name)
    for ax, title in zip(axes, ("rollback rate (A/A = false rollbacks)", "median requests until rollback")):
        ax.set_xticks(np.arange(len(SCENARIOS)) + 0.4 - width / 2)
        ax.set_xticklabels([s.name for s in SCENARIOS], rotation=20, ha="right", fontsize=8)
        ax.set_title(title)
    axes[0].axhline(0.01, color="grey", linestyle=":", linewidth=1)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=int, default=500)
    parser.add_argument(
        "--quick", action="store_true", help="20 rollouts per cell: checks the harness, not the figures"
    )
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    rollouts = 20 if args.quick else args.rollouts
    started = time.time()
    jobs = [(j, s, rollouts) for j in range(len(make_judges())) for s in range(len(SCENARIOS))]
    with ProcessPoolExecutor(args.workers) as pool:
        cells = list(pool.map(_run_cell, jobs))
    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if args.quick else ""
    meta = {
        "requests_per_interval": REQUESTS_PER_INTERVAL,
        "horizon_intervals": HORIZON,
        "reservoir": RESERVOIR_SIZE,
        "phases": [p.model_dump() for p in PHASES],
        "base": BASE,
        "seconds": round(time.time() - started, 1),
    }
    (RESULTS / f"decision_accuracy{suffix}.json").write_text(json.dumps({"meta": meta, "cells": cells}, indent=2))
    chart(cells, RESULTS / f"decision_accuracy{suffix}.png")
    print(table(cells))
    print(f"\n{len(jobs)} cells × {rollouts} rollouts in {meta['seconds']} s")


if __name__ == "__main__":
    main()
