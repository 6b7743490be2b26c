"""The chat page in headless Chromium: type a message, get a streamed reply.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`), so no
websocket library is needed. `tests/install_test_tools.sh` installs Debian's `chromium`. The browser's
preferred languages are set (`--accept-lang`, English unless a test says otherwise), so the page speaks the
language a test expects whatever the machine's locale.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

import pytest
import torch

from tinyk.checkpoint import save_model
from tinyk.engine import Engine, SamplingParams
from tinyk.model import ModelConfig, Transformer
from tinyk.serve import ChatServer, ServerConfig
from tinyk.tokenizer import DEFAULT_SYSTEM_PROMPT, load_tokenizer

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (bash "
                                                         "tests/install_test_tools.sh installs Debian's chromium)")
DEFAULTS = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.1, max_new_tokens=32)


class Browser:
    """Just enough of the Chrome DevTools protocol: NUL-separated JSON messages on fds 3 and 4."""

    def __init__(self, profile: str, languages: str = "en-US,en"):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # A file, not a pipe: a pipe nobody reads until exit would stall a chatty Chromium once full.
        self._log = tempfile.TemporaryFile()

        def wire_pipes() -> None:
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--remote-debugging-pipe",
             f"--lang={languages.split(',')[0]}", f"--accept-lang={languages}",  # navigator.languages
             f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log,
            preexec_fn=wire_pipes, pass_fds=(3, 4))  # close_fds runs after preexec_fn
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            if "method" in reply:
                self.events.append(reply)

    def wait_event(self, method: str, session: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events:
                if e["method"] == method and e.get("sessionId") == session:
                    self.events.remove(e)
                    return e
            msg = self._read(deadline)
            if "method" in msg:
                self.events.append(msg)

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer")
            data = os.read(self._from_chrome, 1 << 16)
            if not data:
                self._log.seek(0)
                raise RuntimeError("Chromium exited: " + self._log.read().decode(errors="replace")[-2000:])
            self._buf += data
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def evaluate(self, session: str, expression: str, timeout: float = 60):
        r = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True,
                                           "timeout": timeout * 1000}, session, timeout + 5)
        if "exceptionDetails" in r:
            raise RuntimeError(json.dumps(r["exceptionDetails"])[:2000])
        return r["result"].get("value")

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
            self.proc.wait(timeout=10)
        except (RuntimeError, TimeoutError, OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)
        self._log.close()


# Defined in the page (whose top-level `history`, `controller`, `input` and `requestBody` are in scope):
# `submit` sends a message, `say` sends one and waits until its reply is complete, `shown` returns what the page
# shows and keeps.
SETUP_SCRIPT = """
window.until = async (ok, what) => {
  for (let i = 0; i < 600; i++) { if (ok()) return; await new Promise(r => setTimeout(r, 50)); }
  throw new Error("timed out waiting for " + what);
};
window.submit = (message) => {
  input.value = message;
  input.dispatchEvent(new KeyboardEvent("keydown", {key: "Enter", bubbles: true}));
};
window.say = async (message) => { submit(message); await until(() => controller === null, "the reply to " + message); };
window.shown = () => {
  const replies = [...document.querySelectorAll(".msg.assistant")];
  return {users: [...document.querySelectorAll(".msg.user")].map(u => u.textContent),
          userHtml: document.querySelector(".msg.user") && document.querySelector(".msg.user").innerHTML,
          unsent: [...document.querySelectorAll(".msg.user.unsent")].map(u => u.textContent),
          replies: replies.map(a => ({text: a.textContent, chunks: Number(a.dataset.chunks),
                                      finish: a.dataset.finish || null, tokens: Number(a.dataset.tokens)})),
          notes: [...document.querySelectorAll(".msg.note")].map(n => n.textContent),
          errors: [...document.querySelectorAll(".msg.error")].map(n => n.textContent),
          history: JSON.parse(JSON.stringify(history))};
};
await until(() => document.getElementById("status").textContent.startsWith("nano"), "the model list");
document.getElementById("temperature").value = "0";
document.getElementById("max-tokens").value = %s;
"""


@contextlib.contextmanager
def chat_page(engine: Engine, tmp_path, max_tokens: int | None, screen: tuple[int, int] | None = None,
              languages: str = "en-US,en", fit_context: bool = False) -> Iterator[Callable[[str], Any]]:
    """Serves `engine`, opens the chat page in headless Chromium (on a `screen` of that width and height,
    a phone's; preferring `languages`, as Accept-Language lists them), and yields a function that runs
    JavaScript (an async function's body) in it and returns its result."""
    server = ChatServer(engine, ServerConfig(model_name="nano", defaults=DEFAULTS, log=False, fit_context=fit_context),
                        port=0)
    server.start()
    try:
        with open_page(server.url + "/", str(tmp_path / "profile"), languages, screen) as run:
            run(SETUP_SCRIPT % json.dumps("" if max_tokens is None else str(max_tokens)))
            yield run
    finally:
        server.close()


@contextlib.contextmanager
def open_page(url: str, profile: str, languages: str = "en-US,en",
              screen: tuple[int, int] | None = None) -> Iterator[Callable[[str], Any]]:
    """Opens `url` in headless Chromium and yields a function that runs JavaScript (an async function's
    body) in it and returns its result; `run.resize(width, height)` and `run.send(method, params)` (a
    DevTools command to the page) come with it."""
    browser = Browser(profile, languages)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        browser.send("Page.enable", session=session)

        def resize(width: int, height: int) -> None:
            browser.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                                "deviceScaleFactor": 1, "mobile": width < 600}, session)

        if screen:
            resize(*screen)
        browser.send("Page.navigate", {"url": url}, session)
        browser.wait_event("Page.loadEventFired", session)

        def run(body: str) -> Any:
            return browser.evaluate(session, f"(async () => {{\n{body}\n}})()")

        run.resize = resize  # type: ignore[attr-defined]
        run.send = lambda method, params: browser.send(method, params, session)  # type: ignore[attr-defined]
        yield run
    finally:
        browser.close()


def chat_in_page(engine: Engine, tmp_path, messages: list[str], max_tokens: int | None) -> dict:
    with chat_page(engine, tmp_path, max_tokens) as run:
        return run(f"for (const m of {json.dumps(messages)}) await say(m);\nreturn shown();")


def greedy_chat(engine: Engine, history: list[dict], max_new_tokens: int):
    prompt = engine.chat_ids(history, default_system=DEFAULT_SYSTEM_PROMPT)
    return engine.generate([prompt], replace(DEFAULTS, temperature=0.0, max_new_tokens=max_new_tokens))[0]


def test_the_chat_page_streams_a_reply(nano_model_dir, tmp_path):
    engine = Engine.from_dir(nano_model_dir)
    message = "你好<b>!</b>"
    result = chat_in_page(engine, tmp_path, [message], max_tokens=12)
    want = greedy_chat(engine, [{"role": "user", "content": message}], 12)
    assert result["errors"] == []
    cut = [f"(reply cut at {want.completion_tokens} tokens; raise max tokens for longer)"]  # as `tinyk chat` says
    assert result["notes"] == (cut if want.finish_reason == "length" else [])
    assert result["users"] == [message] and "<b>" not in result["userHtml"]  # shown as text, not HTML
    [reply] = result["replies"]
    assert reply["text"] == want.text and reply["finish"] == want.finish_reason
    assert reply["tokens"] == want.completion_tokens
    assert reply["chunks"] > 1, "the reply should arrive in several streamed pieces"


def test_the_chat_page_follows_a_server_restarted_with_another_model(nano_model_dir, tmp_path):
    """The page learns the model's name and context when it loads; a server restarted with another
    model refuses that name, and the page asks again instead of failing every message until a reload."""
    engine = Engine.from_dir(nano_model_dir)
    with chat_page(engine, tmp_path, max_tokens=4) as run:
        page = run("model = 'the-model-before'; context = 4096; status.textContent = 'old';\n"
                   "await say('你好');\nreturn {model, context, status: status.textContent, shown: shown()};")
    assert page["model"] == "nano" and page["context"] == engine.context_length and page["status"].startswith("nano")
    shown = page["shown"]
    assert shown["errors"] == [] and shown["unsent"] == [] and len(shown["replies"]) == 1
    assert shown["replies"][0]["finish"] in ("stop", "length") and len(shown["history"]) == 2


def test_the_chat_page_follows_a_server_restarted_with_a_smaller_context(nano_model_dir, tmp_path):
    """A server restarted under the same name with a model of a smaller window: the page kept the old
    window (in the status line, and for the reply's budget), so every message was refused ("... were
    requested; start the server with --fit-context") until a reload. A refusal for the context now
    makes it ask the server's window once."""
    engine = Engine.from_dir(nano_model_dir)
    with chat_page(engine, tmp_path, max_tokens=None) as run:
        page = run(f"context = {4 * engine.context_length}; status.textContent = 'old';\n"
                   "await say('你好');\nreturn {context, status: status.textContent, shown: shown()};")
    assert page["context"] == engine.context_length and page["status"] == f"nano · context {engine.context_length}"
    shown = page["shown"]
    assert shown == {**shown, "errors": [], "unsent": [], "notes": shown["notes"]} and len(shown["replies"]) == 1
    assert not [n for n in shown["notes"] if "forgot" in n]
    want = greedy_chat(engine, [{"role": "user", "content": "你好"}], engine.context_length // 2)
    assert shown["replies"][0]["text"] == want.text


def test_the_chat_page_forgets_old_turns_to_fit_the_context(nano_model_dir, tmp_path):
    """A conversation longer than the model's window goes on, as in `tinyk chat`: old turns are
    dropped until the reply has half the window (the page's default budget; a fixed 256 was refused
    outright by 256-token models), and one message too long for that gets whatever room is left (it
    got the server's --max-new-tokens, and a note that the window was full when it was not)."""
    engine = Engine.from_dir(nano_model_dir)
    long = "今天天气很好，我们一起去公园散步吧。" * 3
    messages = [long + str(i) for i in range(3)]
    ids = engine.chat_ids([{"role": "user", "content": long}] * 3, default_system=DEFAULT_SYSTEM_PROMPT)
    assert len(ids) > engine.context_length, "the test needs a conversation longer than the window"
    result = chat_in_page(engine, tmp_path, messages, max_tokens=None)
    assert result["errors"] == [] and len(result["replies"]) == 3
    forgot = [n for n in result["notes"] if not n.startswith("(reply cut at")]
    assert forgot and all("forgot the oldest turn" in n for n in forgot)
    # The replies equal the engine's on the history the page kept, which always ends with the newest message.
    history: list[dict] = []
    budget = engine.context_length // 2
    for message, reply in zip(messages, result["replies"], strict=True):
        history.append({"role": "user", "content": message})
        while len(engine.chat_ids(history, default_system=DEFAULT_SYSTEM_PROMPT)) + budget > engine.context_length \
                and len(history) > 1:
            history = history[2:]
        room = engine.context_length - len(engine.chat_ids(history, default_system=DEFAULT_SYSTEM_PROMPT))
        want = greedy_chat(engine, history, min(budget, room))
        assert reply["text"] == want.text and reply["finish"] == want.finish_reason
        history.append({"role": "assistant", "content": reply["text"]})
        if want.finish_reason == "length":
            full = "the context window is full" if want.completion_tokens == room else "raise max tokens"
            assert any(n.startswith(f"(reply cut at {want.completion_tokens} tokens; {full}") for n in result["notes"])
    assert any(n.endswith("the context window is full; Clear starts over)") for n in result["notes"])


def test_the_page_says_what_a_fit_context_server_forgot(nano_model_dir, tmp_path):
    """Under `serve --fit-context` the server drops the oldest turns itself (the page never sees its 400):
    the page reads how many from the reply's header, says so and forgets them too."""
    engine = Engine.from_dir(nano_model_dir)
    messages = ["今天天气很好，我们一起去公园散步吧。" * 3 + str(i) for i in range(3)]
    with chat_page(engine, tmp_path, max_tokens=None, fit_context=True) as run:
        result = run(f"for (const m of {json.dumps(messages)}) await say(m);\n"
                     "return {...shown(), kept: history.length};")
    assert result["errors"] == [] and len(result["replies"]) == 3
    assert [n for n in result["notes"] if "forgot the oldest turn" in n]
    assert result["kept"] < 2 * len(messages)


def test_a_large_max_tokens_keeps_the_conversation_and_gets_the_room_there_is(tok_dir, tmp_path):
    """"max tokens" near the window keeps the earlier turns while they leave the reply half the window,
    as `tinyk chat` does, and the reply gets the room there is (all but the newest turn were forgotten,
    and the reply cut at the server's --max-new-tokens)."""
    torch.manual_seed(0)
    vocab = load_tokenizer(tok_dir).vocab_size
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=vocab, max_seq_len=512))
    engine = Engine.from_dir(save_model(model, tok_dir, tmp_path / "long"))
    with chat_page(engine, tmp_path, max_tokens=8) as run:
        result = run("await say('你好');\n"
                     f"document.getElementById('max-tokens').value = '{engine.context_length - 1}';\n"
                     "await say('再见'); return shown();")
    assert result["errors"] == [] and not [n for n in result["notes"] if "forgot" in n]
    first = greedy_chat(engine, [{"role": "user", "content": "你好"}], 8)
    history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": first.text},
               {"role": "user", "content": "再见"}]
    room = engine.context_length - len(engine.chat_ids(history, default_system=DEFAULT_SYSTEM_PROMPT))
    assert room >= engine.context_length // 2 > DEFAULTS.max_new_tokens
    want = greedy_chat(engine, history, room)
    assert [r["text"] for r in result["replies"]] == [first.text, want.text]
    assert result["history"] == [*history, {"role": "assistant", "content": want.text}]


class Forward:
    """The engine's forward pass, made to fail or to wait for the test at its nth call from now."""

    def __init__(self, forward: Callable[..., Any]):
        self.forward = forward
        self.fail_in: int | None = None
        self.hold_in: int | None = None
        self.released = threading.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.fail_in is not None:
            self.fail_in -= 1
            if self.fail_in == 0:
                self.fail_in = None
                raise RuntimeError("simulated out of memory")
        if self.hold_in is not None:
            self.hold_in -= 1
            if self.hold_in == 0:
                self.hold_in = None
                self.released.wait(timeout=60)
        return self.forward(*args, **kwargs)


def test_the_chat_page_keeps_the_conversation_it_shows(nano_model_dir, tmp_path):
    """What the page shows is what it sends next: a message too long on its own is struck through and
    the conversation kept; a reply broken off by a server error stays as far as it came, one stopped
    before its first token does not; 清空 during a reply discards it; an empty temperature field leaves the server's default."""  # noqa: E501
    engine = Engine.from_dir(nano_model_dir)
    forward = engine.forward = Forward(engine.forward)
    too_long = "很" * (2 * engine.context_length)
    with chat_page(engine, tmp_path, max_tokens=64) as run:
        refused = run(f"await say('你好'); await say({json.dumps(too_long)}); return shown();")
        forward.fail_in = 4  # the prompt, two tokens, then the error
        broken = run("await say('再见'); return shown();")
        # Back to greedy after: sampled, the next reply may end before the forward pass it holds.
        no_temperature = run("const field = document.getElementById('temperature'); field.value = '';\n"
                             "const unset = !('temperature' in requestBody(history, 5)); field.value = '0';\n"
                             "return unset;")
        forward.hold_in = 3
        try:
            run("submit('讲个故事'); await until(() => history.length && history.at(-1).content === '讲个故事', "
                "'the server to take the message');\n"
                "document.getElementById('reset').click(); await until(() => controller === null, 'the stop');")
        finally:
            forward.released.set()
        after = run("return shown();")
        forward.released.clear()
        forward.hold_in = 1  # the prefill: the server has taken the message, no token has come
        try:
            early_stop = run("submit('讲个笑话'); await until(() => history.length, "
                             "'the server to take the message');\n"
                             "stop.click(); await until(() => controller === null, 'the stop'); return shown();")
        finally:
            forward.released.set()
        # Unset by default (the server's --temperature decides); a key the browser cannot send, and
        # Safari's IME Enter (keyCode 229, composition already ended), send nothing.
        default_temperature = run("return document.getElementById('temperature').defaultValue;")
        bad_key = run("document.getElementById('reset').click();\n"
                      "document.getElementById('api-key').value = '密钥'; await say('你好');\n"
                      "document.getElementById('api-key').value = ''; return shown();")
        ime = run("input.value = 'nihao'; input.dispatchEvent(new KeyboardEvent('keydown', "
                  "{key: 'Enter', keyCode: 229, bubbles: true})); return [input.value, controller === null];")
    first = greedy_chat(engine, [{"role": "user", "content": "你好"}], 64)
    assert refused["history"] == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": first.text}]
    assert refused["unsent"] == [too_long] and [r["text"] for r in refused["replies"]] == [first.text]
    assert len(refused["errors"]) == 1 and "context" in refused["errors"][0]
    cut = [f"(reply cut at {first.completion_tokens} tokens; raise max tokens for longer)"]
    assert refused["notes"] == (cut if first.finish_reason == "length" else [])  # no turn forgotten for it
    assert broken["errors"][1:] == ["generation failed: RuntimeError: simulated out of memory"]
    assert broken["replies"][1]["finish"] == "error"
    assert broken["replies"][1]["chunks"] > 0 and broken["history"][-2:] == [
        {"role": "user", "content": "再见"}, {"role": "assistant", "content": broken["replies"][1]["text"]}]
    assert no_temperature is True
    assert after == {**after, "users": [], "replies": [], "errors": [], "notes": [], "history": []}
    # Stopped before its reply began: no empty answer kept (and sent next time); the message is unsent.
    assert early_stop == {**early_stop, "users": ["讲个笑话"], "unsent": ["讲个笑话"], "replies": [], "errors": [],
                          "history": []}
    assert default_temperature == ""
    assert bad_key["unsent"] == ["你好"] and bad_key["errors"] == ["an API key is printable ASCII without spaces"]
    assert ime == ["nihao", True]


def test_the_chat_page_works_on_a_phone_by_keyboard_and_with_a_screen_reader(nano_model_dir, tmp_path):
    """On a 360-pixel screen a URL or a long unbroken run wraps inside the bubble instead of pushing the
    message off the screen; a streaming reply is marked busy, so a screen reader reads it once, complete,
    not again at every token; 发送 and 停止 leave the focus in the input (a disabled button drops it to the
    page), and Esc stops a reply."""
    engine = Engine.from_dir(nano_model_dir)
    forward = engine.forward = Forward(engine.forward)
    url = "https://example.com/" + "a" * 45  # twice the width of a phone
    with chat_page(engine, tmp_path, max_tokens=8, screen=(360, 640), languages="zh-CN,zh") as run:  # a student's
        forward.hold_in = 3  # the prefill and a token: the reply is streaming
        try:
            streaming = run(f"input.value = {json.dumps(url)}; send.focus(); send.click();\n"
                            "await until(() => Number(document.querySelector('.msg.assistant').dataset.chunks) > 0, "
                            "'the first token');\n"
                            "return [document.querySelector('.msg.assistant').getAttribute('aria-busy'), "
                            "document.activeElement === input];")
        finally:
            forward.released.set()
        fits = run("await until(() => controller === null, 'the reply');\n"
                   "const box = log.getBoundingClientRect();\n"
                   "return {inside: [...document.querySelectorAll('.msg')].every(m => {\n"
                   "  const r = m.getBoundingClientRect(); return r.left >= box.left && r.right <= box.right; }),\n"
                   "  scrolls: log.scrollWidth > log.clientWidth, formFits: document.getElementById('form')"
                   ".getBoundingClientRect().bottom <= innerHeight,\n"
                   "  headerShare: document.querySelector('header').getBoundingClientRect().height / innerHeight,\n"
                   "  busy: document.querySelector('.msg.assistant').getAttribute('aria-busy'),\n"
                   "  speakers: [...document.querySelectorAll('.msg.user, .msg.assistant')]"
                   ".map(m => m.getAttribute('aria-label'))};")
        forward.released.clear()
        forward.hold_in = 3
        try:
            stopped = run("submit('讲个故事');\n"
                          "await until(() => document.querySelectorAll('.msg.assistant').length === 2 && "
                          "Number(document.querySelectorAll('.msg.assistant')[1].dataset.chunks) > 0, "
                          "'the first token');\n"
                          "stop.focus(); document.dispatchEvent(new KeyboardEvent('keydown', "
                          "{key: 'Escape', bubbles: true}));\n"
                          "return controller !== null;")
        finally:
            forward.released.set()
        after_stop = run("await until(() => controller === null, 'the stop');\n"
                         "return [shown().replies[1].finish, document.activeElement === input, shown().notes];")
        folded = run("return document.getElementById('settings').open;")
        run.resize(640, 360)  # the phone turned sideways: wide enough to show the settings, with no 设置 to open them
        turned = run("await until(() => document.getElementById('settings').open, 'the settings'); "
                     "return document.getElementById('api-key').getClientRects().length > 0;")
    assert streaming == ["true", True]
    assert fits["headerShare"] < 0.15, "the settings fold away, leaving a phone's screen to the conversation"
    assert fits == {**fits, "inside": True, "scrolls": False, "formFits": True, "busy": None,
                    "speakers": ["你", "助手"]}
    # A stopped reply says so, as `tinyk chat` does: it would look finished otherwise.
    assert stopped is True and after_stop[:2] == ["stopped", True] and after_stop[2][-1] == "（回复已停止）"
    assert after_stop[2].count("（回复已停止）") == 1
    assert folded is False and turned is True


class StreamStub(BaseHTTPRequestHandler):
    """Another OpenAI-style server (or tinyk behind a proxy) that streams as the SSE standard allows but
    tinyk does not: CRLF line ends, `data:` without a space, one byte per write. `mode` picks the reply."""

    mode = "bytes"  # bytes | hold (waits for `released` inside a character) | cut (no end) | empty
    models_status = 200
    posts: list[dict] = []
    released = threading.Event()

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, kind: str, body: bytes = b"") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.end_headers()  # HTTP/1.0: the body ends where the connection does
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            card = {"object": "list", "data": [{"id": "nano", "object": "model", "max_model_len": 256}]}
            error = {"error": {"message": "the model is loading", "code": None}}
            self._send(self.models_status, "application/json",
                       json.dumps(card if self.models_status == 200 else error).encode())
        else:
            page = resources.files("tinyk").joinpath("web/index.html").read_bytes()
            self._send(200, "text/html; charset=utf-8", page)

    def do_POST(self) -> None:
        type(self).posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mode = type(self).mode
        reply = "" if mode == "empty" else "A" + STUB_REPLY
        events = [{"choices": [{"index": 0, "delta": {"content": ch}, "finish_reason": None}]} for ch in reply]
        if mode == "text_error":  # another server's error event, its error a plain string
            events = [*events[:1], {"error": "the server is overloaded"}]
        elif mode != "cut":
            events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        stream = b"".join(b"data:" + json.dumps(e, ensure_ascii=False).encode() + b"\r\n\r\n" for e in events)
        if mode not in ("cut", "text_error"):
            stream += b"data: [DONE]\r\n\r\n"
        self._send(200, "text/event-stream; charset=utf-8")
        if mode == "hold":  # the first delta and a character's first byte, then the rest once released
            split = stream.index("你".encode()) + 1
            self.wfile.write(stream[:split])
            self.wfile.flush()
            type(self).released.wait(timeout=60)
            stream = stream[split:]
        for i in range(len(stream)):
            self.wfile.write(stream[i:i + 1])


STUB_REPLY = "你好，世界！😀<img src=x onerror=alert(1)>"


class PrefixedStub(StreamStub):
    """The page behind a proxy's path prefix (https://host/tinyk/): nothing of the server's is at the root."""

    def _unprefixed(self) -> bool:
        if not self.path.startswith("/tinyk/"):
            self._send(404, "text/plain", b"not here")
            return False
        self.path = self.path.removeprefix("/tinyk")
        return True

    def do_GET(self) -> None:
        if self._unprefixed():
            super().do_GET()

    def do_POST(self) -> None:
        if self._unprefixed():
            super().do_POST()


CONTRAST_SCRIPT = """
const lum = (color) => color.match(/[\\d.]+/g).slice(0, 3).map(Number).map((v) => {
  v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; })
  .reduce((sum, v, i) => sum + v * [0.2126, 0.7152, 0.0722][i], 0);
const behind = (el) => {
  while (el && getComputedStyle(el).backgroundColor === "rgba(0, 0, 0, 0)") el = el.parentElement;
  return el ? getComputedStyle(el).backgroundColor : "rgb(255, 255, 255)";
};
for (const kind of ["user", "user unsent", "assistant", "note", "error"]) {
  const div = document.createElement("div"); div.className = "msg " + kind; div.textContent = kind; log.append(div);
}
const shown = [...document.querySelectorAll(".msg, #status, header label span, #send, #reset, summary")];
return {page: lum(behind(document.body)), ratios: Object.fromEntries(shown.map((el) => {
  const [a, b] = [lum(getComputedStyle(el).color), lum(behind(el))].sort((x, y) => y - x);
  return [el.className || el.id || el.textContent, Math.round((a + 0.05) / (b + 0.05) * 100) / 100];
}))};
"""


def test_the_page_follows_dark_mode_with_readable_text(tmp_path):
    """A system in dark mode got the light page; each mode's text keeps 4.5:1 against what it stands on."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), StreamStub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with open_page(f"http://127.0.0.1:{server.server_address[1]}/", str(tmp_path / "profile")) as run:
            light = run(CONTRAST_SCRIPT)
            run.send("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
            dark = run("log.replaceChildren();\n" + CONTRAST_SCRIPT)
    finally:
        server.shutdown()
        server.server_close()
    assert light["page"] > 0.8 and dark["page"] < 0.05
    for mode in (light, dark):
        assert len(mode["ratios"]) >= 9 and min(mode["ratios"].values()) >= 4.5, mode["ratios"]


def test_the_page_works_behind_a_path_prefix_and_says_how_a_reply_ended(tmp_path):
    """The page asked /v1/... of the root, which behind a proxy at /tinyk/ is not tinyk: nothing could be
    sent. A string error event showed as an empty bubble; the note after a long reply stayed below the
    view; a temperature the field marks wrong was sent to be refused."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), PrefixedStub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    StreamStub.posts = []
    try:
        with open_page(f"http://127.0.0.1:{server.server_address[1]}/tinyk/", str(tmp_path / "profile")) as run:
            run(SETUP_SCRIPT % json.dumps(""))
            said = run("await say('你好'); return shown();")
            # The message box grows with a long paste, and shrinks back once it is sent.
            grown = run("const before = input.offsetHeight; input.value = 'line\\n'.repeat(10);\n"
                        "input.dispatchEvent(new Event('input')); const grown = input.offsetHeight;\n"
                        "await say('长消息'); return {before, grown, after: input.offsetHeight};")
            StreamStub.mode = "text_error"
            failed = run("await say('再说'); return shown();")
            StreamStub.mode = "empty"
            note = run("for (let i = 0; i < 40; i++) log.appendChild(noteBubble('earlier ' + i));\n"
                       "await say('你好'); const last = [...log.children].at(-1);\n"
                       "return {note: last.textContent, "
                       "seen: last.getBoundingClientRect().bottom <= log.getBoundingClientRect().bottom + 1};")
            posts = len(StreamStub.posts)
            temperature = run("document.getElementById('temperature').value = '5'; submit('热一点');\n"
                              "await new Promise(r => setTimeout(r, 200));\n"
                              "return {input: input.value, open: document.getElementById('settings').open, "
                              "busy: controller !== null};")
            # The settings outlive a reload, as the API key does; the conversation and the draft do not.
            run("for (const [id, value] of [['temperature', '0.3'], ['max-tokens', '64'], ['system', '简短回答']]) {\n"
                "  const field = document.getElementById(id); field.value = value;\n"
                "  field.dispatchEvent(new Event('change')); }")
            run("window.before = true;")
            run.send("Page.reload", {})
            for attempt in range(3):  # a script that began in the page being left ends with it
                try:
                    kept = run("while (window.before || document.readyState !== 'complete') "
                               "await new Promise(r => setTimeout(r, 50));\n"
                               "return ['temperature', 'max-tokens', 'system', 'input'].map(id => "
                               "document.getElementById(id).value).concat(document.querySelectorAll('.msg').length);")
                    break
                except RuntimeError:
                    if attempt == 2:
                        raise
    finally:
        server.shutdown()
        server.server_close()
        StreamStub.mode = "bytes"
    assert said["errors"] == [] and [r["finish"] for r in said["replies"]] == ["stop"]
    assert grown["grown"] > 2 * grown["before"] and grown["after"] == grown["before"], grown
    assert failed["errors"][-1] == "the server is overloaded"
    assert note == {"note": "(empty reply: the model ended its turn at once)", "seen": True}
    assert temperature == {"input": "热一点", "open": True, "busy": False} and len(StreamStub.posts) == posts
    assert kept == ["0.3", "64", "简短回答", "", 0]


class HeldModels(StreamStub):
    """A server that stops answering (frozen with Ctrl-Z, or a dropped network) once `held` is set:
    /v1/models takes the request and does not reply until `unheld` is set."""

    held = False
    unheld = threading.Event()

    def do_GET(self) -> None:
        if self.path == "/v1/models" and type(self).held:
            type(self).unheld.wait(timeout=60)
        super().do_GET()


def test_stop_ends_a_message_that_waits_for_the_model_list(tmp_path):
    """After "server unreachable" the page asks for the model list before the next message; a server
    that takes that request and never answers left the page busy (Send disabled) whatever Stop, Esc
    or Clear did, until a reload. Stop now withdraws the message, as before a reply's first token."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), HeldModels)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    HeldModels.held = False
    HeldModels.unheld.clear()
    try:
        with open_page(f"http://127.0.0.1:{server.server_address[1]}/", str(tmp_path / "profile")) as run:
            run(SETUP_SCRIPT % json.dumps(""))
            HeldModels.held = True
            page = run("model = null; submit('你好');\n"
                       "await new Promise(r => setTimeout(r, 300)); const busy = controller !== null;\n"
                       "stop.click(); await until(() => controller === null, 'the stop');\n"
                       "return {busy, sendDisabled: send.disabled, input: input.value, ...shown(), "
                       "status: status.textContent};")
    finally:
        HeldModels.unheld.set()
        server.shutdown()
        server.server_close()
    assert page == {**page, "busy": True, "sendDisabled": False, "input": "你好", "unsent": ["你好"], "errors": [],
                    "history": [], "replies": []}
    assert page["status"] == "nano · context 256", "a stop is no error to show in the status line"


def test_the_page_takes_messages_as_typed_and_says_what_it_cannot_send(nano_model_dir, tmp_path):
    """Pasted code keeps its first line's indent (the whole message was trimmed); a max tokens the field
    marks wrong (-5, 0.5) is said so at the field and nothing is sent (it was replaced by half the
    context, silently); a system prompt that alone fills the window is named as what to shorten (every
    message was "the prompt has N tokens", a two-character one too)."""
    engine = Engine.from_dir(nano_model_dir)
    code = "    def f():\n        return 1"
    with chat_page(engine, tmp_path, max_tokens=2) as run:
        typed = run(f"input.value = '\\n' + {json.dumps(code)} + '\\n\\n'; send.click();\n"
                    "await until(() => controller === null, 'the reply'); return shown();")
        invalid = {value: run(f"document.getElementById('reset').click();\n"
                              f"document.getElementById('max-tokens').value = '{value}'; submit('你好');\n"
                              "await new Promise(r => setTimeout(r, 200));\n"
                              "return {...shown(), input: input.value, sending: controller !== null, "
                              "focused: document.activeElement.id};")
                   for value in ("-5", "0.5")}
        system = run("document.getElementById('max-tokens').value = '2';\n"
                     f"document.getElementById('system').value = '你是'.repeat({engine.context_length});\n"
                     "await say('你好'); return shown();")
    assert typed["users"] == [code] and typed["history"][0] == {"role": "user", "content": code}
    for page in invalid.values():
        assert page == {**page, "users": [], "history": [], "input": "你好", "sending": False, "focused": "max-tokens"}
    assert system == {**system, "replies": [], "unsent": ["你好"]}
    assert [e.partition(":")[0] for e in system["errors"]] == ["the system message is too long"]


def test_the_message_box_has_the_width_of_a_phone_and_the_page_loads_cleanly(nano_model_dir, tmp_path):
    """On a 320-pixel phone in English the three buttons left the message box 43 pixels ("Type a messag"):
    they go below it there. The page names its own (empty) icon: the browser's request for /favicon.ico
    was a 404 in the console at every load."""
    engine = Engine.from_dir(nano_model_dir)
    with chat_page(engine, tmp_path, max_tokens=2, screen=(320, 640)) as run:
        page = run("const box = input.getBoundingClientRect(), form = document.getElementById('form');\n"
                   "return {share: box.width / innerWidth,\n"
                   " formFits: form.getBoundingClientRect().bottom <= innerHeight,"
                   " buttonsBelow: [send, stop, document.getElementById('reset')].every("
                   "b => b.getBoundingClientRect().top >= box.bottom),"
                   " icon: document.querySelector('link[rel~=icon]').getAttribute('href')};")
        run.resize(1024, 700)
        wide = run("const box = input.getBoundingClientRect();\n"
                   "return [send, stop].every(b => b.getBoundingClientRect().top < box.bottom);")
    assert page == {**page, "formFits": True, "buttonsBelow": True, "icon": "data:,"} and page["share"] > 0.8
    assert wide is True, "a wide window keeps the buttons beside the message box"


def test_the_chat_page_reads_any_standard_stream_and_says_when_one_breaks_off(tmp_path):
    """Against a server that streams as the standard allows, with the browser's site data blocked
    (the page stopped at its first line, and Send reloaded it): a character split between reads, an
    emoji and markup in the reply come out as text; an input method's Esc cancels its composition, not
    the reply, and a reader scrolled up is left there; a stream that ends before the reply does says
    so; an empty reply says so; and a message is not sent while the page does not know the model."""
    profile = tmp_path / "profile"
    (profile / "Default").mkdir(parents=True)
    (profile / "Default" / "Preferences").write_text(
        json.dumps({"profile": {"default_content_setting_values": {"cookies": 2}}}))  # "block site data"
    server = ThreadingHTTPServer(("127.0.0.1", 0), StreamStub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    StreamStub.posts = []
    StreamStub.released.clear()
    try:
        with open_page(f"http://127.0.0.1:{server.server_address[1]}/", str(profile)) as run:
            run(SETUP_SCRIPT % json.dumps(""))
            blocked = run("try { localStorage.length; return false; } catch (e) { return true; }")
            streamed = run("await say('你好'); return shown();")
            StreamStub.mode = "hold"
            run("for (let i = 0; i < 40; i++) log.appendChild(noteBubble('earlier ' + i));\n"
                "submit('再说一遍');\n"
                "await until(() => Number(document.querySelectorAll('.msg.assistant')[1].dataset.chunks) > 0, "
                "'the first delta'); log.scrollTop = 0; input.focus();")
            run.send("Input.imeSetComposition", {"text": "ni", "selectionStart": 2, "selectionEnd": 2})
            run.send("Input.dispatchKeyEvent", {"type": "rawKeyDown", "key": "Escape", "code": "Escape",
                                                "windowsVirtualKeyCode": 27})
            composing = run("return controller !== null;")
            StreamStub.released.set()
            held = run("await until(() => controller === null, 'the reply');\n"
                       "return {...shown(), top: log.scrollTop, img: document.querySelector('#log img') !== null};")
            StreamStub.mode = "cut"
            cut = run("document.getElementById('reset').click(); input.value = '';\n"
                      "await say('你好'); return shown();")
            StreamStub.mode = "empty"
            empty = run("document.getElementById('reset').click(); await say('你好'); return shown();")
            StreamStub.models_status, posts = 503, len(StreamStub.posts)
            unknown = run("document.getElementById('reset').click(); model = null;\n"
                          "await say('你好'); return {...shown(), status: status.textContent};")
    finally:
        server.shutdown()
        server.server_close()
        StreamStub.mode, StreamStub.models_status = "bytes", 200
    reply = "A" + STUB_REPLY
    assert blocked is True
    assert streamed == {**streamed, "errors": [], "notes": [], "history": [
        {"role": "user", "content": "你好"}, {"role": "assistant", "content": reply}]}
    assert [(r["text"], r["finish"]) for r in streamed["replies"]] == [(reply, "stop")]
    assert composing is True, "Esc that cancels a composition must not stop the reply"
    assert [(r["text"], r["finish"]) for r in held["replies"]] == [(reply, "stop")] * 2
    assert held["img"] is False and held["top"] == 0 and held["errors"] == []
    assert cut["errors"] == ["the reply broke off: its stream ended before the reply did"]
    assert [(r["text"], r["finish"]) for r in cut["replies"]] == [(reply, "error")]
    assert cut["history"] == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": reply}]
    assert empty == {**empty, "errors": [], "notes": ["(empty reply: the model ended its turn at once)"]}
    assert empty["history"] == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": ""}]
    assert len(StreamStub.posts) == posts, "nothing is sent with model null"
    assert unknown == {**unknown, "unsent": ["你好"], "replies": [], "history": [],
                       "errors": ["the model is loading"], "status": "the model is loading"}


def test_a_message_stopped_before_its_reply_gives_back_the_turns_it_forgot(nano_model_dir, tmp_path):
    """Withdrawn (stopped before its first token), a message that made the page forget the oldest
    turns leaves the conversation as it was: those turns are sent with the next message again."""
    engine = Engine.from_dir(nano_model_dir)
    forward = engine.forward = Forward(engine.forward)
    first, second = (json.dumps("今天天气很好，我们一起去公园散步吧。" * 3 + str(i)) for i in range(2))
    with chat_page(engine, tmp_path, max_tokens=None) as run:
        before = run(f"await say({first}); return shown();")
        forward.hold_in = 1  # the prefill: the server has taken the message, no token has come
        try:
            stopped = run(f"submit({second});\n"
                          f"await until(() => history.length && history.at(-1).content === {second}, "
                          "'the server to take the message');\n"
                          "const forgot = history.length === 1;\n"
                          "stop.click(); await until(() => controller === null, 'the stop');\n"
                          "return {...shown(), forgot};")
        finally:
            forward.released.set()
    assert stopped["forgot"], "the second message must make the page forget the first turn"
    assert len(before["history"]) == 2 and stopped["history"] == before["history"]
    assert stopped["notes"] == before["notes"] and stopped["unsent"] == [json.loads(second)]


# Every text the page writes, with the language its element says it is in: text nodes, the placeholders, aria-labels
# and titles, and the document's title; not the conversation itself, nor the server's own (English) words.
WRITTEN_SCRIPT = """
const written = [[document.title, document.documentElement.lang]];
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
for (let node; (node = walker.nextNode());) {
  const el = node.parentElement;
  if (node.data.trim() && !el.closest("script, #log span[lang], #status span[lang]"))
    written.push([node.data.trim(), el.closest("[lang]").lang]);
}
for (const el of document.querySelectorAll("[placeholder], [aria-label], [title]"))
  for (const name of ["placeholder", "aria-label", "title"])
    if (el.getAttribute(name)) written.push([el.getAttribute(name), el.closest("[lang]").lang]);
return written;
"""


# What the page says in each of its languages, as the test below reads it.
PAGE_WORDS = {
    "en": dict(texts=["tinyk chat", "Settings", "temperature", "max tokens", "system", "API key", "Send", "Stop",
                      "Clear"], context="context", you="You", assistant="Assistant", server_said="",
               bad_key="an API key is printable ASCII without spaces",
               cut="(reply cut at 2 tokens; raise max tokens for longer)", conversation="Conversation",
               not_sent="not sent"),
    "zh-CN": dict(texts=["tinyk 聊天", "设置", "温度 (temperature)", "最大词元数 (max tokens)",
                         "系统提示词 (system prompt)", "API 密钥 (API key)", "发送", "停止", "清空"],
                  context="上下文", you="你", assistant="助手", server_said="服务器报错：",
                  bad_key="API 密钥只能由可打印的 ASCII 字符组成，不能有空格",
                  cut="（回复在 2 个词元处截断；调大“最大词元数”可以得到更长的回复）", conversation="对话",
                  not_sent="未发送"),
    "zh-Hant": dict(texts=["tinyk 聊天", "設定", "溫度 (temperature)", "最大詞元數 (max tokens)",
                           "系統提示詞 (system prompt)", "API 金鑰 (API key)", "送出", "停止", "清除"],
                    context="上下文", you="你", assistant="助理", server_said="伺服器錯誤：",
                    bad_key="API 金鑰只能由可列印的 ASCII 字元組成，不能有空格",
                    cut="（回覆在 2 個詞元處截斷；調高「最大詞元數」可以得到更長的回覆）", conversation="對話",
                    not_sent="未送出"),
}


@pytest.mark.parametrize(("languages", "lang"), [("zh-CN,zh", "zh-CN"), ("zh-TW,zh", "zh-Hant"),
                                                 ("zh-HK,en", "zh-Hant"), ("en-US,en", "en"), ("en-GB,zh-CN", "en")])
def test_the_chat_page_speaks_the_browsers_language(nano_model_dir, tmp_path, languages, lang):
    """Chinese where the browser prefers Chinese (traditional characters for Taiwan, Hong Kong and Macau,
    simplified otherwise), English otherwise: the labels, placeholders, the status line, notes and errors,
    marked with the language they are in (for a screen reader's voice). The conversation is marked
    Chinese, the model's language; the server's errors stay English, marked so."""
    engine = Engine.from_dir(nano_model_dir)
    words, zh = PAGE_WORDS[lang], lang != "en"
    with chat_page(engine, tmp_path, max_tokens=2, languages=languages) as run:
        page = run("const texts = () => [...document.querySelectorAll('h1, summary, label span, button')]"
                   ".map(e => e.textContent);\n"
                   "await say('你好'); await say('很'.repeat(2 * context));\n"
                   "document.getElementById('api-key').value = '密钥'; await say('再见');\n"
                   "document.getElementById('api-key').value = '';\n"
                   "return {lang: document.documentElement.lang, texts: texts(), status: status.textContent,\n"
                   "  speakers: [...document.querySelectorAll('.msg.user, .msg.assistant')]"
                   ".map(m => [m.getAttribute('aria-label'), m.lang, m.firstChild.lang]),\n"
                   "  errors: [...document.querySelectorAll('.msg.error')].map(m => ({text: m.textContent, "
                   "lang: m.lang, server: [...m.querySelectorAll('[lang]')].map(s => s.lang)})),\n"
                   "  shown: shown()};")
        written = run(WRITTEN_SCRIPT)
    assert page["lang"] == lang
    assert page["texts"] == words["texts"]
    assert page["status"] == f"nano · {words['context']} {engine.context_length}"
    # Two messages refused (too long for the window; an API key the browser cannot send), each struck through.
    assert page["shown"]["unsent"] == ["很" * (2 * engine.context_length), "再见"]
    you, assistant = [words["you"], lang, "zh"], [words["assistant"], lang, "zh"]
    assert page["speakers"] == [you, assistant, you, you]
    refused, bad_key = page["errors"]
    assert refused["text"].startswith(words["server_said"]) and "context" in refused["text"]
    assert refused["lang"] == lang and refused["server"] == ["en"]  # the server's words, in English
    assert bad_key == {"text": words["bad_key"], "lang": lang, "server": []}
    if page["shown"]["replies"][0]["finish"] == "length":
        assert page["shown"]["notes"] == [words["cut"]]
    # Nothing left in the other language: every text the page writes has Chinese in it, or none.
    han = re.compile(r"[\u4e00-\u9fff]")
    assert [w for w in written if bool(han.search(w[0])) != zh] == []
    assert [w for w in written if w[1] != lang] == []  # each in an element marked with the page's language
    assert {words["conversation"], words["not_sent"]} <= {w[0] for w in written}
