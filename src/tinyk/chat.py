"""A terminal conversation over the engine: history, /commands, and a context window that never overflows.

`tinyk chat` runs it on stdin/stdout; tests drive it with a list of lines.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, TextIO

from .files import Terminated, TinykError

if TYPE_CHECKING:  # the engine brings torch, which `tinyk --help` does not need
    from .engine import Engine, SamplingParams

CHAT_HELP = ("commands: /reset (forget the conversation), /system TEXT (new system prompt, then reset), "
             "/exit or /quit, /help; //TEXT sends /TEXT")


def chat_session(engine: Engine, params: SamplingParams, lines: Iterable[str], out: TextIO, *,
                 system: str | None, prompt: str = "assistant> ", interactive: bool = True) -> list[dict[str, str]]:
    """Runs a conversation over `lines` (user messages and /commands), streaming each reply to `out`.

    When the conversation outgrows the context window the oldest turns are forgotten; a
    message too long on its own is reported (and fatal unless `interactive`). In an interactive
    session Ctrl-C stops the reply being written and keeps what was shown of it.
    Returns the final history.
    """
    from .engine import MESSAGE_TOKENS, ContextLengthError
    from .files import has_surrogate
    from .tokenizer import NOT_UTF8

    history: list[dict[str, str]] = []
    # Room for the reply: its whole token budget, but never more than half the window (the history
    # keeps the rest).
    reserve = min(params.max_new_tokens, engine.context_length // 2)

    def opening(s: str | None) -> int:
        """Tokens a conversation under system prompt `s` takes before its first message's text."""
        engine.check_fits([s or ""], tokens_each=MESSAGE_TOKENS)  # a pasted megabyte: refused, not tokenized
        return engine.tok.opening_tokens(s)

    def too_long(s: str | None) -> str | None:
        """Why system prompt `s` leaves no room for any message, or None."""
        try:
            start = opening(s)
        except ContextLengthError:
            start = engine.context_length
        return None if start < engine.context_length else (
            f"the system prompt is too long: with it the conversation takes at least {start:,} tokens before "
            f"any message, and the model's context window is {engine.context_length:,}")

    if why := too_long(system):
        raise TinykError(why)
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if interactive and text.startswith("//"):  # the escape for a message that starts with "/"
            text = text[1:]
        # A one-shot message is only ever a message ("/usr 是什么"), and so is a pasted paragraph.
        elif interactive and text.startswith("/") and "\n" not in text:
            command = text.split(maxsplit=1)[0]
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                history = []
                print("(conversation reset)", file=sys.stderr)
            elif command == "/help":
                print(CHAT_HELP, file=sys.stderr)
            elif command == "/system" and has_surrogate(text):  # a GBK line: the session goes on
                print(f"({NOT_UTF8}; system prompt unchanged)", file=sys.stderr)
            elif command == "/system" and (why := too_long(text[len("/system"):].strip() or None)):
                print(f"({why}; system prompt unchanged)", file=sys.stderr)
            elif command == "/system":
                system = text[len("/system"):].strip() or None
                history = []
                print(f"(system prompt {'set' if system else 'cleared'}; conversation reset)", file=sys.stderr)
            else:
                print(f"unknown command {command}; {CHAT_HELP}", file=sys.stderr)
            continue
        try:
            engine.check_fits([text], tokens_each=MESSAGE_TOKENS)  # a pasted megabyte: refused, not tokenized
            engine.tok.encode(text)
        except TinykError as e:  # too long, or a line of GBK bytes: say so and keep the session
            long = isinstance(e, ContextLengthError)
            if not interactive and long:
                raise TinykError(f"message too long: {e}") from e
            if not interactive:
                raise
            print(f"({'message too long: ' if long else ''}{e})", file=sys.stderr)
            continue
        # Turns are forgotten from a copy: a message too long even on its own keeps the conversation.
        kept, forgot = [*history, {"role": "user", "content": text}], 0
        while True:
            ids = engine.chat_ids(kept, default_system=system)
            if len(ids) + reserve <= engine.context_length or len(kept) == 1:
                break
            kept, forgot = kept[2:], forgot + 1
        try:
            request = engine.request(ids, params)
        except ContextLengthError as e:
            share = opening(system)
            why = f"{e}; the system prompt and chat markers take {share:,}" if share > engine.context_length // 4 \
                else str(e)
            if not interactive:
                raise TinykError(f"message too long: {why}") from e
            print(f"(message too long: {why})", file=sys.stderr)
            continue
        if forgot:
            turns = f"{forgot} turns" if forgot > 1 else "turn"
            print(f"(forgot the oldest {turns} to fit the context window)", file=sys.stderr)
        history = kept
        out.write(prompt)
        shown = []
        try:
            for _, delta in engine.run([request]):
                out.write(delta)
                out.flush()
                shown.append(delta)
        except TinykError:  # the model failed mid-reply (its logits overflowed): the error gets its own line
            out.write("\n")
            out.flush()
            raise
        except KeyboardInterrupt as e:  # Ctrl-C stops the reply, not the conversation; SIGTERM stops both
            out.write("\n")  # the reply's line ends before anything says why it stopped
            out.flush()
            if not interactive or isinstance(e, Terminated):
                raise
            if shown:
                print("(reply stopped)", file=sys.stderr)
                history.append({"role": "assistant", "content": "".join(shown)})
            else:  # no reply to keep: the message goes too, so no empty answer stays in the context
                print("(reply stopped; the message is forgotten too)", file=sys.stderr)
                history.pop()
            continue
        out.write("\n")
        out.flush()
        reply = request.completion()
        if reply.finish_reason == "length":
            fix = ("raise --max-new-tokens for longer" if reply.completion_tokens >= params.max_new_tokens
                   else "the context window is full" + ("; /reset starts over" if interactive else ""))
            print(f"(reply cut at {reply.completion_tokens} tokens; {fix})", file=sys.stderr)
        history.append({"role": "assistant", "content": reply.text})
    return history
