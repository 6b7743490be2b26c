"""OpenAI's Responses API (`POST /v1/responses`, the openai package's `client.responses`), served by the
chat completions path: a request's `instructions` and `input` become chat messages, and the reply comes
back as one output message, whole or as the API's stream of events.

The server keeps nothing between requests, so what needs a stored response (`previous_response_id`,
`conversation`, `background`) is refused, as are tools; a client sends the whole conversation in `input`.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .api import (
    API_ROLES,
    IGNORED_EVERYWHERE,
    MISSING,
    Api,
    ApiError,
    Submission,
    check_off_fields,
    failure,
    get_field,
    message_content,
    no_surrogate,
    refuse_unknown,
)
from .engine import Request

# Fields that do not change the answer, accepted and ignored, with the JSON type checked (as in chat).
IGNORED: dict[str, str] = {**IGNORED_EVERYWHERE, "reasoning": "object", "max_tool_calls": "integer",
                           "stream_options": "object"}
# Fields this server cannot honour, with the values that mean "off" (null always does): else a 400.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": ([],), "tool_choice": ("none", "auto"), "include": ([],), "top_logprobs": (0,),
    "truncation": ("disabled",), "prompt": ()}
# What only a server that keeps responses can do (null or false is off).
STORED = ("previous_response_id", "conversation", "background")
# Passed to the chat path as they are: OpenAI's, and the sampling extensions chat takes too (vLLM's).
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
FIELDS = {"model", "input", "instructions", "max_output_tokens", "stream", "text", *SAMPLING, *IGNORED,
          *UNSUPPORTED, *STORED}
TEXT_PARTS = ("input_text", "output_text")
# An input item's fields: a message as the client wrote it, or an output message sent back as it came.
ITEM_FIELDS = {"type", "role", "content", "id", "status"}
# What a chat error's param names, in the Responses request's terms.
_PARAMS = {"max_tokens": "max_output_tokens", "messages": "input"}


def chat_body(body: dict) -> dict:
    """The /v1/chat/completions request a Responses request means; what it cannot mean is a 400 that
    names the Responses field."""
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise ApiError(400, f"unrecognized request argument supplied: {unknown[0]}", param=unknown[0],
                       code="unknown_parameter")
    for name in STORED:
        if body.get(name) is not None and body[name] is not False:  # 0 == False, and is not off
            raise ApiError(400, f"'{name}' is not supported: this server keeps no responses; send the whole "
                                f"conversation in 'input'", param=name, code="invalid_value")
    check_off_fields(body, IGNORED, UNSUPPORTED)
    text = get_field(body, "text", "object", {})
    refuse_unknown(text, {"format", "verbosity"}, "text")
    refuse_unknown(get_field(body, "stream_options", "object", None) or {}, {"include_obfuscation"}, "stream_options")
    fmt = text.get("format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise ApiError(400, "only 'text.format' {\"type\": \"text\"} is supported", param="text.format",
                       code="invalid_value")
    if body.get("stream_options") and not body.get("stream"):
        raise ApiError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options",
                       code="invalid_value")
    chat = {name: body[name] for name in ("model", "stream", *SAMPLING) if name in body}
    chat["messages"] = messages(body)
    max_output = get_field(body, "max_output_tokens", "integer", None)
    if max_output is not None:
        if max_output < 1:
            raise ApiError(400, f"'max_output_tokens' must be at least 1, got {max_output}",
                           param="max_output_tokens", code="invalid_value")
        chat["max_tokens"] = max_output
    return chat


def messages(body: dict) -> list[dict[str, str]]:
    """`instructions` as the first (system) message, then `input`: a string (one user message) or a list
    of message items, whose content is a string or a list of text parts."""
    instructions = get_field(body, "instructions", "string", None)
    no_surrogate(instructions, "instructions")
    out = [] if instructions is None else [{"role": "system", "content": instructions}]
    given = body.get("input", MISSING)
    if given is MISSING:
        get_field(body, "input", "string")
    if isinstance(given, str):
        no_surrogate(given, "input")
        return [*out, {"role": "user", "content": given}]
    if not (isinstance(given, list) and given):
        raise ApiError(400, "'input' must be a string or a non-empty list of messages", param="input",
                       code="invalid_type")
    for i, item in enumerate(given):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"'{where}' must be an object", param=where, code="invalid_type")
        kind = item.get("type", "message")
        if kind != "message":
            raise ApiError(400, f"'{where}.type' {json.dumps(kind)} is not supported: only messages (this server "
                                f"runs no tools and keeps no reasoning)", param=f"{where}.type", code="invalid_value")
        refuse_unknown(item, ITEM_FIELDS, where)
        role = item.get("role")
        if not isinstance(role, str) or role not in API_ROLES:
            raise ApiError(400, f"'{where}.role' must be one of {', '.join(API_ROLES)}", param=f"{where}.role",
                           code="invalid_value")
        out.append({"role": role, "content": message_content(item.get("content", MISSING), f"{where}.content",
                                                             TEXT_PARTS)})
        no_surrogate(out[-1]["content"], f"{where}.content")
    return out


def submit(api: Api, body: dict) -> Submission:
    """A Responses API request, validated and queued as the chat it means (`chat_body`)."""
    chat = chat_body(body)
    try:
        return api.submit(chat, chat=True)
    except ApiError as e:
        raise renamed(e) from None


def renamed(e: ApiError) -> ApiError:
    """A chat path error, with its param named as the Responses request names it."""
    if e.param is not None:
        head, dot, tail = e.param.partition("[")
        if head in _PARAMS:
            e.param = _PARAMS[head] + (dot + tail if head != "messages" else "")
    return e


@dataclass
class Reply:
    """What every form of one response carries: its ids, its time and the settings it echoes."""

    body: dict
    req: Request
    model: str
    rid: str = field(default_factory=lambda: f"resp_{secrets.token_hex(12)}")
    mid: str = field(default_factory=lambda: f"msg_{secrets.token_hex(12)}")
    created: int = field(default_factory=lambda: int(time.time()))

    def message(self, text: str, status: str) -> dict[str, Any]:
        return {"type": "message", "id": self.mid, "status": status, "role": "assistant",
                "content": [] if status == "in_progress" else [_part(text)]}

    def response(self, status: str, text: str = "") -> dict[str, Any]:
        """The response object: in progress (no output yet), completed, or incomplete (the length ran out)."""
        p, done = self.req.params, status != "in_progress"
        usage = None
        if done:
            c = self.req.completion()
            usage = {"input_tokens": c.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                     "output_tokens": c.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": c.prompt_tokens + c.completion_tokens}
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {"id": self.rid, "object": "response", "created_at": self.created, "status": status, "error": None,
                "incomplete_details": incomplete, "instructions": self.body.get("instructions"),
                "max_output_tokens": self.body.get("max_output_tokens"), "model": self.model,
                "output": [self.message(text, status)] if done else [], "usage": usage,
                "temperature": p.temperature, "top_p": p.top_p, "text": {"format": {"type": "text"}},
                "tools": [], "tool_choice": "none", "parallel_tool_calls": False, "truncation": "disabled",
                "previous_response_id": None, "reasoning": {"effort": None, "summary": None}, "store": False,
                "metadata": self.body.get("metadata") or {}, "user": self.body.get("user")}

    def finished(self) -> tuple[str, str]:
        """(status, text) of the finished request."""
        c = self.req.completion()
        return ("incomplete" if c.finish_reason == "length" else "completed"), c.text

    def events(self, deltas: Iterator[str]) -> Iterator[dict[str, Any]]:
        """The stream's events: the response created, its message and text part opened, the text as it
        comes, then all of it closed and the response completed (or incomplete, or failed: the engine's
        error)."""
        at = {"item_id": self.mid, "output_index": 0, "content_index": 0}
        yield {"type": "response.created", "response": self.response("in_progress")}
        yield {"type": "response.in_progress", "response": self.response("in_progress")}
        yield {"type": "response.output_item.added", "output_index": 0, "item": self.message("", "in_progress")}
        yield {"type": "response.content_part.added", **at, "part": _part("")}
        for delta in deltas:
            yield {"type": "response.output_text.delta", **at, "delta": delta, "logprobs": []}
        if self.req.finish_reason == "error":
            failed = {**self.response("in_progress"), "status": "failed",
                      "error": {"code": "server_error", "message": failure(self.req).message}}
            yield {"type": "response.failed", "response": failed}
            return
        status, text = self.finished()
        yield {"type": "response.output_text.done", **at, "text": text, "logprobs": []}
        yield {"type": "response.content_part.done", **at, "part": _part(text)}
        yield {"type": "response.output_item.done", "output_index": 0, "item": self.message(text, status)}
        yield {"type": f"response.{status}", "response": self.response(status, text)}


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
