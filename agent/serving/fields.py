"""The field policy, in one place: every request field of OpenAI's chat and completions APIs, and
the extras vLLM's and llama-cpp-python's servers accept, is honoured on every engine of the chain
or refused with a 400 naming it and why. Nothing is accepted and ignored.

``RULES`` is the table (docs/serving.md lists it; a test checks the ``openai`` package's own request
types against it). A refused field is accepted only at a value that asks for nothing (``null``,
or the listed defaults, e.g. ``store: false``). A field outside the table is refused as unknown.
Where honouring depends on the engines (logprobs, token ids, constraints) the check against their
``Features`` is ``check_chain``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.backends.base import Features, GenerationRequest
from agent.serving.errors import InvalidRequest

CHAT, COMPLETIONS = "chat", "completions"
BOTH = (CHAT, COMPLETIONS)


@dataclass(frozen=True)
class Rule:
    """One field: where it comes from, on which endpoints, and how both engines honour it (or why
    not). ``maps_to`` names what carries it (a GenerationRequest attribute, or the response) so a
    test can check that an honoured field reaches the engines."""

    name: str
    endpoints: tuple[str, ...]
    origin: str  # "openai", "vllm", "llama.cpp" or "vllm, llama.cpp"
    honoured: bool
    how: str
    allowed: tuple[Any, ...] = ()  # values of a refused field that ask for nothing
    maps_to: str = ""


def _ok(name, endpoints, origin, how, maps_to) -> Rule:
    return Rule(name, endpoints, origin, True, how, maps_to=maps_to)


def _no(name, endpoints, origin, why, *allowed) -> Rule:
    return Rule(name, endpoints, origin, False, why, allowed)


SAME = "the same value on both engines"
ROUTER = "sglang, via vllm-router"
RULES: tuple[Rule, ...] = (
    # --- OpenAI, both endpoints ---------------------------------------------------------------
    _ok("model", BOTH, "openai", "must be the served name (404 otherwise)", "response"),
    _ok("max_tokens", BOTH, "openai", "vLLM max_tokens; llama.cpp counts tokens itself", "max_tokens"),
    _ok("temperature", BOTH, "openai", "vLLM temperature; llama.cpp: logits divided before top_k/top_p, "
        "as vLLM does (llama.cpp's own order is after)", "temperature"),
    _ok("top_p", BOTH, "openai", SAME, "top_p"),
    _ok("stop", BOTH, "openai", "up to 4; vLLM stop; llama.cpp matched on the decoded text", "stop"),
    _ok("seed", BOTH, "openai", "vLLM seed; llama.cpp's sampler seed (choice i of n gets seed + i, as vLLM)", "seed"),
    _ok("n", BOTH, "openai", "n choices, each its own sequence through the router with seed + i (vLLM's "
        "parallel sampling does the same); each reserves its own KV", "response"),
    _ok("stream", BOTH, "openai", "Server-Sent Events, [DONE] last", "response"),
    _ok("stream_options", BOTH, "openai", "include_usage honoured; include_obfuscation only false", "response"),
    _ok("presence_penalty", BOTH, "openai", "vLLM's formula on both (llama.cpp: in the agent's logits "
        "processor, over the whole completion)", "presence_penalty"),
    _ok("frequency_penalty", BOTH, "openai", "as presence_penalty", "frequency_penalty"),
    _ok("logit_bias", BOTH, "openai", "token ids of the served vocabulary; only when every engine of the chain "
        "has the same vocabulary (else 400)", "logit_bias"),
    _ok("user", BOTH, "openai", "an end-user id: written to the request log line", "response"),
    _ok("logprobs", BOTH, "openai", "raw log-probabilities (vLLM's raw_logprobs; llama.cpp from its logits); "
        "chat: true/false, completions: 0-5 alternatives", "logprobs"),
    # --- OpenAI chat ----------------------------------------------------------------------------
    _ok("messages", (CHAT,), "openai", "system/developer/user/assistant/tool; text content or text parts; "
        "image, audio and file parts are a 400 (text-only model)", "messages"),
    _ok("max_completion_tokens", (CHAT,), "openai", "as max_tokens (wins over it)", "max_tokens"),
    _ok("top_logprobs", (CHAT,), "openai", "0-20 alternatives per token, needs logprobs: true", "logprobs"),
    _ok("response_format", BOTH, "openai", "text; json_object and json_schema through one llguidance grammar "
        "on both engines (vLLM's guidance backend, llama.cpp's logits processor); a schema that cannot be "
        "compiled is a 400", "constraint"),
    _ok("tools", (CHAT,), "openai", "function tools, rendered by the model's template when it knows tools "
        "(else the Hermes format in the system message); custom tools are a 400", "tools"),
    _ok("tool_choice", (CHAT,), "openai", "none, auto (parsed), required and a named function (constrained by "
        "the tools' schemas), allowed_tools", "constraint"),
    _ok("parallel_tool_calls", (CHAT,), "openai", "false: at most one call (required: the grammar allows one)",
        "constraint"),
    _ok("metadata", (CHAT,), "openai", "up to 16 string pairs: written to the request log line", "response"),
    _no("store", (CHAT,), "openai", "this node stores no completions (false is accepted)", False),
    _no("service_tier", (CHAT,), "openai", "one tier here (auto and default are accepted)", "auto", "default"),
    _ok("prompt_cache_key", (CHAT,), "openai", "a caching hint: both engines reuse every cached prompt "
        "prefix by themselves; written to the request log line", "response"),
    _ok("safety_identifier", (CHAT,), "openai", "an end-user id: written to the request log line", "response"),
    _no("modalities", (CHAT,), "openai", 'the model is text-only (["text"] is accepted)', ["text"]),
    _no("prompt_cache_retention", (CHAT,), "openai", "the engines keep their prefix cache in memory only "
        "(in_memory is accepted)", "in_memory"),
    _no("prompt_cache_options", (CHAT,), "openai", "explicit cache breakpoints are not supported: the engines cache "
        "every prefix (implicit is accepted)", {}, {"mode": "implicit"}, {"mode": "implicit", "ttl": "30m"}),
    _no("audio", (CHAT,), "openai", "the model is text-only: no audio output"),
    _no("prediction", (CHAT,), "openai", "predicted outputs are not supported by these engines"),
    _no("reasoning_effort", (CHAT,), "openai", "this node's engines have no reasoning-effort control"),
    _no("verbosity", (CHAT,), "openai", "this node's engines have no verbosity control"),
    _no("web_search_options", (CHAT,), "openai", "this node has no web search"),
    _no("functions", (CHAT,), "openai", "deprecated by OpenAI: send tools"),
    _no("function_call", (CHAT,), "openai", "deprecated by OpenAI: send tool_choice"),
    _no("moderation", (CHAT,), "openai", "this node runs no moderation model"),
    # --- OpenAI completions ---------------------------------------------------------------------
    _ok("prompt", (COMPLETIONS,), "openai", "a string or a list of strings (one choice set per prompt); token-id "
        "prompts are a 400", "prompt"),
    _ok("echo", (COMPLETIONS,), "openai", "the prompt is prepended to the text (not with logprobs: that needs "
        "prompt logprobs)", "response"),
    _ok("best_of", (COMPLETIONS,), "openai", "only equal to n (choosing among more candidates is not supported)",
        "response"),
    _no("suffix", (COMPLETIONS,), "openai", "insertion needs a fill-in-the-middle template, which this node does "
        "not apply"),
    # --- vLLM and llama-cpp-python extras -------------------------------------------------------
    _ok("top_k", BOTH, "vllm, llama.cpp", "0 or -1: off; both engines", "top_k"),
    _ok("min_p", BOTH, "vllm, llama.cpp", "0: off; both engines (llama.cpp's default 0.05 is never used)", "min_p"),
    _ok("repetition_penalty", BOTH, "vllm", "vLLM's formula over prompt and completion on both", "repetition_penalty"),
    _ok("repeat_penalty", BOTH, "llama.cpp", "llama-cpp-python's name for repetition_penalty", "repetition_penalty"),
    _ok("min_tokens", BOTH, "vllm, llama.cpp", "end tokens and stop ids masked, stop strings unchecked until then",
        "min_tokens"),
    _ok("ignore_eos", BOTH, "vllm", "generation goes on after an end token", "ignore_eos"),
    _ok("stop_token_ids", BOTH, "vllm", "token ids; same vocabulary required, as logit_bias", "stop_token_ids"),
    _ok("include_stop_str_in_output", BOTH, "vllm", "the matched stop string ends the text", "include_stop_str_in_output"),
    _ok("allowed_token_ids", BOTH, "vllm", "only these ids may be sampled (vLLM's own; llama.cpp masks the rest); "
        "same vocabulary required", "allowed_token_ids"),
    _ok("chat_template_kwargs", (CHAT,), "vllm", "extra variables for the chat template on both", "chat_template_kwargs"),
    _ok("continue_final_message", (CHAT,), "vllm", "the last assistant message is continued, not answered",
        "assistant_prefix"),
    _ok("add_generation_prompt", (CHAT,), "vllm", "true only, or false with continue_final_message", "messages"),
    _ok("structured_outputs", BOTH, "vllm", "json, json_object, regex, choice, grammar (Lark or GBNF): one "
        "llguidance grammar on both engines", "constraint"),
    _ok("grammar", BOTH, "llama.cpp", "a GBNF (or Lark) grammar: one llguidance grammar on both engines",
        "constraint"),
    _no("skip_special_tokens", BOTH, "vllm", "both engines drop special tokens from the text (true is accepted)",
        True),
    _no("spaces_between_special_tokens", BOTH, "vllm", "special tokens are dropped (true is accepted)", True),
    _no("mirostat_mode", BOTH, "llama.cpp", "vLLM has no mirostat (0 is accepted)", 0),
    _no("logit_bias_type", BOTH, "llama.cpp", "logit_bias keys are token ids (input_ids is accepted)", "input_ids"),
    _no("include_reasoning", (CHAT,), "vllm", "no reasoning parser: all text is content (true is accepted)", True),
    _no("priority", BOTH, "vllm", "one FIFO queue per engine (0 is accepted)", 0),
    _no("mirostat_tau", BOTH, "llama.cpp", "mirostat is not available on vLLM"),
    _no("mirostat_eta", BOTH, "llama.cpp", "mirostat is not available on vLLM"),
    _no("echo", (CHAT,), "vllm", "echoing the last message is not supported", False),
    _no("add_special_tokens", BOTH, "vllm", "the template decides the special tokens on both engines"),
    _no("documents", (CHAT,), "vllm", "retrieval documents for the template are not supported"),
    _no("chat_template", (CHAT,), "vllm", "a request may not replace the model's chat template"),
    _no("bad_words", BOTH, "vllm", "needs each engine's own tokenization of the words; not supported"),
    _no("length_penalty", BOTH, "vllm", "beam search is not supported"),
    _no("use_beam_search", BOTH, "vllm", "beam search is not supported", False),
    _no("prompt_logprobs", BOTH, "vllm", "llama.cpp computes no prompt logprobs without logits for every prompt token"),
    _no("logprob_token_ids", BOTH, "vllm", "logprobs of chosen token ids are not supported"),
    _no("truncate_prompt_tokens", BOTH, "vllm", "a prompt that does not fit is refused, never cut"),
    _no("truncation_side", BOTH, "vllm", "a prompt that does not fit is refused, never cut"),
    _no("return_token_ids", BOTH, "vllm", "token ids differ between this node's engines; use POST /tokenize",
        False),
    _no("return_tokens_as_token_ids", BOTH, "vllm", "token ids differ between this node's engines", False),
    _no("return_token_offsets", BOTH, "vllm", "not supported", False),
    _no("return_prompt_text", (CHAT,), "vllm", "not supported", False),
    _no("request_id", BOTH, "vllm", "the node assigns request ids"),
    _no("cache_salt", BOTH, "vllm", "prefix-cache isolation is not supported by llama.cpp"),
    _no("kv_transfer_params", BOTH, "vllm", "disaggregated serving is not supported"),
    _no("ec_transfer_params", BOTH, "vllm", "disaggregated serving is not supported"),
    _no("mm_processor_kwargs", (CHAT,), "vllm", "the model is text-only"),
    _no("media_io_kwargs", (CHAT,), "vllm", "the model is text-only"),
    _no("mm_payload", BOTH, "vllm", "the model is text-only"),
    _no("return_mm_kwargs", BOTH, "vllm", "the model is text-only", False),
    _no("prompt_embeds", (COMPLETIONS,), "vllm", "embedding prompts are not supported"),
    _no("thinking_token_budget", BOTH, "vllm", "no reasoning parser on this node"),
    _no("repetition_detection", BOTH, "vllm", "not supported by llama.cpp"),
    _no("watermarking", BOTH, "vllm", "not supported by llama.cpp", False),
    _no("routed_experts_prompt_start", BOTH, "vllm", "not supported"),
    _no("session_id", BOTH, "vllm", "sessions are not supported"),
    _no("stream_interval", BOTH, "vllm", "every delta is streamed as it comes", 1),
    _no("vllm_xargs", BOTH, "vllm", "engine-specific arguments would apply to one engine of the chain only"),
    # --- SGLang's, which vLLM's router (vllm-router) writes into every request at these defaults ---
    _no("no_stop_trim", BOTH, ROUTER, "a matched stop string is trimmed; use include_stop_str_in_output "
        "(false is accepted)", False),
    _no("separate_reasoning", (CHAT,), ROUTER, "no reasoning parser: all text is content (true and false "
        "are accepted)", True, False),
    _no("stream_reasoning", (CHAT,), ROUTER, "no reasoning parser: nothing to hold back (true and false are "
        "accepted)", True, False),
    _no("return_hidden_states", BOTH, ROUTER, "hidden states are not returned (false is accepted)", False),
)
BY_ENDPOINT: dict[str, dict[str, Rule]] = {e: {r.name: r for r in RULES if e in r.endpoints} for e in BOTH}


def refuse_fields(body: Mapping[str, Any], endpoint: str) -> None:
    """400 for a refused field set to something, and for a field this node does not know."""
    rules = BY_ENDPOINT[endpoint]
    for name, value in body.items():
        rule = rules.get(name)
        if rule is None:
            raise InvalidRequest(f"{name}: unknown field: not part of OpenAI's {endpoint} API nor of the vLLM and "
                                 f"llama.cpp extras this node knows (docs/serving.md lists them)", param=name)
        if not rule.honoured and value is not None and value not in rule.allowed:
            raise InvalidRequest(f"{name}: not supported on this node: {rule.how}", param=name)


def check_chain(request: GenerationRequest, features: Iterable[Features], param: str | None = None) -> None:
    """What must hold on every engine of the chain (token ids, logprobs) and on at least one
    (a constraint: the router sends it to the engines that can apply it)."""
    features = list(features)
    if request.logit_bias or request.stop_token_ids or request.token_space:
        vocabs = {f.vocab for f in features if f.vocab}
        field_name = param or ("logit_bias" if request.logit_bias else "stop_token_ids")
        if len(vocabs) > 1:
            raise InvalidRequest(f"{field_name}: token ids differ between this node's engines (their vocabularies "
                                 f"are not the same)", param=field_name)
        if not vocabs:
            raise InvalidRequest(f"{field_name}: no engine has started yet to say what the token ids mean; "
                                 f"retry in a moment", param=field_name)
    if request.logprobs is not None:
        most = min((f.max_logprobs for f in features), default=0)
        if request.logprobs > most:
            raise InvalidRequest(f"logprobs: at most {most} alternatives per token on this node's engines",
                                 param="top_logprobs" if param is None else param)
    if request.constraint is not None and not any(f.constraints for f in features):
        reasons = "; ".join(f.constraints_reason for f in features if f.constraints_reason)
        raise InvalidRequest(f"{param or 'response_format'}: no engine of this node can constrain output ({reasons})",
                             param=param or "response_format")


def vocabulary(features: Iterable[Features]) -> tuple[str, int]:
    """(fingerprint, size) of the chain's one vocabulary, ("", 0) when unknown or not one."""
    known = {(f.vocab, f.vocab_size) for f in features if f.vocab}
    return next(iter(known)) if len(known) == 1 else ("", 0)
