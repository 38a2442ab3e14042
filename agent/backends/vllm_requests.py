"""vLLM's side of a request: SamplingParams with every value explicit, its logprobs as ours, and
what the engine honours (``Features``), read once after start-up."""

from __future__ import annotations

from typing import Any

from agent.backends.base import Features, GenerationRequest, TokenLogprob, vocab_fingerprint


def sampling_params(request: GenerationRequest, max_tokens: int) -> Any:
    """vLLM's SamplingParams for the request, every value explicit."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    r = request
    return SamplingParams(
        max_tokens=max_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, min_p=r.min_p,
        presence_penalty=r.presence_penalty, frequency_penalty=r.frequency_penalty,
        repetition_penalty=r.repetition_penalty, seed=r.seed, stop=list(r.stop),
        stop_token_ids=list(r.stop_token_ids), include_stop_str_in_output=r.include_stop_str_in_output,
        ignore_eos=r.ignore_eos, min_tokens=r.min_tokens, logit_bias=dict(r.logit_bias) or None,
        allowed_token_ids=list(r.allowed_token_ids) or None,
        logprobs=r.logprobs,
        structured_outputs=StructuredOutputsParams(grammar=r.constraint.grammar) if r.constraint else None,
        output_kind=RequestOutputKind.DELTA,
    )


def logprobs(c: Any, k: int) -> tuple[TokenLogprob, ...]:
    """vLLM's per-token logprob dicts (its top ``k`` by rank, plus the sampled token) as ours. The
    token that ended the answer (EOS or a stop id: no text) has none, as on llama.cpp."""
    out = []
    pairs = list(zip(c.token_ids, c.logprobs or ()))
    if c.finish_reason == "stop" and not isinstance(c.stop_reason, str) and pairs:
        pairs = pairs[:-1]
    for token_id, entry in pairs:
        if not entry:
            continue
        ranked = sorted((lp for lp in entry.values() if lp.rank is not None and lp.rank <= k), key=lambda lp: lp.rank)
        top = tuple(((lp.decoded_token or ""), (lp.decoded_token or "").encode(), float(lp.logprob)) for lp in ranked)
        chosen = entry.get(token_id)
        text = (chosen.decoded_token or "") if chosen else ""
        out.append(TokenLogprob(text, text.encode(), float(chosen.logprob) if chosen else float("-inf"), top))
    return tuple(out)


def engine_features(engine: Any, tokenizer: Any) -> Features:
    """What this engine honours; read once after start-up."""
    cfg = engine.vllm_config
    cpu = getattr(cfg.device_config, "device_type", "") == "cpu"
    v2 = bool(getattr(cfg, "use_v2_model_runner", False))
    texts = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return Features(
        constraints=not (cpu and v2),
        constraints_reason="vLLM's CPU build with Model Runner V2 kills its EngineCore on a grammar "
                           "(vllm-project/vllm#51283)" if cpu and v2 else "",
        continue_constrained=False, max_logprobs=int(cfg.model_config.max_logprobs),
        vocab=vocab_fingerprint([t or "" for t in texts]), vocab_size=len(texts),
        chat_template=getattr(tokenizer, "chat_template", None) or None,
        special_tokens=frozenset(tokenizer.get_added_vocab()) | frozenset(tokenizer.all_special_tokens),
    )
