"""The findings of the reliability and security review, each as the behaviour a user relies
on: nobody can force a rollback, no state file kills the controller, no input gets a 500, a
silent canary does not stall its users, a lost stable replica costs its users no request, a
restarted collector republishes the rollout."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put

from serve_canary.controller import NAMESPACE, collector_name

from .conftest import HOLD, app_args, background_traffic, wait_for

pytestmark = pytest.mark.integration


def feedback(app, request_id: str, token: str | None, **fields) -> httpx.Response:
    body = {"request_id": request_id, **({"feedback_token": token} if token is not None else {}), **fields}
    return app.http.post("/-/canary/feedback", json=body)


def answers(app, count: int) -> dict[str, list[tuple[str, str]]]:
    """(request id, feedback token) of `count` answers, by the arm that gave them."""
    by_arm: dict[str, list[tuple[str, str]]] = {"stable": [], "canary": []}
    for i in range(count):
        body = app.chat(user=f"attacker-{i}").json()
        by_arm[body["serve_canary"]["arm"]].append((body["id"], body["serve_canary"]["feedback_token"]))
    return by_arm


def test_an_anonymous_client_cannot_force_a_rollback_with_feedback(deploy):
    # The review's attack: hold one canary and one stable answer, then post "hallucinated" on
    # the canary one and "fine" on the stable one over and over (it rolled back after 52 posts).
    app = deploy(app_args(rollout={**HOLD, "interval_s": 0.5}))
    app.admin("PUT", "weight", json={"weight": 0.5})
    by_arm = answers(app, 40)
    (canary_id, canary_token), (stable_id, stable_token) = by_arm["canary"][0], by_arm["stable"][0]
    outcomes = []
    for _ in range(26):
        outcomes.append(feedback(app, canary_id, canary_token, hallucination=True).status_code)
        outcomes.append(feedback(app, stable_id, stable_token, hallucination=False).status_code)
    assert outcomes[:2] == [200, 200] and set(outcomes[2:]) == {409}
    assert feedback(app, canary_id, None, hallucination=True).status_code == 400  # no token
    assert feedback(app, by_arm["canary"][1][0], stable_token, hallucination=True).status_code == 403  # not its token
    forged = canary_token.split(".")[0] + ".AAAA"
    assert feedback(app, canary_id, forged, hallucination=True).status_code == 403
    status = app.evaluations(3)
    assert status["status"] == "paused" and status["arms"]["canary"]["hallucinations"] == 1


def rating_sums(app) -> dict[str, float]:
    """The exported sum of ratings, per series (arm and version)."""
    lines = app.http.get("/metrics").text.splitlines()
    series = (line.rsplit(" ", 1) for line in lines if line.startswith("serve_canary_feedback_rating_sum_total"))
    return {labels: float(value) for labels, value in series}


@pytest.mark.parametrize("rating", [-5, 6, "NaN", "Infinity", "1e999"])
def test_a_bad_rating_is_a_400_and_changes_nothing(held_app, rating):
    app = held_app
    before = rating_sums(app)
    body = app.chat(user="u").json()
    request_id, token = body["id"], body["serve_canary"]["feedback_token"]
    raw = f'{{"request_id": "{request_id}", "feedback_token": "{token}", "rating": {rating}}}'
    response = app.http.post("/-/canary/feedback", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "rating", response.text
    assert feedback(app, request_id, token, rating=4).status_code == 200  # the request can still be rated once
    added = {labels: total - before.get(labels, 0.0) for labels, total in rating_sums(app).items()}
    assert sorted(added.values()) == [0.0] * (len(added) - 1) + [4.0]


class FileState:
    """The file store's document of an app, as an operator would damage and restore it."""

    def __init__(self, tmp_path, app_name: str = "") -> None:
        self.uri, self.path = f"file://{tmp_path}", tmp_path / f"{app_name}.json"
        self.location = str(self.path)

    def read(self) -> bytes:
        return self.path.read_bytes()

    def write(self, raw: bytes) -> None:
        self.path.write_bytes(raw)


class GcsState:
    """The GCS store's document of an app."""

    def __init__(self, tmp_path, app_name: str = "") -> None:
        self.uri, self.key = "gcs", f"rollout/{app_name}".encode()
        self.location = f"gcs://serve_canary/rollout/{app_name}"

    def read(self) -> bytes:
        return _internal_kv_get(self.key, namespace="serve_canary")

    def write(self, raw: bytes) -> None:
        _internal_kv_put(self.key, raw, overwrite=True, namespace="serve_canary")


@pytest.mark.parametrize("store", [FileState, GcsState])
def test_a_damaged_stored_state_is_a_state_error_not_a_dead_controller(deploy, tmp_path, store):
    app = deploy(app_args(state_store=store(tmp_path).uri, rollout=HOLD))
    stored = store(tmp_path, app.name)
    app.admin("PUT", "weight", json={"weight": 0.3})
    good = stored.read()
    stored.write(b'{"config": {"model_name": ')
    ray.kill(app.controller, no_restart=False)  # it restarts and reads the damaged state
    damaged = wait_for(
        lambda: (
            (s := app.http.get("/-/canary/status")).status_code == 200
            and s.json()["status"] == "state_error"
            and s.json()
        ),
        30,
        "a state_error status",
    )
    assert stored.location in damaged["waiting_for"] and damaged["canary_weight"] == 0.0
    wait_for(lambda: app.chat(user="probe").headers["x-serve-canary-arm"] == "stable", 10, "stable-only routing")
    assert all(app.chat(user=f"user-{i}").status_code == 200 for i in range(20))
    refused = app.admin("PUT", "weight", json={"weight": 0.5})
    assert refused.status_code == 409 and "cannot be read" in refused.json()["error"]["message"]
    assert stored.read() == b'{"config": {"model_name": '  # never overwritten
    stored.write(good)  # the operator puts a good state back
    back = wait_for(lambda: (s := app.status())["events"][-1]["action"] == "state_recovered" and s, 30, "recovery")
    assert (back["status"], back["canary_weight"], back["events"][-1]["action"]) == ("paused", 0.3, "state_recovered")


BAD_BODIES = st.one_of(
    st.binary(max_size=200),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
        max_leaves=30,
    ).map(lambda value: json.dumps(value).encode()),
    st.fixed_dictionaries(
        {"model": st.just("test-llm")},
        optional={
            "messages": st.lists(
                st.fixed_dictionaries(
                    {"role": st.sampled_from(["user", "system", "tool", 3])},
                    optional={
                        "content": st.one_of(
                            st.text(),
                            st.integers(),
                            st.none(),
                            st.lists(
                                st.dictionaries(
                                    st.sampled_from(["type", "text"]), st.one_of(st.text(), st.integers(), st.none())
                                )
                            ),
                        )
                    },
                ),
                max_size=3,
            ),
            "prompt": st.one_of(st.text(), st.lists(st.text()), st.integers()),
            "max_tokens": st.one_of(st.integers(-5, 5), st.floats(), st.text()),
            "stream": st.one_of(st.booleans(), st.text()),
            "request_id": st.text(),
            "feedback_token": st.text(),
            "rating": st.floats(allow_nan=True),
        },
    ).map(lambda value: json.dumps(value).encode()),
    st.integers(1_000, 20_000).map(lambda depth: b"[" * depth + b"]" * depth),
)


def test_no_malformed_body_gets_a_5xx_on_any_post_route(held_app):
    app = held_app
    statuses: dict[int, int] = {}

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(route=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/-/canary/feedback"]), raw=BAD_BODIES)
    def post(route: str, raw: bytes) -> None:
        response = app.http.post(route, content=raw, headers={"content-type": "application/json"})
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, (route, raw[:200], response.text[:300])
        if response.status_code >= 400:
            assert set(response.json()["error"]) >= {"message", "type"}

    post()
    print("fuzzed statuses:", dict(sorted(statuses.items())))
    huge = app.http.post(
        "/v1/chat/completions", content=b"x" * (5 * 1024 * 1024), headers={"content-type": "application/json"}
    )
    assert huge.status_code == 413
    many = [{"role": "user", "content": "hi"}] * 2049
    too_many = app.http.post("/v1/chat/completions", json={"model": "test-llm", "messages": many})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "messages"
    assert app.chat(user="after").status_code == 200  # alive


def test_a_silent_canary_fails_over_to_stable_and_counts_as_unavailable(deploy):
    app = deploy(app_args(canary_engine={"ttft_ms": 20_000}, rollout=HOLD, canary_first_token_timeout_s=0.5))
    app.admin("PUT", "weight", json={"weight": 1.0})
    wait_for(lambda: app.chat(user="probe").json()["serve_canary"]["table_version"] >= 2, 10, "the new table")
    answered = [app.chat(user=f"u{i}") for i in range(5)]
    assert [(r.status_code, r.headers["x-serve-canary-arm"]) for r in answered] == [(200, "stable")] * 5
    assert all(r.elapsed.total_seconds() < 3.0 for r in answered)  # not 20 s behind the canary
    status = app.evaluations(2)
    assert status["arms"]["canary"]["error_kinds"].get("unavailable", 0) >= 5


def test_a_collector_restart_mid_window_keeps_the_judges_evidence_and_judges_a_new_window(deploy):
    app = deploy(app_args(rollout={**HOLD, "interval_s": 0.5}))
    with background_traffic(app) as outcomes:
        judged = wait_for(
            lambda: (s := app.status())["last_verdict"] and s["last_verdict"]["canary_requests"] > 0 and s,
            30,
            "a verdict on canary traffic",
        )
        ray.kill(ray.get_actor(collector_name(app.name), namespace=NAMESPACE), no_restart=False)
        reopened = wait_for(lambda: (s := app.status())["events"][-1]["action"] == "reopen_window" and s, 30, "reopen")
    assert reopened["window"] != judged["window"] and reopened["status"] == "running"
    assert "collector" in reopened["events"][-1]["reason"]
    assert set(outcomes) == {"200"}


def test_a_restarted_collector_republishes_the_rollout_gauges(deploy):
    app = deploy(app_args(rollout=HOLD))
    app.admin("POST", "rollback")  # terminal: nothing is judged, the gauges must still come back
    weight_line = 'serve_canary_canary_weight{model="test-llm"} 0.0'
    wait_for(lambda: weight_line in app.http.get("/metrics").text, 10, "the weight gauge")
    ray.kill(ray.get_actor(collector_name(app.name), namespace=NAMESPACE), no_restart=False)
    wait_for(lambda: weight_line in app.http.get("/metrics").text, 30, "the gauge after the restart")
    assert 'serve_canary_rollout_status{model="test-llm",status="rolled_back"} 1.0' in app.http.get("/metrics").text


def test_when_stable_is_as_slow_the_canary_is_waited_for_not_failed_over(deploy):
    """Both arms take 1.5 s to a first token (long prompts, a loaded cluster): beyond the 0.5 s
    floor, but stable's users wait as long, so failing over would only add load and count it
    as the canary's error. Once stable's first tokens have been seen, the canary is waited for."""
    slow = {"ttft_ms": 1500}
    app = deploy(app_args(slow, slow, rollout=HOLD, canary_first_token_timeout_s=0.5))
    app.admin("PUT", "weight", json={"weight": 0.5})
    wait_for(lambda: app.chat(user="probe").json()["serve_canary"]["table_version"] >= 2, 10, "the new table")

    def wave(name: str) -> list[str]:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda i: app.chat(user=f"{name}-{i}"), range(16)))
        assert {r.status_code for r in answers} == {200}
        return [r.headers["x-serve-canary-arm"] for r in answers]

    wave("first")  # stable's first tokens are seen (canary requests may still fail over)
    assert "canary" in wave("second") + wave("third")


def test_requests_on_a_lost_stable_replica_wait_for_its_replacement_instead_of_failing(deploy):
    """Stable has nowhere to fail over to: a call its only replica took down with it is made
    once more, and Serve holds it until the replacement runs. Before: a 502 for each."""
    app = deploy(app_args(stable_engine={"ttft_ms": 2000}, rollout=HOLD))
    app.admin("PUT", "weight", json={"weight": 0.0})
    wait_for(lambda: app.chat(user="probe").json()["serve_canary"]["table_version"] >= 2, 10, "the new table")
    [name] = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{app.name}#stable#")
    ]
    replica = ray.get_actor(name, namespace="serve")
    with httpx.Client(base_url=app.url, timeout=120.0) as http, ThreadPoolExecutor(4) as pool:
        body = {"model": app.model, "messages": [{"role": "user", "content": "hi"}]}
        answers = [
            pool.submit(http.post, "/v1/chat/completions", json=body, headers={"x-user-id": f"u{i}"}) for i in range(4)
        ]
        wait_for(lambda: ray.get(replica.get_num_ongoing_requests.remote()) == 4, 30, "4 requests at the replica")
        ray.kill(replica, no_restart=True)
        answered = [future.result() for future in answers]
    assert [(r.status_code, r.headers.get("x-serve-canary-arm")) for r in answered] == [(200, "stable")] * 4
    status = app.evaluations(2)
    assert status["arms"]["stable"]["error_kinds"].get("unavailable", 0) == 4
