"""OpenAI-compatible request models, response bodies, error bodies and SSE framing.

The same models validate HTTP bodies and handle-call dicts, so both paths reject the same
inputs with the same messages.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serve_canary.protocol import ChatMessage, GenerationRequest


class OpenAIError(Exception):
    """An error the client caused or should see, rendered as OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _CommonRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1, description="serve-canary generates one choice")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def _stop(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class ChatCompletionRequest(_CommonRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def to_generation(self, request_id: str) -> GenerationRequest:
        return GenerationRequest(
            request_id=request_id,
            messages=tuple(ChatMessage(m.role, m.text()) for m in self.messages),
            max_tokens=self.max_completion_tokens or self.max_tokens or 256,
            temperature=self.temperature, top_p=self.top_p, stop=self._stop(), seed=self.seed,
        )


class CompletionRequest(_CommonRequest):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, prompt: str | list[str]) -> str:
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError("serve-canary takes one prompt per request")
            return prompt[0]
        return prompt

    def to_generation(self, request_id: str) -> GenerationRequest:
        return GenerationRequest(
            request_id=request_id, prompt=self.prompt, max_tokens=self.max_tokens or 16,
            temperature=self.temperature, top_p=self.top_p, stop=self._stop(), seed=self.seed,
        )


def parse_request(model: type[BaseModel], body: Any) -> Any:
    """Validate a request body; a bad one becomes a 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise OpenAIError(400, f"{param}: {first['msg']}", param=param) from None


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class ResponseBuilder:
    """Builds one response's bodies (unary or chunks) for chat or text completions."""

    def __init__(self, kind: Literal["chat", "text"], request_id: str, model: str, served_by: dict[str, Any]) -> None:
        self.kind, self.request_id, self.model, self.served_by = kind, request_id, model, served_by
        self.created = int(time.time())

    def _envelope(self, object_: str, choices: list[dict[str, Any]], served_by: bool = False) -> dict[str, Any]:
        body = {"id": self.request_id, "object": object_, "created": self.created, "model": self.model, "choices": choices}
        if served_by:
            body["serve_canary"] = self.served_by
        return body

    def unary(self, text: str, finish_reason: str | None, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
            body = self._envelope("chat.completion", [choice], served_by=True)
        else:
            body = self._envelope("text_completion", [{"index": 0, "text": text, "finish_reason": finish_reason}], served_by=True)
        body["usage"] = usage(prompt_tokens, completion_tokens)
        return body

    def chunk(self, text: str, finish_reason: str | None, first: bool = False) -> dict[str, Any]:
        """A stream chunk; the first one also says who served the stream."""
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            return self._envelope("chat.completion.chunk", [{"index": 0, "delta": delta, "finish_reason": finish_reason}], first)
        return self._envelope("text_completion", [{"index": 0, "text": text, "finish_reason": finish_reason}], first)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk" if self.kind == "chat" else "text_completion", [])
        body["usage"] = usage(prompt_tokens, completion_tokens)
        return body


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
