"""OpenAI wire shapes that serve-canary owns: error bodies, SSE framing, the few fields the
ingress reads from every request, and the request models of the simulated engine.

vLLM arms take vLLM's own request models (through Ray Serve LLM); the simulated engine takes
the models here, which forbid every field it cannot honour, so a request for `tools` or
`response_format` gets a 400 from it instead of a silent 200.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ModelT = TypeVar("ModelT", bound=BaseModel)


class OpenAIError(Exception):
    """An error the client caused or should see, rendered as OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """What a model server yields instead of a response: the shape of vLLM's and Ray Serve
    LLM's `ErrorResponse`, where `code` is the HTTP status."""

    error: ErrorInfo


class Envelope(BaseModel):
    """The fields the ingress itself reads; the arm's own request model validates the rest."""

    model_config = ConfigDict(extra="ignore")

    model: str
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _SimulatedRequest(_Strict):
    model: str
    request_id: str = ""
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1, description="the simulated engine generates one choice")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_SimulatedRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_SimulatedRequest):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, prompt: str | list[str]) -> str:
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError("the simulated engine takes one prompt per request")
            return prompt[0]
        return prompt


class Response(BaseModel):
    """A whole (non-streamed) completion body from the simulated engine."""

    model_config = ConfigDict(extra="allow")


def parse_request(model: type[ModelT], body: Any) -> ModelT:
    """Validate a request body; a bad one becomes a 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


_UNION_BRANCH = re.compile(r"^(str|int|float|bool|none|list|dict)$|\[")  # pydantic's names for union members


def validation_error(exc: ValidationError) -> OpenAIError:
    """A 400 naming the most specific bad field, as a dotted path of the client's own keys."""
    first = max(exc.errors(), key=lambda error: len(error["loc"]))
    param = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and _UNION_BRANCH.search(p))) or None
    if first["type"] == "extra_forbidden":
        return OpenAIError(400, f"{param}: not supported by this model server", param=param)
    return OpenAIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param)


def parse_json(raw: bytes, max_depth: int) -> Any:
    """A request body as JSON, nested at most `max_depth` deep; 400 otherwise."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise OpenAIError(400, f"the request body is nested more than {max_depth} levels deep") from None
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        raise OpenAIError(400, "the request body is not valid JSON") from None
    if _depth(body) > max_depth:
        raise OpenAIError(400, f"the request body is nested more than {max_depth} levels deep")
    return body


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value (a scalar is 0), without recursion."""
    deepest, level = 0, [(value, 1)]
    while level:
        node, depth = level.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                level.append((child, depth + 1))
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
    return deepest


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
