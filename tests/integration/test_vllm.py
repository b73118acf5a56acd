"""Real vLLM arms: two Ray Serve LLM `LLMServer` deployments on vLLM's CPU build, serving two
tiny local Llama models (made by `benchmarks.tiny_models`), behind the canary ingress.

The engines start once for this module (20-75 s each); the tests run in file order, the
one that kills the canary's engine last.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray
from openai import BadRequestError, OpenAI
from ray import serve

from benchmarks.tiny_models import make_models

from .conftest import App, background_traffic, delete_app, deploy_app, wait_for

# Found, not imported: the engines import vLLM in their replicas; here it would cost ~9 s of torch.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(find_spec("vllm") is None, reason="vLLM is installed by scripts/install-vllm-cpu.sh"),
]

MODEL = "tiny"
MAX_MODEL_LEN = 2048
MAX_NUM_SEQS = 2  # requests each engine generates at once; more wait in its queue
MODEL_DIR = Path(os.environ.get("SERVE_CANARY_TINY_MODELS", Path.home() / ".cache" / "serve-canary" / "tiny-models"))
PHASES = [
    {"name": "init", "weight": 0.10, "min_duration_s": 1.0, "min_requests": 10},
    {"name": "early", "weight": 0.30, "min_duration_s": 1.0, "min_requests": 10},
    {"name": "progress", "weight": 0.50, "min_duration_s": 1.0, "min_requests": 10},
    {"name": "full", "weight": 1.0, "approval": True},
]

FULL_LENGTH = {"ignore_eos": True}  # random tiny weights can sample EOS at any step


def llm_config(model_id: str, path: Path) -> dict[str, Any]:
    return {
        "model_loading_config": {"model_id": model_id, "model_source": str(path)},
        "accelerator_config": {"kind": "cpu"},
        "placement_group_config": {"bundles": [{"CPU": 0.5}]},
        # No torch.compile: building inductor's kernels took ~20 s of each engine's initialisation
        # on 2 cores, and these tests judge the serving path, not the engine's speed.
        "engine_kwargs": {
            "max_model_len": MAX_MODEL_LEN,
            "dtype": "float32",
            "max_num_seqs": MAX_NUM_SEQS,
            "enforce_eager": True,
        },
        "deployment_config": {"ray_actor_options": {"num_cpus": 0}, "health_check_timeout_s": 60},
        "runtime_env": {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}},
    }


@pytest.fixture(scope="module")
def vllm_app(cluster: dict[str, Any]) -> Iterator[App]:
    stable, canary = make_models(MODEL_DIR)
    args = {
        "model_name": MODEL,
        "stable": {"llm_config": llm_config("tiny-llama-a", stable)},
        "canary": {"llm_config": llm_config("tiny-llama-b", canary)},
        "rollout": {"interval_s": 0.5, "phases": PHASES},
        "canary_first_token_timeout_s": 30.0,  # a starved CPU engine is slow, not gone
        # Two engines share 2 cores with the ingress, the proxy and the clients, so per-arm
        # latency differences here are scheduling, not the models. These tests judge errors: a
        # tiny α asks overwhelming evidence of any rollback (a dead engine gives it within a few
        # dozen requests), and latency passes within wide limits.
        "health": {
            "alpha": 1e-6,
            "max_error_rate": 0.2,
            "max_ttft_ms": 60_000,
            "max_latency_ms": 60_000,
            "max_ttft_increase": 20.0,
            "max_latency_increase": 20.0,
            "max_itl_increase": 20.0,
        },
    }
    name = deploy_app(cluster, args, timeout_s=400)
    yield App(name, cluster["port"], model=MODEL)
    delete_app(name)


def client(app: App, user: str) -> OpenAI:
    return OpenAI(base_url=f"{app.url}/v1", api_key="unused", default_headers={"x-user-id": user}, max_retries=0)


TRAFFIC = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def status_is(app: App, *statuses: str):
    def check():
        status = app.status()
        return status if status["status"] in statuses else None

    return check


def test_a_healthy_vllm_canary_walks_the_phases_to_the_approval_gate(vllm_app):
    with background_traffic(vllm_app, concurrency=8, body=TRAFFIC) as outcomes:
        status = wait_for(status_is(vllm_app, "awaiting_approval", "rolled_back"), 240, "the approval gate")
    assert status["status"] == "awaiting_approval", [(e["action"], e["reason"]) for e in status["events"]]
    assert [e["action"] for e in status["events"]] == ["start", "promote", "promote", "await_approval"]
    assert set(outcomes) == {"200"}


def test_openai_client_chat_and_completions_stream_and_not(vllm_app):
    from transformers import AutoTokenizer

    ray.get(vllm_app.controller.set_weight.remote(0.5))
    messages = [{"role": "user", "content": "hello canary, how are the rivers?"}]
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR / "tiny-llama-a")
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    prompt_tokens = len(prompt_ids)
    assert prompt_ids.count(tokenizer.bos_token_id) == 1
    seen_arms = set()
    for user in (f"user-{i}" for i in range(12)):
        raw = client(vllm_app, user).chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, max_tokens=6, extra_body=FULL_LENGTH
        )
        completion = raw.parse()
        arm = raw.headers["x-serve-canary-arm"]
        seen_arms.add(arm)
        assert completion.model == {"stable": "tiny-llama-a", "canary": "tiny-llama-b"}[arm]
        assert completion.usage.prompt_tokens == prompt_tokens  # one BOS: the template is not tokenized twice
        assert completion.usage.completion_tokens == 6 and completion.choices[0].finish_reason == "length"
    assert seen_arms == {"stable", "canary"}

    openai = client(vllm_app, "ada")
    chunks = list(
        openai.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=FULL_LENGTH,
        )
    )
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].usage.prompt_tokens == prompt_tokens
    plain = list(
        openai.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=5, stream=True, extra_body=FULL_LENGTH
        )
    )
    assert all(chunk.usage is None for chunk in plain)  # asked for internally, stripped for this client
    assert [c.choices[0].finish_reason for c in plain if c.choices][-1] == "length"

    text = openai.completions.create(model=MODEL, prompt="the canary sings", max_tokens=4, extra_body=FULL_LENGTH)
    assert text.usage.completion_tokens == 4
    streamed = list(
        openai.completions.create(
            model=MODEL, prompt="the canary sings", max_tokens=4, stream=True, extra_body=FULL_LENGTH
        )
    )
    assert [c.choices[0].finish_reason for c in streamed][-1] == "length"


def test_vllm_options_pass_through(vllm_app):
    completion = client(vllm_app, "ada").chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
        seed=7,
        presence_penalty=0.5,
        stop=["zzz"],
        extra_body=FULL_LENGTH,
    )
    assert len(completion.choices[0].logprobs.content) == 3
    assert len(completion.choices[0].logprobs.content[0].top_logprobs) == 2


def test_a_prompt_longer_than_max_model_len_is_a_400_and_no_arm_error(vllm_app):
    window = vllm_app.status()["window"]
    before = vllm_app.window(window)
    with pytest.raises(BadRequestError, match="maximum context length"):
        client(vllm_app, "ada").completions.create(model=MODEL, prompt="river " * (MAX_MODEL_LEN + 10), max_tokens=4)
    after = wait_for(
        lambda: (
            (w := vllm_app.window(window))
            and sum(w[a].rejected for a in w) > sum(before[a].rejected for a in before)
            and w
        ),
        10,
        "the rejected request recorded",
    )
    assert sum(after[a].errors for a in after) == sum(before[a].errors for a in before)


def test_a_client_disconnect_aborts_the_generation(vllm_app):
    window = vllm_app.status()["window"]
    max_tokens = MAX_MODEL_LEN - 16
    body = {"model": MODEL, "prompt": "the canary", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    with vllm_app.http.stream("POST", "/v1/completions", json=body, headers={"x-user-id": "ada"}) as response:
        arm = response.headers["x-serve-canary-arm"]
        engine = serve.get_deployment_handle(arm, vllm_app.name)
        lines = response.iter_lines()
        next(lines)
        assert engine.running_requests.remote().result() == 1, "the generation must still be running here"
    wait_for(lambda: engine.running_requests.remote().result() == 0, 10, "the engine to abort the request")
    cancelled = wait_for(lambda: vllm_app.window(window)[arm].cancelled, 10, "the cancelled request recorded")
    assert cancelled == 1


def test_a_wait_in_vllms_own_queue_is_queueing_not_the_models_time(vllm_app):
    """Three times the engines' `max_num_seqs` requests at once from one user (so one arm): the
    later ones wait in vLLM's scheduler queue (Serve's router holds none of them), and vLLM's
    per-request metrics bring that wait to the ingress as queueing."""
    window = vllm_app.status()["window"]
    before = {arm: (a.queue_s.seen, a.e2e_s.seen) for arm, a in vllm_app.window(window).items()}
    sent = 3 * MAX_NUM_SEQS

    def ask(_: int) -> str:
        raw = client(vllm_app, "queued").completions.with_raw_response.create(
            model=MODEL, prompt="the canary", max_tokens=200, extra_body=FULL_LENGTH
        )
        return raw.headers["x-serve-canary-arm"]

    with ThreadPoolExecutor(sent) as pool:
        [arm] = set(pool.map(ask, range(sent)))
    queued_seen, e2e_seen = before.get(arm, (0, 0))
    aggregate = wait_for(
        lambda: (a := vllm_app.window(window)[arm]).queue_s.seen >= queued_seen + sent and a,
        10,
        "the requests recorded",
    )
    queued, waited = sum(aggregate.queue_s.values[queued_seen:]), sum(aggregate.e2e_s.values[e2e_seen:])
    # Two at a time: two wait about one generation, two about two; a third of the time users waited.
    assert queued >= 0.25 * waited, (queued, waited)


def _engine_processes(app: App, arm: str) -> list[psutil.Process]:
    """The vLLM engine processes under an arm's replica worker (Ray titles it by replica)."""
    title = f"ServeReplica:{app.name}:{arm}"
    [replica] = [p for p in psutil.process_iter(["cmdline"]) if title in " ".join(p.info["cmdline"] or ())]
    return [p for p in replica.children(recursive=True) if "EngineCore" in " ".join(p.cmdline()) + p.name()]


def test_a_killed_vllm_canary_fails_over_to_stable_and_is_rolled_back(vllm_app):
    assert vllm_app.status()["status"] == "paused"  # the set-weight of the tests above
    assert vllm_app.admin("POST", "resume").json()["canary_weight"] == 0.5
    engines = _engine_processes(vllm_app, "canary")
    assert engines, "the canary replica runs its vLLM engine in a child process"
    for process in engines:
        process.kill()
    with background_traffic(vllm_app, concurrency=8, body=TRAFFIC) as outcomes:
        status = wait_for(status_is(vllm_app, "rolled_back"), 120, "the rollback")
    assert "error_rate" in status["events"][-1]["reason"]
    assert set(outcomes) == {"200"}, outcomes  # every user was answered, by stable when the canary failed


def test_engines_stop_with_their_replicas(vllm_app):
    engines = _engine_processes(vllm_app, "stable")
    assert engines
    serve.delete(vllm_app.name)
    wait_for(
        lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in engines), 30, "engines to stop"
    )
