"""The OpenAI wire format: request models (validated), and response/chunk builders.

Requests become one engine-neutral ``GenerationRequest``, so failover re-dispatches them
without translation. Unknown fields are ignored, as vLLM's and llama.cpp's servers do.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agent.backends.base import Delta, GenerationRequest
from agent.serving.errors import InvalidRequest

MAX_STOP = 4
MAX_STOP_CHARS = 1024
MAX_MESSAGES = 2048  # (the body itself is bounded by server.max_request_bytes before it is parsed)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, le=1)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in items):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in items):
            raise ValueError(f"a stop sequence may have at most {MAX_STOP_CHARS} characters")
        return v

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.get("include_usage"))


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]


class ChatCompletionRequest(_Request):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=1_048_576)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_048_576)
    response_format: ResponseFormat | None = None

    def to_generation(self, request_id: str, default_max_tokens: int) -> GenerationRequest:
        messages = tuple({"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                         for m in self.messages)
        return GenerationRequest(
            request_id=request_id, max_tokens=self.max_completion_tokens or self.max_tokens or default_max_tokens,
            messages=messages, temperature=self.temperature, top_p=self.top_p, stop=self.stops(), seed=self.seed)


class CompletionRequest(_Request):
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1, le=1_048_576)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt per request (batch prompts are not supported)")
        if (v if isinstance(v, str) else v[0]) == "":
            # llama.cpp asserts on a prompt of no tokens and vLLM refuses it: say so plainly.
            raise ValueError("the prompt is empty; send at least one character")
        return v

    def to_generation(self, request_id: str) -> GenerationRequest:
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        if self.echo:
            raise InvalidRequest("echo is not supported", param="echo")
        return GenerationRequest(request_id=request_id, max_tokens=self.max_tokens, prompt=prompt,
                                 temperature=self.temperature, top_p=self.top_p, stop=self.stops(), seed=self.seed)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(last: Delta) -> dict[str, int]:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens}


def chat_response(rid: str, model: str, text: str, last: Delta) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": last.finish_reason, "logprobs": None}],
            "usage": usage(last)}


def completion_response(rid: str, model: str, text: str, last: Delta) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": last.finish_reason, "logprobs": None}],
            "usage": usage(last)}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: str | None,
               usage_: dict | None = None) -> dict[str, Any]:
    choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if usage_ is None else []
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def completion_chunk(rid: str, model: str, created: int, text: str, finish: str | None,
                     usage_: dict | None = None) -> dict[str, Any]:
    choices = [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}] if usage_ is None else []
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk
