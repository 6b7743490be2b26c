"""The chat page in headless Chromium: type a message, get a streamed reply.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`), so no
websocket library is needed. `tests/install_chromium.sh` installs Debian's `chromium`.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from dataclasses import replace

import pytest

from tinyk.engine import Engine, SamplingParams
from tinyk.serve import ChatServer, ServerConfig
from tinyk.tokenizer import DEFAULT_SYSTEM_PROMPT

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed "
                                                         "(bash tests/install_chromium.sh installs Debian's chromium)")
DEFAULTS = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.1, max_new_tokens=32)


class Browser:
    """Just enough of the Chrome DevTools protocol: NUL-separated JSON messages on fds 3 and 4."""

    def __init__(self, profile: str):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def wire_pipes() -> None:
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
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
                raise RuntimeError("Chromium exited: " + self.proc.stderr.read().decode(errors="replace")[-2000:])
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
        self.proc.stderr.close()


# Runs in the page: waits for the model name, sends each message once the reply before it is complete.
CHAT_SCRIPT = """
(async () => {
  const until = async (ok, what) => {
    for (let i = 0; i < 600; i++) { if (ok()) return; await new Promise(r => setTimeout(r, 50)); }
    throw new Error("timed out waiting for " + what);
  };
  await until(() => document.getElementById("status").textContent.startsWith("nano"), "the model list");
  document.getElementById("temperature").value = "0";
  document.getElementById("max-tokens").value = %(max_tokens)s;
  const input = document.getElementById("input");
  for (const [i, message] of %(messages)s.entries()) {
    input.value = message;
    input.dispatchEvent(new KeyboardEvent("keydown", {key: "Enter", bubbles: true}));
    await until(() => { const a = document.querySelectorAll(".msg.assistant");
                        return a.length > i && a[i].dataset.done === "true"; }, "reply " + i);
  }
  const replies = [...document.querySelectorAll(".msg.assistant")];
  return {user: document.querySelector(".msg.user").textContent, userHtml: document.querySelector(".msg.user").innerHTML,
          replies: replies.map(a => ({text: a.textContent, chunks: Number(a.dataset.chunks),
                                      finish: a.dataset.finish || null, tokens: Number(a.dataset.tokens)})),
          notes: [...document.querySelectorAll(".msg.note")].map(n => n.textContent),
          errors: [...document.querySelectorAll(".msg.error")].map(n => n.textContent)};
})()
"""


def chat_in_page(engine: Engine, tmp_path, messages: list[str], max_tokens: int | None) -> dict:
    server = ChatServer(engine, ServerConfig(model_name="nano", defaults=DEFAULTS, log=False), port=0)
    server.start()
    browser = Browser(str(tmp_path / "profile"))
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        browser.send("Page.enable", session=session)
        browser.send("Page.navigate", {"url": server.url + "/"}, session)
        browser.wait_event("Page.loadEventFired", session)
        script = CHAT_SCRIPT % {"max_tokens": json.dumps("" if max_tokens is None else str(max_tokens)),
                                "messages": json.dumps(messages)}
        return browser.evaluate(session, script)
    finally:
        browser.close()
        server.close()


def greedy_chat(engine: Engine, history: list[dict], max_new_tokens: int):
    prompt = engine.chat_ids(history, default_system=DEFAULT_SYSTEM_PROMPT)
    return engine.generate([prompt], replace(DEFAULTS, temperature=0.0, max_new_tokens=max_new_tokens))[0]


def test_the_chat_page_streams_a_reply(nano_model_dir, tmp_path):
    engine = Engine.from_dir(nano_model_dir)
    message = "你好<b>!</b>"
    result = chat_in_page(engine, tmp_path, [message], max_tokens=12)
    want = greedy_chat(engine, [{"role": "user", "content": message}], 12)
    assert result["errors"] == [] and result["notes"] == []
    assert result["user"] == message and "<b>" not in result["userHtml"]  # shown as text, not HTML
    [reply] = result["replies"]
    assert reply["text"] == want.text and reply["finish"] == want.finish_reason
    assert reply["tokens"] == want.completion_tokens
    assert reply["chunks"] > 1, "the reply should arrive in several streamed pieces"


def test_the_chat_page_forgets_old_turns_to_fit_the_context(nano_model_dir, tmp_path):
    """A conversation longer than the model's window goes on, as in `tinyk chat`: old turns are
    dropped until the reply has half the window (the page's default budget; a fixed 256 was refused
    outright by 256-token models), and one message too long for that gets whatever room is left."""
    engine = Engine.from_dir(nano_model_dir)
    long = "今天天气很好，我们一起去公园散步吧。" * 3
    messages = [long + str(i) for i in range(3)]
    ids = engine.chat_ids([{"role": "user", "content": long}] * 3, default_system=DEFAULT_SYSTEM_PROMPT)
    assert len(ids) > engine.context_length, "the test needs a conversation longer than the window"
    result = chat_in_page(engine, tmp_path, messages, max_tokens=None)
    assert result["errors"] == [] and len(result["replies"]) == 3
    assert result["notes"] and all("forgot the oldest turn" in n for n in result["notes"])
    # The replies equal the engine's on the history the page kept, which always ends with the newest message.
    history: list[dict] = []
    budget = engine.context_length // 2
    for message, reply in zip(messages, result["replies"], strict=True):
        history.append({"role": "user", "content": message})
        while len(engine.chat_ids(history, default_system=DEFAULT_SYSTEM_PROMPT)) + budget > engine.context_length \
                and len(history) > 1:
            history = history[2:]
        fits = len(engine.chat_ids(history, default_system=DEFAULT_SYSTEM_PROMPT)) + budget <= engine.context_length
        want = greedy_chat(engine, history, budget if fits else DEFAULTS.max_new_tokens)
        assert reply["text"] == want.text and reply["finish"] == want.finish_reason
        history.append({"role": "assistant", "content": reply["text"]})
