"""The shadow phase's pure parts: comparators, the whole answer the serving path captures, the
pairs' tally, the betting test and the shadow verdict."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serve_canary.config import CanaryConfig, ConfigError, HealthConfig, ShadowConfig, parse_config
from serve_canary.judge import SHADOW_ALPHA_SHARE, judge_shadow
from serve_canary.metrics import RequestRecord
from serve_canary.sequential import net_rate_e_value
from serve_canary.shadow import (
    Answer,
    PairOutcome,
    ShadowPair,
    ShadowTally,
    checked,
    comparators_for,
    compare,
    example_of,
)
from tests.unit.test_serving import arms, chat, table

HEALTH = HealthConfig()
OK = Answer("the canary sings", "stop", 3, 0.1)


def pair(stable: Answer = OK, canary: Answer = OK, **request) -> ShadowPair:
    return ShadowPair({"messages": [{"role": "user", "content": "hi"}], **request}, stable, canary)


def answer(**changes) -> Answer:
    return Answer(**{**OK.__dict__, **changes})


async def results(shadow_pair: ShadowPair, *names: str) -> dict[str, str]:
    config = ShadowConfig(comparators=[{"name": n} for n in names])
    return await compare(shadow_pair, comparators_for(config, HEALTH))


async def test_built_in_comparators_name_the_worse_answer():
    empty, long, cut = answer(text="  "), answer(output_tokens=9), answer(finish_reason="length")
    refusal, failed = answer(text="I'm sorry, I can't help"), answer(text="", error="error: midstream")
    slow = answer(replica_e2e_s=0.1 * HEALTH.max_latency_increase + 0.01)
    names = ("empty_or_refusal", "length_ratio", "finish_reason", "exact_match")
    assert await results(pair(OK, empty), *names) == {
        "error": "same",
        "latency": "same",
        "empty_or_refusal": "canary",
        "length_ratio": "same",
        "finish_reason": "same",
        "exact_match": "same",  # temperature 1 by default: no exact match expected
    }
    assert (await results(pair(refusal, OK), "empty_or_refusal"))["empty_or_refusal"] == "stable"
    assert (await results(pair(OK, long), "length_ratio"))["length_ratio"] == "canary"
    assert (await results(pair(long, OK), "length_ratio"))["length_ratio"] == "stable"
    assert (await results(pair(OK, cut), "finish_reason"))["finish_reason"] == "canary"
    assert (await results(pair(OK, slow), "error"))["latency"] == "canary"
    assert (await results(pair(OK, failed), "error")) == {"error": "canary", "latency": "same"}
    different = answer(text="the stable sings")
    assert (await results(pair(OK, different, temperature=0), "exact_match"))["exact_match"] == "canary"
    assert (await results(pair(OK, OK, temperature=0), "exact_match"))["exact_match"] == "same"


def worse_when_shorter(shadow_pair: ShadowPair):
    return "canary" if len(shadow_pair.canary.text) < len(shadow_pair.stable.text) else None


async def judged_later(shadow_pair: ShadowPair):
    return "stable"


def broken(shadow_pair: ShadowPair):
    raise RuntimeError("no embedding service")


def says_maybe(shadow_pair: ShadowPair):
    return "maybe"


async def test_a_comparator_by_import_path_may_be_async_and_a_broken_one_is_failed_not_same():
    here = "tests.unit.test_shadow"
    names = [f"{here}:worse_when_shorter", f"{here}:judged_later", f"{here}:broken", f"{here}:says_maybe"]
    found = await results(pair(OK, answer(text="x")), *names)
    assert [found[n] for n in names] == ["canary", "stable", "failed", "failed"]


def test_a_comparator_that_does_not_import_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="rollout.shadow.comparators: 'tests.nowhere:f'"):
        comparators_for(ShadowConfig(comparators=[{"name": "tests.nowhere:f"}]), HEALTH)
    with pytest.raises(ConfigError, match="rollout.shadow.comparators.0.name"):
        parse_config(
            {
                "model_name": "m",
                "stable": {"engine": "simulated", "version": "v1"},
                "canary": {"engine": "simulated", "version": "v2"},
                "rollout": {"shadow": {"comparators": [{"name": "bleu"}]}},
            }
        )


def test_the_shadow_phase_comes_first_at_weight_zero_and_health_is_always_compared():
    config = CanaryConfig.model_validate(
        {
            "model_name": "m",
            "stable": {"engine": "simulated", "version": "v1"},
            "canary": {"engine": "simulated", "version": "v2"},
            "rollout": {"shadow": {"min_pairs": 50, "comparators": [{"name": "exact_match", "max_rate": 0.01}]}},
        }
    )
    plan = config.rollout.plan
    assert (plan[0].name, plan[0].weight, plan[0].min_requests) == ("shadow", 0.0, 50)
    assert plan[1:] == config.rollout.phases
    assert config.rollout.shadow is not None
    assert [(c.name, c.max_rate) for c in checked(config.rollout.shadow)] == [
        ("error", 0.02),
        ("latency", 0.05),
        ("exact_match", 0.01),
    ]


async def test_the_serving_path_captures_a_streams_whole_answer_only_when_asked():
    captured: list[tuple[str, Answer]] = []
    served = await _serve(chat(stream=True), captured)
    assert served.stream is not None and not captured
    async for _ in served.stream:
        pass
    [(arm, whole)] = captured
    assert (arm, whole.text, whole.finish_reason, whole.output_tokens, whole.error) == (
        "stable",
        "the canary sings while stable models",
        "stop",
        6,
        None,
    )
    unary: list[tuple[str, Answer]] = []
    await _serve(chat(), unary)
    assert unary[0][1].text == whole.text


async def test_a_mirrored_answer_is_timed_from_the_replicas_receipt_not_from_its_wait():
    # The mirror reaches the canary's replica 0.3 s late (Serve's router holding it behind the
    # load of the moment); the latency comparator must see the model's time, not that wait.
    captured: list[tuple[str, Answer]] = []
    records: list[RequestRecord] = []
    endpoints = arms(canary_wait_s=0.3)
    await _serve(chat(), captured, endpoints, records.append, failover=False, forced="canary", origin="shadow")
    [(arm, mirrored)], [record] = captured, records
    assert arm == "canary" and record.e2e_s >= 0.3
    assert mirrored.replica_e2e_s < 0.1
    assert await results(pair(answer(replica_e2e_s=mirrored.replica_e2e_s), mirrored)) == {
        "error": "same",
        "latency": "same",
    }


async def _serve(body, captured, endpoints=None, record=lambda record: None, failover=True, **options):
    """`body` served as a user's request (or, with `forced` and `origin`, as a mirror) with
    its whole answer captured."""
    from serve_canary.serving import serve_request

    return await serve_request(
        "chat",
        body,
        "u",
        table(0.0),
        endpoints or arms(),
        record,
        request_id="r",
        failover=failover,
        capture=lambda arm, whole: captured.append((arm, whole)),
        **options,
    )


def test_the_tally_counts_per_comparator_and_keeps_a_few_examples():
    tally = ShadowTally()
    diff = example_of(pair(OK, answer(text="")), {"empty_or_refusal": "canary", "error": "same"})
    assert diff is not None and diff.worse == {"empty_or_refusal": "canary"} and diff.prompt == '"hi"'
    assert example_of(pair(), {"error": "same"}) is None
    tally.add([PairOutcome("w", {"empty_or_refusal": "canary"}, diff)] * 7)
    tally.add([PairOutcome("w", {"empty_or_refusal": "same", "custom": "failed"}, None)])
    counts = tally.comparators["empty_or_refusal"]
    assert (tally.pairs, counts.canary_worse, counts.same, counts.pairs, len(tally.examples)) == (8, 7, 1, 8, 5)
    assert tally.comparators["custom"].pairs == 0 and tally.comparators["custom"].failed == 1


def sequence(n: int, worse: float, better: float, rng: random.Random) -> list[int]:
    return [1 if u < worse else -1 if u < worse + better else 0 for u in (rng.random() for _ in range(n))]


def test_the_betting_test_holds_its_level_at_every_look_under_the_null():
    """On the boundary of the null (canary worse by exactly the limit, ties and both sides
    worse mixed in), the rollback test crosses 1/α at any of 400 looks in at most α of runs."""
    rng, alpha, limit, runs = random.Random(7), 0.05, 0.05, 600
    crossed = 0
    for _ in range(runs):
        worse = better = 0
        for i, x in enumerate(sequence(400, 0.15, 0.10, rng), start=1):
            worse, better = worse + (x == 1), better + (x == -1)
            if net_rate_e_value(worse, better, i, limit, "above") >= 1 / alpha:
                crossed += 1
                break
    assert crossed / runs <= alpha


@given(st.integers(0, 300), st.integers(0, 300), st.integers(0, 300), st.floats(0.01, 0.5))
def test_the_betting_tests_are_e_values_that_rise_with_their_evidence(worse, better, ties, limit):
    pairs = worse + better + ties
    above = net_rate_e_value(worse, better, pairs, limit, "above")
    below = net_rate_e_value(worse, better, pairs, limit, "below")
    assert above >= 0 and below >= 0
    assert net_rate_e_value(worse + 1, better, pairs + 1, limit, "above") >= above
    assert net_rate_e_value(worse, better + 1, pairs + 1, limit, "below") >= below


def tally_of(rng: random.Random, n: int, canary_worse: float, stable_worse: float = 0.0) -> ShadowTally:
    tally = ShadowTally()
    names = [c.name for c in checked(ShadowConfig())]
    for x in sequence(n, canary_worse, stable_worse, rng):
        results = {name: "same" for name in names}
        results["empty_or_refusal"] = {1: "canary", -1: "stable", 0: "same"}[x]
        tally.add([PairOutcome("w", results, None)])
    return tally


COMPARISONS = [(c.name, c.max_rate) for c in checked(ShadowConfig())]


def test_a_canary_that_answers_empty_a_fifth_of_the_time_fails_within_a_few_hundred_pairs():
    rng = random.Random(3)
    verdict = judge_shadow(tally_of(rng, 300, 0.2), COMPARISONS, HEALTH, min_pairs=100)
    assert verdict.decision == "fail" and verdict.reason.startswith("shadow_empty_or_refusal")
    [failed] = [c for c in verdict.checks if c.decision == "fail"]
    assert failed.stats is not None and failed.stats.e_value >= 1 / (HEALTH.alpha * SHADOW_ALPHA_SHARE / 5)


def test_an_unchanged_canary_passes_after_min_pairs_and_not_before():
    rng = random.Random(4)
    early = judge_shadow(tally_of(rng, 90, 0.0), COMPARISONS, HEALTH, min_pairs=100)
    assert early.decision == "wait" and "90/100" in early.reason
    verdict = judge_shadow(tally_of(rng, 400, 0.0), COMPARISONS, HEALTH, min_pairs=100)
    assert verdict.decision == "pass", verdict.reason


def test_symmetric_differences_do_not_fail_an_unchanged_canary():
    """Sampling at temperature > 0: each side empty in 5 % of pairs."""
    fails = sum(
        judge_shadow(tally_of(random.Random(seed), 1000, 0.05, 0.05), COMPARISONS, HEALTH, 100).decision == "fail"
        for seed in range(50)
    )
    assert fails == 0
