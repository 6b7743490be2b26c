"""The `tinyk` command: a thin argparse layer over the library.

Each stage has its own module here with a `register(subparsers)` function; handlers
import the library lazily so `tinyk --help` stays fast.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import difflib
import errno
import importlib
import io
import json
import os
import re
import signal
import stat
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

from tinyk import __version__
from tinyk.cli.common import speaks_for_machine
from tinyk.errors import (
    PeerLost,
    Stopped,
    StoppedBeforeTraining,
    Terminated,
    TinykError,
    escape_controls,
    first_line,
    import_torch,
    out_of_memory,
    say_on_stderr,
    signal_handlers,
    signal_status,
    stop_signal,
)
from tinyk.inputs import UTF8_OR

CLI_MODULES = ["tokenizer", "model", "data", "train", "generate", "serve", "evaluate", "demo", "plan"]
WITHOUT_TORCH = {"tokenizer", "data"}  # commands whose work needs no torch


class _Parser(argparse.ArgumentParser):
    """argparse with tinyk's error style: one line and exit 2, the usage left to --help. Flags are
    never abbreviated: `--res` meaning `--resume` today would silently mean something else once
    another flag starting with it is added, and a script would change behaviour without a word."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        given = getattr(self, "_given", [])
        if message.startswith("argument --") and message.endswith((": expected one argument",
                                                                    ": expected at least one argument")):
            names = message.split(":")[0].removeprefix("argument ").split("/")
            # It took -5B for a flag: a value after the flag that starts with one dash. Not a flag (--pre,
            # a value left out), nor nothing at all.
            if any(a in names and b.startswith("-") and not b.startswith("--") and b not in self._option_string_actions
                   for a, b in zip(given, given[1:], strict=False)):
                message += f" (a value that starts with '-' is written {names[-1]}=VALUE)"
        if message.startswith("the following arguments are required: "):  # `--mod x` for `--model x`
            required = message.split(": ", 1)[1].split(", ")
            missing = [f for f in required if f.startswith("--")]
            positional = [f for f in required if not f.startswith("-")]
            short = [(g, f) for g in (a.partition("=")[0] for a in given)
                     if g.startswith("--") and len(g) > 3 for f in missing if f.startswith(g) and f != g]
            message += "".join(f"; {g} is not {f}: flags are written in full" for g, f in short[:1])
            several = [a.option_strings[-1] for a in self._actions if a.nargs == "+" and a.option_strings
                       and set(a.option_strings) & set(given)]
            if positional and several:  # `tokenizer eval --input a.txt tok`: the input flag took tok
                message += (f"; {several[0]} takes every path after it, so give the {positional[0]} before "
                            f"{several[0]}")
            if "--input" in missing and given and not given[0].startswith("-"):  # `data pretrain a.jsonl ...`
                message += f"; input files are given after it: --input {given[0]}"
        line = f"{self.prog}: error: {message} (see {self.prog} --help)"
        if self.prog in ("tinyk pretrain", "tinyk sft") and _in_a_job_across_machines():
            say_on_stderr(line)  # first: telling the others may take a while
            _tell_job(f"{self.prog}: {message}")
            self.exit(2)
        self.exit(2, line + "\n")

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        """Records the innermost (sub)command's parser, which names the command in an error about what follows it,
        and what it was given, which an error about a missing flag looks through for the flag shortened."""
        self._given = list(args) if args is not None else sys.argv[1:]
        namespace, extras = super().parse_known_args(args, namespace)
        if not hasattr(namespace, "command_parser"):
            namespace.command_parser = self
        return namespace, extras


def _in_a_job_across_machines() -> bool:
    """Under torchrun with processes on other machines: train.tell_job's test, made here without importing
    torch (a platform that sets WORLD_SIZE in every container, torchrun or not, is no job to tell)."""
    if not os.environ.get("TORCHELASTIC_RUN_ID"):
        return False
    world, local = os.environ.get("WORLD_SIZE", "1"), os.environ.get("LOCAL_WORLD_SIZE", "1")
    here = int(local) if local.isascii() and local.isdigit() and int(local) > 0 else 1
    return world.isascii() and world.isdigit() and int(world) > here


def _tell_job(why: str) -> None:
    """A command line refused on one node (a typo in its job script): the job's processes on the other
    machines wait for this one until the group's timeout unless it comes to tell them."""
    try:
        from tinyk.train import tell_job

        tell_job("auto", TinykError(why))
    except (Exception, KeyboardInterrupt):  # its own line is out; the others stop on the group's timeout
        pass


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tinyk", description="Train a small Chinese chat LLM from scratch.")
    parser.add_argument("--version", action="version", version=f"tinyk {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in CLI_MODULES:  # each registers its commands
        importlib.import_module(f"tinyk.cli.{module}").register(sub)
    return parser


def _commands(parser: argparse.ArgumentParser) -> Iterable[argparse.ArgumentParser]:
    """Every (sub)command's parser under `parser`, those with subcommands of their own included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # an alias maps to the same parser
                yield sub
                yield from _commands(sub)


def _elsewhere(root: argparse.ArgumentParser, parser: argparse.ArgumentParser, flag: str) -> str:
    """For a flag another command has (`--model` given to `model gguf`): which commands take it, and
    whether this one takes the thing it names without a flag (its argument's help names it). A flag of
    its own that starts with it (`--modelfile`) means something else, so it is not offered."""
    owners = [p.prog.removeprefix("tinyk ") for p in _commands(root) if flag in p._option_string_actions]
    if not owners:
        return ""
    thing = flag[2:].split("-")[0]  # --model: a model (directory)
    positional = [a.metavar or a.dest.upper() for a in parser._actions if not a.option_strings
                  and not isinstance(a, argparse._SubParsersAction) and re.search(rf"\b{thing}\b", a.help or "")]
    names = owners if len(owners) <= 4 else [*owners[:4], "others"]
    where = f"{', '.join(names[:-1])} and {names[-1]}" if len(names) > 1 else names[0]
    how = f": {parser.prog} takes its {' '.join(positional)} without a flag" if positional else ""
    return f"; {flag} is a flag of tinyk {where}, not of {parser.prog}{how}"


def _flag_hint(root: argparse.ArgumentParser, parser: argparse.ArgumentParser, command: str,
               extras: list[str]) -> str:
    """For a shortened or mistyped flag (`--res`, `--max-new`, `--temprature`): the flag it may mean; for
    another command's flag, the --set that says it here, or what it is."""
    given = extras[0].partition("=")[0]
    if not given.startswith("--") or len(given) < 4:  # a bare `--` begins every flag
        return ""
    flags = [f for f in parser._option_string_actions if f.startswith("--")]
    close = difflib.get_close_matches(given, flags, n=1, cutoff=0.8)
    if said := _elsewhere(root, parser, given):  # a flag of this command like it is offered, beside what it is
        return _set_hint(command, extras) or said + "".join(f" (did you mean {f}?)" for f in close)
    matches = [f for f in flags if f.startswith(given)] or close
    return f"; did you mean {' or '.join(sorted(matches))}?" if 0 < len(matches) <= 3 else ""


def _set_hint(command: str, extras: list[str]) -> str:
    """For a training config key typed as a flag (`--keep-checkpoints 5`): the --set that says it."""
    if command not in ("pretrain", "sft", "plan") or not extras[0].startswith("--"):
        return ""
    from dataclasses import fields

    from tinyk.config import TrainConfig
    from tinyk.model import ModelConfig

    name, _, value = extras[0][2:].partition("=")
    keys = {f.name: f.name for f in fields(TrainConfig)} | {f.name: f"model.{f.name}" for f in fields(ModelConfig)}
    close = difflib.get_close_matches(name.replace("-", "_"), keys, n=1, cutoff=0.85)  # --keep-checkpoint too
    if not close:
        return ""
    key = keys[close[0]]
    value = value or (extras[1] if len(extras) > 1 and not extras[1].startswith("--") else "VALUE")
    return f"; a config key without a flag of its own is set with --set {key}={value}"


def _terminate(signum: int, frame: object) -> NoReturn:
    raise Terminated


def _hang_up(signum: int, frame: object) -> NoReturn:
    raise Stopped("SIGHUP")


def _break(signum: int, frame: object) -> NoReturn:
    raise Stopped("SIGBREAK")


def _stop_handlers() -> dict[int, Any]:
    """SIGTERM stops a command as Ctrl-C does; so does SIGHUP (the terminal or SSH session went away,
    which would kill `tinyk serve` or `tinyk data` without their clean-up), unless it is ignored, as
    under nohup, where the command goes on; and so does Windows' Ctrl-Break."""
    handlers: dict[int, Any] = {signal.SIGTERM: _terminate}
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
        handlers[signal.SIGHUP] = _hang_up
    if hasattr(signal, "SIGBREAK"):
        handlers[signal.SIGBREAK] = _break
    return handlers


OWN_BYTES = "tinyk-own-bytes"


def _own_bytes(e: UnicodeError) -> tuple[str | bytes, int]:
    """surrogateescape where it applies (a file name's bytes that are not UTF-8 print as those bytes),
    backslashreplace elsewhere (a lone surrogate from JSON's \\ud800 cannot end the command)."""
    if not isinstance(e, UnicodeEncodeError):
        raise e
    chars = e.object[e.start:e.end]
    if all(0xDC80 <= ord(c) <= 0xDCFF for c in chars):
        return bytes(ord(c) - 0xDC00 for c in chars), e.end
    return codecs.backslashreplace_errors(e)


codecs.register_error(OWN_BYTES, _own_bytes)


WINDOWS = os.name == "nt"


def utf8_streams(streams: Iterable[Any], windows: bool = WINDOWS) -> None:
    """Reads and writes UTF-8, as Python's UTF-8 mode would, where the locale's encoding is another: an
    ASCII locale (LC_ALL=C), and a pipe or file under any other (`generate --json > out.jsonl` came out
    in GBK under zh_CN.GBK or on Windows, which tinyk then refused to read; a UTF-8 file on stdin was
    read as GBK, silently garbled), unless PYTHONIOENCODING names an encoding. A terminal keeps a
    locale's other than ASCII: it shows and types that (Windows' console is UTF-16 to Python anyway).
    Windows' stdin reads UTF-8 where it is, else the code page: `echo 你好 | tinyk ...` in cmd.exe sends
    GBK. Elsewhere stdin reads UTF-8 with undecodable bytes kept as surrogates, as under LC_ALL=C, so GBK
    input is refused in one line, not misread."""
    if os.environ.get("PYTHONIOENCODING", "").partition(":")[0]:  # an encoding asked for (not ":strict")
        return
    for stream in streams:
        if not isinstance(stream, io.TextIOWrapper):
            continue
        encoding = codecs.lookup(stream.encoding).name
        stdin = stream is sys.stdin
        if encoding == "ascii":
            stream.reconfigure(encoding="utf-8")
        elif encoding != "utf-8" and not stream.isatty():
            if stdin and windows:
                stream.reconfigure(encoding=UTF8_OR + encoding)
            else:
                stream.reconfigure(encoding="utf-8", errors="surrogateescape" if stdin else None)


def _stopped(e: KeyboardInterrupt) -> NoReturn:
    """One line for a command stopped by a signal, and its status: 128 + the signal's number. Under
    torchrun only local rank 0 says it, once per machine: Ctrl-C reaches every process, and the agent
    stops the others with SIGTERM when one refuses, whose line would then seem a second problem."""
    name = stop_signal(e)
    said = {"SIGINT": "interrupted", "SIGTERM": "terminated", "SIGPIPE": "stopped: its output could not be written "
            "(the reader left, or a full disk)"}.get(name, f"stopped by {name}")
    if name == "SIGTERM" and os.environ.get("TORCHELASTIC_RUN_ID"):  # it may be the one line on screen
        said += " (by torchrun, if another process of the job failed: its report below names the error)"
    if speaks_for_machine():  # a command may say what the stop came too late to undo (eval's complete results)
        say_on_stderr(f"tinyk: {said}{f' {e}' if str(e) else ''}")
    sys.exit(signal_status(name))


def _fail(message: str, root_cause: bool = True) -> NoReturn:
    """One line on stderr and exit 2. Under torchrun every process usually fails alike: each leaves its
    line in the error file torchrun reads, whose failure summary then shows it in place of a link to
    PyTorch's docs, and only local rank 0 prints it, once per machine rather than once per process.
    torchrun names the earliest failure the root cause: a process that only saw another one stop
    dates its line a second later, so the other's error is the one named. Control characters (a file
    name's newline or ESC) are written out: one line, that drives no terminal."""
    message = escape_controls(message, keep="\t")
    written = False
    if error_file := os.environ.get("TORCHELASTIC_ERROR_FILE"):
        stamp = str(int(time.time()) + (0 if root_cause else 1))
        # The layout torch's own @record writes: {"message": {"message", "extraInfo": {"py_callstack", "timestamp"}}}
        with contextlib.suppress(OSError):
            Path(error_file).write_text(json.dumps({"message": {"message": message, "extraInfo": {
                "py_callstack": message, "timestamp": stamp}}}), encoding="utf-8")
            written = True
    if not written or speaks_for_machine():
        print(message, file=sys.stderr)
    # In a job of several processes, tearing down gloo's pairs at exit can abort (SIGABRT, not 2): after
    # a peer died, and when every process refuses at once (nodes started with different settings).
    if not root_cause or getattr(sys.modules.get("tinyk.train"), "joined_a_job", False):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    sys.exit(2)


def _stdout_is_full() -> bool:
    """Whether stdout is where a disk ran out: /dev/full, or a file on a disk with no room or no inodes left."""
    try:
        fd = sys.stdout.fileno()
        st = os.fstat(fd)
        if stat.S_ISCHR(st.st_mode):  # a terminal never is; /dev/full is device 1:7 on Linux
            return hasattr(os, "major") and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 7)
        if stat.S_ISREG(st.st_mode) and hasattr(os, "fstatvfs"):
            vfs = os.fstatvfs(fd)
            return vfs.f_bavail == 0 or (vfs.f_files > 0 and vfs.f_favail == 0)
    except (OSError, ValueError, AttributeError):  # closed, or no descriptor: nothing to tell by
        pass
    return False


def _closed_std_streams_on_devnull() -> None:
    """A standard stream its caller closed (a daemon started with `2>&-`) becomes /dev/null: Python
    leaves it None, which print() and the server's log take for stdout or fail on, and the next file
    opened would take its descriptor, so whatever torch writes there would land in that file."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        if getattr(sys, name) is not None:
            continue
        try:
            os.fstat(fd)  # a file opened since holds the descriptor: it stays that file's
            stream = open(os.devnull, mode, encoding="utf-8")
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            stream = open(fd, mode, encoding="utf-8", closefd=False)
        setattr(sys, name, stream)


def main(argv: list[str] | None = None) -> None:
    _closed_std_streams_on_devnull()
    try:
        os.getcwd()
    except FileNotFoundError:  # torch's own import would end in "Intel oneMKL FATAL ERROR"
        say_on_stderr("tinyk: error: the current directory no longer exists (it was deleted); cd to one that does")
        sys.exit(2)
    try:
        parser = build_parser()  # imports every stage's module: a Ctrl-C can land here too
    except KeyboardInterrupt:
        say_on_stderr("tinyk: interrupted")
        sys.exit(130)
    if not (sys.argv[1:] if argv is None else argv):  # a bare `tinyk`: what it can do
        parser.print_help()
        sys.exit(0)
    args, extras = parser.parse_known_args(argv)
    if extras:
        hint = _flag_hint(parser, args.command_parser, args.command, extras) or _set_hint(args.command, extras)
        args.command_parser.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
    utf8_streams((sys.stdin, sys.stdout, sys.stderr))
    for stream in (sys.stdout, sys.stderr):
        # A GBK or Latin-1 terminal cannot show every character a model writes (U+FFFD, emoji, rare
        # characters): they print as substitutes instead of ending the command with a traceback. On a
        # UTF-8 one, a path named in another encoding prints as its own bytes, as `ls` shows it.
        if not isinstance(stream, io.TextIOWrapper):
            continue
        if codecs.lookup(stream.encoding).name != "utf-8":
            stream.reconfigure(errors="replace")
        elif stream.errors in ("strict", "backslashreplace"):  # stderr's is backslashreplace: \udcc4 for the byte
            stream.reconfigure(errors=OWN_BYTES)
    try:
        with signal_handlers(_stop_handlers()):
            if args.command not in WITHOUT_TORCH:
                import_torch()
            code = args.func(args)
    except TinykError as e:
        _fail(f"tinyk: error: {e}", root_cause=not isinstance(e, PeerLost))
    except StoppedBeforeTraining as e:
        if speaks_for_machine():
            say_on_stderr(f"tinyk: stopped by {e.signal_name} before the first step: nothing was trained, and the "
                          f"run directory is as it was")
        sys.exit(signal_status(e.signal_name))
    except KeyboardInterrupt as e:
        _stopped(e)
    except OSError as e:
        # The reader left (`tinyk plan | head`): stop quietly, as other command-line tools do. Windows
        # says EINVAL where POSIX says EPIPE.
        if isinstance(e, BrokenPipeError) or WINDOWS and e.errno == errno.EINVAL and e.filename is None:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(signal_status("SIGPIPE"))
        if e.filename is None and e.errno in (errno.ENOSPC, errno.EDQUOT):
            # The files a command writes are complete or absent, and may be complete; each names itself when
            # it fails, so an unnamed one is most often stdout's (to a full disk, or /dev/full).
            where = "what it prints could not be written to its standard output" if _stdout_is_full() else \
                "a write failed"
            _fail(f"tinyk: error: {where}: {e.strerror} (the files it writes are complete or not there)")
        if isinstance(e.filename, str | bytes) and e.filename2 is None and e.strerror:
            # As ls says it, not Python's "[Errno 13] Permission denied: 'x'".
            _fail(f"tinyk: error: cannot access {os.fsdecode(e.filename)}: {e.strerror[:1].lower()}{e.strerror[1:]}")
        _fail(f"tinyk: error: {e}")
    except RuntimeError as e:
        if isinstance(e.__cause__, KeyboardInterrupt):  # a stop inside a class's set-up, which Python 3.11 wraps
            _stopped(e.__cause__)
        if not (memory := out_of_memory(e)):
            raise
        _fail(f"tinyk: error: out of {memory}: a smaller model, batch or sequence length fits")
    except MemoryError as e:  # Python's or numpy's own, not PyTorch's: anywhere, not only in a model
        _fail(f"tinyk: error: out of memory{f' ({first_line(e)})' if str(e) else ''}")
    sys.exit(code or 0)
