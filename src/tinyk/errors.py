"""What tinyk says when something goes wrong.

The CLI prints a `TinykError` as one line and exits non-zero. The helpers here turn what
libraries raise (a full disk, an exhausted allocator, a symlink loop) into such a line, and tell
how much memory is left, so that a step too large for it is refused before it starts. Text from
elsewhere (a model's output, a request line) reaches the terminal through `escape_controls`.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import fnmatch
import itertools
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TextIO

from .units import bytes_text, plural

# Why --device mps (or device: mps) is refused, in the words the CLI and the config checks both use.
MPS_REFUSED = ("mps is not supported: tinyk's training has not been checked on Apple GPUs (--device cpu trains on "
               "the Mac's CPU)")


class TinykError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits non-zero."""


class DamagedInput(TinykError):
    """An input file is damaged or cut short (a failed CRC, a truncated download): a rerun of the same
    command meets it again at the same place, so work kept to continue would only fail again."""


class PeerLost(TinykError):
    """This process of a distributed job stopped because another one did, whose error is the root cause."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a job scheduler) stops a command as Ctrl-C does, through the same
    clean-up: partial outputs are removed (`tinyk data` keeps its work to continue), a training run saves
    a checkpoint."""


class Stopped(KeyboardInterrupt):
    """A command stopped, after cleaning up, by the signal a run it started caught (SIGHUP when the
    terminal went away, SIGPIPE when the reader left): it exits 128 + that signal's number, as the
    shell reports a kill by it. `why` is what the stop came too late to undo."""

    def __init__(self, signal_name: str, why: str = ""):
        super().__init__(why)
        self.signal_name = signal_name


_POSIX_NUMBERS = {"SIGHUP": 1, "SIGINT": 2, "SIGPIPE": 13, "SIGTERM": 15}
# What stops a command: Ctrl-C, SIGTERM (kill, a scheduler), SIGHUP (the terminal went away) and Windows'
# Ctrl-Break, where the system has them (Windows has no SIGHUP, only Windows has SIGBREAK).
STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None),
                                 getattr(signal, "SIGBREAK", None)) if s is not None)


def signal_status(name: str) -> int:
    """128 + the signal's number, as the shell reports a kill by it; POSIX's number where the system
    has no such signal (Windows has no SIGPIPE or SIGHUP)."""
    number = getattr(signal, name, None)
    return 128 + (int(number) if number is not None else _POSIX_NUMBERS[name])


def stop_signal(e: KeyboardInterrupt) -> str:
    """The signal that stopped a command: SIGINT for Ctrl-C, else the one the exception names."""
    return getattr(e, "signal_name", "SIGTERM" if isinstance(e, Terminated) else "SIGINT")


@contextlib.contextmanager
def signal_handlers(handlers: Mapping[int, Callable[[int, object], object]]) -> Iterator[None]:
    """Installs `handlers` for the duration and then puts back what was there. Handlers belong to the
    main thread: elsewhere (a program running tinyk in a thread) nothing changes. A handler installed
    outside Python (`getsignal` says None) is left alone, as it could not be put back."""
    before: dict[int, object] = {}
    try:
        if threading.current_thread() is threading.main_thread():
            for s, handler in handlers.items():
                if signal.getsignal(s) is not None:
                    before[s] = signal.signal(s, handler)
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def signals_held(deliver: bool = True, second_ctrl_c_aborts: bool = False) -> Iterator[None]:
    """Holds Ctrl-C, SIGTERM and SIGHUP (delivered afterwards, unless not `deliver`) through what must
    not be cut short: files moving back, torch's first import. Python handlers rather than a signal
    mask: a mask holds a signal only from the thread that set it."""
    caught: list[int] = []

    def hold(signum: int, _frame: object) -> None:
        if second_ctrl_c_aborts and signum == signal.SIGINT and signum in caught:
            raise KeyboardInterrupt
        caught.append(signum)

    try:
        with signal_handlers(dict.fromkeys(STOP_SIGNALS, hold)):
            yield
    finally:
        for s in dict.fromkeys(caught if deliver else ()):  # each once; one ignored before stays ignored
            signal.raise_signal(s)


def import_torch() -> None:
    """Imports torch with the stop signals held: its first import takes seconds and does not survive a
    signal (a Ctrl-C there was lost, or left numpy half-imported for a traceback later); one that came
    meanwhile stops the command right after. A second Ctrl-C ends an import that hangs (a broken driver)."""
    with signals_held(second_ctrl_c_aborts=True):
        import torch  # noqa: F401


class StoppedBeforeTraining(Stopped):
    """A signal stopped a new training run before its first step: there is nothing to save, so the
    run directory is left as the run found it (the run --force was to replace kept)."""


def not_found(path: Path, what: str) -> TinykError:
    """Why `path` (of `what`, e.g. "input file") cannot be used: missing, a symlink loop (which `exists()`
    reports alike), or there but no file (a pipe, `<(command)`, a device)."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return TinykError(f"{what} is a symlink loop (its links lead back to themselves): {path}")
        return TinykError(f"{what} not found: {path}{typo_hint(path)}")
    return TinykError(f"{what} is a pipe or a device, not a file: {path}")


def typo_hint(path: str | Path) -> str:
    """" (did you mean run/final?)" for a missing path whose folder holds one of a name close to its own
    (run/fnal, data/pretian); else "". Hidden names are offered only for a hidden one, and a folder's
    first thousand entries are all that is read (a typo beside /usr/bin costs nothing)."""
    path = Path(path)
    if not path.name or path.name in (".", ".."):
        return ""
    try:
        with os.scandir(path.parent) as entries:
            names = [e.name for e in itertools.islice(entries, 1000)]
    except OSError:
        return ""
    names = [n for n in names if not n.startswith(".") or path.name.startswith(".")]
    if matching := fnmatch.filter(names, path.name) if any(c in path.name for c in "*?[") else []:
        # 'data/*.jsonl' quoted, or a Windows shell, which passes patterns on as they are
        return (f" (a wildcard, which tinyk does not expand: it matches {plural(len(matching), 'names')} there; "
                f"give the names, or leave it unquoted in a shell that expands it)")
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.8)
    return f" (did you mean {shown(path.parent / close[0])}?)" if close else ""


def shown(path: str | Path) -> str:
    """A path as text that can always be printed and written to JSON: bytes of a file name that are not
    UTF-8 (a GBK name from a Windows zip) become U+FFFD."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def escape_controls(text: str, keep: str = "") -> str:
    """`text` with its control characters written out (ESC as \\x1b): a terminal acts on them, and a
    model's output or a request line can hold any (clear the screen, switch the character set). Those
    in `keep` (newline, tab) stay as they are."""
    return _CONTROL.sub(lambda m: m[0] if m[0] in keep else f"\\x{ord(m[0]):02x}", text)


def say_on_stderr(line: str) -> None:
    """A last line on stderr, which may be a pipe a Ctrl-C or `| head` closed (`... 2>&1 | tee log` stops
    tee too): then the line is lost instead of raising, so the clean-up after it and the exit status
    (the signal's) stay as they are."""
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr)


def is_terminal(stream: object) -> bool:
    """`stream.isatty()`, False for a stream without one (a host program's stdout replacement)."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def for_terminal(text: str, stream: TextIO) -> str:
    """A model's text as `stream` shows it: control characters other than line breaks and tabs escaped
    on a terminal, untouched in a file or pipe (which get exactly what the model wrote)."""
    return escape_controls(text, "\n\r\t") if is_terminal(stream) else text


def one_line(e: BaseException) -> str:
    """An error's whole message on one line, to quote inside one of ours."""
    return " ".join(str(e).split()) or type(e).__name__


def first_line(e: BaseException) -> str:
    """An error's own first line: what follows is often a page of frames (torch, trackers)."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def memory_available() -> int | None:
    """Bytes this machine (or its container's memory limit, if lower) can still give, if known: Linux's
    MemAvailable, macOS's free and inactive pages (`vm_stat`), Windows' available memory."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    if (left := cgroup_memory_left()) is not None:
        found.append(left)
    if not found and (other := _macos_available() if sys.platform == "darwin" else
                      _windows_available() if sys.platform == "win32" else None) is not None:
        found.append(other)
    return max(0, min(found)) if found else None


def _macos_available() -> int | None:
    import subprocess

    try:
        return vm_stat_available(subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=10,
                                                check=True).stdout)
    except (OSError, subprocess.SubprocessError):
        return None


def vm_stat_available(text: str) -> int | None:
    """What macOS can give without swapping, from `vm_stat`'s output: its free and inactive pages,
    as psutil counts it (purgeable pages are among the active and inactive ones)."""
    size = re.search(r"page size of (\d+) bytes", text)
    pages = dict(re.findall(r"^Pages (free|inactive):\s+(\d+)\.", text, re.MULTILINE))
    if size is None or "free" not in pages:
        return None
    return int(size[1]) * sum(int(n) for n in pages.values())


def _windows_available() -> int | None:
    import ctypes

    class MemoryStatus(ctypes.Structure):  # MEMORYSTATUSEX
        _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong),
                    *((name, ctypes.c_ulonglong) for name in ("total_phys", "avail_phys", "total_page_file",
                                                             "avail_page_file", "total_virtual", "avail_virtual",
                                                             "avail_extended_virtual"))]

    status = MemoryStatus()
    status.length = ctypes.sizeof(status)
    try:
        ok = ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status))
    except (AttributeError, OSError):
        return None
    return int(status.avail_phys) if ok else None


_CGROUP_FILES = {2: ("memory.max", "memory.current", "inactive_file"),
                 1: ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}


def cgroup_memory_left(root: Path = Path("/sys/fs/cgroup"), own: Path = Path("/proc/self/cgroup")) -> int | None:
    """What the memory limits of this process's cgroup and of the groups above it leave (cgroup v2, or
    v1's memory controller, which older Docker and many clusters still use), or None with no limit.
    /proc/meminfo shows the whole machine's memory, not a container's."""
    try:
        groups = [line.split(":", 2) for line in own.read_text().splitlines()]
    except OSError:
        return None
    v1 = [path for _, controllers, path in groups if "memory" in controllers.split(",")]
    version, base = (1, root / "memory") if v1 else (2, root)
    path = v1[0] if v1 else next((path for _, controllers, path in groups if not controllers), "/")
    limit_file, usage_file, cache_key = _CGROUP_FILES[version]
    left = []
    d = base / path.strip("/")
    while True:  # up to the mount's root: a container may see its own group there, its path not existing
        try:
            limit = (d / limit_file).read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:  # v1 writes "no limit" as a huge number
                # The page cache counts as used but is given back on demand (docker and the kubelet
                # subtract it too); a container that has just read its corpus would otherwise look full.
                stat = dict(line.split() for line in (d / "memory.stat").read_text().splitlines())
                left.append(int(limit) - int((d / usage_file).read_text()) + int(stat.get(cache_key, 0)))
        except (OSError, ValueError):
            pass
        if d == base or base not in d.parents:
            break
        d = d.parent
    return min(left) if left else None


def out_of_memory(e: BaseException) -> str | None:
    """What PyTorch ran out of ('GPU memory', 'CPU memory (asked for 32.0 GB)'), or None when `e` is another
    error: a user's model or batch too large for the machine, said in one line, not a traceback."""
    if type(e).__name__ == "OutOfMemoryError":
        return "GPU memory"
    if isinstance(e, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(e):
        asked = re.search(r"allocate (\d+) bytes", str(e))
        return "CPU memory" + (f" (asked for {bytes_text(int(asked[1]))})" if asked else "")
    return None


def write_error(path: Path, e: BaseException) -> TinykError:
    """A failed write as one line with the free space beside it: a full disk often says only
    "iostream error" (torch) or "N requested and M written" (numpy). Not where permission was refused
    or the file system is read-only: there the folder is what to fix, not the disk."""
    if isinstance(e, PermissionError) or getattr(e, "errno", None) == errno.EROFS:
        refused = Path(os.fsdecode(e.filename)) if getattr(e, "filename", None) else path
        why = "permission denied" if isinstance(e, PermissionError) else "the file system is read-only"
        return TinykError(f"cannot write in {shown(refused.parent)}: {why}")
    if isinstance(e, OSError) and e.errno not in (None, errno.ENOSPC, errno.EDQUOT, errno.EIO) and e.strerror:
        # Not the disk (a folder that is not one, /proc): the reason alone, without the temporary file's name.
        return TinykError(f"cannot write {path}: {e.strerror}")
    try:
        left = shutil.disk_usage(path.parent).free
        free = f"; {left / 1e6:,.0f} MB free on that disk"
        inodes = os.statvfs(path.parent) if hasattr(os, "statvfs") else None
        # room for bytes, none for another file (btrfs and tmpfs count no inodes: f_files 0)
        if left and getattr(e, "errno", None) == errno.ENOSPC and inodes and inodes.f_files and not inodes.f_favail:
            free = f"; that disk has no free inodes (too many files), though {left / 1e6:,.0f} MB are free"
    except OSError:
        free = ""
    why = first_line(e)
    if not isinstance(e, OSError) and any(m in why for m in _TORCH_WRITER):  # "unexpected pos 292928 vs 292820"
        why = f"the write stopped part-way, as it does on a full disk (torch: {why.split('] ')[-1].strip(' .')})"
    return TinykError(f"cannot write {path}: {why}{free}")


# What torch's checkpoint writer and the Rust writers of safetensors and tokenizers ("No space left on
# device (os error 28)") say when a write fails; other RuntimeErrors (CUDA out of memory) are not ours.
_TORCH_WRITER = ("iostream", "inline_container", "PytorchStreamWriter")
_WRITE_FAILURES = (*_TORCH_WRITER, "(os error ")


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """A failed write of `path` as one line (see `write_error`) instead of a traceback."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as e:
        raise write_error(path, e) from e
    except Exception as e:
        if isinstance(e, TinykError) or not any(m in str(e) for m in _WRITE_FAILURES):
            raise
        raise write_error(path, e) from e
