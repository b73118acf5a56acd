"""The OpenAI wire shapes serve-canary owns: error bodies, request validation, SSE framing."""

from __future__ import annotations

import json

import pytest

from serve_canary.openai_api import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    Envelope,
    OpenAIError,
    parse_json,
    parse_request,
    sse,
)


def chat(**fields):
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


def refusal(model, body) -> OpenAIError:
    with pytest.raises(OpenAIError) as caught:
        parse_request(model, body)
    assert caught.value.status == 400
    return caught.value


def test_an_error_renders_as_openais_error_body():
    error = OpenAIError(404, "no such model", param="model", code="model_not_found")
    assert error.body() == {
        "error": {
            "message": "no such model",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


@pytest.mark.parametrize("body", [[], "text", 3, None])
def test_a_body_that_is_not_an_object_is_refused(body):
    assert refusal(ChatCompletionRequest, body).message == "the request body must be a JSON object"


def test_a_field_the_simulated_engine_cannot_honour_is_refused_by_name():
    error = refusal(ChatCompletionRequest, chat(tools=[{"type": "function"}]))
    assert (error.param, error.message) == ("tools", "tools: not supported by this model server")


@pytest.mark.parametrize("text", [123, None, ["a"], {"t": 1}])
def test_a_content_part_whose_text_is_not_a_string_is_refused(text):
    body = chat(messages=[{"role": "user", "content": [{"type": "text", "text": text}]}])
    assert refusal(ChatCompletionRequest, body).param == "messages.0.content.0.text"


def test_bounds_are_named_in_the_error():
    error = refusal(ChatCompletionRequest, chat(max_tokens=0))
    assert error.param == "max_tokens" and "greater than or equal to 1" in error.message
    assert refusal(ChatCompletionRequest, chat(messages=[])).param == "messages"


def test_a_completion_takes_one_prompt():
    assert parse_request(CompletionRequest, {"model": "m", "prompt": ["only"]}).prompt == "only"
    assert "one prompt" in refusal(CompletionRequest, {"model": "m", "prompt": ["a", "b"]}).message


def test_the_envelope_reads_only_what_the_ingress_needs():
    envelope = parse_request(Envelope, chat(stream=True, stream_options={"include_usage": True}, tools=[]))
    assert envelope.stream and envelope.include_usage and envelope.user is None
    assert not parse_request(Envelope, chat(stream=True)).include_usage


def test_sse_frames_one_compact_json_event():
    event = sse({"id": "x", "choices": [{"delta": {"content": "hé"}}]})
    assert event.startswith("data: ") and event.endswith("\n\n") and "\n" not in event[:-2]
    assert json.loads(event[len("data: ") :]) == {"id": "x", "choices": [{"delta": {"content": "hé"}}]}
    assert SSE_DONE == "data: [DONE]\n\n"


def test_json_bodies_are_parsed_within_a_depth_limit():
    assert parse_json(b'{"a": [{"b": 1}]}', max_depth=3) == {"a": [{"b": 1}]}
    for raw in (b'{"a": [{"b": [1]}]}', b"[" * 100_000 + b"]" * 100_000):
        with pytest.raises(OpenAIError, match="nested more than 3 levels") as caught:
            parse_json(raw, max_depth=3)
        assert caught.value.status == 400
    for raw in (b"{", b"\xff", b""):
        with pytest.raises(OpenAIError, match="not valid JSON"):
            parse_json(raw, max_depth=3)
