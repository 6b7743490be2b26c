"""What the benchmark scripts share: one-line refusals, a clean stop on SIGTERM, turns taken by
interleaved trials, the decode rate, and the data benchmarks' `tinyk data pretrain` runs and tokenizer.

At import it needs only the standard library and tinyk's pure-Python errors and units, so that
gpu_bench.py and gpu_profile.py can use it on a GPU machine that has torch and tinyk's few
dependencies, with tinyk run from its source.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TypeVar

from tinyk.errors import TinykError
from tinyk.units import plural

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


class Parser(argparse.ArgumentParser):
    """argparse whose refusal of a flag is one line, as tinyk's own: the usage is left to --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_main(main: Callable[[], int | None]) -> NoReturn:
    """Runs a script's `main` and exits with its code. SIGTERM (`kill`, a batch system's time limit) stops
    it as Ctrl-C does, so that its `finally` blocks remove what it wrote; a setting tinyk refuses
    (TinykError) and an interruption end it in one line."""
    name = Path(sys.argv[0]).name
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        code = main()
    except TinykError as e:
        sys.exit(f"{name}: {e}")
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)


def rotated(items: Sequence[T], turn: int) -> list[T]:
    """`items` starting at the `turn`-th, so that interleaved trials take turns going first and what the
    first place costs (a cold cache, the machine's other work) falls on each alike."""
    k = turn % len(items)
    return [*items[k:], *items[:k]]


def decode_rate(tokens: int, first: float, full: float, more: str) -> float:
    """Tokens/s of decoding alone: the `tokens` generated after the first took `full - first` seconds.

    On a busy machine noise can make that difference zero or less, which is no rate (it read as a
    billion tokens/s): refused, `more` naming the flags that make the difference measurable."""
    if full <= first:
        raise TinykError(f"generating {plural(tokens, 'more tokens')} timed {full - first:+.4f} s, which is timing "
                         f"noise, not a rate: raise {more}")
    return tokens / (full - first)


def data_pretrain(corpus: Path, tok_dir: Path, out: Path, workers: int, *, force: bool = False,
                  stop_after: float | None = None,
                  watch: Callable[[int], object] | None = None) -> tuple[float, int, str, str]:
    """One `tinyk data pretrain` in a subprocess: its wall seconds, exit code, stdout and stderr.

    `stop_after`: SIGTERM after that many seconds, as `kill` or a batch system stops it (a program a
    shell started in the background ignores SIGINT); the run may then also end 143 (stopped) or -15
    (stopped before it could handle the signal). Any other failure is a TinykError with the last line
    of its stderr. `watch` gets the process id once it has started. Interrupted, the run is stopped
    too, so that it writes nothing more where the caller cleans up.
    """
    cmd = [sys.executable, "-m", "tinyk", "data", "pretrain", "--input", str(corpus), "--tokenizer", str(tok_dir),
           "--out", str(out), "--workers", str(workers), *(["--force"] if force else [])]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if watch is not None:
            watch(proc.pid)
        try:
            stdout, stderr = proc.communicate(timeout=stop_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            stdout, stderr = proc.communicate()
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    seconds = time.perf_counter() - t0
    stopped = (128 + signal.SIGTERM, -signal.SIGTERM) if stop_after is not None else ()
    if proc.returncode not in (0, *stopped):
        last = stderr.strip().splitlines()[-1:] or ["(nothing on stderr)"]
        raise TinykError(f"tinyk data pretrain failed (exit {proc.returncode}): {last[0]}")
    return seconds, proc.returncode, stdout, stderr


def bench_tokenizer(corpus: Path, tok_dir: Path) -> None:
    """The data benchmarks' 6144-token tokenizer in `tok_dir`, trained on the corpus's first 20 MB
    (the same text at every corpus size: generation is seeded) unless one is there already."""
    if not (tok_dir / "tokenizer.json").exists():
        from tinyk.tokenizer import train_tokenizer

        train_tokenizer([corpus], tok_dir, vocab_size=6144, max_bytes=20_000_000, show_progress=False)
