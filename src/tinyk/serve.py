"""An OpenAI-compatible HTTP server (and a chat page at `/`) over the generation engine.

Standard library only: `ThreadingHTTPServer` gives every connection its own thread, and
those threads only parse, validate and relay. One `engine.Scheduler` thread owns the model
and decodes every active request in a single continuously refilled batch, so a client that
reads slowly or disconnects only ever blocks its own connection thread; a vanished client's
sequence, streamed or not, is cancelled and leaves the batch at the next step. What a request
body means, field by field, is `api.py`'s; this module is the HTTP around it.
"""

from __future__ import annotations

import contextlib
import email.errors
import errno
import hmac
import io
import ipaddress
import json
import math
import operator
import os
import queue
import re
import selectors
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from . import responses
from .api import (
    DROPPED_HEADER,
    Api,
    ApiError,
    LogprobsWriter,
    Submission,
    echo_text,
    echoed_tokens,
    failure,
    generated_tokens,
    new_id,
)
from .engine import Engine, Request, SamplingParams
from .errors import TinykError, escape_controls, first_line
from .model import dtype_name, emulated_note
from .tokenizer import MODEL_PROMPT, ModelPrompt
from .units import plural

DEFAULT_MAX_BODY = 1_000_000  # the CLI's --max-body 1M
MAX_CHUNK_LINE, MAX_TRAILERS = 4096, 32  # a chunked body's size lines and trailer fields
LINGER_BYTES = 64 << 20  # at most this much of a refused body is read and thrown away
LINGER_S = 2.0  # and for at most this long
CLIENT_POLL_S = 0.2  # how often a non-streamed request checks that its client is still connected
POST_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses")
MAX_REQUEST_LINE = 65536  # bytes, as http.server allows
# RFC 9110 tokens
_HEADER_NAMES = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+(?:[ \t]*,[ \t]*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*")


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY
    timeout: float = 60.0  # seconds to send a whole request in (or wait for the next), or to stall taking a stream
    defaults: SamplingParams | None = None  # for fields a request leaves out
    # Put first when a chat has no system message; by default the one the model was trained with.
    system_prompt: str | None | ModelPrompt = MODEL_PROMPT
    max_waiting: int = 256
    log: bool = True
    allow_origins: tuple[str, ...] = ()  # web pages of other origins that may call the API ("*": any)
    allow_hosts: tuple[str, ...] = ()  # Host names answered besides those no public site can have ("*": any)
    max_connections: int = 512  # open at once; one more is answered 503 (fewer if the open-file limit is low)
    # Fit requests to the context as chat clients expect of a small model (Ollama does so): a chat's oldest
    # turns are dropped and max_tokens is cut to the room left, where OpenAI's API answers a 400.
    fit_context: bool = False

    def __post_init__(self) -> None:
        try:  # as browsers send them, so that the headers compare equal
            self.allow_origins = tuple(normal_origin(o) for o in self.allow_origins)
            self.allow_hosts = tuple(normal_host(h) for h in self.allow_hosts)
        except ValueError as e:
            raise TinykError(str(e)) from None
        if self.api_key is not None and not (self.api_key.isascii() and self.api_key.isprintable()
                                             and self.api_key and " " not in self.api_key):
            # HTTP headers carry ASCII: clients (the openai package among them) cannot send anything else.
            raise TinykError("the API key must be printable ASCII without spaces")


def normal_origin(value: str) -> str:
    """An origin as browsers send it (scheme://host[:port], lowercase, punycode, no default port, no
    path), null (a browser's file:// page), file:// (what an Electron app's page sends) or *."""
    if value in ("*", "null"):
        return value
    if _is_file_origin(value):
        return "file://"
    bad = ValueError(f"not an origin (scheme://host[:port], e.g. http://localhost:5173): {value!r}")
    try:
        parts = urllib.parse.urlsplit(value.strip())
        port = parts.port
    except ValueError:
        raise bad from None
    if not (parts.scheme and parts.hostname) or parts.username or parts.path not in ("", "/") or parts.query \
            or parts.fragment:
        raise bad
    host = normal_host(parts.hostname)
    host = f"[{host}]" if ":" in host else host
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    return f"{parts.scheme.lower()}://{host}" + (f":{port}" if port is not None and port != default else "")


def _is_file_origin(value: str) -> bool:
    """file://, file:///, FILE:// ...: the origin an Electron app's page sends, however it is spelt."""
    return value.strip().lower().rstrip("/") == "file:"


def normal_host(value: str) -> str:
    """A host name as a Host header carries it, without a port (chat.example.com, punycode), or *."""
    name = value.strip().lower()
    if name == "*":
        return name
    try:
        name = name.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"not a host name: {value!r}") from None
    if not name or any(c in name for c in "/@ *") or (":" in name and not _is_ipv6(name)):
        raise ValueError(f"not a host name (e.g. chat.example.com, no port or wildcard): {value!r}")
    return name


def _is_ipv6(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).version == 6
    except ValueError:
        return False


class _NotJson(ValueError):
    pass


def _not_json(name: str) -> None:
    """NaN, Infinity and -Infinity, which Python's parser takes and RFC 8259 (and OpenAI's API) does not."""
    raise _NotJson(f"{name} is not a number JSON has")


def _json_float(text: str) -> float:
    """A JSON number as a float; one beyond a double's range (1e400) would be infinity, which no field takes."""
    value = float(text)
    if math.isinf(value):
        raise ApiError(400, f"the request body holds a number beyond a double's range: {text[:40]}",
                       code="invalid_json")
    return value


class Handler(BaseHTTPRequestHandler):
    """One connection: its requests read, checked and tokenized here, decoded in the scheduler thread."""

    protocol_version = "HTTP/1.1"
    server: ChatServer
    server_version = "tinyk"

    def version_string(self) -> str:
        return self.server_version  # not the Python version the standard library adds

    def setup(self) -> None:
        self.timeout = self.server.api.cfg.timeout
        self.unread_body = False
        self.chunked = True
        self.cors_origin: str | None = None
        super().setup()
        self.rfile.close()
        self.reader = _DeadlineReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self.reader)

    def finish(self) -> None:
        super().finish()
        if self.unread_body:
            self._linger()

    def _linger(self) -> None:
        """Half-closes, then drains what the client is still sending before the socket is closed.

        Closing with unread input makes the kernel send a reset, which can destroy the error
        response before the client reads it (what web servers call a lingering close).
        """
        try:
            self.connection.shutdown(socket.SHUT_WR)
            budget, end = LINGER_BYTES, time.monotonic() + LINGER_S
            while budget > 0 and (left := end - time.monotonic()) > 0:
                self.connection.settimeout(left)
                if not (data := self.connection.recv(65536)):
                    break
                budget -= len(data)
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # BaseHTTPRequestHandler's signature
        if self.server.api.cfg.log:
            self._say(format % args)

    def _say(self, text: str) -> None:
        """A line on stderr naming the client (a request line's escape codes would repaint the operator's terminal)."""
        sys.stderr.write(f"{self.address_string()} - {escape_controls(text)}\n")

    # -- plumbing -----------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if status == 503:  # overloaded or stopping: clients that honour it wait before trying again
            self.send_header("Retry-After", "1")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, _json_bytes(obj), headers=headers)

    def _error(self, e: ApiError) -> None:
        self._send(e.status, _json_bytes(e.body()), headers=e.headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's own refusals (a malformed request line, headers too large, a method
        with no handler) in the OpenAI format instead of its HTML page. A request line too malformed to
        name its version is answered in HTTP/1.1, not as HTTP/0.9 (a bare body, which curl refuses)."""
        self.close_connection = self.unread_body = True
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.1"
        phrase = HTTPStatus(code).phrase
        self._error(ApiError(code, message or phrase, code=phrase.lower().replace(" ", "_").replace("-", "_")))

    def _cross_origin(self) -> str | None:
        """The calling page's origin when a browser calls from another site (None for programs, which
        send no Origin, and for the chat page at /)."""
        origin = self.headers.get("Origin")
        if origin is None or _netloc(origin) == self.headers.get("Host", "").lower():
            return None
        return "file://" if _is_file_origin(origin) else origin  # as --allow-origin takes it

    def _origin_refusal(self) -> ApiError | None:
        """The 403 for a web page of another site, or None (and CORS headers for a page --allow-origin
        names): any page the user visits could otherwise make the API generate for it (with no
        --api-key, a form post needs no preflight)."""
        origin = self._cross_origin()
        if origin is None:
            return None
        if origin in self.server.api.cfg.allow_origins or "*" in self.server.api.cfg.allow_origins:
            self.cors_origin = self.headers["Origin"]  # echoed as the browser sent it, which it compares
            return None
        return ApiError(403, f"requests from web pages at {origin} are refused; start the server with "
                             f"--allow-origin {origin} to allow them", code="origin_not_allowed")

    def end_headers(self) -> None:
        self.send_header("X-Content-Type-Options", "nosniff")
        if self.cors_origin:
            self.send_header("Access-Control-Allow-Origin", self.cors_origin)
            self.send_header("Access-Control-Expose-Headers", f"{DROPPED_HEADER}, Retry-After")  # a page may read them
            self.send_header("Vary", "Origin")
        super().end_headers()

    def _authorized(self) -> bool:
        key = self.server.api.cfg.api_key
        if key is None:
            return True
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode("latin-1", "replace"), key.encode())

    def handle_expect_100(self) -> bool:
        """Refuses a request before the client sends its body: one the server would refuse unread (a
        foreign Host, a path that takes no body, a web page of another site, no valid key), or an
        oversized (or unusable) body."""
        if self.command in ("PUT", "PATCH", "DELETE"):  # no path takes their body
            self._other_method()
            return False
        try:
            refusal = self._header_refusal()
            if self.command == "POST":
                refusal = refusal or self._host_refusal() or self._post_refusal()
            if refusal is not None:
                raise refusal
            if self.command == "POST":
                self._body_length()
        except ApiError as e:
            self.close_connection = self.unread_body = True  # the client may send the body all the same
            self._error(e)
            return False
        return super().handle_expect_100()

    def _body_length(self) -> int | None:
        """The body's Content-Length (None: chunked), or the ApiError that refuses it (the connection then
        ends: the unread body must not be parsed as the next request)."""
        try:
            return _content_length(self.headers, self.server.api.cfg.max_body_bytes)
        except ApiError:
            self.close_connection = True
            raise

    def _body(self) -> dict:
        coding = self.headers.get("Content-Encoding", "").strip().lower()
        if coding not in ("", "identity"):
            self.close_connection = self.unread_body = True
            raise ApiError(415, f"Content-Encoding {coding[:40]} is not supported; send the body uncompressed",
                           code="unsupported_content_encoding")
        length = self._body_length()
        if length is None and "Content-Length" in self.headers:  # RFC 9112 6.3: read chunked, then close
            self.close_connection = True
        try:
            raw = self.rfile.read(length) if length is not None else self._chunked_body()
        except ApiError:  # the rest of the body must not be read as the next request: drained, then closed
            self.close_connection = self.unread_body = True
            raise
        if length is not None and len(raw) < length:  # not a request to run: its end never came
            raise _body_cut_off()
        self.unread_body = False
        try:  # RFC 8259 8.1: a byte order mark may be ignored
            body = json.loads(raw.decode("utf-8-sig"), parse_constant=_not_json, parse_float=_json_float)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, _NotJson) as e:
            raise ApiError(400, f"the request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from e
        except ValueError as e:  # Python's own limit on integer digits, whose advice is for the server's code
            raise ApiError(400, f"the request body holds an integer of more than {sys.get_int_max_str_digits()} "
                                f"digits", code="invalid_json") from e
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    def _chunked_body(self) -> bytes:
        """A body in chunked transfer coding (RFC 9112 7.1), which HTTP/1.1 servers must take (curl
        sends one for `-T -`, streaming HTTP clients for a body of unknown length); up to --max-body,
        extensions and trailers read and dropped."""
        limit, parts, total, framing = self.server.api.cfg.max_body_bytes, [], 0, 0

        def malformed() -> Exception:  # or cut off by the client leaving, which gets no answer
            if self.reader.ended:
                return _body_cut_off()
            return ApiError(400, "malformed chunked request body", code="invalid_chunked_body")

        while True:
            line = self.rfile.readline(MAX_CHUNK_LINE)
            size = line.split(b";", 1)[0].strip()
            if not line.endswith(b"\n") or not re.fullmatch(rb"0*[0-9A-Fa-f]{1,15}", size):  # 0s: RFC 9112 7.1
                raise malformed()
            n = int(size, 16)
            if n == 0:
                break
            total += n
            framing += len(line) + 2  # bounded too: a body in 1-byte chunks takes 6 times its size to parse
            if total > limit:
                raise _too_large(f"more than {limit}", limit)
            if framing > limit:
                raise ApiError(413, f"the chunked body's framing is more than --max-body ({limit} bytes): send it in "
                                    f"fewer, larger chunks", code="request_too_large")
            parts.append(self.rfile.read(n))
            if len(parts[-1]) < n or self.rfile.readline(MAX_CHUNK_LINE) not in (b"\r\n", b"\n"):
                raise malformed()
        for _ in range(MAX_TRAILERS + 1):
            if self.rfile.readline(MAX_CHUNK_LINE) in (b"\r\n", b"\n", b""):
                return b"".join(parts)
        raise ApiError(400, f"more than {MAX_TRAILERS} trailer fields after a chunked body",
                       code="invalid_chunked_body")

    # -- routes -------------------------------------------------------------------------

    def parse_request(self) -> bool:
        """Refuses a request that names another site as its Host, on any address: a web page whose DNS
        name was re-pointed at this server (DNS rebinding) would otherwise read the API as its own origin.
        Also refuses malformed headers (`_header_refusal`) and skips an empty line before the request line."""
        if self.raw_requestline in (b"\r\n", b"\n"):  # RFC 9112 2.2: a stray line end after the last body
            self.reader.await_request(self.rfile)  # the wait for a request starts over: this was none
            self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE + 1)
            if len(self.raw_requestline) > MAX_REQUEST_LINE:
                self.requestline = self.request_version = self.command = ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return False
        if self.reader.ended and not self.raw_requestline.endswith(b"\n"):  # the client left mid-request line
            self.close_connection = True
            return False
        if not super().parse_request():
            return False
        if self.reader.ended:  # no blank line ended the headers: the client left mid-request, and gets no answer
            self.close_connection = True
            return False
        if refusal := self._header_refusal():  # (with Expect: 100-continue, said before the body came)
            self.close_connection = self.unread_body = True
            self._error(refusal)
            return False
        lengths = _content_lengths(self.headers)
        if self.command != "POST" and (self.headers.get("Transfer-Encoding") is not None
                                       or any(v not in ("", "0") for v in lengths)):
            # A body sent with GET, HEAD or OPTIONS is never read: the connection ends with this answer,
            # so the body is not taken for the next request (behind a proxy that reuses connections,
            # another client's).
            self.close_connection = self.unread_body = True
        refusal = self._host_refusal()
        if refusal is None:
            return True
        self.close_connection = self.unread_body = True
        self._error(refusal)
        return False

    def _header_refusal(self) -> ApiError | None:
        """A line that is no header (no colon, a space before it, a control character in its name) made the
        standard library take it and every header after it (Origin, Content-Length) for the body, unchecked;
        a value folded onto the next line (RFC 9112 5.2) is refused too, and two Authorization or Origin
        headers, as two Hosts are: which one a proxy in front went by is unknown."""
        if any(isinstance(d, email.errors.MissingHeaderBodySeparatorDefect) for d in self.headers.defects) \
                or any("\n" in value for value in self.headers.values()):
            return ApiError(400, "malformed header line: each header is 'Name: value' on a line of its own",
                            code="invalid_header")
        if twice := next((h for h in ("Authorization", "Origin") if len(self.headers.get_all(h, [])) > 1), None):
            return ApiError(400, f"more than one {twice} header", code="invalid_header")
        return None

    def _host_refusal(self) -> ApiError | None:
        hosts = self.headers.get_all("Host", [])
        if len(hosts) > 1:  # RFC 9112 3.2: which one a proxy in front checked is unknown
            return ApiError(400, "more than one Host header", code="invalid_host")
        if not hosts and self.request_version == "HTTP/1.1":  # RFC 9112 3.2 (HTTP/1.0 had no Host)
            return ApiError(400, "an HTTP/1.1 request needs a Host header", code="invalid_host")
        host = hosts[0] if hosts else None
        if self.path.lower().startswith(("http://", "https://")):  # RFC 9112 3.2.2: the target's host counts
            try:
                host = urllib.parse.urlsplit(self.path).netloc.rpartition("@")[2]  # without any user:password@
            except ValueError:  # an unclosed [ of an IPv6 address
                host = ""
            if not host:
                return ApiError(400, f"the request target {self.path[:200]!r} names no host", code="invalid_host")
        allowed = self.server.api.cfg.allow_hosts
        # On any address: in Docker the server listens on 0.0.0.0 behind `-p 127.0.0.1:8000:8000`.
        if host is None or "*" in allowed or _local_host_name(host, allowed):
            return None
        name = _hostname(host) or host
        return ApiError(403, f"Host {host} is not this server, which listens on {self.server.address} and answers "
                             f"IP addresses, localhost, this machine's own name and the names given with --allow-host; "
                             f"if {name} is its name (a reverse proxy that passes its Host on, a name on your "
                             f"network), start it with --allow-host {name}", code="host_not_allowed")

    def handle_one_request(self) -> None:
        """A client that leaves mid-request is its own business: no traceback on the server's stderr.
        The request must arrive whole within --timeout of its first byte (a client that sends a byte now
        and then would otherwise hold its connection for ever)."""
        self.cors_origin = None  # decided anew for each request on a kept-alive connection
        self.raw_requestline = b""
        self.reader.await_request(self.rfile)
        try:
            super().handle_one_request()
        except ConnectionError:
            self.close_connection = True

    def log_error(self, format: str, *args: Any) -> None:  # BaseHTTPRequestHandler's signature
        """As log_message, but a kept-alive connection that stays idle until --timeout (a browser keeps the
        chat page's open) closes silently: only a request that stalls mid-way is worth a line."""
        if format.startswith("Request timed out"):  # http.server's "TimeoutError('timed out')" reads as a fault
            if self.reader.timed_out:
                self.log_message("the request did not arrive whole within --timeout %g s; connection closed",
                                 self.timeout)
            elif self.reader.started:  # a write: the client stopped reading
                self.log_message("the client did not take the response within --timeout %g s; connection closed",
                                 self.timeout)
            return
        self.log_message(format, *args)

    def _route(self) -> str:
        """The request's path, unquoted and without its query; a target in absolute form
        (`GET http://host/v1/models`, RFC 9112 3.2.2) is its path (its host was checked as a Host header is)."""
        target = self.path
        if target.lower().startswith(("http://", "https://")):
            target = "/" + target.split("/", 3)[3] if target.count("/") >= 3 else "/"
        return urllib.parse.unquote(target.split("?", 1)[0])

    def do_GET(self) -> None:
        path = self._route()
        api = self.server.api
        if path in ("/", "/index.html"):
            # Never inside another site's frame, where a page could trick its user into clicking (clickjacking).
            self._send(200, self.server.page, "text/html; charset=utf-8",
                       {"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'"})
        elif path == "/health":
            self._json(200, {"status": "ok", **api.scheduler.stats()})
        elif not path.startswith("/v1/"):
            self._error(_not_found(path, self.command))
        elif (refusal := self._api_refusal()) is not None:
            self._error(refusal)
        elif path == "/v1/models":
            self._json(200, {"object": "list", "data": [api.model_card()]})
        elif path == f"/v1/models/{api.cfg.model_name}":
            self._json(200, api.model_card())
        elif path.startswith("/v1/models/") and not path.endswith("/"):
            self._error(api.no_such_model(path[11:]))
        elif path in POST_PATHS:
            self._error(_not_allowed(path))
        else:
            self._error(_not_found(path, self.command))

    do_HEAD = do_GET

    def do_POST(self) -> None:
        with self.server.answering():
            self._post()

    def _post(self) -> None:
        self.unread_body = True
        try:
            refusal = self._post_refusal()
            if refusal is not None:
                self.close_connection = True  # the body is left unread
                raise refusal
            body, path = self._body(), self._route()
            api = self.server.api
            sub = responses.submit(api, body) if path == "/v1/responses" else api.submit(body, path == POST_PATHS[1])
        except ApiError as e:
            self._error(e)
            return
        except (ConnectionError, TimeoutError):  # the client left or stalled mid-body: handle_one_request's
            raise
        except Exception as e:  # a fault of tinyk's, not the client's: still answered, and logged
            self.close_connection = True
            # Said with the access log off too (--quiet): a fault to fix, not a request to count.
            self._say(f"tinyk: internal error: {type(e).__name__}: {first_line(e)}")
            self._error(ApiError(500, "the server failed to take the request", type="server_error",
                                 code="internal_error"))
            return
        if path == "/v1/responses":
            self._respond(sub, body)
        elif sub.stream:
            self._stream(sub)
        else:
            self._complete(sub)

    def _post_refusal(self) -> ApiError | None:
        """Why a POST is refused before its body is read: a path that takes none, or `_api_refusal`."""
        path = self._route()
        methods = _methods(path)
        if methods != "POST":
            return _not_allowed(path) if methods else _not_found(path, "POST")
        return self._api_refusal()

    def _api_refusal(self) -> ApiError | None:
        """Why an API call is refused before its body is read: a web page of another site, or no valid key."""
        return self._origin_refusal() or (None if self._authorized() else _unauthorized())

    def do_OPTIONS(self) -> None:
        """A browser's CORS preflight of an API call: answered for the origins --allow-origin names,
        with whatever request headers the page's client sends (the openai JS package adds x-stainless-*)."""
        path = self._route()
        preflight = self.headers.get("Access-Control-Request-Method") is not None
        if not (_methods(path) and path.startswith("/v1/")) or not preflight or self._cross_origin() is None:
            self._other_method()
            return
        if (refusal := self._origin_refusal()) is not None:
            self.close_connection = True  # the browser shows a failed fetch; its network panel shows this 403
            self._error(refusal)
            return
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods", "GET, POST")
        asked = self.headers.get("Access-Control-Request-Headers", "")
        self.send_header("Access-Control-Allow-Headers",
                         asked if _HEADER_NAMES.fullmatch(asked) else "Authorization, Content-Type")
        if self.headers.get("Access-Control-Request-Private-Network", "").strip().lower() == "true":
            # Chrome's Private Network Access preflight (a public https page calling this machine): the
            # origin is one --allow-origin names, so the answer is yes.
            self.send_header("Access-Control-Allow-Private-Network", "true")
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def _other_method(self) -> None:
        """PUT, PATCH, DELETE (and OPTIONS but for a preflight): a 405 naming the path's methods, or a 404."""
        self.close_connection = True  # any body is left unread
        path = self._route()
        if _methods(path):
            self._error(_not_allowed(path, f"{self.command} is not supported; "))
        else:
            self._error(_not_found(path, self.command))

    do_PUT = do_PATCH = do_DELETE = _other_method

    def _finished(self, reqs: list[Request]) -> bool:
        """Waits for every request to end: True, or False (all cancelled) when the client left first.
        Nothing is sent until the end, so the client is watched while waiting. A failed request has been
        answered with its error (False too)."""
        for req in reqs:
            while not req.wait(CLIENT_POLL_S):
                if self._client_gone():
                    for r in reqs:
                        r.cancel()
                    self.close_connection = True
                    return False
        failed = next((r for r in reqs if r.finish_reason == "error"), None)
        if failed is not None:
            self._error(failure(failed))
            return False
        return True

    def _complete(self, sub: Submission) -> None:
        reqs, chat, tok = sub.reqs, sub.chat, self.server.api.engine.tok
        if not self._finished(reqs):
            return
        choices = []
        for i, r in enumerate(reqs):
            c = r.completion()
            text = echo_text(r, sub.added[i]) + c.text if sub.echo else c.text
            logprobs = None
            if c.logprobs is not None:
                echoed = echoed_tokens(r, sub.added[i]) if c.prompt_logprobs is not None else []
                logprobs = LogprobsWriter(tok, chat).take_apart(echoed, generated_tokens(r, 0, len(c.logprobs)))
            answer = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            choices.append({"index": i, **answer, "logprobs": logprobs, "finish_reason": c.finish_reason})
        self._json(200, {"id": new_id(chat), "object": "chat.completion" if chat else "text_completion",
                         "created": int(time.time()), "model": self.server.api.cfg.model_name, "choices": choices,
                         "usage": sub.usage()}, sub.headers())

    def _stop_if_client_gone(self) -> None:
        if self._client_gone():
            raise ConnectionAbortedError("the client left")

    def _client_gone(self) -> bool:
        """Whether the client closed the connection (an HTTP timeout, a closed tab) while it waited.
        A selector, not select(), which fails for descriptors past 1024 on a busy server; a client
        that only shut down its sending side counts as gone, as in Go's net/http."""
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(self.connection, selectors.EVENT_READ)
                return bool(sel.select(0)) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):  # reset, or already closed
            return True

    def _stream(self, sub: Submission) -> None:
        """Server-sent events, in chunked encoding for HTTP/1.1 (an HTTP/1.0 client gets them up to
        the connection's close); each choice's text as it comes, tagged with its index (with the
        logprobs of the tokens since its last chunk, when asked), and its finish_reason once it ends.
        An echoed prompt is its choice's first chunk. A client that goes away cancels every choice."""
        reqs, chat, include_usage, tok = sub.reqs, sub.chat, sub.include_usage, self.server.api.engine.tok
        rid, name, created = new_id(chat), self.server.api.cfg.model_name, int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        writers = [LogprobsWriter(tok, chat) if r.params.logprobs is not None else None for r in reqs]
        sent = [0] * len(reqs)  # generated tokens whose logprobs went out, by choice
        echoed: set[int] = set()  # the choices whose prompt went out

        def envelope(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
            """What every chunk carries; usage is the spec's null until the last chunk."""
            return {"id": rid, "object": obj, "created": created, "model": name, "choices": choices,
                    **({"usage": usage} if include_usage else {})}

        def logprobs(i: int, upto: int | None) -> dict[str, Any] | None:
            """Those of the tokens since choice i's last chunk, up to `upto` (None: all, once it ended)."""
            r = reqs[i]
            end = len(r.logprobs) if upto is None else upto
            if writers[i] is None:
                return None
            items, sent[i] = generated_tokens(r, sent[i], end), end
            return writers[i].take(items)

        def echo(i: int) -> dict[str, Any]:
            r, w = reqs[i], writers[i]
            lp = w.take_apart(echoed_tokens(r, sub.added[i])) if w is not None and r.prompt_logprobs else None
            text = echo_text(r, sub.added[i])
            return envelope([{"index": i, "text": text, "logprobs": lp, "finish_reason": None}])

        def chunk(i: int, delta: str | None, finish: str | None = None, upto: int | None = None) -> dict[str, Any]:
            lp = logprobs(i, upto)
            if chat and finish and lp is not None and not lp["content"]:  # nothing left: null, as OpenAI's last
                lp = None
            if chat:
                choice = {"index": i, "delta": {"content": delta} if delta else {}, "logprobs": lp,
                          "finish_reason": finish}
            else:
                choice = {"index": i, "text": delta or "", "logprobs": lp, "finish_reason": finish}
            return envelope([choice])

        def events() -> None:
            if chat:  # each choice opens with the role
                for i in range(len(reqs)):
                    self._event(envelope([{"index": i, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}]))
            failed = None
            for i, item in _merged(reqs, self._stop_if_client_gone):
                if sub.echo and i not in echoed and reqs[i].finish_reason != "error":
                    self._event(echo(i))
                echoed.add(i)
                if item is not None:
                    delta, upto = item
                    self._event(chunk(i, delta, upto=upto))
                elif reqs[i].finish_reason == "error":
                    failed = failed or reqs[i]
                else:
                    self._event(chunk(i, None, reqs[i].finish_reason))
            if failed is not None:
                self._event(failure(failed).body())
            elif include_usage:
                self._event(envelope([], sub.usage()))
            self._write_chunk(b"data: [DONE]\n\n")

        self._event_stream(sub, events)

    def _event_stream(self, sub: Submission, events: Callable[[], None]) -> None:
        """A stream of server-sent events: its headers, what `events()` writes, and its last chunk. A
        client that goes away, even before the headers, cancels every choice."""
        try:
            self._open_stream(sub)
            events()
            if self.chunked:
                self._write_chunk(b"")
        except (OSError, ValueError):  # disconnected, reset or timed out (ValueError: closed file)
            for r in sub.reqs:
                r.cancel()
            self.close_connection = True

    def _open_stream(self, sub: Submission) -> None:
        """The headers of a stream of server-sent events."""
        self.send_response(200)
        for name, value in sub.headers().items():
            self.send_header(name, value)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")  # nginx would otherwise hold the events back
        self.chunked = self.request_version != "HTTP/1.0"
        if self.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()

    def _respond(self, sub: Submission, body: dict) -> None:
        """A Responses API answer: the response object, or with `stream` its events (named, as OpenAI
        sends them, and numbered), ending with the response completed, incomplete or failed."""
        [req] = sub.reqs
        reply = responses.Reply(body, req, self.server.api.cfg.model_name)
        if not sub.stream:
            if self._finished(sub.reqs):
                self._json(200, reply.response(*reply.finished()), sub.headers())
            return
        deltas = (item[0] for _, item in _merged(sub.reqs, self._stop_if_client_gone) if item is not None)

        def events() -> None:
            for number, event in enumerate(reply.events(deltas)):
                self._event({**event, "sequence_number": number}, name=event["type"])

        self._event_stream(sub, events)

    def _event(self, obj: dict, name: str | None = None) -> None:
        """One server-sent event (named, as the Responses API's are)."""
        self._write_chunk((f"event: {name}\n".encode() if name else b"") + b"data: " + _json_bytes(obj) + b"\n\n")

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n" if self.chunked else data)
        self.wfile.flush()


class _DeadlineReader(io.RawIOBase):
    """A connection's receiving side: after `await_request`, a wait of `timeout` seconds for the
    request's first byte, and then `timeout` seconds for all of it, not only for each byte."""

    def __init__(self, sock: socket.socket, timeout: float):
        self.sock, self.timeout = sock, timeout
        self.deadline: float | None = None
        self.started = True  # whether bytes of the request awaited have arrived
        self.polling = False  # a read that takes only what has arrived
        self.ended = False  # the client's sending side is closed: what was read of a request is all of it
        self.timed_out = False  # a request that had started arriving did not arrive whole within the timeout

    def await_request(self, buffered: io.BufferedReader) -> None:
        """Starts the wait for a request, or the request itself when bytes of it are there already (a
        client that sent it with the one before, in `buffered` or the socket's buffer)."""
        self.deadline, self.started = None, False
        if not hasattr(socket, "MSG_DONTWAIT"):  # Windows: such a request gets its first wait's time besides
            return
        self.polling = True
        try:
            there = buffered.peek(1)
        except OSError:
            there = b""
        finally:
            self.polling = False
        if there and not self.started:
            self.started, self.deadline = True, time.monotonic() + self.timeout

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        if self.polling:
            self.sock.settimeout(0.0)  # with a timeout set, Python waits up to it for a byte, MSG_DONTWAIT or not
            try:
                n = self.sock.recv_into(buffer, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return None
            finally:
                self.sock.settimeout(self.timeout)
            if n:
                self.started, self.deadline = True, time.monotonic() + self.timeout
            return n
        left = self.timeout if self.deadline is None else min(self.timeout, self.deadline - time.monotonic())
        if left <= 0:
            self.timed_out = self.started
            raise TimeoutError("the request did not arrive within --timeout")
        self.sock.settimeout(left)
        try:
            n = self.sock.recv_into(buffer)
        except TimeoutError:
            self.timed_out = self.started
            raise
        finally:
            self.sock.settimeout(self.timeout)  # writing a stream keeps its own limit
        if n and not self.started:
            self.started, self.deadline = True, time.monotonic() + self.timeout
        self.ended = self.ended or not n
        return n


def _merged(reqs: list[Request], idle: Callable[[], None]) -> Iterator[tuple[int, tuple[str, int] | None]]:
    """(choice index, (text delta, log-probabilities behind it)) as the engine produces them, and
    (index, None) as each ends; `idle()` is called every CLIENT_POLL_S without one (a request still
    queued writes nothing that would fail). One thread per choice relays its deltas (n > 1 only); each
    ends when its sequence does, cancelled ones included."""
    if len(reqs) == 1:
        yield from ((0, c) for c in reqs[0].chunks(CLIENT_POLL_S, idle))
        yield 0, None
        return
    merged: queue.SimpleQueue = queue.SimpleQueue()

    def relay(i: int, req: Request) -> None:
        for c in req.chunks():
            merged.put((i, c))
        merged.put((i, None))

    for i, req in enumerate(reqs):
        threading.Thread(target=relay, args=(i, req), name=f"tinyk-choice-{i}", daemon=True).start()
    ended = 0
    while ended < len(reqs):
        try:
            item = merged.get(timeout=CLIENT_POLL_S)
        except queue.Empty:
            idle()
            continue
        ended += item[1] is None
        yield item


def _json_bytes(obj: Any) -> bytes:
    """UTF-8 JSON; a lone surrogate echoed from a request (a model name of "\\ud83d") stays the JSON
    escape it came as instead of failing to encode."""
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "backslashreplace")


def _netloc(url: str) -> str | None:
    try:
        return urllib.parse.urlsplit(url).netloc.lower()
    except ValueError:  # "http://[::1" and other malformed values
        return None


def _hostname(host: str) -> str | None:
    """The name in a Host header, without its port ("[::1]:8000" -> "::1"); None when malformed."""
    try:
        return urllib.parse.urlsplit("//" + host).hostname
    except ValueError:
        return None


def _body_cut_off() -> ConnectionAbortedError:
    """A body the client stopped sending by leaving: no request to run, and nobody to answer."""
    return ConnectionAbortedError("the client closed the connection before the whole body arrived")


_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:[0-9]{1,5})?")


def _local_host_name(host: str, allowed: tuple[str, ...]) -> bool:
    """Whether a Host header names this machine as no name an attacker can re-point can, or is one
    --allow-host names: an IP address, localhost (RFC 6761), this machine's own name as its system
    answers it (also with `.local`), Docker's host.docker.internal. Other names of one label or under
    `.local` resolve through LLMNR or mDNS, which anyone on the network can answer. A trailing dot
    (`localhost.`) is the same name; a value with more than a host and port is none."""
    if not _HOST.fullmatch(host):
        return False
    name = (_hostname(host) or "").removesuffix(".")
    own = socket.gethostname().lower()
    if name in allowed or name == "localhost" or name.endswith(".localhost") or \
            name in (own, f"{own}.local", "host.docker.internal"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _unauthorized() -> ApiError:
    return ApiError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def _methods(path: str) -> str | None:
    """The methods a path takes, as an Allow header lists them; None for a path this server does not have."""
    if path in POST_PATHS:
        return "POST"
    if path in ("/", "/index.html", "/health", "/v1/models") or path.startswith("/v1/models/"):
        return "GET, HEAD"
    return None


def _not_found(path: str, method: str) -> ApiError:
    """A 404 that says where a client's base URL went wrong: it is http://HOST:PORT/v1. Where the path it
    meant does not take `method`, the suggestion names the method that path takes."""
    def meant(target: str) -> str:
        takes = "POST" if target in POST_PATHS else "GET"
        return target if method == takes else f"{takes} {target}"

    hint, paths, trimmed = "", (*POST_PATHS, "/v1/models"), path.rstrip("/")
    if trimmed in paths or trimmed != path and trimmed.startswith("/v1/models/"):  # a model's card: GET /v1/models/NAME
        hint = f"; did you mean {meant(trimmed)}? (no slash at the end)"
    elif path.startswith("/v1/v1/") and (path[3:] in paths or path.startswith("/v1/v1/models/")):
        hint = f"; the base URL already ended in /v1 (did you mean {meant(path[3:])}?)"
    elif f"/v1{path}" in paths or path.startswith("/models/"):
        hint = f"; did you mean {meant('/v1' + path)}? (a client's base URL is http://HOST:PORT/v1)"
    elif path.startswith("/api/"):
        hint = "; this is an OpenAI-compatible server, not Ollama's API: its base URL is http://HOST:PORT/v1"
    return ApiError(404, f"no such path: {path}{hint}", code="not_found")


def _not_allowed(path: str, why: str = "") -> ApiError:
    methods = _methods(path) or ""
    return ApiError(405, f"{why}use {methods.replace(', ', ' or ')} for {path}", code="method_not_allowed",
                    headers={"Allow": methods})


def _content_lengths(headers: Any) -> list[str]:
    """Every Content-Length value, over repeated headers and comma lists (RFC 9110 8.6)."""
    return [v.strip() for line in headers.get_all("Content-Length", []) for v in line.split(",")]


def _content_length(headers: Any, limit: int) -> int | None:
    """A request's Content-Length, or None for a chunked body (whose size is checked as it is read):
    411 when there is neither, 400 when it is not a number, 413 above `limit`."""
    # Every Transfer-Encoding line: a proxy that reads another one than this server does is how
    # requests are smuggled past it.
    coding = [c.strip().lower() for line in headers.get_all("Transfer-Encoding", []) for c in line.split(",")
              if c.strip()]
    if coding == ["chunked"]:  # it overrides a Content-Length (RFC 9112 6.3)
        return None
    if coding:
        raise ApiError(501, f"Transfer-Encoding {', '.join(coding)} is not supported; send chunked or Content-Length",
                       code="unsupported_transfer_encoding")
    lengths = set(_content_lengths(headers))
    if not lengths:
        raise ApiError(411, "a Content-Length header is required", code="length_required")
    if len(lengths) > 1:  # which one a proxy in front went by is unknown (RFC 9112 6.3)
        raise ApiError(400, f"conflicting Content-Length values: {', '.join(sorted(lengths))[:80]}",
                       code="invalid_content_length")
    length = lengths.pop()
    if not (length.isascii() and length.isdigit()):  # "²".isdigit() is true, int("²") is not
        raise ApiError(400, f"Content-Length must be a number of bytes, got {length[:40]!r}",
                       code="invalid_content_length")
    if len(length.lstrip("0")) > len(str(limit)) or int(length) > limit:  # and Python's int() refuses 5,000 digits
        raise _too_large(length if len(length) <= 40 else f"{length[:20]}... ({len(length)} digits)", limit)
    return int(length)


def _too_large(length: int | str, limit: int) -> ApiError:
    return ApiError(413, f"request body of {length} bytes exceeds the limit of {limit} bytes", code="request_too_large")


def _busy_response() -> bytes:
    body = _json_bytes(ApiError(503, "the server has too many open connections; try again shortly",
                                type="server_error", code="too_many_connections").body())
    return (b"HTTP/1.1 503 Service Unavailable\r\nServer: tinyk\r\nContent-Type: application/json\r\n"
            b"Retry-After: 1\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\nContent-Length: %d\r\n"
            b"\r\n" % len(body)) + body


_TOO_MANY_CONNECTIONS = _busy_response()


def _connections_the_fd_limit_allows() -> int:
    """Connections that fit under the soft open-file limit, leaving room for the process's own files."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # no resource module (Windows)
        return 1 << 30
    return (1 << 30) if soft == resource.RLIM_INFINITY else max(16, soft - 64)


def check_host(host: str) -> None:
    if not host.strip():  # an unset $HOST in a script: the socket would listen on every interface
        raise TinykError("--host is empty; give 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)")


class ChatServer(ThreadingHTTPServer):
    """The HTTP server; `serve_forever()` runs it, `close()` stops it and the engine thread."""

    daemon_threads = True
    request_queue_size = 128
    # On Windows SO_REUSEADDR lets a second server take a port in use, each then getting some requests.
    allow_reuse_address = os.name != "nt"
    _serving = False

    def __init__(self, engine: Engine, cfg: ServerConfig, host: str = "127.0.0.1", port: int = 8000):
        check_host(host)
        # A library caller's port from os.environ is text; one past 65535 would be OverflowError from bind
        try:
            ok = not isinstance(port, bool) and 0 <= operator.index(port) <= 65535  # numpy's ints too
        except TypeError:
            ok = False
        if not ok:
            raise TinykError(f"port must be an integer from 0 to 65535, got {port!r}")
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.page = resources.files("tinyk").joinpath("web/index.html").read_bytes()
        self.api = Api(engine, cfg)  # its engine thread holds the model: closed below if the server cannot start
        try:
            super().__init__((host, port), Handler)
        except BaseException as e:
            self.api.close()
            if not isinstance(e, OSError):
                raise
            hint = "; pick another --port (--port 0: any free one)" if e.errno == errno.EADDRINUSE else ""
            raise TinykError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from e
        ip = ipaddress.ip_address(self.server_address[0].split("%")[0])
        if ip.version == 6 and ip.ipv4_mapped:  # ::ffff:127.0.0.1 is 127.0.0.1
            ip = ip.ipv4_mapped
        self.loopback, self.everywhere = ip.is_loopback, ip.is_unspecified
        self._answering = 0
        self._quiet = threading.Condition()
        self.max_connections = min(cfg.max_connections, _connections_the_fd_limit_allows())
        self._open = self._refused = 0
        self._refused_said = -math.inf
        self._open_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        """A connection past --max-connections is answered 503 at once, without a thread: accepting
        until the process runs out of descriptors would leave the server unable to answer anyone."""
        with self._open_lock:
            busy = self._open >= self.max_connections
            self._open += not busy
        if busy:
            self._refused += 1
            if time.monotonic() - self._refused_said >= 10:  # a line, not a flood
                self._report_refused("are")
            with contextlib.suppress(OSError):
                request.setblocking(False)
                request.send(_TOO_MANY_CONNECTIONS)
                request.shutdown(socket.SHUT_WR)
                request.recv(65536)  # a request already there, read: closing on unread input resets the answer
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started (the system's limit): none will count it out
            with self._open_lock:
                self._open -= 1
            raise

    def _report_refused(self, are: str) -> None:
        """Said with the access log off too (--quiet): a server too small for its load is the operator's to fix."""
        print(f"tinyk: refused {plural(self._refused, 'connections')} with a 503: --max-connections "
              f"{self.max_connections} {are} open", file=sys.stderr, flush=True)
        self._refused, self._refused_said = 0, time.monotonic()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open -= 1

    @property
    def address(self) -> str:
        """Where it listens, as bound (0.0.0.0 or [::]: every interface)."""
        host, port = self.server_address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def url(self) -> str:
        """Its URL on this machine: one listening on every interface is opened through loopback
        (0.0.0.0 is no address a browser can open everywhere)."""
        host, port = self.server_address[:2]
        if self.everywhere:
            host = "::1" if ":" in host else "127.0.0.1"
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> threading.Thread:
        """Serves from a background thread (tests, notebooks)."""
        self._serving = True
        t = threading.Thread(target=self.serve_forever, name="tinyk-http", daemon=True)
        t.start()
        return t

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._serving = True
        super().serve_forever(poll_interval)

    @contextlib.contextmanager
    def answering(self) -> Iterator[None]:
        """Counts a request being answered, so that `close` lets its reply go out first."""
        with self._quiet:
            self._answering += 1
        try:
            yield
        finally:
            with self._quiet:
                self._answering -= 1
                self._quiet.notify_all()

    def close(self, grace_s: float = 2.0) -> None:
        if self._refused:  # those since the last line said
            self._report_refused("were")
        # Requests in flight get their 503 now, and a moment to send it: the handler threads are
        # daemons, which a process ending after `close` (tinyk serve on Ctrl-C) would cut off.
        self.api.scheduler.stop()
        if self._serving:  # shutdown() waits for serve_forever to return: forever, if it never ran
            self.shutdown()
        # A client that connects from now on is refused, not accepted and then reset as the process ends.
        self.socket.close()
        with self._quiet:
            self._quiet.wait_for(lambda: self._answering == 0, timeout=grace_s)
        self.server_close()
        self.api.close()

    def __exit__(self, *exc: object) -> None:
        """Leaving `with ChatServer(...)` stops it all (socketserver's own only closes the socket, and a
        started server then spins on it)."""
        self.close()


def startup_notes(server: ChatServer) -> list[str]:
    """What an operator should know before the first request: a dtype this CPU emulates, fewer connections
    than asked, and who besides them can use the model without a key (the network; any web page, for *
    or null origins)."""
    cfg, lines = server.api.cfg, []
    engine = server.api.engine
    if note := emulated_note(engine.device, engine.dtype):
        lines.append(f"note: {note}")
    if server.max_connections < cfg.max_connections:
        lines.append(f"note: at most {server.max_connections:,} connections open at once, not --max-connections "
                     f"{cfg.max_connections}: the open-file limit (ulimit -n) allows no more")
    if cfg.api_key is None and not server.loopback:
        lines.append(f"warning: no --api-key: anyone who can reach port {server.server_address[1]} of this machine "
                     f"can use the model")
    if cfg.api_key is None and (wide := [o for o in ("*", "null") if o in cfg.allow_origins]):
        lines.append(f"warning: --allow-origin {wide[0]} without --api-key: any web page opened in a browser that can "
                     f"reach this server can use the model"
                     + (" (every site's sandboxed frames send Origin: null)" if wide[0] == "null" else ""))
    return lines


def serve(model_dir: str, *, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          dtype: str = "auto", quantize: str = "none", max_batch: int = 16, **cfg: Any) -> None:
    """Loads the model and serves until interrupted (`tinyk serve`)."""
    from .rundir import model_name

    cfg.setdefault("model_name", model_name(Path(model_dir)))
    config = ServerConfig(**cfg)  # its refusals (an API key with a space) come before the model loads
    check_host(host)
    engine = Engine.from_dir(model_dir, device=device, dtype=dtype, max_batch=max_batch, quantize=quantize)
    server = ChatServer(engine, config, host, port)
    weights = ", int8 weights" if engine.quantize == "int8" else ""
    where = f"on every interface ({server.address}): here at" if server.everywhere else "at"
    print(f"tinyk: serving {cfg['model_name']} ({engine.device}, {dtype_name(engine.dtype)}{weights}) "
          f"{where} {server.url}  (chat page: {server.url}/, API: {server.url}/v1)", file=sys.stderr, flush=True)
    for line in startup_notes(server):
        print(f"tinyk: {line}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.close()
