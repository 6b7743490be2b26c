"""`tinyk generate` (raw completions, batched) and `tinyk chat` (interactive or scripted chat, see tinyk.chat)."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

from tinyk.chat import CHAT_HELP, chat_session
from tinyk.cli.common import (
    add_engine_args,
    add_sampling_args,
    batch_count,
    json_text,
    non_empty,
    path_arg,
    sampling_params,
    set_threads,
    text_field,
    utf8_text,
)
from tinyk.errors import Stopped, Terminated, TinykError, for_terminal
from tinyk.inputs import STDIN_NAMES, read_prompts, read_stdin_message
from tinyk.units import plural

if TYPE_CHECKING:
    from tinyk.engine import Completion, Engine


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="raw text completion (like the seed's pretrain sample)",
                       description="Continues each prompt as a pretraining document (prompts start with "
                                   "<|im_start|> unless --no-bos). Prompts are decoded --batch-size at a time.")
    add_engine_args(g)
    g.add_argument("--prompt", action="append", type=utf8_text, default=[], help="a prompt (repeatable)")
    g.add_argument("--prompt-file", type=path_arg, help="prompts, one per line (.txt, or - for stdin) or one per "
                                                        "record (JSON Lines in .jsonl/.json, or .parquet)")
    g.add_argument("--field", default=None, type=non_empty,
                   help="record field holding the prompt in --prompt-file (default prompt)")
    g.add_argument("--no-bos", action="store_true", help="do not start prompts with <|im_start|>")
    g.add_argument("--batch-size", type=batch_count, default=16, help="sequences decoded together (default 16)")
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    add_sampling_args(g, "seed for reproducible sampling (with several prompts, the i-th from 0 uses seed + i)")
    g.set_defaults(func=_generate)

    c = sub.add_parser("chat", help="chat with a model in the terminal",
                       description="Interactive multi-turn chat (" + CHAT_HELP + "). With --message (repeatable), "
                                   "or with input piped on stdin, answers those messages and exits.")
    add_engine_args(c)
    c.add_argument("--message", action="append", type=non_empty,
                   help="answer this message and exit; repeated, one conversation answered turn by turn")
    c.add_argument("--system-prompt", "--system", dest="system", type=utf8_text,
                   help="system prompt (default: the model's own, its SFT data's; '' for none)")
    add_sampling_args(c)
    c.set_defaults(func=_chat)


def _engine(args: argparse.Namespace, max_batch: int = 16) -> Engine:
    from tinyk.engine import Engine
    from tinyk.model import emulated_note

    set_threads(args)
    engine = Engine.from_dir(args.model, device=args.device, dtype=args.dtype, max_batch=max_batch,
                             quantize=args.quantize)
    if note := emulated_note(engine.device, engine.dtype):
        print(f"tinyk: note: {note}", file=sys.stderr)
    return engine


def _generate(args: argparse.Namespace) -> int:
    if args.prompt_file in STDIN_NAMES and sys.stdin.isatty():  # else it waits without a word
        end = "Ctrl-Z then Enter" if os.name == "nt" else "Ctrl-D"
        print(f"tinyk: reading prompts from the terminal, one per line; {end} ends them", file=sys.stderr)
    field = text_field(args.field, [args.prompt_file] if args.prompt_file else [], default="prompt",
                       source="--prompt-file", unit="prompt", stdin=True)
    prompts, note = read_prompts(args.prompt, args.prompt_file, field)
    if note:
        print(f"tinyk: {note}", file=sys.stderr)
    if args.no_bos and "" in prompts:  # the engine refuses it too, but only once the model has loaded
        raise TinykError("an empty prompt has nothing to continue without <|im_start|>; give it text, or leave out "
                         "--no-bos")
    params = sampling_params(args)
    engine = _engine(args, args.batch_size)
    ids, kept, note = engine.encode_prompts(prompts, bos=not args.no_bos, typed=len(args.prompt))
    if note:
        print(f"tinyk: {note}", file=sys.stderr)
    if len(prompts) == 1 and not args.json:
        sys.stdout.write(for_terminal(prompts[0], sys.stdout))
        request = engine.request(ids[0], params)
        try:
            for _, delta in engine.run([request]):
                sys.stdout.write(for_terminal(delta, sys.stdout))
                sys.stdout.flush()
        finally:  # also before an error or Ctrl-C, which then get their own line
            sys.stdout.write("\n")
        _say_if_cut(request.completion(), engine)
        return 0
    numbered = params.numbered(len(prompts))  # repeated prompts give different samples, each reproducible alone
    # Each sample is printed once it and those before it are done: Ctrl-C keeps what was printed.
    for i, c in zip(kept, engine.completions(ids, [numbered[i] for i in kept]), strict=True):
        prompt = prompts[i]
        if args.json:
            # finish_reason stays OpenAI's "length"; the extra key tells the context's cut from the budget's.
            # "sample" numbers it as text mode does.
            print(json_text({"sample": i + 1, "prompt": prompt, "text": c.text, "finish_reason": c.finish_reason,
                             **({"cut_by_context": True} if c.cut_by_context else {}),
                             "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens}), flush=True)
        else:
            print(f"--- sample {i + 1} ({plural(c.completion_tokens, 'tokens')}, {c.finish_reason}) ---\n"
                  f"{for_terminal(prompt + c.text, sys.stdout)}", flush=True)
        _say_if_cut(c, engine, f"sample {i + 1} ")
    return 0


def _say_if_cut(c: Completion, engine: Engine, which: str = "") -> None:
    """A note on stderr when the context window, not the --max-new-tokens asked for, ended a sample."""
    if c.cut_by_context:
        sys.stdout.flush()  # after the text it is about
        print(f"({which}cut at {plural(c.completion_tokens, 'tokens')}: the prompt and the text fill the model's "
              f"{engine.context_length}-token context)", file=sys.stderr, flush=True)


def _chat(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    if isinstance(sys.stdin, io.TextIOWrapper):  # a GBK line becomes one message the session reports, not a crash
        sys.stdin.reconfigure(errors="surrogateescape")
    messages = args.message
    if messages is None and not sys.stdin.isatty():
        messages = [read_stdin_message()]  # before the model loads
    engine = _engine(args, 1)
    system = engine.tok.system_from_flag(args.system)
    if messages is not None:
        chat_session(engine, params, messages, sys.stdout, system=system, prompt="", interactive=False)
        return 0
    print(f"tinyk chat: {args.model} ({CHAT_HELP})", file=sys.stderr)
    chat_session(engine, params, _input_lines(), sys.stdout, system=system)
    return 0


def _input_lines() -> Iterable[str]:
    """Lines typed at the `you>` prompt, with line editing and history where readline exists (arrow
    keys otherwise type escape codes into the message). Ctrl-C there clears the line, as at Python's
    own prompt, rather than ending the conversation; Ctrl-D ends it."""
    with contextlib.suppress(ImportError):  # not on Windows
        import readline  # loading it is what gives input() editing and history

        if "libedit" not in (readline.__doc__ or ""):  # macOS's has other settings, and none of these
            # Under LC_ALL=C readline takes each byte of a Chinese character for a Meta key (0xBD is
            # M-=, which lists the files here) and the message arrives empty: 8-bit bytes pass through.
            for setting in ("input-meta on", "output-meta on", "convert-meta off"):
                readline.parse_and_bind(f"set {setting}")
            # CPython turns it off; on, the terminal marks a paste and a pasted paragraph is one message.
            # Not on a dumb terminal (an editor's shell buffer), which would show its switching codes
            # around every prompt.
            if os.environ.get("TERM", "dumb") != "dumb":
                readline.parse_and_bind("set enable-bracketed-paste on")
    to_terminal = sys.stdout.isatty()
    while True:
        try:
            if to_terminal:
                yield input("you> ")
            else:  # replies go to a file or a pipe; the prompt is for the person typing
                print("you> ", end="", file=sys.stderr, flush=True)
                yield input()
        except EOFError:
            print(file=sys.stderr)
            return
        except KeyboardInterrupt as e:
            print(file=sys.stderr)  # the prompt's line ends, also before a line that says why it stopped
            if isinstance(e, Terminated | Stopped):  # SIGTERM, a hang-up: not Ctrl-C at the prompt
                raise
