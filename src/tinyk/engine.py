"""The one generation engine behind `tinyk generate`, `tinyk chat`, `tinyk serve` and eval.

Sequences are decoded together through the model's preallocated KV cache: prompts of
different lengths are left-padded, every step feeds one token per sequence, and a sequence
that stops (EOS, a stop string or its token budget) leaves the batch at once. New sequences
join a running batch between steps (continuous batching), which is how the server keeps
concurrent requests flowing. Text comes out through an incremental detokenizer that holds
back incomplete UTF-8 and possible beginnings of stop strings, so streamed deltas
concatenate to exactly the final text.
"""

from __future__ import annotations

import itertools
import math
import queue
import random
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import check_compatible, load_model
from .errors import TinykError
from .inputs import short_repr
from .model import KVCache, Transformer, apply_rope, attend, cpu_emulates, dtype_name, resolve_device, resolve_dtype
from .tokenizer import (
    CHAT_ROLES,
    MESSAGE_TOKENS,
    MODEL_PROMPT,
    SPECIAL_IDS,
    SYSTEM_ROLES,
    ModelPrompt,
    TinyTokenizer,
    continues_character,
    encode_chat,
    with_system,
)
from .units import is_int, is_number, plural


def _packed_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def pack_cpu_bf16(w: torch.Tensor) -> torch.Tensor:
    """A bf16 weight laid out once, ahead of time, for oneDNN (AMX / AVX-512-BF16).

    A plain bf16 `F.linear` on CPU re-lays-out its weight on every call, which makes bf16
    no faster than fp32; pre-packed, decoding reads half the bytes of fp32.
    """
    return torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)


def cpu_bf16_packing_works() -> bool:
    """Whether this CPU and torch build run `pack_cpu_bf16` weights (and get the right answer)."""
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        w, x = torch.randn(32, 64, dtype=torch.bfloat16), torch.randn(3, 64, dtype=torch.bfloat16)
        return torch.allclose(_packed_linear(x, pack_cpu_bf16(w)).float(), F.linear(x, w).float(),
                              rtol=0.02, atol=0.02)
    except (AttributeError, RuntimeError):  # an op missing from this build
        return False


QUANTIZE = ("none", "int8")
MAX_LOGPROBS = 20  # the most alternatives a token's log-probability comes with, as in OpenAI's API
# Beyond these a penalty only breaks things: dividing a logit by 1e-40 is inf, and sampling NaN.
REPETITION_PENALTY_RANGE = (0.01, 10)


def non_finite(dtype: torch.dtype) -> str:
    """Why a request ended on NaN or infinite logits, and what to do: in fp16 (a V100's or T4's default)
    activations overflow, which bf16 and fp32 do not; in those a model that gives them has diverged."""
    if dtype == torch.float16:
        return ("the model's logits are not finite (NaN or inf): its activations overflowed float16; "
                "use --dtype bf16 or fp32")
    return (f"the model's logits are not finite (NaN or inf) in {dtype_name(dtype)}: the "
            f"model has diverged")


def quantize_int8(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight-only int8 with one scale per output row (absmax / 127): a quarter of fp32's bytes.

    Batch-1 decoding on a CPU is bound by reading every weight once per token (fp32's matrix
    products alone cap seed-82m near 60 tokens/s on 2 cores), so fewer bytes per weight is
    the only way past that; the scales are kept in the kernel's activation dtype.
    """
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale.to(dtype)


# Up to this many rows (sequences x tokens) the int8 kernel beats a bf16 matmul, and up to
# INT8_MAX_ROWS_FP32 an fp32 one (seed-82m decoding 8 sequences on a 2-core EPYC without bf16
# instructions: 261 tokens/s through the kernel, 178 on fp32 weights, as fp32 alone); prefill and larger
# batches are compute-bound and run on the model's own dense weights instead.
INT8_MAX_ROWS = 4
INT8_MAX_ROWS_FP32 = 16
# PyTorch's CPU int8 kernel steps through a row's inputs 16 at a time and reads past the end of a row that
# is not a whole number of steps: garbage or a segfault for a model of dim 72 or hidden_dim 1000 (torch 2.13).
# Such weights stay dense.
INT8_IN_MULTIPLE = 16


def _int8_weights(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None,
                                                                  torch.Tensor]:
    """(int8 weight, scales, dense weight); only the dense one where the kernel cannot take its width.
    The kernel's activations are half (`dtype`'s, or bf16 for fp32): with fp32 ones it took 11x as long."""
    if w.shape[1] % INT8_IN_MULTIPLE:
        return None, None, w
    return (*quantize_int8(w, dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16), w)


def int8_max_rows(dtype: torch.dtype) -> int:
    """The most rows a step sends through the int8 kernel when the engine computes in `dtype`."""
    return INT8_MAX_ROWS_FP32 if dtype == torch.float32 else INT8_MAX_ROWS


def _int8_linear(x: torch.Tensor, w: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]) -> torch.Tensor:
    q, scale, dense = w
    if q is None or scale is None or x.numel() > int8_max_rows(x.dtype) * x.shape[-1]:
        return F.linear(x, dense)
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(scale.dtype).contiguous(), q, scale)
    return y.view(*x.shape[:-1], q.shape[0]).to(x.dtype)


def int8_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch build has the int8 weight-only kernel for `device` and `dtype`."""
    try:
        w, x = torch.randn(32, 64, device=device), torch.randn(3, 64, device=device, dtype=dtype)
        ref = F.linear(x.float(), w)
        err = (_int8_linear(x, _int8_weights(w, dtype)).float() - ref).abs().max() / ref.std()
        return bool(err < 0.05)
    except (AttributeError, NotImplementedError, RuntimeError):
        return False


def engine_dtype(dtype: str | torch.dtype, device: torch.device, quantize: str) -> torch.dtype:
    """The dtype an engine computes in. "auto" with int8 weights is bf16, the int8 kernel's activations,
    except on a CPU without bf16 instructions (most laptops'): there prefill and batches of more than
    INT8_MAX_ROWS rows ran on emulated bf16 weights, 3 to 6x fp32's time to the first token, so it is fp32,
    with only the kernel's activations in bf16 (int8 and fp32 weights: 1.25x fp32's memory)."""
    if quantize == "int8" and dtype == "auto":
        return torch.float32 if device.type == "cpu" and cpu_emulates(torch.bfloat16) else torch.bfloat16
    return resolve_dtype(dtype, device)


def int8_refusal(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why int8 weights cannot decode on `device` in `dtype` (its kernel is CPU-only in PyTorch), or None."""
    if int8_works(device, dtype):
        return None
    fix = "; int8 decoding runs on the CPU: add --device cpu" if device.type != "cpu" else ""
    return (f"int8 weights are not supported by this torch build on {device.type} with "
            f"{dtype_name(dtype)}{fix}")


class _Forward:
    """The model's forward pass with the KV cache, restated for generation.

    Same arithmetic as `Transformer.forward`, so the same logits bit for bit (unless the
    weights are packed or quantized; ids past the tokenizer's vocabulary get -inf), minus what
    dominates a small-batch decode step besides the matrix products: ~150 module calls, dropout
    no-ops, and the q/k/v and gate/up weights concatenated every step. It uses the model's own
    weight tensors and RoPE tables, so a model trained further is seen at once; only packed bf16
    and int8 weights (`Engine(optimize=True)`, `quantize="int8"`) are copies.
    """

    def __init__(self, model: Transformer, weights: str, vocab: int | None):
        cfg = model.config
        # Rows past the tokenizer's vocabulary (an imported model's padding) decode to nothing: never picked.
        self.vocab = vocab if vocab is not None and vocab < cfg.vocab_size else None
        self.model, self.heads, self.kv_heads, self.head_dim = model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        dtype = model.lm_head.weight.dtype
        prep, self.linear = {
            "plain": (lambda w: w, F.linear),
            "packed": (pack_cpu_bf16, _packed_linear),
            "int8": (lambda w: _int8_weights(w, dtype), _int8_linear),
        }[weights]
        self.layers = [(b.input_layernorm, b.post_attention_layernorm,
                        *(prep(m.weight) for m in (b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj,
                                                   b.self_attn.o_proj, b.mlp.gate_proj, b.mlp.up_proj,
                                                   b.mlp.down_proj)))
                       for b in model.model.layers]
        self.lm_head = prep(model.lm_head.weight)
        self.cos, self.sin = model.rope_cos, model.rope_sin

    def __call__(self, idx: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                 valid: torch.Tensor | None = None, every_position: bool = False) -> torch.Tensor:
        """Feeds (B, T) tokens through the cache; returns the (B, vocab) logits of the last position,
        or the (B, T, vocab) logits of every position."""
        B, T = idx.shape
        H, K, D, lin = self.heads, self.kv_heads, self.head_dim, self.linear
        mask = cache.mask(valid if valid is not None else torch.ones(B, T, dtype=torch.bool, device=idx.device))
        cos, sin = self.cos[positions], self.sin[positions]
        x = self.model.model.embed_tokens(idx)
        for i, (norm1, norm2, wq, wk, wv, wo, wg, wu, wd) in enumerate(self.layers):
            h = norm1(x)
            q = apply_rope(lin(h, wq).view(B, T, H, D).transpose(1, 2), cos, sin)
            k = apply_rope(lin(h, wk).view(B, T, K, D).transpose(1, 2), cos, sin)
            k, v = cache.update(i, k, lin(h, wv).view(B, T, K, D).transpose(1, 2))
            y = attend(q, k, v, mask)
            x = x + lin(y.transpose(1, 2).reshape(B, T, H * D), wo)
            h = norm2(x)
            x = x + lin(F.silu(lin(h, wg)) * lin(h, wu), wd)
        cache.length += T
        logits = lin(self.model.model.norm(x if every_position else x[:, -1]), self.lm_head)
        if self.vocab is not None:
            logits[..., self.vocab:] = -math.inf
        return logits


class ContextLengthError(TinykError):
    """A prompt that leaves no room in the model's context window."""

    @classmethod
    def of(cls, tokens: int, context_length: int, at_least: bool = False) -> ContextLengthError:
        """The one wording, for the engine and for checks made before any engine exists (`tinyk eval`)."""
        return cls(f"the prompt has {'at least ' if at_least else ''}{plural(tokens, 'tokens')} but the model's "
                   f"context window is {plural(context_length, 'tokens')} (at most {context_length - 1:,} fit)")


def document_ids(tok: TinyTokenizer, text: str) -> list[int]:
    """A raw prompt's ids as the start of a document: `<|im_start|>` first, as training documents begin (unless
    the text spells it, e.g. a rendered chat); a special token spelt out in it is that token."""
    ids = tok.encode(text)
    return ids if ids[:1] == [tok.bos_id] else [tok.bos_id, *ids]


def check_fits(tok: TinyTokenizer, context_length: int, texts: Iterable[str], tokens_each: int = 0) -> None:
    """Refuses text too long for the context window before it is tokenized: encoding a megabyte holds
    the GIL for a second or more (stalling every other stream of a server) and takes a GB of memory.
    `tokens_each` is the least each text adds around itself (MESSAGE_TOKENS for a chat message)."""
    sizes = [utf8_size(t) for t in texts]
    least = least_tokens(tok, sum(sizes), len(sizes), tokens_each)
    if least >= context_length:
        raise ContextLengthError.of(least, context_length, at_least=True)


def least_tokens(tok: TinyTokenizer, nbytes: int, count: int, tokens_each: int) -> int:
    """The fewest tokens `count` texts of `nbytes` UTF-8 bytes in all can be: no token holds more than
    the tokenizer's longest, and each text adds `tokens_each` around itself."""
    return nbytes // tok.max_token_bytes + tokens_each * count


def utf8_size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def chat_prompt_ids(tok: TinyTokenizer, context_length: int, messages: list[dict[str, str]]) -> list[int]:
    """A chat's prompt ids (the messages as given) from the tokenizer alone, for `Engine.chat_prompt_ids`
    and for `tinyk eval`, which checks every task file before the weights load; a chat too long for the
    window (leaving no room for a reply) is a ContextLengthError, found before a long one is tokenized."""
    check_fits(tok, context_length, (m["content"] for m in messages), MESSAGE_TOKENS)
    ids = tok.encode_chat(messages, add_generation_prompt=True)
    if len(ids) >= context_length:
        raise ContextLengthError.of(len(ids), context_length)
    return ids


@dataclass
class SamplingParams:
    """How to pick tokens. Defaults avoid the repetition loops small models fall into.

    temperature 0 is greedy decoding; top_k 0, top_p 1 and min_p 0 switch those filters off (top_p 0
    keeps only the most likely token); repetition_penalty 1 switches the penalty off. `logprobs` n
    records each generated token's log-probability and the n likeliest at its place, `prompt_logprobs`
    n the same for the prompt's tokens (None: neither); both come from the model's own distribution,
    before any sampling setting. `stop` strings end a sequence and are not part of its text;
    `stop_token_ids` do the same as EOS. A sequence also ends at EOS (`<|im_end|>`) or any other
    special token, since none belongs inside a text or a reply (`<|im_start|>` would begin a new
    document or turn), unless `ignore_eos`; special tokens are never part of the text.
    """

    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.9
    min_p: float = 0.0
    repetition_penalty: float = 1.1
    max_new_tokens: int = 256
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        self.check()

    def numbered(self, n: int) -> list[SamplingParams]:
        """The params of n samples (generate's prompts, the server's choices): with a seed, sample i
        draws with seed + i, so repeats differ and each is what that seed gives alone."""
        return [self if self.seed is None else replace(self, seed=self.seed + i) for i in range(n)]

    def check(self) -> None:
        def bad(name: str, rule: str, value) -> TinykError:
            return TinykError(f"{name} must be {rule}, got {value!r}")

        checks = [
            ("temperature", "a number >= 0", self.temperature, _is_number(self.temperature) and self.temperature >= 0),
            ("top_k", "an integer >= 0", self.top_k, is_int(self.top_k) and self.top_k >= 0),
            ("top_p", "a number in [0, 1]", self.top_p, _is_number(self.top_p) and 0 <= self.top_p <= 1),
            ("min_p", "a number in [0, 1]", self.min_p, _is_number(self.min_p) and 0 <= self.min_p <= 1),
            ("repetition_penalty", "a number in [{:g}, {:g}]".format(*REPETITION_PENALTY_RANGE),
             self.repetition_penalty,
             _is_number(self.repetition_penalty)
             and REPETITION_PENALTY_RANGE[0] <= self.repetition_penalty <= REPETITION_PENALTY_RANGE[1]),
            ("max_new_tokens", "an integer >= 1", self.max_new_tokens,
             is_int(self.max_new_tokens) and self.max_new_tokens >= 1),
            ("seed", "an integer or None", self.seed, self.seed is None or is_int(self.seed)),
            ("stop", "a list of non-empty strings", self.stop,
             isinstance(self.stop, list | tuple) and all(isinstance(s, str) and s for s in self.stop)),
            ("stop_token_ids", "a list of integers", self.stop_token_ids,
             isinstance(self.stop_token_ids, list | tuple) and all(is_int(t) for t in self.stop_token_ids)),
            *((name, f"None or an integer from 0 to {MAX_LOGPROBS}", n,
               n is None or is_int(n) and 0 <= n <= MAX_LOGPROBS)
              for name, n in (("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs))),
        ]
        for name, rule, value, ok in checks:
            if not ok:
                raise bad(name, rule, value)


def _is_number(x: object) -> bool:
    return is_number(x) and math.isfinite(x)


@dataclass
class TokenLogprob:
    """A token's log-probability under the model, and the likeliest tokens at its place (most likely first)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Completion:
    """One finished sequence. `token_ids` are all generated ids (a final EOS included);
    `text` excludes special tokens and anything from a stop string on. `logprobs` has one entry per
    generated id and `prompt_logprobs` one per prompt id (None for the first, which nothing predicts)
    when the sampling params asked for them. `cut_by_context`: the "length" came from the end of the
    model's context window, before max_new_tokens, which a caller should say, since it was not asked for."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS / stop string / stop token), "length", "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    cut_by_context: bool = False


class Detokenizer:
    """Turns a growing list of token ids into text deltas that are safe to show.

    Byte-level BPE splits a Chinese character over several tokens, and decoding a prefix
    then ends in U+FFFD; a stop string may also arrive a few tokens at a time. Both are held
    back until they resolve, so the deltas join to exactly the final text.
    """

    def __init__(self, tok: TinyTokenizer, stop: list[str]):
        self.tok, self.stop = tok, list(stop)
        self.max_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.checked = 0  # text before this index can no longer change or complete a stop string
        self.stopped = False
        self.dropped = False  # a cut-short reply's unfinished last character, left out of the text
        self.ends: list[int] = []  # the text's length after each token, its unfinished character's U+FFFD included
        self.starts: list[int] = []  # where each token's text begins in the text (for the logprobs of a cut one)
        self._pending = b""  # the first bytes of a character the text so far ends in
        self._covered = 0
        # The first `_whole` ids end on a whole character and decode to `_whole_text`: byte-level text
        # joins there, so each token decodes only the ids after them (decoding all of them every token
        # took 2 s of the engine thread for a 4,096-token reply).
        self._whole, self._whole_text = 0, ""

    def add(self, token_id: int) -> str:
        # A token that goes on with a character begins where that character does, not after the U+FFFD
        # standing for it (the last bytes of 衉 before a stop string were taken for past the cut).
        begin = self.ends[-1] if self.ends else 0
        if self._pending and token_id not in self.tok.special_ids and \
                continues_character(self._pending, self.tok.piece(token_id)):
            begin -= 1
        self.starts.append(begin)
        self.ids.append(token_id)
        text = self._whole_text + self.tok.decode(self.ids[self._whole:], skip_special_tokens=True)
        self._pending = self.tok.pending_bytes(self.ids)
        mid = int(bool(self._pending))
        if not mid and self.tok.byte_level:
            self._whole, self._whole_text = len(self.ids), text
        self.ends.append(len(text))
        stable = len(text) - mid
        if self.stop:
            start = max(0, self.checked - self.max_stop + 1)
            # In the decoded characters only: a stop string holding U+FFFD must not match a character
            # whose last bytes are still to come.
            hits = [i for i in (text.find(s, start, stable) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                self.text = text[:min(hits)]
                return self._emit(len(self.text))
            stable -= self._partial_stop(text[:stable])
        self.checked = max(self.checked, stable)
        self.text = text
        return self._emit(stable)

    def _partial_stop(self, text: str) -> int:
        """Length of the longest end of `text` that could be the start of a stop string. Only the places
        where a stop string's first character stands are tried: trying every length cost a request
        with 5000-character stop strings (run for every token, in the thread that decodes them all)
        seconds per reply."""
        longest = 0
        for s in self.stop:
            i = text.find(s[0], max(0, len(text) - len(s) + 1))
            while i >= 0 and len(text) - i > longest:
                if s.startswith(text[i:]):
                    longest = len(text) - i
                    break
                i = text.find(s[0], i + 1)
        return longest

    def covered(self) -> int:
        """How many of the tokens added have all their text sent; one whose character is unfinished, or
        that may begin a stop string, waits for the delta that shows it (a stream's logprobs go with it)."""
        while self._covered < len(self.ends) and self.ends[self._covered] <= self.sent:
            self._covered += 1
        return self._covered

    def spelled(self) -> int:
        """How many of the tokens added begin within the text: once a stop string has cut it, those
        after the cut do not, nor do those of a character a cut-short reply dropped."""
        if not (self.stopped or self.dropped):
            return len(self.ids)
        return sum(start < len(self.text) for start in self.starts)

    def _emit(self, end: int) -> str:
        if end <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent:end], end
        return delta

    def flush(self, cut_short: bool = False) -> str:
        """Everything not yet sent: called once the sequence is over. When the reply was `cut_short`
        (max_tokens, a cancel, an error), a character whose last bytes were never generated is dropped,
        not shown as U+FFFD."""
        if cut_short and self._pending and len(self.text) > self.sent:
            self.text = self.text[:-1]
            self.dropped = True
        return self._emit(len(self.text))


_DONE = object()


class Request:
    """One prompt being decoded: its state in the batch and the caller's handle on it."""

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams, stream: bool):
        self.prompt_ids = prompt_ids
        self.params = params
        self.max_new = min(params.max_new_tokens, engine.context_length - len(prompt_ids))
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else SPECIAL_IDS)
        # random.Random(-5) is random.Random(5); modulo keeps every 64-bit seed distinct.
        self.rng = random.Random(None if params.seed is None else params.seed % 2**64)
        self.out_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []  # filled by the engine thread before the token is accepted
        self.prompt_logprobs: list[TokenLogprob | None] = []
        self.detok = Detokenizer(engine.tok, params.stop) if (stream or params.stop) else None
        self.tok = engine.tok
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.cancelled = False
        self.submitted = time.monotonic()
        self.first_token_s: float | None = None  # seconds from submitted to the first token, queueing included
        self._deltas: queue.SimpleQueue = queue.SimpleQueue()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Asks the engine to drop this sequence before its next step (e.g. the client left)."""
        self.cancelled = True

    def accept(self, token: int) -> str:
        """Records a sampled token; returns the text that became safe to show."""
        if not self.out_ids:
            self.first_token_s = time.monotonic() - self.submitted
        self.out_ids.append(token)
        delta = ""
        if token in self.stop_ids:
            self.finish_reason = "stop"
        elif self.detok is not None:
            delta = self.detok.add(token)
            if self.detok.stopped:
                self.finish_reason = "stop"
        if self.finish_reason is None and len(self.out_ids) >= self.max_new:
            self.finish_reason = "length"
        if self.finished and self.detok is not None:
            delta += self.detok.flush(cut_short=self.cut_short)
        return delta

    def end(self, reason: str, error: str | None = None) -> str:
        self.finish_reason, self.error = reason, error
        return self.detok.flush(cut_short=self.cut_short) if self.detok is not None else ""

    @property
    def cut_short(self) -> bool:
        """Whether the reply ended before the model ended it (max_tokens, a cancel, an error)."""
        return self.finish_reason != "stop"

    def completion(self) -> Completion:
        if self.detok is not None:
            text = self.detok.text
        else:
            ids = self.out_ids[:-1] if self.out_ids and self.out_ids[-1] in self.stop_ids else self.out_ids
            text = self.tok.decode(ids, skip_special_tokens=True)
            if self.cut_short and self.tok.ends_mid_character(ids):
                text = text[:-1]  # the U+FFFD of a character whose last bytes were never generated
        p = self.params
        return Completion(text=text, token_ids=list(self.out_ids), finish_reason=self.finish_reason or "length",
                          prompt_tokens=len(self.prompt_ids), completion_tokens=len(self.out_ids),
                          logprobs=None if p.logprobs is None else list(self.logprobs),
                          prompt_logprobs=None if p.prompt_logprobs is None else list(self.prompt_logprobs),
                          cut_by_context=self.finish_reason == "length" and self.max_new < p.max_new_tokens)

    def spelled_tokens(self) -> int:
        """How many generated tokens begin within the text (not those of a stop string past its cut)."""
        return self.detok.spelled() if self.detok is not None else len(self.out_ids)

    def deliver(self, delta: str) -> None:
        if delta:  # with how many tokens' text has now been sent: the log-probabilities behind it
            self._deltas.put((delta, self.detok.covered() if self.detok is not None else len(self.out_ids)))
        if self.finished:
            self._deltas.put(_DONE)

    def wait(self, timeout: float) -> bool:
        """Whether the sequence ended within `timeout` seconds (its text is then in `completion()`)."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                if self._deltas.get(timeout=left) is _DONE:
                    return True
            except queue.Empty:
                break
        return False

    def deltas(self, timeout: float | None = None) -> Iterator[str]:
        """Text deltas as a background `Scheduler` produces them, until the sequence ends; queue.Empty
        after `timeout` seconds without one."""
        return (text for text, _ in self.chunks(timeout))

    def chunks(self, timeout: float | None = None, idle: Callable[[], None] | None = None
               ) -> Iterator[tuple[str, int]]:
        """`deltas` with, for each, how many of `logprobs` its text comes from: the scheduler may have
        recorded the next tokens' by the time a delta is read, and a stream sends each text with its own.
        After `timeout` seconds without one, `idle()` is called and the wait goes on (a server checks
        there that its client is still connected, and raises to stop); without `idle`, queue.Empty."""
        while True:
            try:
                item = self._deltas.get(timeout=timeout)
            except queue.Empty:
                if idle is None:
                    raise
                idle()
                continue
            if item is _DONE:
                return
            yield item


class _DecodeBatch:
    """The sequences decoding together: one KV cache, one forward pass per step."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._clear()

    def _clear(self) -> None:
        self.rows: list[Request] = []
        self.cache: KVCache | None = None
        self.tokens = self.pos = self.seen = None  # next input token, its position, ids seen so far
        self._params: _ParamTensors | None = None

    @torch.inference_mode()
    def add(self, reqs: list[Request]) -> list[tuple[Request, str]]:
        """Prefills `reqs`, samples their first tokens and merges them into the running batch."""
        e = self.engine
        dev = e.device
        n, P = len(reqs), max(len(r.prompt_ids) for r in reqs)
        x = torch.full((n, P), e.tok.pad_id, dtype=torch.long)
        valid = torch.zeros((n, P), dtype=torch.bool)
        for i, r in enumerate(reqs):
            x[i, P - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            valid[i, P - len(r.prompt_ids):] = True
        x, valid = x.to(dev), valid.to(dev)
        positions = (valid.cumsum(1) - 1).clamp(min=0)
        # A lone batch gets its final size now, so decoding never copies the cache.
        room = max(r.max_new for r in reqs) - 1 if self.cache is None else 0
        cache = KVCache(e.model.config, n, P + room, dev, e.dtype)
        every = any(r.params.prompt_logprobs is not None for r in reqs)
        logits = e.forward(x, positions, cache, valid, every_position=every)
        if every:
            _record_prompt_logprobs(reqs, logits, x)
            logits = logits[:, -1]
        seen = torch.zeros((n, e.vocab_size), dtype=torch.bool, device=dev)
        seen.scatter_(1, torch.where(valid, x, x[:, -1:]), True)
        tokens, events = self._take(reqs, logits, seen, _ParamTensors(reqs, dev))
        keep = [i for i, r in enumerate(reqs) if not r.finished]
        if keep:
            index = torch.tensor(keep, device=dev)
            if len(keep) < n:
                cache.reorder(index)
            new_rows = [reqs[i] for i in keep]
            self._join(cache, new_rows, tokens[index], positions[index, -1] + 1, seen[index])
        return events

    def _join(self, cache: KVCache, rows: list[Request], tokens, pos, seen) -> None:
        if self.cache is None:  # an empty batch (no sampling settings either)
            self.cache, self.rows, self.tokens, self.pos, self.seen = cache, rows, tokens, pos, seen
            return
        old = self.cache
        live = old.key_valid[:, :old.length].any(0).nonzero()
        first = int(live[0]) if len(live) else old.length
        la, lb = old.length - first, cache.length
        L = max(la, lb)
        everyone = self.rows + rows
        need = L + max(r.max_new - len(r.out_ids) for r in everyone)
        merged = KVCache(self.engine.model.config, len(everyone), need, self.engine.device, self.engine.dtype)
        nb = len(self.rows)
        # Both parts are right-aligned at slot L; slots to their left stay invalid (masked).
        for dst, src in ((merged.k, old.k), (merged.v, old.v)):
            dst[:, :nb, :, L - la:L] = src[:, :, :, first:old.length]
        merged.key_valid[:nb, L - la:L] = old.key_valid[:, first:old.length]
        for dst, src in ((merged.k, cache.k), (merged.v, cache.v)):
            dst[:, nb:, :, L - lb:L] = src[:, :, :, :lb]
        merged.key_valid[nb:, L - lb:L] = cache.key_valid[:, :lb]
        merged.length = L
        # All or nothing: a failure above leaves the batch as it was, running on without the new rows.
        joined = torch.cat([self.tokens, tokens]), torch.cat([self.pos, pos]), torch.cat([self.seen, seen])
        self.cache, self.rows = merged, everyone
        self.tokens, self.pos, self.seen = joined
        self._params = None

    @torch.inference_mode()
    def step(self) -> list[tuple[Request, str]]:
        """One decode step for every row; finished or cancelled rows leave the batch."""
        events = [(r, r.end("cancelled")) for r in self.rows if r.cancelled]
        self._drop()
        if not self.rows:
            return events
        e = self.engine
        logits = e.forward(self.tokens[:, None], self.pos[:, None], self.cache)
        self.pos = self.pos + 1
        if self._params is None:
            self._params = _ParamTensors(self.rows, e.device)
        self.tokens, taken = self._take(self.rows, logits, self.seen, self._params)
        events += taken
        self._drop()
        return events

    def fail(self, message: str) -> list[tuple[Request, str]]:
        """Ends every row with an error (a failed step must not take the server down)."""
        events = [(r, r.end("error", message)) for r in self.rows]
        self._clear()
        return events

    def _take(self, rows: list[Request], logits: torch.Tensor, seen: torch.Tensor,
              params: _ParamTensors) -> tuple[torch.Tensor, list[tuple[Request, str]]]:
        """Samples each row's next token and gives it to the row (with its log-probability where asked);
        a row whose logits were not finite ends with an error instead."""
        logits, bad = _finite_rows(logits)
        tokens = self.engine.sample(logits, seen, params, [r.rng for r in rows])
        failed = bad.tolist()
        _record_logprobs(rows, logits, tokens, failed)
        seen[torch.arange(len(rows), device=seen.device), tokens] = True
        return tokens, [(r, r.end("error", non_finite(self.engine.dtype)) if bad else r.accept(t))
                        for r, t, bad in zip(rows, tokens.tolist(), failed, strict=True)]

    def _drop(self) -> None:
        keep = [i for i, r in enumerate(self.rows) if not r.finished]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self._clear()
            return
        index = torch.tensor(keep, device=self.engine.device)
        self.cache.reorder(index)
        self.tokens, self.pos, self.seen = self.tokens[index], self.pos[index], self.seen[index]
        self.rows = [self.rows[i] for i in keep]
        self._params = None


def _finite_rows(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits with each row holding NaN or +inf zeroed, so sampling them cannot fail, and which
    rows those were (they end with an error; the rest of the batch goes on). -inf is no fault: it is
    a token ruled out, as a padded vocabulary's are."""
    bad = (logits.isnan() | (logits == math.inf)).any(-1)
    return logits.masked_fill(bad[:, None], 0.0), bad


def _top_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, n: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Each row's log-probability of its chosen id, and its n likeliest (id, log-probability)s."""
    picked = logprobs.gather(-1, chosen[:, None]).squeeze(-1).tolist()
    values, ids = logprobs.topk(n, dim=-1)
    return [(lp, list(zip(i, v, strict=True))) for lp, i, v in zip(picked, ids.tolist(), values.tolist(), strict=True)]


def _record_logprobs(rows: list[Request], logits: torch.Tensor, tokens: torch.Tensor, failed: list[bool]) -> None:
    """Appends each row's sampled token, with its log-probability, to the rows that asked for them (not
    to a row whose logits failed: its token, drawn from zeroed logits, is never taken)."""
    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None and not failed[i]]
    if not want:
        return
    index = torch.tensor(want, device=logits.device)
    n = max(rows[i].params.logprobs for i in want)
    chosen = tokens[index]
    found = _top_logprobs(logits[index].float().log_softmax(-1), chosen, n)
    for i, token, (lp, top) in zip(want, chosen.tolist(), found, strict=True):  # one device sync, not one a row
        rows[i].logprobs.append(TokenLogprob(token, lp, top[:rows[i].params.logprobs]))


def _record_prompt_logprobs(rows: list[Request], logits: torch.Tensor, x: torch.Tensor) -> None:
    """Sets each asking row's prompt log-probabilities from the prefill's (rows, positions, vocab) logits
    of its left-padded prompt `x`: position t predicts token t + 1."""
    for i, r in enumerate(rows):
        n = r.params.prompt_logprobs
        if n is None:
            continue
        P = len(r.prompt_ids)
        found = _top_logprobs(logits[i, -P:-1].float().log_softmax(-1), x[i, -P + 1:], n) if P > 1 else []
        r.prompt_logprobs = [None] + [TokenLogprob(t, lp, top)
                                      for t, (lp, top) in zip(r.prompt_ids[1:], found, strict=True)]


class _ParamTensors:
    """Per-row sampling settings as tensors, so one batch can mix greedy and sampled requests."""

    def __init__(self, rows: list[Request], device: torch.device):
        ps = [r.params for r in rows]

        def col(name: str) -> torch.Tensor:
            return torch.tensor([getattr(p, name) for p in ps], dtype=torch.float32, device=device)

        self.greedy = all(p.temperature == 0 for p in ps)
        self.penalize = any(p.repetition_penalty != 1 for p in ps)
        self.filter_k = any(p.top_k > 0 for p in ps)
        self.temperature, self.top_p, self.min_p = col("temperature"), col("top_p"), col("min_p")
        self.penalty = col("repetition_penalty")
        # Any k past the vocabulary keeps every token; an int64 cannot hold every Python int.
        self.top_k = torch.tensor([min(p.top_k, 2**62) for p in ps], dtype=torch.long, device=device)


class Engine:
    """Batched, cached generation over one tinyk model (see the module docstring)."""

    def __init__(self, model: Transformer, tok: TinyTokenizer, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, max_batch: int = 16, optimize: bool = False,
                 quantize: str = "none"):
        """`optimize` lets a bf16 engine on CPU keep packed copies of the weights (see
        `pack_cpu_bf16`), which would go stale if the model were trained further; `from_dir`
        sets it, since the engine owns that model. `quantize="int8"` decodes with int8
        copies of the weights (see `quantize_int8`); dtype "auto" then computes as `engine_dtype` says."""
        check_compatible(model.config, tok)
        if not (isinstance(max_batch, int) and max_batch >= 1):
            raise TinykError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if quantize not in QUANTIZE:
            raise TinykError(f"unknown quantization {quantize!r} (use {' or '.join(QUANTIZE)})")
        first = next(model.parameters())
        self.device = resolve_device(device) if device is not None else first.device
        if quantize == "int8" and dtype is None:
            dtype = "auto"
        self.dtype = engine_dtype(dtype, self.device, quantize) if dtype is not None else first.dtype
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.quantize = quantize
        if quantize == "int8":
            if why := int8_refusal(self.device, self.dtype):
                raise TinykError(why)
            weights = "int8"
        elif optimize and self.device.type == "cpu" and self.dtype == torch.bfloat16 and cpu_bf16_packing_works():
            weights = "packed"
        else:
            weights = "plain"
        self.packed = weights == "packed"
        self.forward = _Forward(self.model, weights, tok.vocab_size)
        self.tok = tok
        self.max_batch = max_batch
        self.context_length = model.config.max_seq_len
        self.vocab_size = model.config.vocab_size

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str | torch.device | None = "cpu",
                 dtype: str | torch.dtype | None = None, max_batch: int = 16, quantize: str = "none") -> Engine:
        """The engine of a model directory (a run's `final/`, a checkpoint's `model/`, an imported one),
        as `tinyk generate`, `chat` and `serve` make it. `device`: CPU unless asked ("auto", which the CLI
        passes, is CUDA when there is one); `dtype` None (or "auto"): bf16 on CUDA (fp16 on cards without
        it), fp32 on CPU; `max_batch` sequences decode together; `quantize` "int8" stores the weights as
        int8 (CPU only)."""
        dev = resolve_device(device)
        model, tok = load_model(model_dir, device=dev)
        return cls(model, tok, dtype=dtype if dtype is not None else "auto", max_batch=max_batch, optimize=True,
                   quantize=quantize)

    # -- prompts ------------------------------------------------------------------------

    def encode(self, prompt: str | list[int], bos: bool = True) -> list[int]:
        """Token ids of a prompt. Text is a raw completion: it starts with `<|im_start|>` as training
        documents do (unless it already does, e.g. a rendered chat, or `bos` is False). Token ids are
        taken as given; an empty prompt is `<|im_start|>`, and refused as text without it."""
        if isinstance(prompt, str):
            self.check_fits([prompt])
            ids = document_ids(self.tok, prompt) if bos else self.tok.encode(prompt)
            if not ids:
                raise TinykError("an empty prompt has nothing to continue without <|im_start|> (bos=False)")
        elif isinstance(prompt, list | tuple) and len(prompt) >= self.context_length:
            raise ContextLengthError.of(len(prompt), self.context_length)
        elif isinstance(prompt, list | tuple) and all(is_int(t) for t in prompt):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise TinykError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        else:
            raise TinykError("a prompt must be a string or a list of token ids")
        ids = ids or [self.tok.bos_id]
        if len(ids) >= self.context_length:
            raise ContextLengthError.of(len(ids), self.context_length)
        return ids

    def encode_prompts(self, prompts: list[str], *, bos: bool = True, typed: int = 0
                       ) -> tuple[list[list[int]], list[int], str | None]:
        """Token ids of the prompts that fit the context, their numbers in `prompts` (from 0), and a note
        on those skipped as too long: like a file's bad records, they are skipped and counted. The
        first `typed` were typed out one by one, so the user means each: a long one is an error."""
        ids, kept, too_long = [], [], []
        for i, p in enumerate(prompts):
            try:
                ids.append(self.encode(p, bos=bos))
                kept.append(i)
            except ContextLengthError as e:  # which of many: its number and how it starts
                said = f"prompt {i + 1} of {len(prompts)} ({short_repr(p, 24)}): {e}"
                if i < typed or len(prompts) == 1:
                    raise TinykError(said if len(prompts) > 1 else str(e)) from None
                too_long.append(said)
        if too_long and not ids:
            raise TinykError(f"no prompt fits the model's {self.context_length}-token context (the first: "
                             f"{too_long[0]})")
        note = (f"skipped {plural(len(too_long), 'prompts')} longer than the model's context (the first: "
                f"{too_long[0]})") if too_long else None
        return ids, kept, note

    def chat_ids(self, messages: list[dict], default_system: str | None | ModelPrompt = None) -> list[int]:
        """The chat prompt's token ids, as SFT data is tokenized: message text is only ever text. The
        messages are taken as given unless `default_system` is passed (`chat` passes the training one)."""
        return self.tok.encode_chat(self._chat_messages(messages, default_system), add_generation_prompt=True)

    def chat_prompt_ids(self, messages: list[dict], default_system: str | None | ModelPrompt = None) -> list[int]:
        """`chat_ids`, refused (a ContextLengthError) where the window has no room left for a reply."""
        return chat_prompt_ids(self.tok, self.context_length, self._chat_messages(messages, default_system))

    def check_fits(self, texts: Iterable[str], tokens_each: int = 0) -> None:
        check_fits(self.tok, self.context_length, texts, tokens_each)

    def system_tokens(self, system: str | None) -> int:
        """Tokens a one-message conversation under `system` takes besides the message's text."""
        self.check_fits([system or ""], tokens_each=MESSAGE_TOKENS)  # a pasted megabyte: refused, not tokenized
        return self.tok.opening_tokens(system)

    def system_too_long(self, system: str | None, named: str = "the system prompt") -> str | None:
        """Why system prompt `system` leaves no room for any message, or None."""
        try:
            start = self.system_tokens(system)
        except ContextLengthError:
            start = self.context_length
        return None if start < self.context_length else (
            f"{named} is too long: with it the conversation takes at least {start:,} tokens before "
            f"any message, and the model's context window is {self.context_length:,}")

    def fit_chat(self, messages: list[dict], default_system: str | None | ModelPrompt, room: int) -> list[dict]:
        """`messages` (`default_system` first where they have no system message) without their oldest user
        and assistant turns, as many as the prompt needs to leave `room` tokens of the window for the reply
        (`tinyk chat`, and `tinyk serve --fit-context`): every system message stays, as does the last
        message, and the turns left open with a user's. Where even the last message cannot fit, every other
        turn is dropped, so that the refusal counts its tokens alone. Linear in the messages: a history far
        too long is cut by check_fits's bound before any of it is tokenized, and each message left is
        tokenized once (a turn's tokens do not depend on its neighbours')."""
        chat, ctx = self._chat_messages(messages, default_system), self.context_length
        turns = [i for i, m in enumerate(chat) if m["role"] not in SYSTEM_ROLES]
        if not turns:  # system messages alone: nothing to drop
            return chat
        size = [utf8_size(m["content"]) for m in chat]

        def least(nbytes: int, count: int) -> int:  # check_fits's bound
            return least_tokens(self.tok, nbytes, count, MESSAGE_TOKENS)

        first = len(turns) - 1  # the last message always stays
        nbytes = sum(size) - sum(size[i] for i in turns[:-1])
        count = len(chat) - first
        while first > 0 and least(nbytes + size[turns[first - 1]], count + 1) < ctx:
            first -= 1
            nbytes, count = nbytes + size[turns[first]], count + 1
        if least(nbytes, count) < ctx:
            kept = [i for i, m in enumerate(chat) if m["role"] in SYSTEM_ROLES or i >= turns[first]]
            cost = dict(zip(kept, (len(t.ids) for t in encode_chat(self.tok.plain, [[chat[i]] for i in kept])),
                            strict=True))
            total = len(self.tok.encode_chat([], add_generation_prompt=True)) + sum(cost.values())
            while first < len(turns) - 1 and (total + room > ctx or chat[turns[first]]["role"] == "assistant"):
                total -= cost[turns[first]]
                first += 1
        dropped = set(turns[:first])
        return [m for i, m in enumerate(chat) if i not in dropped]

    def _chat_messages(self, messages: list[dict], default_system: str | None | ModelPrompt) -> list[dict]:
        if not isinstance(messages, list) or not messages:
            raise TinykError("messages must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise TinykError(f"messages[{i}] must be an object with a string 'content'")
            if m.get("role") not in (*CHAT_ROLES, *SYSTEM_ROLES):
                roles = ", ".join(dict.fromkeys(CHAT_ROLES + SYSTEM_ROLES))
                raise TinykError(f"messages[{i}].role must be one of {roles}")
        return with_system(messages, self.tok.resolve_system(default_system))

    def request(self, prompt: str | list[int], params: SamplingParams, stream: bool = True) -> Request:
        params.check()
        return Request(self, self.encode(prompt), params, stream)

    # -- running ------------------------------------------------------------------------

    def _steps(self, requests: Iterable[Request]) -> Iterator[list[tuple[Request, str]]]:
        """Decodes `requests` (at most `max_batch` at a time, each taken as a row frees up), yielding each
        step's (request, text delta)s."""
        pending, batch = iter(requests), _DecodeBatch(self)
        while True:
            admit = list(itertools.islice(pending, self.max_batch - len(batch.rows)))
            if not admit and not batch.rows:
                return
            events = batch.add(admit) if admit else []
            if batch.rows:
                events += batch.step()
            if failed := next((r.error for r, _ in events if r.error), None):
                raise TinykError(failed)
            yield events

    def run(self, requests: list[Request]) -> Iterator[tuple[Request, str]]:
        """Decodes `requests` (at most `max_batch` at a time), yielding (request, text delta)."""
        for events in self._steps(requests):
            for r, delta in events:
                if delta:
                    yield r, delta

    def completions(self, prompts: list[str] | list[list[int]],
                    params: SamplingParams | list[SamplingParams] | None = None) -> Iterator[Completion]:
        """Raw completions of `prompts` in order, each as soon as it and those before it are done, so a
        long list shows its results as it goes (and an interrupted one keeps them); one `params` or one
        per prompt."""
        if not isinstance(prompts, list):
            raise TinykError("prompts must be a list")
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise TinykError(f"{len(plist)} sets of sampling params for {plural(len(prompts), 'prompts')} (give one "
                             f"per prompt, or one for all)")
        for sp in {id(sp): sp for sp in plist}.values():
            sp.check()
        ids = [self.encode(p) for p in prompts]  # every prompt checked before any is decoded
        reqs: deque[Request] = deque()  # made as rows free up: a file of 300,000 prompts held 1.6 GB of them

        def made() -> Iterator[Request]:
            for prompt_ids, sp in zip(ids, plist, strict=True):
                reqs.append(Request(self, prompt_ids, sp, stream=False))
                yield reqs[-1]

        for _ in self._steps(made()):
            while reqs and reqs[0].finished:
                yield reqs.popleft().completion()

    def generate(self, prompts: list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Raw completions of `prompts`, in order (decoded `max_batch` at a time); one `params` or one per prompt."""
        return list(self.completions(prompts, params))

    def chat(self, messages_batch: list[list[dict]], params: SamplingParams | list[SamplingParams] | None = None,
             default_system: str | None | ModelPrompt = MODEL_PROMPT) -> list[Completion]:
        """Assistant replies to each conversation, through the chat template. As in `tinyk chat` and the
        server, a conversation without a system message gets the one the model's SFT examples carried,
        unless `default_system` is given (None: none), as in `transformers`' apply_chat_template."""
        return self.generate([self.chat_ids(m, default_system) for m in messages_batch], params)

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one raw completion as they are produced."""
        for _, delta in self.run([self.request(prompt, params or SamplingParams())]):
            yield delta

    # -- sampling -----------------------------------------------------------------------

    @staticmethod
    def sample(logits: torch.Tensor, seen: torch.Tensor, p: _ParamTensors,
               rngs: list[random.Random]) -> torch.Tensor:
        """Next token per row: repetition penalty, then greedy or temperature/top-k/top-p/min-p.

        The order matches Hugging Face's processors. Each row draws from its own seeded
        generator, so a seeded request samples the same tokens whatever it is batched with.
        """
        logits = logits.float()
        if p.penalize:
            pen = p.penalty[:, None]
            logits = torch.where(seen, torch.where(logits > 0, logits / pen, logits * pen), logits)
        greedy = logits.argmax(-1)
        if p.greedy:
            return greedy
        scaled = logits / p.temperature.clamp(min=1e-6)[:, None]
        if p.filter_k:
            k = torch.where(p.top_k > 0, p.top_k, scaled.shape[-1]).clamp(max=scaled.shape[-1])
            kth = scaled.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
            scaled = scaled.masked_fill(scaled < kth, -math.inf)
        sorted_l, order = scaled.sort(-1, descending=True)
        probs = sorted_l.softmax(-1)
        # top-p keeps the smallest head whose mass reaches top_p (the most likely token always, even at 0);
        # top_p 1 keeps everything, also where float32's cumulative sum reaches 1 early.
        cut = (probs.cumsum(-1) - probs >= p.top_p.clamp(min=1e-9)[:, None]) & (p.top_p < 1)[:, None]
        sorted_l = sorted_l.masked_fill(cut, -math.inf)
        probs = sorted_l.softmax(-1)
        probs = probs.masked_fill(probs < p.min_p[:, None] * probs[:, :1], 0.0)
        # In float64, so a draw keeps its 53 bits: in float32 the top 2**-25 of draws all became the
        # last token. The kept tokens are a prefix of `order`; a draw that still rounds to cdf's end
        # would step past every filtered-out token in searchsorted, so it stops at the last kept one.
        cdf = probs.double().cumsum(-1)
        u = torch.tensor([r.random() for r in rngs], dtype=torch.float64, device=logits.device)[:, None] * cdf[:, -1:]
        last_kept = (probs > 0).sum(-1, keepdim=True) - 1
        choice = torch.minimum(torch.searchsorted(cdf, u, right=True), last_kept)
        sampled = order.gather(1, choice).squeeze(1)
        return torch.where(p.temperature == 0, greedy, sampled)


class EngineBusy(TinykError):
    """Too many requests are waiting; the caller should retry later."""


class EngineStopping(EngineBusy):
    """The engine is stopping: the caller may retry later (or elsewhere)."""


SHUTTING_DOWN = "the server is shutting down; retry later"  # the error of requests a closing Scheduler ends


def _cancelled_apart(reqs: Iterable[Request]) -> tuple[list[Request], list[Request]]:
    """Those cancelled and the others, each request's flag read once: a client may leave between two reads."""
    cancelled: list[Request] = []
    others: list[Request] = []
    for r in reqs:
        (cancelled if r.cancelled else others).append(r)
    return cancelled, others


def _failure(e: Exception) -> str:
    """The error of the requests a failed prefill or step ends."""
    return f"generation failed: {type(e).__name__}: {e}"


class Scheduler:
    """Serves concurrent callers from one background thread that owns the model.

    Callers `submit` requests and read their deltas; the thread admits waiting requests
    into the running batch between decode steps (up to `max_batch` rows) and never waits
    on a caller, so a slow or vanished client cannot stall anyone else.
    """

    def __init__(self, engine: Engine, max_waiting: int = 256,
                 on_finish: Callable[[Request], None] | None = None):
        self.engine, self.max_waiting = engine, max_waiting
        self.on_finish = on_finish  # in the engine thread as each request ends, before its caller wakes: keep it quick
        self.finished: Counter[str] = Counter()
        self.running = 0
        self._waiting: deque[Request] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="tinyk-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt: str | list[int], params: SamplingParams) -> Request:
        return self.submit_all([(prompt, params)])[0]

    def submit_all(self, prompts: list[tuple[str | list[int], SamplingParams]]) -> list[Request]:
        """Queues all of them or none: the choices of an n=4 request that the queue has no room for
        must not wait there first, to be prefilled for nobody and crowd others out."""
        reqs = [self.engine.request(prompt, params, stream=True) for prompt, params in prompts]
        with self._cv:
            if self._closed:
                raise EngineStopping(SHUTTING_DOWN)
            waiting = len(self._waiting)
            if waiting + len(reqs) > self.max_waiting:
                room = f"has room for {self.max_waiting - waiting} of these {len(reqs)}" if len(reqs) > 1 else "is full"
                raise EngineBusy(f"the queue {room} ({waiting} waiting); retry later")
            self._waiting.extend(reqs)
            self._cv.notify()
        return reqs

    def stop(self) -> None:
        """Refuses new requests; those queued or decoding end (error SHUTTING_DOWN) before the next step."""
        with self._cv:
            self._closed = True
            self._cv.notify()

    def close(self) -> None:
        self.stop()
        self._thread.join()

    def _loop(self) -> None:
        batch = _DecodeBatch(self.engine)
        while True:
            with self._cv:
                while not self._waiting and not batch.rows and not self._closed:
                    self._cv.wait()
                if self._closed:
                    events = batch.fail(SHUTTING_DOWN)
                    events += [(r, r.end("error", SHUTTING_DOWN)) for r in self._waiting]
                    self._waiting.clear()
                    self._deliver(events)
                    return
                # A request whose client left while it waited gives its place in the queue up now.
                gone, kept = _cancelled_apart(self._waiting)
                if gone:  # else the queue stays as it is: this runs before every decode step
                    self._waiting = deque(kept)
                room = self.engine.max_batch - len(batch.rows)
                admit = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            left, admit = _cancelled_apart(admit)
            events = [(r, r.end("cancelled")) for r in gone + left]
            # A failure ends the requests it reaches, with its error for their callers. A prefill that
            # fails (one long prompt out of memory) reaches only those it admitted: the batch it would
            # have joined is untouched, and its replies go on.
            try:
                if admit:
                    events += batch.add(admit)
            except Exception as e:
                message = _failure(e)
                # Those it finished inside it lost their text with the failure: they end with the error too.
                events += [(r, r.end("error", message)) for r in admit]
            try:
                if batch.rows:
                    events += batch.step()
            except Exception as e:
                events += batch.fail(_failure(e))
            self.running = len(batch.rows)
            self._deliver(events)

    def _deliver(self, events: list[tuple[Request, str]]) -> None:
        """Hands each request its text of this round at once: a request admitted and finished in the
        same round has two events, and must end (and be counted) once, after all of its text. A finished
        one is counted and logged before its caller wakes, so `stats()` then includes it."""
        text: dict[Request, str] = {}
        for r, delta in events:
            text[r] = text.get(r, "") + delta
        for r, delta in text.items():
            if r.finished:
                with self._cv:
                    self.finished[r.finish_reason] += 1
                if self.on_finish is not None:
                    try:
                        self.on_finish(r)
                    except Exception as e:  # a logging hook must not stop the engine thread
                        sys.stderr.write(f"tinyk: on_finish failed: {type(e).__name__}: {e}\n")
            r.deliver(delta)

    def stats(self) -> dict:
        with self._cv:
            return {"running": self.running, "waiting": len(self._waiting), "finished": dict(self.finished)}
