"""llama.cpp's side of "a request means the same on both engines" (#12): the logits processor
applies vLLM's formulas in vLLM's order, and the text assembly holds back what may start a stop
string. Pure numpy; the real engine runs it in tests/integration/test_llamacpp_openai_surface.py."""

from __future__ import annotations

import numpy as np
import pytest

from agent.backends.base import GenerationRequest
from agent.backends.llamacpp_sampling import Processor, Text, Vocab

V = 8
EOS = 7


def vocab() -> Vocab:
    pieces = [b"a", b"b", b"c", b" d", b"\xc3", b"\xa9", b"!", b""]
    return Vocab(pieces, [p.decode("latin-1") for p in pieces], frozenset({EOS}), "fp", frozenset())


def logits() -> np.ndarray:
    return np.array([2.0, -1.0, 0.5, 3.0, -2.0, 1.0, 0.0, 1.5], dtype=np.float32)


def vllm_reference(x, prompt, output, rep, freq, pres, temp):
    """vLLM's sampler, written out: repetition penalty over prompt and output tokens, frequency
    and presence over output tokens, then the temperature."""
    x = x.copy()
    seen = set(prompt) | set(output)
    for t in seen:
        x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
    counts = np.bincount(output, minlength=len(x)).astype(np.float32)
    x -= freq * counts + pres * (counts > 0)
    return x / temp


def test_penalties_and_temperature_are_vllms():
    r = GenerationRequest("t", 10, prompt="x", repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2,
                          temperature=0.7)
    p = Processor(r, vocab(), prompt=[0, 1])
    for t in (3, 3, 2):
        p.accept(t)
    out = p(None, logits())
    assert np.allclose(out, vllm_reference(logits(), [0, 1], [3, 3, 2], 1.3, 0.4, 0.2, 0.7))


def test_min_tokens_masks_end_and_stop_ids_until_reached():
    r = GenerationRequest("t", 10, prompt="x", min_tokens=2, stop_token_ids=(6,))
    p = Processor(r, vocab(), prompt=[0])
    assert np.isneginf(p(None, logits())[[EOS, 6]]).all()
    p.accept(1)
    p.accept(2)
    assert np.isfinite(p(None, logits())[[EOS, 6]]).all()


def test_logit_bias_and_allowed_ids():
    r = GenerationRequest("t", 10, prompt="x", logit_bias=((1, 5.0),), allowed_token_ids=(1, 2))
    out = Processor(r, vocab(), prompt=[0])(None, logits())
    assert out[1] == pytest.approx(4.0) and out[2] == pytest.approx(0.5)
    assert np.isneginf(np.delete(out, [1, 2])).all()


def test_logprobs_are_the_raw_distribution_with_its_top_alternatives():
    r = GenerationRequest("t", 10, prompt="x", logprobs=3, temperature=0.5, logit_bias=((1, 50.0),))
    p = Processor(r, vocab(), prompt=[0])
    p(None, logits())
    entry = p.logprob(5)
    raw = logits() - np.log(np.exp(logits()).sum())
    assert entry.logprob == pytest.approx(raw[5], abs=1e-5)  # before bias and temperature
    assert [t for t, _, _ in entry.top] == [" d", "a", ""]  # ids 3, 0, 7: the three likeliest
    assert [lp for _, _, lp in entry.top] == pytest.approx(sorted(raw, reverse=True)[:3], abs=1e-5)


def test_no_processor_runs_when_nothing_needs_one():
    assert not Processor.needed(GenerationRequest("t", 4, prompt="x", temperature=0))
    assert not Processor.needed(GenerationRequest("t", 4, prompt="x", temperature=1.0, top_k=5, min_p=0.1))
    assert Processor.needed(GenerationRequest("t", 4, prompt="x", temperature=0.7))


def test_text_holds_back_a_possible_stop_string_and_cuts_at_it():
    t = Text(["END"], include_stop=False)
    assert t.feed(b"abc E", True) == ("abc ", False)
    assert t.feed(b"N", True) == ("", False)
    assert t.feed(b"Dzz", True) == ("", True)
    t = Text(["END"], include_stop=True)
    assert t.feed(b"xENDy", True) == ("xEND", True)
    t = Text(["END"], include_stop=False)
    assert t.feed(b"END", False) == ("END", False)  # before min_tokens stop strings are not checked


def test_text_keeps_utf8_sequences_whole():
    t = Text([], include_stop=False)
    assert t.feed(b"\xc3", True) == ("", False)
    assert t.feed(b"\xa9", True) == ("é", False)
    assert Text(["é!"], False).feed("aé!".encode(), True) == ("a", True)
