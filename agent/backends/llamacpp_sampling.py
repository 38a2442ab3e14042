"""llama.cpp generation, token by token, with every sampling value explicit and vLLM's meaning.

llama-cpp-python's ``create_completion`` hides the token ids behind text chunks (stop-string
hold-back releases several at once) and computes logprobs only with ``logits_all=True`` (a
context x vocabulary float buffer: 400 MB for SmolLM2 at 2048 tokens). So the backend drives
``Llama.generate`` itself: each sampled token id, its raw distribution (for logprobs), the
grammar matcher, EOS and stop ids, stop strings and UTF-8 assembly are handled here.

What runs before llama.cpp's own sampler chain is a ``Processor`` (llama-cpp-python calls it
first, with the raw logits in vocabulary order). It applies, in vLLM's order: the grammar mask,
``logit_bias``, ``min_tokens`` (end-of-generation and stop ids masked until then), vLLM's
penalties (repetition over prompt and output, presence and frequency over the output), then
the temperature. llama.cpp then runs top_k, top_p, min_p on those logits with its own
temperature at 1 and its own penalties off, and samples with the request's seed: vLLM scales by
temperature before top_k/top_p, llama.cpp after, so doing the scaling here makes a request mean
the same on both engines. Without anything to apply, no processor runs.
"""

from __future__ import annotations

import codecs
import ctypes
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.backends.base import CannotServe, GenerationRequest, TokenLogprob, vocab_fingerprint


@dataclass
class Vocab:
    """A GGUF's vocabulary as the generation loop needs it, built once per backend."""

    pieces: list[bytes]  # what each token adds to the text (control tokens add nothing)
    texts: list[str]  # the tokens as the vocabulary spells them (the fingerprint)
    eog: frozenset[int]  # end-of-generation tokens (EOS, EOT, ...)
    fingerprint: str
    special: frozenset[str]  # texts of control and user-defined tokens
    _ll: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def read(cls, vocab_ptr: Any) -> Vocab:
        import llama_cpp

        n = llama_cpp.llama_vocab_n_tokens(vocab_ptr)
        size = 256
        buf = ctypes.create_string_buffer(size)
        pieces, texts, eog, special = [], [], set(), set()
        marked = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
        for t in range(n):
            k = llama_cpp.llama_token_to_piece(vocab_ptr, t, buf, size, 0, False)
            if k < 0:  # longer than the buffer: ask again with the size it needs
                big = ctypes.create_string_buffer(-k)
                k = llama_cpp.llama_token_to_piece(vocab_ptr, t, big, -k, 0, False)
                pieces.append(bytes(big[:k]))
            else:
                pieces.append(bytes(buf[:k]))
            texts.append(llama_cpp.llama_vocab_get_text(vocab_ptr, t).decode("utf-8", "replace"))
            if llama_cpp.llama_vocab_is_eog(vocab_ptr, t):
                eog.add(t)
            if llama_cpp.llama_vocab_get_attr(vocab_ptr, t) & marked:
                special.add(texts[-1])
        return cls(pieces, texts, frozenset(eog), vocab_fingerprint(texts), frozenset(special))

    def ll_tokenizer(self, vocab_ptr: Any) -> Any:
        """llguidance's tokenizer for this vocabulary (about a second; built on first use)."""
        with self._lock:
            if self._ll is None:
                from llguidance.llamacpp import lltokenizer_from_vocab

                with warnings.catch_warnings():  # it calls llama_token_get_attr, deprecated, once per token
                    warnings.simplefilter("ignore", DeprecationWarning)
                    self._ll = lltokenizer_from_vocab(vocab_ptr, eos_token=sorted(self.eog) or None)
            return self._ll

    def token(self, t: int) -> tuple[str, bytes]:
        piece = self.pieces[t]
        return piece.decode("utf-8", "replace"), piece


class Processor:
    """The request's logits processor (see the module docstring); also records logprobs."""

    def __init__(self, request: GenerationRequest, vocab: Vocab, prompt: list[int], matcher: Any = None) -> None:
        self.request = request
        self.vocab = vocab
        self.matcher = matcher
        self.n_prompt = len(prompt)
        self.generated: list[int] = []
        self.counts = np.zeros(len(vocab.pieces), dtype=np.float32)
        self.seen = np.zeros(len(vocab.pieces), dtype=bool)
        self.seen[np.asarray(prompt, dtype=np.int64)] = True
        self.bias = (np.asarray([t for t, _ in request.logit_bias], dtype=np.int64),
                     np.asarray([b for _, b in request.logit_bias], dtype=np.float32))
        self.allowed = None
        if request.allowed_token_ids:
            self.allowed = np.zeros(len(vocab.pieces), dtype=bool)
            self.allowed[np.asarray(request.allowed_token_ids, dtype=np.int64)] = True
        self.stoppers = np.asarray(sorted(vocab.eog | set(request.stop_token_ids)), dtype=np.int64)
        self.last: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.mask = None
        if matcher is not None:
            from llguidance.numpy import allocate_token_bitmask

            self.mask = allocate_token_bitmask(1, len(vocab.pieces))

    @staticmethod
    def needed(request: GenerationRequest) -> bool:
        r = request
        return bool(r.constraint or r.logprobs is not None or r.logit_bias or r.min_tokens or r.allowed_token_ids
                    or r.repetition_penalty != 1
                    or r.presence_penalty or r.frequency_penalty or r.temperature not in (0.0, 1.0))

    def accept(self, token: int) -> None:
        """``token`` was sampled: count it, and advance the grammar."""
        self.generated.append(token)
        self.counts[token] += 1
        self.seen[token] = True
        if self.matcher is not None and not self.matcher.is_stopped() and not self.matcher.consume_token(token):
            raise CannotServe(f"the output constraint rejected a sampled token: {self.matcher.get_error()}")

    def logprob(self, token: int) -> TokenLogprob | None:
        """The distribution recorded when ``token`` was sampled, as a ``TokenLogprob``."""
        if self.last is None or self.request.logprobs is None:
            return None
        logprobs, top_ids, top_lp = self.last
        text, raw = self.vocab.token(token)
        top = tuple((*self.vocab.token(int(t)), float(lp)) for t, lp in zip(top_ids, top_lp))
        return TokenLogprob(text, raw, float(logprobs[token]), top)

    def __call__(self, _input_ids: Any, logits: np.ndarray) -> np.ndarray:
        r = self.request
        x = np.asarray(logits, dtype=np.float32)
        if self.matcher is not None:
            from llguidance.numpy import fill_next_token_bitmask

            fill_next_token_bitmask(self.matcher, self.mask)
            allowed = np.unpackbits(self.mask.view(np.uint8), bitorder="little")[: len(x)].astype(bool)
            x[~allowed] = -np.inf
        if self.allowed is not None:
            x[~self.allowed] = -np.inf
        if r.logprobs is not None:  # after the masks, before the rest: as vLLM's raw_logprobs
            m = x.max()
            lp = x - (m + np.log(np.exp(x - m).sum()))
            k = min(r.logprobs, len(lp))
            top = np.argpartition(-lp, k - 1)[:k] if k else np.arange(0)
            top = top[np.argsort(-lp[top], kind="stable")]
            self.last = (lp, top, lp[top])
        if r.logit_bias:
            x[self.bias[0]] += self.bias[1]
        if len(self.generated) < r.min_tokens:
            x[self.stoppers] = -np.inf
        if r.repetition_penalty != 1.0:
            p = r.repetition_penalty
            rep = x[self.seen]
            x[self.seen] = np.where(rep > 0, rep / p, rep * p)
        if r.frequency_penalty or r.presence_penalty:
            x -= r.frequency_penalty * self.counts + r.presence_penalty * (self.counts > 0)
        if r.temperature not in (0.0, 1.0):
            x /= r.temperature
        return x


class Text:
    """Bytes in, text out: UTF-8 sequences split across tokens are held until complete, and text
    that may begin a stop string is held until it cannot (released as several tokens' worth)."""

    def __init__(self, stops: list[str], include_stop: bool) -> None:
        self.stops = [s for s in stops if s]
        self.include_stop = include_stop
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.pending = ""

    def feed(self, piece: bytes, check_stops: bool) -> tuple[str, bool]:
        """(text to release, a stop string ended the generation)."""
        self.pending += self.decoder.decode(piece)
        if not check_stops or not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0:
                end = i + len(s) if self.include_stop else i
                out, self.pending = self.pending[:end], ""
                return out, True
        hold = 0  # the longest end of the text that could still grow into a stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:k]):
                    hold = k
                    break
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending + self.decoder.decode(b"", final=True), ""
        return out


def generate(llm: Any, vocab: Vocab, prompt: list[int], request: GenerationRequest, template_stops: list[str],
             matcher: Any, cancel: threading.Event, put: Callable[[tuple], None]) -> None:
    """Generate on ``llm`` (this thread owns it), handing ``(text, finish, tokens so far,
    logprobs)`` to ``put`` whenever text is released and once at the end."""
    r = request
    processor = Processor(r, vocab, prompt, matcher) if Processor.needed(r) else None
    text = Text(list(r.stop) + template_stops, r.include_stop_str_in_output)
    # llama.cpp's sampler seed is 32 bits (a seed reproduces a sample on the same engine only)
    llm.set_seed(r.seed & 0xFFFFFFFF if r.seed is not None else int.from_bytes(os.urandom(4), "little"))
    sampling = dict(temp=0.0 if r.temperature == 0 else 1.0, top_k=r.top_k, top_p=r.top_p, min_p=r.min_p,
                    typical_p=1.0, repeat_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0,
                    logits_processor=[processor] if processor is not None else None)
    n_ctx, n, finish = llm.n_ctx(), 0, None
    stop_ids = set(r.stop_token_ids)
    pending_lp: list[TokenLogprob] = []
    gen = llm.generate(prompt, **sampling)
    try:
        for token in gen:
            n += 1
            entry = processor.logprob(token) if processor is not None else None
            if cancel.is_set():
                return
            if (token in vocab.eog and not r.ignore_eos) or token in stop_ids:
                finish = "stop"
                break
            if processor is not None:
                processor.accept(token)
            if entry is not None:
                pending_lp.append(entry)
            out, stopped = text.feed(vocab.pieces[token], n > r.min_tokens)
            if stopped:
                finish = "stop"
                put((out, None, n, tuple(pending_lp)))
                pending_lp = []
                break
            if out:
                put((out, None, n, tuple(pending_lp)))
                pending_lp = []
            if matcher is not None and matcher.is_stopped() and r.ignore_eos:
                finish = "stop"  # the grammar is complete; only an end token could follow
                break
            if n >= r.max_tokens or len(prompt) + n >= n_ctx:
                finish = "length"
                break
        put((text.flush(), finish or "stop", n, tuple(pending_lp)))
    finally:
        gen.close()
