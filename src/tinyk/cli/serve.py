"""`tinyk serve`: the OpenAI-compatible API and chat page."""

from __future__ import annotations

import argparse
import os

from tinyk.cli.common import (
    add_engine_args,
    add_sampling_args,
    batch_count,
    float_range,
    int_range,
    non_empty,
    positive_int,
    sampling_params,
    set_threads,
    size_range,
    utf8_text,
)
from tinyk.errors import TinykError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API with a chat page at /",
                       description="Serves GET /v1/models, POST /v1/completions, POST /v1/chat/completions and "
                                   "POST /v1/responses (stream: true gives server-sent events) and a chat page at "
                                   "/. Concurrent "
                                   "requests are decoded together in one continuously refilled batch.")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int_range(0, 65535), default=8000, help="default 8000; 0 picks a free one")
    p.add_argument("--model-name", type=non_empty,
                   help="the model id clients send (default: the directory's name; a run's for its model)")
    p.add_argument("--api-key",
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $TINYK_API_KEY, else no check)")
    p.add_argument("--max-batch", type=batch_count, default=16, help="sequences decoded together (default 16)")
    p.add_argument("--max-waiting", type=positive_int, default=256,
                   help="queued requests before answering 503 (default 256)")
    p.add_argument("--max-body", type=size_range(1, 10**9), default="1M", help="largest request body (default 1M)")
    p.add_argument("--timeout", type=float_range(0, 86400, lo_open=True, unit=" seconds"), default=60.0,
                   help="seconds a client has to send a whole request, and may stall reading a stream (default 60)")
    p.add_argument("--max-connections", type=positive_int, default=512,
                   help="connections open at once before answering 503 (default 512, fewer if the open-file "
                        "limit, ulimit -n, is low)")
    p.add_argument("--system-prompt", "--system", type=utf8_text,
                   help="system prompt for chats that bring none (default: the model's "
                        "own, its SFT data's; '' for none)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN", type=_origin,
                   help="a web page origin (http://localhost:5173; file:// for an Electron app's pages) that may "
                        "call the API from a browser; "
                        "repeatable, * for any (default: only the chat page at /); * and null (which any "
                        "site's sandboxed frames send) want an --api-key")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME", type=_host_name,
                   help="a host name to answer besides IP addresses, localhost and this machine's own name: "
                        "the one a reverse proxy passes on, its DNS name, a compose service's; repeatable, * for any")
    p.add_argument("--fit-context", action="store_true",
                   help="fit requests to the model's context as chat apps expect (Ollama does so): drop a chat's "
                        "oldest turns, keeping its system messages and last message, and cut max_tokens to the room "
                        "left, where OpenAI's API (and the default) answers 400 context_length_exceeded")
    p.add_argument("--quiet", action="store_true", help="no access log")
    add_sampling_args(p, "seeds the server: requests without a seed of their own draw one from it, so a "
                         "restarted server answers the same requests, in the same order, the same way")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from tinyk.serve import serve
    from tinyk.tokenizer import prompt_from_flag

    key = args.api_key if args.api_key is not None else os.environ.get("TINYK_API_KEY")
    if key == "":
        raise TinykError("--api-key is empty (leave it out to serve without a key)" if args.api_key is not None else
                         "TINYK_API_KEY is set but empty (unset it to serve without a key)")
    cfg = dict(api_key=key, max_body_bytes=args.max_body, timeout=args.timeout,
               defaults=sampling_params(args), max_waiting=args.max_waiting, max_connections=args.max_connections,
               log=not args.quiet, fit_context=args.fit_context,
               allow_origins=tuple(args.allow_origin), allow_hosts=tuple(args.allow_host))
    if args.model_name:
        cfg["model_name"] = args.model_name
    cfg["system_prompt"] = prompt_from_flag(args.system_prompt)
    set_threads(args)
    serve(args.model, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
          quantize=args.quantize, max_batch=args.max_batch, **cfg)
    return 0


def _origin(value: str) -> str:
    from tinyk.serve import normal_origin

    try:
        return normal_origin(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _host_name(value: str) -> str:
    from tinyk.serve import normal_host

    try:
        return normal_host(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
