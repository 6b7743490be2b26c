"""`python -m tinyk` (what torchrun runs) and the `tinyk` command."""

import gc
import signal
import sys


def run() -> None:
    """Imports the CLI where a Ctrl-C is one line, not a traceback (a stage's module, torch included, is
    imported only once the command is known; under load even the 50 ms before that can take a Ctrl-C)."""
    try:
        from tinyk.cli import main
    except KeyboardInterrupt:
        print("tinyk: interrupted", file=sys.stderr)
        sys.exit(130)
    try:
        main()
    finally:
        _ignore_stops()
        # The command is done: the interpreter's last collection would walk torch's objects for nothing
        # (0.3 s of each command that imported it). Files are closed by then; none waits on a collection.
        gc.freeze()


def _ignore_stops() -> None:
    """The command is done and its exit status set: Ctrl-C, SIGTERM and SIGHUP are ignored through the
    second the interpreter then takes to exit (torch's teardown), so that none ends the process as if it
    had stopped the command (a script that reruns on a non-zero status would train a finished run again).
    Ignored, not handled: Python's own exit puts the default of every handled signal back. Ctrl-\\ still
    quits an exit that hangs."""
    for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if s is not None and signal.getsignal(s) is not None:  # None: a handler from outside Python, left alone
            signal.signal(s, signal.SIG_IGN)


if __name__ == "__main__":
    run()
