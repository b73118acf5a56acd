"""Shadow comparisons: the canary's answer to a mirrored request against stable's answer to
the same request, which its user already has.

A canary tool that reads only errors and latency misses the regression users notice first:
what the new version answers. In the shadow phase the ingress mirrors some of stable's
requests to the canary and hands each pair to comparators. A comparator reads one pair and
says which answer is worse, if either ("canary", "stable" or None); the judge then asks, per
comparator, whether pairs with the canary's answer worse outnumber pairs with stable's by more
than the comparator's `max_rate` (`judge.judge_shadow`). A symmetric comparison (one side
empty, one side much longer) is fair at any temperature: an unchanged canary is worse as often
as stable. Exact match has no side: a difference is the canary's, so it is read at
temperature 0 only, where an unchanged model answers the same.

Pure, no Ray: the ingress runs comparators, the collector tallies outcomes per window.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel

from serve_canary.config import ComparatorConfig, ConfigError, HealthConfig, ShadowConfig

Worse = Literal["canary", "stable"] | None
Comparison = Literal["canary", "stable", "same", "failed"]  # "failed": the comparator raised
Comparator = Callable[["ShadowPair"], Worse | Awaitable[Worse]]
EXAMPLES = 5  # example pairs kept per window, for the status
EXAMPLE_CHARS = 200
# How a refusal starts, lower-cased; what a model says when it will not answer.
REFUSALS = ("i can't", "i cannot", "i'm sorry", "i am sorry", "i'm unable", "i am unable", "as an ai")
LONGER = 1.5  # `length_ratio`: an answer this many times as long as the other's is the worse one
# Health is compared in every shadow phase, whatever comparators are configured.
HEALTH = (ComparatorConfig(name="error"), ComparatorConfig(name="latency"))
logger = logging.getLogger("serve_canary.shadow")


@dataclass(frozen=True)
class Answer:
    """One arm's whole answer to a request, as a comparator reads it."""

    text: str
    finish_reason: str | None
    output_tokens: int
    replica_e2e_s: float  # from the replica's receipt: a mirrored request's wait for it is load, not the model
    error: str | None = None  # why there is no answer (an error before or during it)


@dataclass(frozen=True)
class ShadowPair:
    """A request (the client's body) with stable's answer and the canary's."""

    request: Mapping[str, Any]
    stable: Answer
    canary: Answer

    @property
    def temperature(self) -> float:
        value = self.request.get("temperature")
        return float(value) if isinstance(value, int | float) else 1.0  # OpenAI's default


def _flagged(pair: ShadowPair, flag: Callable[[Answer], bool]) -> Worse:
    canary, stable = flag(pair.canary), flag(pair.stable)
    if canary == stable:
        return None
    return "canary" if canary else "stable"


def _answered(pair: ShadowPair) -> bool:
    return pair.stable.error is None and pair.canary.error is None


def is_empty_or_refusal(answer: Answer) -> bool:
    text = answer.text.strip().lower()
    return answer.error is None and (not text or text.startswith(REFUSALS))


def empty_or_refusal(pair: ShadowPair) -> Worse:
    """The answer that is empty or a refusal, when the other is neither."""
    return _flagged(pair, is_empty_or_refusal)


def finish_reason(pair: ShadowPair) -> Worse:
    """The answer that ended for another reason than `stop` (cut at max_tokens, filtered)."""
    return _flagged(pair, lambda a: a.error is None and a.finish_reason != "stop") if _answered(pair) else None


def length_ratio(pair: ShadowPair) -> Worse:
    """The answer at least 1.5× as long as the other (tokens): longer answers cost more.
    Shorter ones are `empty_or_refusal`'s and `finish_reason`'s to find."""
    if not _answered(pair):
        return None
    canary, stable = max(pair.canary.output_tokens, 1), max(pair.stable.output_tokens, 1)
    if canary >= LONGER * stable:
        return "canary"
    if stable >= LONGER * canary:
        return "stable"
    return None


def exact_match(pair: ShadowPair) -> Worse:
    """At temperature 0, a canary answer that is not stable's word for word."""
    if pair.temperature != 0.0 or not _answered(pair):
        return None
    return None if pair.canary.text == pair.stable.text else "canary"


def error(pair: ShadowPair) -> Worse:
    """The arm that failed to answer, when the other answered."""
    return _flagged(pair, lambda a: a.error is not None)


def latency_over(allowed: float) -> Comparator:
    """The answer that took more than `allowed` × the other's end-to-end time at the replica.

    A mirrored request is sent when stable's answer is in, so it meets the load of that moment
    and waits in other queues than the user's request did; as in the judge's comparisons, only
    the time from the replica's receipt is compared."""

    def latency(pair: ShadowPair) -> Worse:
        if not _answered(pair):
            return None
        if pair.canary.replica_e2e_s > allowed * pair.stable.replica_e2e_s:
            return "canary"
        if pair.stable.replica_e2e_s > allowed * pair.canary.replica_e2e_s:
            return "stable"
        return None

    return latency


_BUILTIN: dict[str, Comparator] = {
    "empty_or_refusal": empty_or_refusal,
    "finish_reason": finish_reason,
    "length_ratio": length_ratio,
    "exact_match": exact_match,
    "error": error,
}


def checked(shadow: ShadowConfig) -> tuple[ComparatorConfig, ...]:
    """Every comparison the shadow phase judges: health (unless configured otherwise), then the configured ones."""
    named = {c.name for c in shadow.comparators}
    return (*(c for c in HEALTH if c.name not in named), *shadow.comparators)


def load(name: str, health: HealthConfig) -> Comparator:
    """A built-in comparator, or the function at 'package.module:function'."""
    if name == "latency":
        return latency_over(health.max_latency_increase)
    if name in _BUILTIN:
        return _BUILTIN[name]
    module_name, _, attribute = name.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"invalid serve-canary config:\n  rollout.shadow.comparators: {name!r}: {exc}") from None
    if not callable(found):
        raise ConfigError(f"invalid serve-canary config:\n  rollout.shadow.comparators: {name!r} is not callable")
    return found  # type: ignore[no-any-return]


def comparators_for(shadow: ShadowConfig, health: HealthConfig) -> dict[str, Comparator]:
    return {c.name: load(c.name, health) for c in checked(shadow)}


async def compare(pair: ShadowPair, comparators: Mapping[str, Comparator]) -> dict[str, Comparison]:
    """Every comparator's reading of the pair; one that raises or answers something else is "failed"."""
    results: dict[str, Comparison] = {}
    for name, comparator in comparators.items():
        try:
            worse = comparator(pair)
            if inspect.isawaitable(worse):
                worse = await worse
        except Exception:
            logger.exception("shadow comparator %s failed", name)
            results[name] = "failed"
            continue
        results[name] = "same" if worse is None else worse if worse in ("canary", "stable") else "failed"
    return results


def _clip(text: str) -> str:
    return text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + "…"


class PairExample(BaseModel):
    """A pair in which some comparator found one answer worse, clipped for display."""

    prompt: str
    stable: str
    canary: str
    worse: dict[str, Literal["canary", "stable"]]


def example_of(pair: ShadowPair, results: Mapping[str, Comparison]) -> PairExample | None:
    """The pair as an example, if any comparator found a side worse."""
    worse: dict[str, Literal["canary", "stable"]] = {
        name: result for name, result in results.items() if result == "canary" or result == "stable"
    }
    if not worse:
        return None

    def shown(answer: Answer) -> str:
        return _clip(answer.text if answer.error is None else f"[error] {answer.error}")

    return PairExample(
        prompt=_clip(_prompt(pair.request)), stable=shown(pair.stable), canary=shown(pair.canary), worse=worse
    )


def _prompt(request: Mapping[str, Any]) -> str:
    """The last chat message's content, or the completion prompt, as JSON text."""
    messages = request.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        return json.dumps(messages[-1].get("content"), ensure_ascii=False)
    return json.dumps(request.get("prompt"), ensure_ascii=False)


class PairOutcome(NamedTuple):
    """What the ingress ships for one compared pair (no texts unless it is an example)."""

    window: str
    results: dict[str, Comparison]
    example: PairExample | None


class ComparatorCounts(BaseModel):
    canary_worse: int = 0
    stable_worse: int = 0
    same: int = 0
    failed: int = 0

    @property
    def pairs(self) -> int:
        """Pairs the comparator read (those it failed on are not pairs of its)."""
        return self.canary_worse + self.stable_worse + self.same


class ShadowTally(BaseModel):
    """One window's compared pairs: per comparator, how often each side was worse."""

    pairs: int = 0
    comparators: dict[str, ComparatorCounts] = {}
    examples: list[PairExample] = []

    def add(self, outcomes: Iterable[PairOutcome]) -> None:
        kept = deque(self.examples, maxlen=EXAMPLES)
        for outcome in outcomes:
            self.pairs += 1
            for name, result in outcome.results.items():
                counts = self.comparators.setdefault(name, ComparatorCounts())
                field = {"canary": "canary_worse", "stable": "stable_worse"}.get(result, result)
                setattr(counts, field, getattr(counts, field) + 1)
            if outcome.example is not None:
                kept.append(outcome.example)
        self.examples = list(kept)
