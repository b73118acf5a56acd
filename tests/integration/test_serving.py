"""The serving path on a real local Ray cluster, through Serve's HTTP proxy and handles."""

from __future__ import annotations

import json

import pytest
import ray
from openai import OpenAI

from serve_canary.routing import RoutingTable

from .conftest import ADMIN_TOKEN, HOLD, OUTPUT_TOKENS, app_args, serve_canary_cli, wait_for

pytestmark = pytest.mark.integration


def test_openai_client_gets_completions_with_arm_headers(held_app):
    app = held_app
    client = OpenAI(base_url=f"{app.url}/v1", api_key="unused")
    raw = client.chat.completions.with_raw_response.create(
        model="test-llm", messages=[{"role": "user", "content": "hi"}], max_tokens=4, extra_headers={"x-user-id": "ada"}
    )
    completion = raw.parse()
    assert raw.headers["x-serve-canary-arm"] in ("stable", "canary")
    assert raw.headers["x-serve-canary-version"] == {"stable": "v1", "canary": "v2"}[raw.headers["x-serve-canary-arm"]]
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 4 and completion.usage.prompt_tokens == 2  # "hi" plus one per message

    stream = client.chat.completions.create(
        model="test-llm",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == OUTPUT_TOKENS
    assert chunks[-1].usage.completion_tokens == OUTPUT_TOKENS
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"

    completion = client.completions.create(model="test-llm", prompt="once upon", max_tokens=3)
    assert len(completion.choices[0].text.split()) == 3
    assert [m.id for m in client.models.list()] == ["test-llm"]


def test_sse_stream_ends_with_done_and_carries_headers(held_app):
    app = held_app
    with app.http.stream(
        "POST",
        "/v1/completions",
        json={"model": "test-llm", "prompt": "x", "stream": True},
        headers={"x-user-id": "u1"},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-serve-canary-arm"] in ("stable", "canary")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-1]]
    assert all(chunk["object"] == "text_completion" and chunk["choices"] for chunk in chunks)


def test_bad_requests_get_openai_error_bodies(held_app):
    app = held_app
    missing = app.http.post("/v1/chat/completions", json={"model": "test-llm"})
    assert missing.status_code == 400
    assert missing.json()["error"]["param"] == "messages"
    assert missing.json()["error"]["type"] == "invalid_request_error"
    not_json = app.http.post("/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]["message"]
    wrong_model = app.chat(model="gpt-17")
    assert wrong_model.status_code == 404 and wrong_model.json()["error"]["code"] == "model_not_found"
    bad_temperature = app.chat(temperature=7)
    assert bad_temperature.status_code == 400 and bad_temperature.json()["error"]["param"] == "temperature"


def test_fixed_user_always_gets_the_same_arm(deploy):
    app = deploy(app_args(rollout=HOLD), ingress_replicas=2)
    ray.get(app.controller.set_weight.remote(0.5))
    wait_for(lambda: app.chat(user="probe").json()["serve_canary"]["table_version"] >= 2, 5, "new table")
    for user in ("alice", "bob", "carol", "dave"):
        arms = {app.chat(user=user).headers["x-serve-canary-arm"] for _ in range(12)}
        assert len(arms) == 1, f"{user} saw {arms}"


def test_handle_methods_return_openai_dicts_and_stream_chunks(held_app):
    app = held_app
    body = {"model": "test-llm", "messages": [{"role": "user", "content": "hi"}], "user": "ada"}
    response = app.handle.chat.remote(body).result()
    assert response["object"] == "chat.completion" and response["usage"]["completion_tokens"] == OUTPUT_TOKENS
    blocks = list(app.handle.options(stream=True).chat.remote({**body, "stream": True}))
    assert len(blocks) < OUTPUT_TOKENS  # one SSE block per batch, not one message per token
    events = [e for block in blocks for e in block.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert {c["model"] for c in chunks} == {response["model"]}  # the same arm: sticky by `user`
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == response["choices"][0]["message"]["content"]
    text = app.handle.completions.remote({"model": "test-llm", "prompt": "a b c", "max_tokens": 2}).result()
    assert text["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def _replica_views(app, count: int = 40) -> dict[str, dict]:
    """The table each ingress replica routes by, keyed by replica id (Serve spreads calls)."""
    views = {}
    for _ in range(count):
        status = app.status()
        views[status["replica"]["id"]] = status["replica"]
    return views


def _both_replica_views(app) -> dict[str, dict] | None:
    views = _replica_views(app)
    return views if len(views) == 2 else None


def test_set_weight_reaches_both_replicas_within_a_second_without_redeploy(deploy, cluster):
    app = deploy(app_args(rollout=HOLD), ingress_replicas=2)
    before = wait_for(lambda: _both_replica_views(app), 10, "two replicas")
    cli = serve_canary_cli("--address", cluster["gcs_address"], "--app", app.name, "--json", "set-weight", "0.5")
    assert cli.returncode == 0, cli.stderr
    answer = json.loads(cli.stdout)
    assert answer["canary_weight"] == 0.5
    committed_at = answer["events"][-1]["at"]

    def both_replicas_moved():
        views = _both_replica_views(app)
        return views if views and all(v["canary_weight"] == 0.5 for v in views.values()) else None

    # Each replica says when it adopted the table: no polling of ours is in the figure.
    moved = wait_for(both_replicas_moved, 10, "both replicas to route at weight 0.5")
    assert all(view["table_adopted_at"] - committed_at < 1.0 for view in moved.values()), moved
    assert {v["canary_weight"] for v in before.values()} == {0.05}

    # Each replica routes every user exactly as the new table says (the router is deterministic).
    table = RoutingTable(
        1, answer["rollout_id"], answer["window"], answer["rollout_id"], 0.5, "v1", "v2", "p", "paused"
    )
    served_by: dict[str, int] = {}
    for i in range(400):
        body = {"model": "test-llm", "prompt": "x", "max_tokens": 1, "user": f"user-{i}"}
        served = app.handle.completions.remote(body).result()["serve_canary"]
        assert served["arm"] == table.arm_for(f"user-{i}"), (i, served)
        served_by[served["replica"]] = served_by.get(served["replica"], 0) + 1
    assert len(served_by) == 2 and 0.4 < sum(table.arm_for(f"user-{i}") == "canary" for i in range(400)) / 400 < 0.6
    after = _both_replica_views(app)
    assert {v["actor_id"] for v in after.values()} == {v["actor_id"] for v in before.values()}, (
        "weights must change without restarting replicas"
    )


def test_canary_failing_before_first_token_fails_over_to_stable(deploy):
    app = deploy(app_args(canary_engine={"error_rate": 1.0}, rollout=HOLD))
    window_id = ray.get(app.controller.set_weight.remote(0.5)).window
    wait_for(lambda: app.chat(user="probe").json()["serve_canary"]["table_version"] >= 2, 5, "new table")
    responses = [app.chat(user=f"user-{i}") for i in range(60)]
    assert all(r.status_code == 200 for r in responses)
    assert {r.headers["x-serve-canary-arm"] for r in responses} == {"stable"}

    def recorded():
        window = app.window(window_id)
        return window if window["canary"].errors >= 15 else None

    window = wait_for(recorded, 5, "canary failures recorded")
    assert window["canary"].errors == window["canary"].requests
    assert window["canary"].error_kinds["before_first_token"] == window["canary"].errors
    assert window["stable"].errors == 0


def test_without_failover_canary_failures_reach_the_client(deploy):
    app = deploy(app_args(canary_engine={"error_rate": 1.0}, rollout=HOLD, failover=False))
    ray.get(app.controller.set_weight.remote(1.0))
    wait_for(lambda: app.chat(user="probe").status_code == 502, 5, "canary-only routing")
    error = app.chat(user="someone").json()["error"]
    assert error["type"] == "server_error" and "v2" in error["message"]


def test_admin_routes_need_the_token(deploy):
    app = deploy(app_args(rollout=HOLD))
    assert app.http.get("/-/canary/status").status_code == 200
    assert app.http.put("/-/canary/weight", json={"weight": 0.3}).status_code == 401
    wrong = app.http.put("/-/canary/weight", json={"weight": 0.3}, headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    assert app.admin("PUT", "weight", json={"weight": 3}).status_code == 400
    moved = app.admin("PUT", "weight", json={"weight": 0.3})
    assert moved.status_code == 200 and moved.json()["canary_weight"] == 0.3 and moved.json()["status"] == "paused"
    assert app.admin("POST", "resume").json()["canary_weight"] == 0.05
    assert app.admin("POST", "approve").status_code == 409


def test_admin_routes_are_refused_when_no_token_is_configured(deploy):
    app = deploy(app_args(rollout=HOLD), ingress_env={"SERVE_CANARY_ADMIN_TOKEN": ""})
    refused = app.admin("POST", "pause")
    assert refused.status_code == 403 and "SERVE_CANARY_ADMIN_TOKEN" in refused.json()["error"]["message"]
    assert app.status()["status"] == "running"
    assert ADMIN_TOKEN not in refused.text


def test_testers_pick_an_arm_with_the_admin_token_or_a_listed_key_and_are_never_judged(deploy):
    app = deploy(app_args(rollout=HOLD, routing={"testers": ["qa-1"]}))
    window = app.status()["window"]
    chat = {"model": app.model, "messages": [{"role": "user", "content": "hi"}]}

    def post(headers: dict[str, str]):
        return app.http.post("/v1/chat/completions", json=chat, headers=headers)

    listed = post({"x-user-id": "qa-1", "x-serve-canary-force": "canary"})
    assert listed.status_code == 200 and listed.headers["x-serve-canary-arm"] == "canary"
    assert listed.json()["serve_canary"]["forced"] and "x-serve-canary-feedback-token" not in listed.headers
    admin = post({"x-user-id": "someone", "x-serve-canary-force": "canary", "authorization": f"Bearer {ADMIN_TOKEN}"})
    assert admin.status_code == 200 and admin.headers["x-serve-canary-arm"] == "canary"
    refused = post({"x-user-id": "someone", "x-serve-canary-force": "canary"})
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
    wrong = post({"x-user-id": "qa-1", "x-serve-canary-force": "blue"})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "x-serve-canary-force"
    forced_line = 'serve_canary_forced_requests_total{arm="canary",model="test-llm",outcome="ok",version="v2"} 2.0'
    wait_for(lambda: forced_line in app.http.get("/metrics").text, 10, "the forced requests exported")
    assert app.window(window)["canary"].requests == 0  # the judge never saw them
