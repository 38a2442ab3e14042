"""The OpenAI wire format, requests side: the request models, validated.

Every field of ``agent.serving.fields.RULES`` is declared here, typed and bounded where it is
honoured; the policy (refused fields, unknown fields) runs on the raw body first, so its 400
names the field and why. Explicit ``null`` is accepted for every optional field, as OpenAI does.
``agent.serving.jobs`` turns a validated request into engine-neutral ``GenerationRequest``s.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.serving.fields import CHAT, COMPLETIONS, refuse_fields

MAX_STOP = 4
MAX_STOP_CHARS = 1024
MAX_MESSAGES = 2048  # (the body itself is bounded by server.max_request_bytes before it is parsed)
MAX_N = 16
MAX_TOKEN_IDS = 1024  # logit_bias, stop_token_ids, allowed_token_ids
MAX_PROMPTS = 16
MAX_TOOLS = 128
TEXT_ONLY = ("image_url", "input_audio", "file", "video_url", "audio_url", "input_image")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: Literal[False] | None = None
    continuous_usage_stats: Literal[False] | None = None  # vLLM's; usage comes once, at the end


class JsonSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object")
        return self


class StructuredOutputs(_Strict):
    """vLLM's ``structured_outputs``: exactly one constraint."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: Literal[True] | None = None
    regex: str | None = Field(None, min_length=1)
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = Field(None, min_length=1)
    disable_any_whitespace: bool | None = None  # ours is always compact JSON, valid either way
    disable_additional_properties: Literal[False] | None = None
    whitespace_pattern: None = None
    structural_tag: None = None

    @model_validator(mode="after")
    def _one(self) -> StructuredOutputs:
        given = [k for k in ("json_", "json_object", "regex", "choice", "grammar") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of json, json_object, regex, choice, grammar")
        return self


class _Body(BaseModel):
    """Fields both endpoints share; ``endpoint`` selects the field policy."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    endpoint: ClassVar[str] = ""

    @model_validator(mode="before")
    @classmethod
    def _policy(cls, data: Any) -> Any:
        if isinstance(data, dict):
            refuse_fields(data, cls.endpoint)
        return data

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=1_048_576)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = Field(None, max_length=MAX_TOKEN_IDS)
    user: str | None = Field(None, max_length=256)
    response_format: ResponseFormat | None = None
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    repeat_penalty: float | None = Field(None, gt=0.0, le=10.0)
    min_tokens: int | None = Field(None, ge=0, le=1_048_576)
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_TOKEN_IDS)
    include_stop_str_in_output: bool | None = None
    allowed_token_ids: list[int] | None = Field(None, min_length=1, max_length=65536)
    structured_outputs: StructuredOutputs | None = None
    grammar: str | None = Field(None, min_length=1)

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

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[int, float] | None) -> dict[int, float] | None:
        if v and any(not -100 <= b <= 100 for b in v.values()):
            raise ValueError("biases must lie between -100 and 100")
        if v and any(t < 0 for t in v):
            raise ValueError("token ids are not negative")
        return v

    @model_validator(mode="after")
    def _combinations(self) -> _Body:
        if self.repetition_penalty is not None and self.repeat_penalty is not None:
            raise ValueError("give repetition_penalty or repeat_penalty (the same), not both")
        constraints = [k for k in ("response_format", "structured_outputs", "grammar", "allowed_token_ids")
                       if getattr(self, k) is not None and not (k == "response_format" and self.response_format.type == "text")]
        if len(constraints) > 1:
            raise ValueError(f"one output constraint per request: {' and '.join(constraints)} were both given")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only with stream: true")
        return self

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def choices(self) -> int:
        return self.n or 1


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class RefusalPart(_Strict):
    type: Literal["refusal"]
    refusal: str


class FunctionCallIn(_Strict):
    name: str = Field(min_length=1)
    arguments: str


class ToolCallIn(_Strict):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCallIn


class Message(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart | RefusalPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None  # OpenAI's response field, passed back unchanged by clients
    annotations: list[Any] | None = None  # (the same)
    audio: None = None
    function_call: None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        for part in v if isinstance(v, list) else ():
            if isinstance(part, dict) and part.get("type") in TEXT_ONLY:
                raise ValueError(f"{part['type']} parts are not supported: the model served here is text-only")
        return v

    @model_validator(mode="after")
    def _shape(self) -> Message:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if self.content is None and not (self.role == "assistant" and (self.tool_calls or self.refusal)):
            raise ValueError("content is required (it may be null only on an assistant message with tool_calls)")
        return self

    def text(self) -> str | None:
        if self.content is None or isinstance(self.content, str):
            return self.content if self.content is not None else self.refusal
        return "".join(p.text if isinstance(p, TextPart) else p.refusal for p in self.content)


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef

    @model_validator(mode="before")
    @classmethod
    def _functions_only(cls, v: Any) -> Any:
        if isinstance(v, dict) and v.get("type") == "custom":
            raise ValueError("custom tools are not supported: give function tools with a JSON schema")
        return v


class NamedFunction(_Strict):
    name: str


class NamedChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class AllowedTools(_Strict):
    mode: Literal["auto", "required"]
    tools: list[NamedChoice] = Field(min_length=1)


class AllowedChoice(_Strict):
    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


class ChatCompletionRequest(_Body):
    endpoint: ClassVar[str] = CHAT

    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_048_576)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedChoice | AllowedChoice | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)
    prompt_cache_key: str | None = Field(None, max_length=1024)
    safety_identifier: str | None = Field(None, max_length=256)
    chat_template_kwargs: dict[str, Any] | None = None
    continue_final_message: bool | None = None
    add_generation_prompt: bool | None = None

    @model_validator(mode="after")
    def _chat_combinations(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice: needs tools")
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        chosen = [self.tool_choice.function.name] if isinstance(self.tool_choice, NamedChoice) else (
            [c.function.name for c in self.tool_choice.allowed_tools.tools] if isinstance(self.tool_choice, AllowedChoice)
            else [])
        for name in chosen:
            if name not in names:
                raise ValueError(f"tool_choice: no tool named {name!r} in tools")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError("continue_final_message: the last message must be the assistant's")
        if self.add_generation_prompt is False and not self.continue_final_message:
            raise ValueError("add_generation_prompt: false only with continue_final_message: true")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt exclude each other")
        return self


class CompletionRequest(_Body):
    endpoint: ClassVar[str] = COMPLETIONS

    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompts(cls, v: Any) -> Any:
        if isinstance(v, list) and v and not all(isinstance(p, str) for p in v):
            raise ValueError("token-id prompts are not supported: token ids differ between engines; send text")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: str | list[str]) -> str | list[str]:
        items = [v] if isinstance(v, str) else v
        if not items or len(items) > MAX_PROMPTS:
            raise ValueError(f"give 1 to {MAX_PROMPTS} prompts")
        if any(p == "" for p in items):
            # llama.cpp asserts on a prompt of no tokens and vLLM refuses it: say so plainly.
            raise ValueError("the prompt is empty; send at least one character")
        return v

    @model_validator(mode="after")
    def _completion_combinations(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.choices():
            raise ValueError("best_of: only equal to n (choosing the best of more candidates is not supported)")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo: not with logprobs (that needs prompt logprobs, which llama.cpp does not compute)")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TokenizeRequest(_Strict):
    """``POST /tokenize`` as vLLM's server has it: a prompt, or messages through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: Literal[True] | None = None  # the template (or the model's BOS rule) decides
    add_generation_prompt: Literal[True] | None = None
    continue_final_message: Literal[False] | None = None
    return_token_strs: bool | None = None

    @model_validator(mode="after")
    def _one(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give prompt or messages")
        return self


class DetokenizeRequest(_Strict):
    """``POST /detokenize``: token ids of the served vocabulary back to text."""

    model: str | None = None
    tokens: list[int] = Field(max_length=1_048_576)
