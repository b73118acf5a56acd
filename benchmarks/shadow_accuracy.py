"""How often, and after how many pairs, the shadow phase decides right (`judge.judge_shadow`).

Each run draws compared pairs one by one for one comparator scenario (the other comparators
tie), looks every 10 pairs, as the controller does every interval, and stops at the first
FAIL or PASS or after 3,000 pairs. Pure: no cluster, `python -m benchmarks.shadow_accuracy`
(~1 min).

Scenarios: an unchanged canary at temperature 0 (every pair a tie), an unchanged canary
sampled at temperature > 0 (each side worse in 5 % or 10 % of pairs), and regressions: the
canary's answer empty in 20 % / 5 % of prompts, or different at temperature 0 in 20 %.
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

from serve_canary.config import DEFAULT_COMPARATORS, HealthConfig, ShadowConfig
from serve_canary.judge import judge_shadow
from serve_canary.shadow import PairOutcome, ShadowTally, checked

RESULTS = Path(__file__).parent / "results"
LOOK_EVERY = 10
HORIZON = 3000
MIN_PAIRS = 200


@dataclass(frozen=True)
class Scenario:
    name: str
    comparator: str
    canary_worse: float
    stable_worse: float
    regression: bool


SCENARIOS = (
    Scenario("unchanged, temperature 0", "exact_match", 0.0, 0.0, regression=False),
    Scenario("unchanged, each side empty in 5 %", "empty_or_refusal", 0.05, 0.05, regression=False),
    Scenario("unchanged, each side longer in 10 %", "length_ratio", 0.10, 0.10, regression=False),
    Scenario("canary empty in 20 %", "empty_or_refusal", 0.20, 0.0, regression=True),
    Scenario("canary empty in 5 %", "empty_or_refusal", 0.05, 0.0, regression=True),
    Scenario("canary different in 20 % at temperature 0", "exact_match", 0.20, 0.0, regression=True),
)


def run_once(scenario: Scenario, rng: random.Random, comparisons: list[tuple[str, float]]) -> tuple[str, int]:
    """(decision, pairs at the decision) of one simulated shadow phase."""
    tally, health = ShadowTally(), HealthConfig()
    names = [name for name, _ in comparisons]
    batch: list[PairOutcome] = []
    for pairs in range(1, HORIZON + 1):
        u = rng.random()
        worse = (
            "canary"
            if u < scenario.canary_worse
            else "stable"
            if u < scenario.canary_worse + scenario.stable_worse
            else "same"
        )
        batch.append(PairOutcome("w", {name: worse if name == scenario.comparator else "same" for name in names}, None))
        if pairs % LOOK_EVERY == 0:
            tally.add(batch)
            batch = []
            verdict = judge_shadow(tally, comparisons, health, MIN_PAIRS)
            if verdict.decision != "wait":
                return verdict.decision, pairs
    return "wait", HORIZON


def main() -> None:
    runs = 500
    shadow = ShadowConfig(min_pairs=MIN_PAIRS, comparators=[*DEFAULT_COMPARATORS, {"name": "exact_match"}])
    comparisons = [(c.name, c.max_rate) for c in checked(shadow)]
    results = {}
    for scenario in SCENARIOS:
        rng = random.Random(scenario.name)
        outcomes = [run_once(scenario, rng, comparisons) for _ in range(runs)]
        decided = {d: [n for o, n in outcomes if o == d] for d in ("fail", "pass", "wait")}
        results[scenario.name] = {
            "regression": scenario.regression,
            "rolled_back": len(decided["fail"]) / runs,
            "passed": len(decided["pass"]) / runs,
            "undecided": len(decided["wait"]) / runs,
            "median_pairs_to_decision": statistics.median(n for o, n in outcomes if o != "wait")
            if len(decided["wait"]) < runs
            else None,
        }
        print(scenario.name, json.dumps(results[scenario.name]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    document = {
        "runs": runs,
        "min_pairs": MIN_PAIRS,
        "look_every": LOOK_EVERY,
        "horizon": HORIZON,
        "comparisons": comparisons,
        "scenarios": results,
    }
    (RESULTS / "shadow_accuracy.json").write_text(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
