"""OpenAI's API without the HTTP: request bodies checked field by field and turned into engine
requests (`Api.submit`), and the pieces of the answers that need the tokenizer (logprobs, echoes).
`serve.py` carries it over HTTP; `responses.py` maps the Responses API onto its chat path.

A request this server cannot honour as asked gets a 400 naming the field, never a silently different
answer: every field is known (answered, ignored as OpenAI's no-ops, or refused unless off).
"""

from __future__ import annotations

import codecs
import json
import random
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .engine import (
    MAX_LOGPROBS,
    REPETITION_PENALTY_RANGE,
    SHUTTING_DOWN,
    ContextLengthError,
    Engine,
    EngineBusy,
    EngineStopping,
    Request,
    SamplingParams,
    Scheduler,
    TokenLogprob,
)
from .errors import TinykError, escape_controls
from .inputs import has_surrogate
from .tokenizer import (
    IM_START_ID,
    SPECIAL_IDS,
    SPECIAL_TOKENS,
    SYSTEM_ROLES,
    ModelPrompt,
    TinyTokenizer,
    continues_character,
    message_text,
)
from .units import is_int

if TYPE_CHECKING:
    from .serve import ServerConfig

MAX_STOP_STRINGS = 4

# The roles a request may give, as the chat template names them (OpenAI's `developer` is the system role).
API_ROLES = {r: "system" if r in SYSTEM_ROLES else r for r in (*SYSTEM_ROLES, "user", "assistant")}
# OpenAI request fields this server cannot honour, with the values that mean "off" (null always does):
# anything else is a 400, not a silently different answer. Those of both endpoints, then of one.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "best_of": (1,), "suffix": ("",),
    "logit_bias": ({},), "presence_penalty": (0,), "frequency_penalty": (0,), "tools": ([],), "functions": ([],),
    "tool_choice": ("none", "auto"), "function_call": ("none", "auto"), "modalities": (["text"],), "audio": (),
    "web_search_options": (), "enable_thinking": (False,), "chat_template_kwargs": ({}, {"enable_thinking": False}),
}
UNSUPPORTED_IN_CHAT: dict[str, tuple[Any, ...]] = {"echo": (False,)}
UNSUPPORTED_IN_COMPLETIONS: dict[str, tuple[Any, ...]] = {"top_logprobs": (0,)}
NO_LOGPROB = -9999.0  # JSON has no -infinity: a token the model rules out (vLLM's value)
# Fields that do not change the answer (who is asking, storage, caching and latency hints), accepted and
# ignored; any field in neither list is refused as OpenAI refuses it ("max_token" is a typo, not a no-op).
# Each with the JSON type OpenAI's schema gives it, which is still checked (null is always accepted).
# Those the Responses API has too, then chat's and completions' own.
IGNORED_EVERYWHERE: dict[str, str] = {
    "user": "string", "metadata": "object", "store": "boolean", "service_tier": "string",
    "parallel_tool_calls": "boolean", "prompt_cache_key": "string", "prompt_cache_retention": "string",
    "safety_identifier": "string"}
IGNORED: dict[str, str] = {**IGNORED_EVERYWHERE, "prediction": "object", "reasoning_effort": "string",
                           "verbosity": "string", "prompt_cache_options": "object"}
# How each JSON type of OpenAI's schema is told apart in a decoded body (where Python counts a bool as an int).
JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool), "integer": is_int,
    "number": lambda v: is_int(v) or isinstance(v, float), "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list)}
# The same three kinds for a chat message's fields: those of an assistant message OpenAI returned
# (a client may send it back as it came) are accepted when off; `name` has no place in the template.
MESSAGE_FIELDS = {"role", "content"}
MESSAGE_IGNORED: dict[str, str] = {"name": "string"}
MESSAGE_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tool_calls": ([],), "function_call": (), "tool_call_id": (), "audio": (), "refusal": ("",), "annotations": ([],)}
_COMMON = {"model", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
           "seed", "n", "top_k", "min_p", "repetition_penalty", "stop_token_ids", "ignore_eos", "logprobs",
           *UNSUPPORTED, *IGNORED}
CHAT_FIELDS = _COMMON | {"messages", "response_format", "top_logprobs", *UNSUPPORTED_IN_CHAT}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", *UNSUPPORTED_IN_COMPLETIONS}
MISSING = object()
DROPPED_HEADER = "X-Tinyk-Dropped-Messages"  # how many of a chat's oldest messages --fit-context left out
FIT_HINT = "; start the server with --fit-context to drop a chat's oldest turns and cut the reply's limit to fit"


class ApiError(Exception):
    """An error answered to the client as `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error",  # OpenAI's field name
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}  # those HTTP requires with the status (Allow with a 405, ...)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def check_off_fields(obj: dict, ignored: dict[str, str], unsupported: dict[str, tuple[Any, ...]],
                     prefix: str = "") -> None:
    """Refuses an ignored field of the wrong JSON type, and an unsupported one that is not off (null
    always is): a request this server cannot honour gets a 400, not a silently different answer."""
    for name, kind in ignored.items():
        if obj.get(name) is not None and not JSON_TYPES[kind](obj[name]):
            raise ApiError(400, f"'{prefix}{name}' must be {_a(kind)}", param=prefix + name, code="invalid_type")
    if ignored.get("metadata") and obj.get("metadata"):
        _check_metadata(obj["metadata"])
    for name, offs in unsupported.items():
        value = obj.get(name)
        # A bool is not a number here: `best_of: true` is not 1, while a penalty of 0.0 is as off as 0.
        if value is not None and not any(isinstance(value, bool) == isinstance(off, bool) and value == off
                                         for off in offs):
            instead = "; 'repetition_penalty' (e.g. 1.1) discourages repeats" if name.endswith("_penalty") else ""
            raise ApiError(400, f"'{prefix}{name}' is not supported by this server{instead}", param=prefix + name,
                           code="invalid_value")


def refuse_unknown(obj: dict, known: set[str], where: str) -> None:
    """A 400 for a field of object `where` that is not in `known`: a typo is not silently ignored."""
    unknown = sorted(set(obj) - known)
    if unknown:
        raise ApiError(400, f"unrecognized field in '{where}': {unknown[0]}", param=f"{where}.{unknown[0]}",
                       code="unknown_parameter")


def _check_metadata(metadata: dict) -> None:
    """OpenAI's limits on `metadata`, which a Responses answer echoes: up to 16 pairs of strings, keys
    up to 64 characters and values up to 512."""
    if len(metadata) > 16:
        raise ApiError(400, f"'metadata' has {len(metadata)} pairs; at most 16 are allowed", param="metadata",
                       code="invalid_value")
    for key, value in metadata.items():
        where = f"metadata.{key[:64]}"
        if len(key) > 64:
            raise ApiError(400, f"'{where}…' is a key over 64 characters", param="metadata", code="invalid_value")
        if not isinstance(value, str):
            raise ApiError(400, f"'{where}' must be a string, got {json.dumps(value)[:80]}", param=where,
                           code="invalid_type")
        if len(value) > 512:
            raise ApiError(400, f"'{where}' is {len(value)} characters; at most 512 are allowed", param=where,
                           code="invalid_value")


def get_field(body: dict, name: str, kind: str, default: Any = MISSING, prefix: str = "") -> Any:
    """A typed field of the request body (an object within it: `prefix` names where, e.g. "stream_options."):
    missing and wrongly typed fields are 400s."""
    value = body.get(name, MISSING)
    where = prefix + name
    if value is MISSING or (value is None and default is not MISSING):
        if default is MISSING:
            raise ApiError(400, f"you must provide {_a(repr(where))} parameter", param=where,
                           code="missing_required_parameter")
        return default
    if not JSON_TYPES[kind](value):
        raise ApiError(400, f"'{where}' must be {_a(kind)}, got {json.dumps(value)[:80]}", param=where,
                       code="invalid_type")
    return value


def _a(word: str) -> str:
    """'a string', 'an integer', "an 'input'": the article as the word (or the quoted name) is spoken."""
    article = "an" if word.lstrip("'")[0] in "aeiou" else "a"
    return f"{article} {word}"


def message_content(content: Any, where: str, part_types: tuple[str, ...] = ("text",)) -> str:
    """A message's text (`message_text`: the same request gives the same prompt here as on vLLM), or a 400
    naming the field `where`."""
    if (text := message_text(content, part_types)) is not None:
        return text
    if content is MISSING:
        raise ApiError(400, f"'{where}' is missing", param=where, code="missing_required_parameter")
    kinds = "" if part_types == ("text",) else f" ({' or '.join(part_types)})"
    raise ApiError(400, f"'{where}' must be a string or a list of text parts{kinds}", param=where, code="invalid_type")


def _sampling_field(body: dict, name: str, kind: str, default: float, lo: float, hi: float) -> Any:
    """A sampling setting: the request's, within the API's range (OpenAI's), else the server's flag, which
    is not held to it (`tinyk generate` takes a --temperature of 3 too, and a client never sent it)."""
    value = get_field(body, name, kind, None)
    if value is None:
        return default
    _in_range(name, value, lo, hi)
    return value


def _in_range(name: str, value: float | None, lo: float, hi: float) -> None:
    if value is not None and not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be between {lo} and {hi}, got {value}", param=name,
                       code="invalid_value")


def no_surrogate(text: Any, name: str) -> None:
    """JSON can escape half of a UTF-16 pair ("\\ud83d"), which is no character: refused as such."""
    if isinstance(text, str) and has_surrogate(text):
        raise ApiError(400, f"'{name}' holds a lone surrogate (\\ud800-\\udfff), which is not text", param=name,
                       code="invalid_value")


class Api:
    """Turns OpenAI request bodies into engine requests (`submit`), queued on the one scheduler that
    decodes them all."""

    def __init__(self, engine: Engine, cfg: ServerConfig):
        self.engine, self.cfg = engine, cfg
        named = "the model's own system prompt" if isinstance(cfg.system_prompt, ModelPrompt) else "--system-prompt"
        if why := engine.system_too_long(engine.tok.resolve_system(cfg.system_prompt), named):  # each chat: a 400
            raise TinykError(f"{why}; give a shorter --system-prompt, or '' for none")
        self.defaults = cfg.defaults or SamplingParams()
        self.scheduler = Scheduler(engine, max_waiting=cfg.max_waiting, on_finish=self._log)
        self.created = int(time.time())
        # --seed seeds the server, not every request: requests without a seed of their own each draw one,
        # so they differ from each other, and the same requests in the same order give the same answers.
        self._seeds = None if self.defaults.seed is None else random.Random(self.defaults.seed)
        self._seeds_lock = threading.Lock()

    def _log(self, req: Request) -> None:
        """A line per finished request in the access log; a failed one (out of memory, a diverged model)
        says why even with the log off (--quiet): the client alone was told."""
        failed = req.error is not None and req.error != SHUTTING_DOWN
        if not (failed or self.cfg.log):  # in the engine thread: a reply is not decoded for nothing
            return
        c = req.completion()
        tokens = f"{c.prompt_tokens} prompt + {c.completion_tokens} completion tokens"
        if failed:
            sys.stderr.write(escape_controls(f"tinyk: request failed: {req.error} ({tokens})") + "\n")
        else:
            took = f"{time.monotonic() - req.submitted:.2f} s"
            if req.first_token_s is not None:
                took += f" (first token after {req.first_token_s:.2f} s)"
            sys.stderr.write(f"tinyk: request done: {c.finish_reason}, {tokens} in {took}\n")

    def close(self) -> None:
        self.scheduler.close()

    def model_card(self) -> dict[str, Any]:
        # The context as vLLM (max_model_len) and OpenRouter (context_length, which Chatbox reads) name it.
        return {"id": self.cfg.model_name, "object": "model", "created": self.created, "owned_by": "tinyk",
                "max_model_len": self.engine.context_length, "context_length": self.engine.context_length}

    def check_model(self, body: dict) -> None:
        name = get_field(body, "model", "string")
        if name != self.cfg.model_name:
            raise self.no_such_model(name)

    def no_such_model(self, name: str) -> ApiError:
        """A 404 that names the model this server has: the one fix for a client's wrong name."""
        return ApiError(404, f"the model '{name}' does not exist (this server has '{self.cfg.model_name}')",
                        param="model", code="model_not_found")

    def sampling(self, body: dict, prompt_tokens: int, chat: bool) -> SamplingParams:
        d = self.defaults
        ctx = self.engine.context_length
        max_name, max_tokens = _max_tokens(body)
        # With --fit-context the engine ends each reply where the window does, as for a request without
        # max_tokens: the room each prompt of a batch leaves.
        if max_tokens is not None and prompt_tokens + max_tokens > ctx and not self.cfg.fit_context:
            raise ApiError(400, f"this model's maximum context length is {ctx} tokens, but "
                                f"{prompt_tokens + max_tokens} were requested ({prompt_tokens} in the prompt, "
                                f"{max_tokens} for the completion){FIT_HINT}",
                           param=max_name, code="context_length_exceeded")
        temperature = _sampling_field(body, "temperature", "number", d.temperature, 0, 2)
        top_p = _sampling_field(body, "top_p", "number", d.top_p, 0, 1)
        # Past the vocabulary it keeps every token, as in vLLM and as `tinyk generate --top-k` takes it.
        top_k = _sampling_field(body, "top_k", "integer", d.top_k, -1, 2**63 - 1)
        min_p = _sampling_field(body, "min_p", "number", d.min_p, 0, 1)
        penalty = _sampling_field(body, "repetition_penalty", "number", d.repetition_penalty, *REPETITION_PENALTY_RANGE)
        stop = _stop_strings(body)
        # vLLM's extensions: more tokens that end a reply, and none (not even <|im_end|>) but the length.
        stop_ids = body.get("stop_token_ids")
        if stop_ids is not None and not (isinstance(stop_ids, list) and all(
                is_int(t) and 0 <= t < self.engine.vocab_size for t in stop_ids)):
            raise ApiError(400, f"'stop_token_ids' must be a list of token ids (0 to {self.engine.vocab_size - 1})",
                           param="stop_token_ids", code="invalid_value")
        ignore_eos = get_field(body, "ignore_eos", "boolean", None)
        seed = get_field(body, "seed", "integer", None)
        _in_range("seed", seed, -2**63, 2**63 - 1)  # int64, as OpenAI's; each maps to its own stream
        logprobs, prompt_logprobs = _logprob_fields(body, chat)
        try:
            return replace(d, temperature=float(temperature), top_p=float(top_p), top_k=max(top_k, 0),
                           min_p=float(min_p), repetition_penalty=float(penalty),
                           stop=d.stop if stop is None else stop, max_new_tokens=max_tokens or d.max_new_tokens,
                           seed=seed, stop_token_ids=d.stop_token_ids if stop_ids is None else stop_ids,
                           ignore_eos=d.ignore_eos if ignore_eos is None else ignore_eos,
                           logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        except TinykError as e:
            raise ApiError(400, str(e), code="invalid_value") from e

    def completion_prompts(self, body: dict, limit: int, why: str) -> list[tuple[list[int], int]]:
        """Each prompt's token ids, and how many of them the server put first (the `<|im_start|>` that
        starts a text prompt), which an echo leaves out of the text. `prompt` is a string or a list of
        token ids, or a batch: a list of those (lm-eval's batch_size), at most `limit` of them."""
        prompt = body.get("prompt", MISSING)
        if prompt is MISSING:
            get_field(body, "prompt", "string")
        if not (isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt)):
            return [self._completion_prompt(prompt)]
        if len(prompt) > limit:
            raise ApiError(400, f"a batch of {len(prompt)} prompts; this server takes at most {limit} completions "
                                f"per request ({why})", param="prompt", code="invalid_value")
        prompts = []
        for i, p in enumerate(prompt):
            try:
                prompts.append(self._completion_prompt(p))
            except ApiError as e:  # which prompt of the batch it was
                e.message, e.param = f"prompt {i} of the batch: {e.message}", f"prompt[{i}]"
                raise
        return prompts

    def _completion_prompt(self, prompt: Any) -> tuple[list[int], int]:
        # A list too long is refused for its length (by encode) before its ids are read one by one.
        too_long = isinstance(prompt, list) and len(prompt) >= self.engine.context_length
        if prompt == []:  # token ids are taken as given, so there is nothing to complete
            raise ApiError(400, "'prompt' is an empty list of token ids", param="prompt", code="invalid_value")
        if not (too_long or isinstance(prompt, str) or isinstance(prompt, list) and all(is_int(t) for t in prompt)):
            raise ApiError(400, "'prompt' must be a string or a list of token ids", param="prompt", code="invalid_type")
        no_surrogate(prompt, "prompt")
        try:
            ids = self.engine.encode(prompt, bos=True)  # text starts a document, as in `tinyk generate`
        except ContextLengthError as e:
            raise ApiError(400, str(e), param="prompt", code="context_length_exceeded") from e
        except TinykError as e:
            raise ApiError(400, str(e), param="prompt", code="invalid_value") from e
        return ids, int(isinstance(prompt, str) and not prompt.startswith(SPECIAL_TOKENS[IM_START_ID]))

    def chat_ids(self, body: dict) -> tuple[list[int], int]:
        """The chat's prompt ids, and how many of its messages --fit-context dropped."""
        messages = get_field(body, "messages", "array")
        if not messages:
            raise ApiError(400, "'messages' must contain at least one message", param="messages", code="invalid_value")
        clean = []
        for i, m in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                raise ApiError(400, f"'{where}' must be an object", param=where, code="invalid_type")
            refuse_unknown(m, {*MESSAGE_FIELDS, *MESSAGE_IGNORED, *MESSAGE_UNSUPPORTED}, where)
            check_off_fields(m, MESSAGE_IGNORED, MESSAGE_UNSUPPORTED, f"{where}.")
            role = m.get("role")
            if not isinstance(role, str) or role not in API_ROLES:
                raise ApiError(400, f"'{where}.role' must be one of {', '.join(API_ROLES)}, got {json.dumps(role)}",
                               param=f"{where}.role", code="invalid_value")
            content = m.get("content", MISSING)
            if content is None and role == "assistant":  # OpenAI's for a turn that was only tool calls or a refusal
                content = ""
            clean.append({"role": API_ROLES[role], "content": message_content(content, f"{where}.content")})
            no_surrogate(clean[-1]["content"], f"{where}.content")
        given = sum(m["role"] != "system" for m in clean)
        if self.cfg.fit_context:
            clean = self.engine.fit_chat(clean, self.cfg.system_prompt, self._reply_room(body))
        turns = sum(m["role"] != "system" for m in clean)
        # Dropping turns could help only where there are two or more besides the system messages.
        hint = "" if self.cfg.fit_context or turns < 2 else FIT_HINT
        try:
            return self.engine.chat_prompt_ids(clean, default_system=self.cfg.system_prompt), given - turns
        except ContextLengthError as e:
            # A system message that alone fills the window is the one to shorten, however short the rest.
            why = next(filter(None, (self.engine.system_too_long(m["content"], "the system message")
                                     for m in clean if m["role"] == "system")), None)
            raise ApiError(400, why or f"{e}{hint}", param="messages", code="context_length_exceeded") from e
        except TinykError as e:
            raise ApiError(400, str(e), param="messages", code="invalid_value") from e

    def _reply_room(self, body: dict) -> int:
        """The room a fitted chat leaves for the reply: what the request asks for (else the server's
        default), but no more than half the window, as `tinyk chat` and the chat page leave."""
        wanted = _max_tokens(body)[1] or self.defaults.max_new_tokens
        return max(1, min(wanted, self.engine.context_length // 2))

    def submit(self, body: dict, chat: bool) -> Submission:
        """Validates everything before anything is queued."""
        unknown = sorted(set(body) - (CHAT_FIELDS if chat else COMPLETION_FIELDS))
        if unknown:
            hint = {"messages": "; chat messages go to /v1/chat/completions",
                    "prompt": "; a text prompt goes to /v1/completions"}.get(unknown[0], "")
            raise ApiError(400, f"unrecognized request argument supplied: {unknown[0]}{hint}", param=unknown[0],
                           code="unknown_parameter")
        self.check_model(body)
        # What cannot be honoured is said before the prompt is read (a chat too long with tools: the tools).
        check_off_fields(body, IGNORED, UNSUPPORTED | (UNSUPPORTED_IN_CHAT if chat else UNSUPPORTED_IN_COMPLETIONS))
        fmt = body.get("response_format")
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise ApiError(400, "only 'response_format' {\"type\": \"text\"} is supported", param="response_format",
                           code="invalid_value")
        # The choices decode side by side in one batch, so no more than the batch holds; and they queue
        # together, so no more than the queue holds (else every retry of an n above it would get a 503).
        limit = min(self.engine.max_batch, self.cfg.max_waiting)
        why = "its --max-batch" if self.engine.max_batch <= self.cfg.max_waiting else "its --max-waiting"
        dropped = 0
        if chat:
            ids, dropped = self.chat_ids(body)
            prompts = [(ids, 0)]
        else:
            prompts = self.completion_prompts(body, limit, why)
        params = self.sampling(body, max(len(ids) for ids, _ in prompts), chat)
        n = get_field(body, "n", "integer", 1)
        if n > limit:
            raise ApiError(400, f"'n' is {n}; this server takes at most {limit} completions per request ({why})",
                           param="n", code="invalid_value")
        _in_range("n", n, 1, limit)
        if len(prompts) * n > limit:
            raise ApiError(400, f"{len(prompts)} prompts x n {n} = {len(prompts) * n} completions; this server takes "
                                f"at most {limit} per request ({why})", param="n", code="invalid_value")
        stream = get_field(body, "stream", "boolean", False)
        options = get_field(body, "stream_options", "object", {})
        if options and not stream:
            raise ApiError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options",
                           code="invalid_value")
        include_usage = get_field(options, "include_usage", "boolean", False, prefix="stream_options.")
        # No padding is added to chunks either way.
        get_field(options, "include_obfuscation", "boolean", False, prefix="stream_options.")
        unknown = sorted(set(options) - {"include_usage", "include_obfuscation"})
        if unknown:
            raise ApiError(400, f"unrecognized stream_options argument supplied: {unknown[0]}",
                           param=f"stream_options.{unknown[0]}", code="unknown_parameter")
        echo = not chat and get_field(body, "echo", "boolean", False)
        if params.seed is None and self._seeds is not None:
            # Drawn once the request is known to be valid: a refused one leaves the next answers as they were.
            with self._seeds_lock:
                params = replace(params, seed=self._seeds.getrandbits(63))
        try:  # choices prompt by prompt, as OpenAI numbers them; choice 0 is the n=1 answer
            reqs = self.scheduler.submit_all([(ids, p) for ids, _ in prompts for p in params.numbered(n)])
        except EngineBusy as e:
            code = "server_shutting_down" if isinstance(e, EngineStopping) else "overloaded"
            raise ApiError(503, str(e), type="server_error", code=code) from e
        return Submission(reqs, chat, stream, include_usage, echo, [added for _, added in prompts for _ in range(n)], n,
                          dropped)


def _max_tokens(body: dict) -> tuple[str, int | None]:
    """The reply's limit a request sets, and the field that set it: max_completion_tokens replaced
    max_tokens in OpenAI's API, so given both, it is the one that counts."""
    newer = get_field(body, "max_completion_tokens", "integer", None)
    older = get_field(body, "max_tokens", "integer", None)
    for name, value in (("max_tokens", older), ("max_completion_tokens", newer)):
        if value is not None and value < 1:
            raise ApiError(400, f"'{name}' must be at least 1, got {value}", param=name, code="invalid_value")
    return ("max_tokens", older) if newer is None else ("max_completion_tokens", newer)


def _stop_strings(body: dict) -> list[str] | None:
    """`stop`: a string or a list of them, as a list (None: not given)."""
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, "'stop' must be a non-empty string or a list of them", param="stop", code="invalid_type")
    if stop and has_surrogate(stop):
        raise ApiError(400, "'stop' holds a lone surrogate (\\ud800-\\udfff), which no generated text contains",
                       param="stop", code="invalid_value")
    if stop and len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' takes at most {MAX_STOP_STRINGS} strings", param="stop", code="invalid_value")
    return stop


def _logprob_fields(body: dict, chat: bool) -> tuple[int | None, int | None]:
    """The (logprobs, prompt_logprobs) of SamplingParams a request asks for: chat's `logprobs` true with
    `top_logprobs` alternatives, or completions' `logprobs` alternatives, for the prompt too with `echo`."""
    if chat:
        want = get_field(body, "logprobs", "boolean", False)
        top = get_field(body, "top_logprobs", "integer", None)
        _in_range("top_logprobs", top, 0, MAX_LOGPROBS)
        if top and not want:
            raise ApiError(400, "'top_logprobs' requires 'logprobs' to be true", param="top_logprobs",
                           code="invalid_value")
        return (top or 0) if want else None, None
    n = None if body.get("logprobs") is False else get_field(body, "logprobs", "integer", None)
    _in_range("logprobs", n, 0, MAX_LOGPROBS)
    return n, n if get_field(body, "echo", "boolean", False) else None


@dataclass
class Submission:
    """A validated request, queued: one engine request per choice (n per prompt), and how to answer."""

    reqs: list[Request]
    chat: bool
    stream: bool
    include_usage: bool
    echo: bool  # completions: the prompt comes first in the text (and its tokens in the logprobs)
    added: list[int]  # by choice: leading prompt ids the server put there, which the echoed text leaves out
    n: int  # choices per prompt
    dropped: int = 0  # the chat's messages --fit-context left out (the X-Tinyk-Dropped-Messages header)

    def headers(self) -> dict[str, str]:
        return {DROPPED_HEADER: str(self.dropped)} if self.dropped else {}

    def usage(self) -> dict[str, int]:
        """Each prompt counts once, as OpenAI counts it for n choices."""
        done = [r.completion() for r in self.reqs]
        prompt, completion = sum(c.prompt_tokens for c in done[::self.n]), sum(c.completion_tokens for c in done)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class LogprobsWriter:
    """One choice's `logprobs` object, in OpenAI's shape: chat's list of `content` tokens, or the
    completions API's parallel lists with character offsets into the choice's text. Fed token by
    token (a stream's chunks carry those of the tokens since the last)."""

    def __init__(self, tok: TinyTokenizer, chat: bool):
        self.tok, self.chat = tok, chat
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.chars = 0  # characters of the choice's text before the next token

    def take(self, items: list[tuple[int, TokenLogprob | None, bool]]) -> dict[str, Any]:
        """The object for (token id, its logprob entry or None, whether its bytes are in the text)s."""
        if self.chat:
            # A chat message's tokens are those of its content: not the <|im_end|> it ends on, as OpenAI's.
            return {"content": [self._chat_entry(e) for _, e, in_text in items if e is not None and in_text],
                    "refusal": None}
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, e, in_text in items:
            out["tokens"].append(self._text(token_id))
            out["token_logprobs"].append(None if e is None else _shown_logprob(e.logprob))
            top = None if e is None else {self._text(i): _shown_logprob(lp)
                                          for i, lp in [*e.top, (token_id, e.logprob)]}
            out["top_logprobs"].append(top)
            piece, pending = self.tok.piece(token_id), self._decoder.getstate()[0]
            # Bytes left pending that this token does not continue become U+FFFD before its text.
            broken = in_text and pending and not continues_character(pending, piece)
            out["text_offset"].append(self.chars + (len(pending.decode("utf-8", errors="replace")) if broken else 0))
            if in_text:
                self.chars += len(self._decoder.decode(piece))
        return out

    def take_apart(self, *parts: list[tuple[int, TokenLogprob | None, bool]]) -> dict[str, Any]:
        """`take` of texts decoded apart, one after the other (an echoed prompt, then its completion):
        bytes one leaves pending (a prompt of ids cut inside a character) are U+FFFD at its end, as in
        the choice's text, not the start of a character the next one finishes."""
        out: dict[str, list] = {}
        for items in parts:
            for key, value in self.take(items).items():
                out[key] = value if value is None or key not in out else out[key] + value
            self.chars += len(self._decoder.decode(b"", final=True))  # its text ends, as decoded alone
            self._decoder.reset()
        return out

    def _text(self, token_id: int) -> str:
        """A token as the completions API names it: its text, or, for part of a character, its bytes as
        OpenAI writes them ("bytes:\\xe4\\xb8"), so that no two tokens of `top_logprobs` share a key."""
        piece = self.tok.piece(token_id)
        try:
            return piece.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in piece)

    def _chat_entry(self, e: TokenLogprob) -> dict[str, Any]:
        def one(token_id: int, logprob: float) -> dict[str, Any]:
            piece = self.tok.piece(token_id)
            return {"token": piece.decode("utf-8", errors="replace"), "logprob": _shown_logprob(logprob),
                    "bytes": list(piece)}

        return {**one(e.token_id, e.logprob), "top_logprobs": [one(i, lp) for i, lp in e.top]}


def _shown_logprob(logprob: float) -> float:
    """A logprob as JSON can carry it: -infinity as NO_LOGPROB."""
    return max(logprob, NO_LOGPROB)


def generated_tokens(req: Request, start: int, end: int) -> list[tuple[int, TokenLogprob | None, bool]]:
    """Generated tokens start..end for a LogprobsWriter: special tokens, the stop token a sequence ended
    on (EOS, one of `stop_token_ids`) and those of a stop string past where it cut the text are not part
    of the text."""
    not_text, spelled = SPECIAL_IDS | req.stop_ids, req.spelled_tokens()
    return [(e.token_id, e, e.token_id not in not_text and k < spelled)
            for k, e in enumerate(req.logprobs[start:end], start)]


def echo_text(req: Request, added: int) -> str:
    """The prompt as an echo shows it: without the ids the server added."""
    return req.tok.decode(req.prompt_ids[added:])


def echoed_tokens(req: Request, added: int) -> list[tuple[int, TokenLogprob | None, bool]]:
    """The prompt's tokens for a LogprobsWriter: all in the echoed text but those the server added."""
    return [(t, e, k >= added) for k, (t, e) in enumerate(zip(req.prompt_ids, req.prompt_logprobs, strict=True))]


def failure(req: Request) -> ApiError:
    """The error of a request the engine ended: a stopping server's is worth retrying (elsewhere, or later)."""
    if req.error == SHUTTING_DOWN:
        return ApiError(503, SHUTTING_DOWN, type="server_error", code="server_shutting_down")
    return ApiError(500, req.error or "generation failed", type="server_error", code="internal_error")


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
