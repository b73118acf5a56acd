"""The ModelServer contract: what the ingress sends a model deployment and what streams back.

A ModelServer is a Serve deployment with
  - `generate(request: GenerationRequest) -> AsyncIterator[GenerationChunk]`, called with
    `handle.options(stream=True)`;
  - `check_health()`, Serve's health hook, raising when the engine is dead;
  - `info() -> ModelInfo`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, TypedDict


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation: a raw `prompt` or chat `messages`, never both."""

    request_id: str
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a GenerationRequest carries a prompt or chat messages, not both or neither")


FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True, slots=True)
class GenerationChunk:
    """A piece of output: the text delta and how many tokens it holds (possibly several)."""

    text: str
    num_tokens: int
    prompt_tokens: int | None = None  # set on the first chunk
    finish_reason: FinishReason | None = None  # set on the last chunk


class ModelInfo(TypedDict):
    version: str
    model: str
    engine: str
