"""A terminal conversation over the engine: history, /commands, and a context window that never overflows.

`tinyk chat` runs it on stdin/stdout; tests drive it with a list of lines.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, TextIO

from .errors import Stopped, Terminated, TinykError, for_terminal
from .units import plural

if TYPE_CHECKING:  # the engine brings torch, which `tinyk --help` does not need
    from .engine import Engine, Request, SamplingParams
    from .tokenizer import ModelPrompt

CHAT_HELP = ("commands: /reset (forget the conversation), /system TEXT (new system prompt, then reset), "
             "/exit or /quit, /help; //TEXT sends /TEXT")
COMMANDS = ("reset", "system", "exit", "quit", "help")
IME_SLASHES = "、／"


def chat_session(engine: Engine, params: SamplingParams, lines: Iterable[str], out: TextIO, *,
                 system: str | None | ModelPrompt, prompt: str = "assistant> ",
                 interactive: bool = True) -> list[dict[str, str]]:
    """Runs a conversation over `lines` (user messages and /commands), streaming each reply to `out`.
    `system`: the text, None for none, or `tokenizer.MODEL_PROMPT` for the model's own (its SFT data's).

    When the conversation outgrows the context window the oldest turns are forgotten; a
    message too long on its own is reported (and fatal unless `interactive`). In an interactive
    session Ctrl-C stops the reply being written and keeps what was shown of it.
    Returns the final history.
    """
    session = _Session(engine, params, out, engine.tok.resolve_system(system), prompt, interactive)
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if interactive and text[:1] in IME_SLASHES and "\n" not in text and text[1:].split(" ")[0] in COMMANDS:
            text = "/" + text[1:]  # typed with Chinese punctuation on: the "/" key gives "、" (or "／")
        if interactive and text.startswith("//"):  # the escape for a message that starts with "/"
            text = text[1:]
        # A one-shot message is only ever a message ("/usr 是什么"), and so is a pasted paragraph.
        elif interactive and text.startswith("/") and "\n" not in text:
            if not session.command(text):
                break
            continue
        before = list(session.history)
        try:
            session.message(text)
        except KeyboardInterrupt as e:  # Ctrl-C before the reply began or after it ended (a long history
            if not interactive or isinstance(e, Terminated | Stopped):  # to tokenize): the session goes on
                raise
            session.history = before
            print("\n(stopped; the message is forgotten)", file=sys.stderr)
    return session.history


class _Session:
    """One conversation: its history and system prompt, and how each line changes them."""

    def __init__(self, engine: Engine, params: SamplingParams, out: TextIO, system: str | None, prompt: str,
                 interactive: bool):
        self.engine, self.params, self.out, self.prompt, self.interactive = engine, params, out, prompt, interactive
        self.history: list[dict[str, str]] = []
        # Room for the reply: its whole token budget, but never more than half the window (the history
        # keeps the rest).
        self.reserve = min(params.max_new_tokens, engine.context_length // 2)
        if why := engine.system_too_long(system):
            raise TinykError(why)
        self.system = system
        self._say_if_system_crowds()

    def _say_if_system_crowds(self) -> None:
        """A system prompt that leaves under a quarter of the window is said at once, not found out from
        replies cut at a few tokens."""
        ctx, share = self.engine.context_length, self.engine.system_tokens(self.system)
        if ctx - share < ctx // 4:
            print(f"(the system prompt and chat markers take {share:,} of the model's {ctx:,}-token context window: "
                  f"messages and replies share the {ctx - share:,} left)", file=sys.stderr)

    def command(self, text: str) -> bool:
        """Carries out a /command; False when it ends the session."""
        from .inputs import has_surrogate
        from .tokenizer import NOT_UTF8

        command, *rest = text.split(maxsplit=1)
        system = rest[0].strip() if rest else None  # /system's argument
        if command in ("/exit", "/quit"):
            return False
        if command == "/reset":
            self.history = []
            print("(conversation reset)", file=sys.stderr)
        elif command == "/help":
            print(CHAT_HELP, file=sys.stderr)
        elif command == "/system" and has_surrogate(text):  # a GBK line: the session goes on
            print(f"({NOT_UTF8}; system prompt unchanged)", file=sys.stderr)
        elif command == "/system" and (why := self.engine.system_too_long(system)):
            print(f"({why}; system prompt unchanged)", file=sys.stderr)
        elif command == "/system":
            self.system, self.history = system, []
            print(f"(system prompt {'set' if system else 'cleared'}; conversation reset)", file=sys.stderr)
            self._say_if_system_crowds()
        else:
            print(f"unknown command {command}; {CHAT_HELP}", file=sys.stderr)
        return True

    def message(self, text: str) -> None:
        """Answers one user message, streaming the reply; a message that cannot be sent is reported."""
        from .engine import ContextLengthError
        from .tokenizer import MESSAGE_TOKENS

        engine, interactive = self.engine, self.interactive
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
            return
        # Turns are forgotten from a copy: a message too long even on its own keeps the conversation.
        asked = [*self.history, {"role": "user", "content": text}]
        fitted = engine.fit_chat(asked, self.system, self.reserve)
        kept = [m for m in fitted if m["role"] != "system"]  # the history holds no system prompt
        forgot = (len(asked) - len(kept)) // 2  # user and assistant turns, in pairs
        try:
            ids = engine.chat_ids(fitted)
            request = engine.request(ids, self.params)
        except ContextLengthError as e:
            share = self._large_system_share()
            why = f"{e}; the system prompt and chat markers take {share:,}" if share else str(e)
            if not interactive:
                raise TinykError(f"message too long: {why}") from e
            print(f"(message too long: {why})", file=sys.stderr)
            return
        if forgot:
            turns = f"{forgot} turns" if forgot > 1 else "turn"
            print(f"(forgot the oldest {turns} to fit the context window)", file=sys.stderr)
        before, self.history = self.history, kept
        if not self._reply(request):  # nothing to keep: the conversation is as before, forgotten turns too
            self.history = before

    def _large_system_share(self) -> int | None:
        """The tokens the system prompt and chat markers take where that is over a quarter of the window:
        then worth naming when a message or a reply runs out of room."""
        share = self.engine.system_tokens(self.system)
        return share if share > self.engine.context_length // 4 else None

    def _window_full(self, request: Request) -> str:
        """Why a reply ran out of window, and what gives it more: /reset only where earlier turns take room;
        a system prompt that takes much of it is named."""
        why = (f"the context window is full: the prompt took {len(request.prompt_ids):,} of its "
               f"{self.engine.context_length:,} tokens")
        if share := self._large_system_share():
            why += f", the system prompt and chat markers {share:,} of those"
        return why + ("; /reset starts over" if self.interactive and len(self.history) > 1 else "")

    def _reply(self, request: Request) -> bool:
        """Streams the reply to `out` and adds it to the history (what was shown of it, after a Ctrl-C);
        False when it was stopped before any of it was shown."""
        out = self.out
        out.write(self.prompt)
        shown = []
        try:
            for _, delta in self.engine.run([request]):
                out.write(for_terminal(delta, out))
                out.flush()
                shown.append(delta)
        except TinykError:  # the model failed mid-reply (its logits overflowed): the error gets its own line
            out.write("\n")
            out.flush()
            raise
        except KeyboardInterrupt as e:  # Ctrl-C stops the reply, not the conversation; SIGTERM stops both
            out.write("\n")  # the reply's line ends before anything says why it stopped
            out.flush()
            if not self.interactive or isinstance(e, Terminated | Stopped):
                raise
            if shown:
                print("(reply stopped)", file=sys.stderr)
                self.history.append({"role": "assistant", "content": "".join(shown)})
                return True
            print("(reply stopped; the message is forgotten too)", file=sys.stderr)  # no empty answer stays
            return False
        out.write("\n")
        out.flush()
        reply = request.completion()
        if not reply.text and reply.finish_reason == "stop":
            # An undertrained model's (the blank line is its answer), or a --stop string the reply began with.
            why = "it began with a stop string" if request.detok and request.detok.stopped else \
                "the model ended its turn at once"
            print(f"(empty reply: {why})", file=sys.stderr)
        if reply.finish_reason == "length":
            fix = self._window_full(request) if reply.cut_by_context else "raise --max-new-tokens for longer"
            print(f"(reply cut at {plural(reply.completion_tokens, 'tokens')}; {fix})", file=sys.stderr)
        self.history.append({"role": "assistant", "content": reply.text})
        return True
