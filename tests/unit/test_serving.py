"""The serving path in-process: routing, failover, relaying batches and what gets recorded,
against the simulated model server itself (the same object Serve runs as a replica)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from serve_canary import openai_api
from serve_canary.engines.simulated import SimulatedServer
from serve_canary.metrics import RequestRecord
from serve_canary.openai_api import OpenAIError
from serve_canary.routing import Arm, RoutingTable
from serve_canary.serving import ArmEndpoint, Kind, ReplicaLost, Served, serve_request

MODELS: dict[Kind, Any] = {"chat": openai_api.ChatCompletionRequest, "completions": openai_api.CompletionRequest}
FAST = {"ttft_ms": 5, "itl_ms": 2, "output_tokens": 6, "jitter": 0.0}


def table(weight: float) -> RoutingTable:
    return RoutingTable(1, "r1", "r1/a1/w0", "salt", weight, "v1", "v2", "init", "running")


class Opened:
    """Counts what the arm was asked and whether each call ran to its end or was closed; asks
    for the replica's receipt stamp as the ingress does. `wait_s`: how long a call takes to
    reach the replica (Serve's router holding it while the arm's replicas are busy).
    `end_wait_s` and `lost_at_end`: the end of the stream, after its last item, arrives late
    (a busy node) or not at all (the node is lost: Ray raises instead). `lost_calls`: the first
    calls die with their replica before they answer."""

    def __init__(
        self,
        server: SimulatedServer,
        wait_s: float = 0.0,
        end_wait_s: float = 0.0,
        lost_at_end: bool = False,
        lost_calls: int = 0,
    ) -> None:
        self.server, self.calls, self.closed_early, self.wait_s = server, 0, 0, wait_s
        self.end_wait_s, self.lost_at_end, self.lost_calls = end_wait_s, lost_at_end, lost_calls

    def __call__(self, kind: Kind, request: Any):
        self.calls += 1
        return self._run(kind, request, lost=self.calls <= self.lost_calls)

    async def _run(self, kind: Kind, request: Any, lost: bool):
        await asyncio.sleep(self.wait_s)
        if lost:
            raise ReplicaLost("ActorUnavailableError: Actor is unavailable.")
        stream = getattr(self.server, kind)(request, stamp=True)
        finished = False
        try:
            async for item in stream:
                yield item
            await asyncio.sleep(self.end_wait_s)
            if self.lost_at_end:
                raise ConnectionError("the node holding the replica was lost")
            finished = True
        finally:
            if not finished:
                self.closed_early += 1
            await stream.aclose()


def arms(
    canary: dict | None = None, stable: dict | None = None, canary_wait_s: float = 0.0, **stable_end: Any
) -> dict[Arm, ArmEndpoint]:
    made = {}
    for name, version, extra in (("stable", "v1", stable), ("canary", "v2", canary)):
        server = SimulatedServer(f"model-{version}", {**FAST, **(extra or {})})
        opened = Opened(server, canary_wait_s) if name == "canary" else Opened(server, **stable_end)
        made[name] = ArmEndpoint(name, version, f"model-{version}", MODELS, opened)
    return made


async def call(
    body: dict, weight: float = 0.0, failover: bool = True, kind: Kind = "chat", endpoints=None, records=None
):
    """Serve one request; `records`, if given, keeps what was recorded when the call raises."""
    records = [] if records is None else records
    endpoints = endpoints or arms()
    served = await serve_request(
        kind, body, "user-1", table(weight), endpoints, records.append, request_id="rid", failover=failover
    )
    return served, records


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "public", "messages": [{"role": "user", "content": "hello canary"}], **extra}


async def drain(served: Served) -> list[str]:
    assert served.stream is not None
    return [block async for block in served.stream]


def sse_events(blocks: list[str]) -> list[str]:
    return [e for block in blocks for e in block.split("\n\n") if e]


async def test_unary_answer_is_the_arms_body_and_one_ok_record():
    served, records = await call(chat(max_tokens=4))
    assert (served.arm, served.version) == ("stable", "v1")
    assert served.body["model"] == "model-v1" and served.body["id"] == "chatcmpl-rid"
    assert served.body["choices"][0]["finish_reason"] == "length"
    assert served.body["serve_canary"] == {"arm": "stable", "version": "v1", "table_version": 1}
    [record] = records
    assert (record.arm, record.outcome, record.output_tokens, record.prompt_tokens) == ("stable", "ok", 4, 3)
    assert record.request_id == served.request_id == served.body["id"]  # what feedback names
    assert record.ttft_s is not None and record.e2e_s >= record.ttft_s


async def test_stream_relays_batches_whole_and_strips_usage_the_client_did_not_ask_for():
    served, records = await call(chat(stream=True), weight=1.0)
    blocks = await drain(served)
    assert served.arm == "canary"
    events = sse_events(blocks)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["choices"] for c in chunks), "the usage chunk the ingress asked for must not reach the client"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert len(text.split()) == FAST["output_tokens"]
    assert len(blocks) < len(events)  # batches, not one message per token
    [record] = records
    assert (record.outcome, record.output_tokens, record.error_kind) == ("ok", 6, None)
    assert record.itl_s is not None and record.itl_s > 0


async def test_stream_keeps_usage_when_the_client_asked():
    served, records = await call(chat(stream=True, stream_options={"include_usage": True}))
    events = sse_events(await drain(served))
    usage_chunk = json.loads(events[-2][6:])
    assert usage_chunk["usage"]["completion_tokens"] == records[0].output_tokens == 6


async def test_canary_failure_before_first_token_fails_over_and_is_held_against_the_canary():
    served, records = await call(chat(), weight=1.0, endpoints=arms(canary={"error_rate": 1.0}))
    assert served.arm == "stable"
    assert [(r.arm, r.outcome, r.error_kind) for r in records] == [
        ("canary", "error", "before_first_token"),
        ("stable", "failover", None),  # the canary's error, not a stable request
    ]


async def test_when_stable_fails_the_canary_request_too_no_answer_is_recorded():
    """Only an answer is a `failover`; stable's own failure is its error (and the client's 502)."""
    records: list[RequestRecord] = []
    with pytest.raises(OpenAIError) as failure:
        await call(chat(), 1.0, endpoints=arms(canary={"error_rate": 1.0}, stable={"error_rate": 1.0}), records=records)
    assert failure.value.status == 502
    assert [(r.arm, r.outcome) for r in records] == [("canary", "error"), ("stable", "error")]


async def test_a_stable_call_whose_replica_is_lost_is_made_once_more():
    endpoints = arms(lost_calls=1)
    served, records = await call(chat(), endpoints=endpoints)
    assert served.arm == "stable" and served.body is not None and endpoints["stable"].open.calls == 2
    assert [(r.arm, r.outcome, r.error_kind) for r in records] == [
        ("stable", "error", "unavailable"),
        ("stable", "ok", None),
    ]


async def test_a_replica_lost_twice_is_a_502_not_a_loop():
    endpoints = arms(lost_calls=2)
    with pytest.raises(OpenAIError) as failure:
        await call(chat(), endpoints=endpoints)
    assert failure.value.status == 502 and "unavailable" in failure.value.message
    assert endpoints["stable"].open.calls == 2


async def test_a_lost_canary_replica_fails_over_to_stable_at_once():
    endpoints = arms()
    lost = Opened(SimulatedServer("model-v2", FAST), lost_calls=1)
    endpoints["canary"] = ArmEndpoint("canary", "v2", "model-v2", MODELS, lost)
    served, records = await call(chat(), 1.0, endpoints=endpoints)
    assert served.arm == "stable" and lost.calls == 1
    assert [(r.arm, r.outcome, r.error_kind) for r in records] == [
        ("canary", "error", "unavailable"),
        ("stable", "failover", None),
    ]


async def test_without_failover_the_failure_is_a_502():
    with pytest.raises(OpenAIError) as failure:
        await call(chat(), weight=1.0, failover=False, endpoints=arms(canary={"error_rate": 1.0}))
    assert failure.value.status == 502 and "v2" in failure.value.message


async def test_a_client_error_from_the_arm_is_relayed_and_not_held_against_it():
    endpoints = arms(canary={"max_model_len": 8})
    with pytest.raises(OpenAIError) as failure:
        await call(chat(max_tokens=7), weight=1.0, endpoints=endpoints)
    assert failure.value.status == 400 and "context length" in failure.value.message
    assert endpoints["stable"].open.calls == 0  # never failed over


async def test_a_client_error_is_recorded_as_rejected():
    endpoints = arms(canary={"max_model_len": 8})
    records: list[RequestRecord] = []
    with pytest.raises(OpenAIError):
        await serve_request(
            "chat", chat(max_tokens=7), "k", table(1.0), endpoints, records.append, request_id="x", failover=True
        )
    assert [(r.arm, r.outcome) for r in records] == [("canary", "rejected")]


async def test_fields_the_arm_cannot_honour_are_a_400_before_any_call():
    endpoints = arms()
    with pytest.raises(OpenAIError) as failure:
        await call(chat(response_format={"type": "json_object"}), endpoints=endpoints)
    assert failure.value.status == 400 and failure.value.param == "response_format"
    assert endpoints["stable"].open.calls == 0


async def test_midstream_error_reaches_the_client_and_is_recorded():
    served, records = await call(chat(stream=True), endpoints=arms(stable={"midstream_error_rate": 1.0}))
    events = sse_events(await drain(served))
    assert any(e.startswith('data: {"error"') for e in events)
    assert (records[0].outcome, records[0].error_kind) == ("error", "midstream")


async def test_a_client_that_goes_away_cancels_the_generation_and_is_recorded_cancelled():
    endpoints = arms(stable={"output_tokens": 200, "itl_ms": 5})
    served, records = await call(chat(stream=True), endpoints=endpoints)
    assert served.stream is not None
    await served.stream.__anext__()
    await served.stream.aclose()
    assert endpoints["stable"].open.closed_early == 1
    [record] = records
    assert record.outcome == "cancelled" and record.output_tokens < 200


async def test_a_client_that_leaves_after_the_last_event_got_a_whole_answer_not_a_cancelled_one():
    # OpenAI's SDK closes the connection on `[DONE]`, before the arm's stream has ended.
    served, records = await call(chat(stream=True), endpoints=arms(end_wait_s=0.5))
    assert served.stream is not None
    async for block in served.stream:
        if block.endswith("data: [DONE]\n\n"):
            break
    await served.stream.aclose()
    [record] = records
    assert (record.outcome, record.output_tokens) == ("ok", FAST["output_tokens"])


async def test_an_arm_lost_after_its_unary_answer_does_not_fail_the_answer():
    served, records = await call(chat(max_tokens=4), endpoints=arms(lost_at_end=True))
    assert served.body["choices"][0]["finish_reason"] == "length"
    assert [(r.outcome, r.output_tokens) for r in records] == [("ok", 4)]


async def test_text_completions_are_served_the_same_way():
    served, records = await call({"model": "public", "prompt": "once upon", "max_tokens": 3}, kind="completions")
    assert len(served.body["choices"][0]["text"].split()) == 3 and served.body["id"] == "cmpl-rid"
    assert records[0].output_tokens == 3


@pytest.mark.parametrize("body", [[], "x", {"messages": []}, {"model": 3}, {"model": "public", "stream": "yes"}])
async def test_malformed_bodies_are_400s(body):
    with pytest.raises(OpenAIError) as failure:
        await call(body)
    assert failure.value.status == 400


async def test_a_forced_arm_serves_whatever_the_weight_without_failover_and_is_marked():
    records: list[RequestRecord] = []
    served = await serve_request(
        "chat", chat(), "qa", table(0.0), arms(), records.append, request_id="f", failover=True, forced="canary"
    )
    assert (served.arm, served.unit) == ("canary", None)
    assert [(r.arm, r.outcome, r.origin) for r in records] == [("canary", "ok", "tester")]
    with pytest.raises(OpenAIError) as failed:  # a tester sees the canary's failure, not stable's answer
        await serve_request(
            "chat",
            chat(),
            "qa",
            table(0.0),
            arms(canary={"error_rate": 1.0}),
            records.append,
            request_id="g",
            failover=True,
            forced="canary",
        )
    assert failed.value.status == 502 and records[-1].origin == "tester"


def test_the_canarys_first_item_deadline_is_the_floor_until_stable_itself_is_slow():
    from serve_canary.serving import FirstItemDeadline

    deadline = FirstItemDeadline(floor_s=1.0)
    assert deadline.seconds == 1.0
    for _ in range(50):
        deadline.observe(0.05)  # a healthy stable: the floor holds
    assert deadline.seconds == 1.0
    for _ in range(50):
        deadline.observe(3.0)  # the cluster is loaded: stable's users wait 3 s for a first token
    assert deadline.seconds > 3.0
    for _ in range(100):
        deadline.observe(0.05)  # and back
    assert deadline.seconds == 1.0


@pytest.mark.parametrize("stream", [False, True])
async def test_the_wait_to_reach_a_replica_is_recorded_apart_and_the_stamp_never_reaches_the_client(stream):
    served, records = await call(chat(stream=stream), weight=1.0, endpoints=arms(canary_wait_s=0.2))
    if stream:
        assert all(event.startswith("data: ") for event in sse_events(await drain(served)))
    else:
        assert served.body["choices"][0]["message"]["content"]
    [record] = records
    assert record.queue_s is not None and 0.2 <= record.queue_s <= record.ttft_s
    assert record.ttft_s - record.queue_s < 0.1  # the engine's 5 ms, not the wait


@pytest.mark.parametrize("stream", [False, True])
async def test_the_wait_in_the_engines_own_queue_is_queueing_not_the_models_time(stream):
    """One request at a time in the canary's engine (vLLM's `max_num_seqs`): the second of two
    concurrent requests waits there for the first, and reports it as vLLM does."""
    endpoints = arms(canary={"max_num_seqs": 1, "ttft_ms": 5, "itl_ms": 20, "output_tokens": 11})
    records: list[RequestRecord] = []

    async def one(request_id: str) -> None:
        served = await serve_request(
            "chat",
            chat(stream=stream),
            "user-1",
            table(1.0),
            endpoints,
            records.append,
            request_id=request_id,
            failover=True,
        )
        if stream:
            await drain(served)

    await asyncio.gather(one("first"), one("second"))
    first, second = sorted(records, key=lambda record: record.ttft_s)
    generation_s = 0.005 + 10 * 0.020
    assert first.queue_s is not None and first.queue_s < 0.05
    assert second.queue_s is not None and generation_s * 0.9 <= second.queue_s <= second.ttft_s
    assert second.e2e_s - second.queue_s < generation_s + 0.1  # the model's own time, not the wait
    if stream:
        assert second.ttft_s - second.queue_s < 0.1  # the engine's 5 ms to its first token
