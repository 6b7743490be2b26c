"""Reading user corpora safely and writing outputs atomically.

Every stage of tinyk reads the same kinds of input (JSONL, TXT, Parquet, compressed
JSONL) and writes directories that must be complete or absent, so both live here.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import json
import math
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO


class TinykError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits non-zero."""


class PeerLost(TinykError):
    """This process of a distributed job stopped because another one did, whose error is the root cause."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a job scheduler) stops a command as Ctrl-C does, through the same
    clean-up: partial outputs are removed (`tinyk data` keeps its work to continue), a training run saves
    a checkpoint."""


class StoppedBeforeTraining(KeyboardInterrupt):
    """A signal stopped a new training run before its first step: there is nothing to save, so the
    run directory is left as the run found it (the run --force was to replace kept)."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024
NUL_HINT = "a NUL byte is binary data, not text"  # a text line holding one is skipped with this reason
MAX_BATCH = 65536  # sequences per step: far more than fits anywhere, far less than exhausts memory
# Tokens per pretraining shard, at least: fewer is a file every few documents (or `--shard-tokens 100` meant
# as 100M), and training holds every shard open at once.
MIN_SHARD_TOKENS = 1000
SUPPORTED_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst", ".txt.gz",
                      ".txt.zst")


MAX_SIZE = 10**18  # beyond this, counts overflow the 64-bit integers of the libraries underneath
_UNITS = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def size_text(n: int) -> str:
    """A count as a person writes it: 1G, 500M, 1e18."""
    for unit, scale in (("T", 10**12), ("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= scale and n % scale == 0 and n // scale < 1000:
            return f"{n // scale}{unit}"
    return f"{n:.0e}".replace("e+", "e") if n >= 10**15 else str(n)


def bytes_text(n: float) -> str:
    """An amount of bytes or memory to read at a glance: 512 bytes, 14.2 kB, 3.5 MB, 180 MB, 1.5 GB."""
    if n < 1e6:
        return plural(int(n), "bytes") if n < 1e3 else f"{n / 1e3:.1f} kB"
    return f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / 1e6:,.0f} MB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def parse_size(s: str, lo: int = 0, hi: int = MAX_SIZE, *, tokens: bool = False) -> int:
    """'500M', '2G', '1e9' or a plain number as an integer in lo..hi; ValueError says what is allowed.

    A trailing B is bytes (500MB = 500M) unless `tokens`: a token count's B is billion ("10B tokens",
    as `tinyk plan` prints them), so a flag and a config key read 10B alike."""
    t = s.strip().lower()
    if tokens and t.endswith("b") and t[:-1] and t[-2] not in _UNITS:
        t, scale = t[:-1], 10**9
    else:
        t, scale = t.rstrip("b"), 1
    if t and t[-1] in _UNITS:
        t, scale = t[:-1], _UNITS[t[-1]]
    try:
        value = float(t) * scale
    except ValueError:
        raise ValueError(f"not a size: {s!r} (e.g. 500M, 2G)") from None
    if not (math.isfinite(value) and lo <= int(value) <= hi):
        raise ValueError(f"must be a size from {size_text(lo)} to {size_text(hi)} (e.g. 500M, 2G), got {s!r}")
    return int(value)


@dataclass
class Skips:
    """Counts skipped input records by reason and remembers where the first few were."""

    strict: bool = False
    keep_first: int = 5
    counts: Counter = field(default_factory=Counter)
    first: dict[str, list[str]] = field(default_factory=dict)
    hints: dict[str, str] = field(default_factory=dict)  # what the first skip of a reason says about the fix
    stopped_at: int | None = None  # input bytes read (lines too long to read not counted) when max_bytes ended it

    def add(self, reason: str, where: str, hint: str | None = None) -> None:
        if self.strict:
            raise TinykError(f"{where}: {reason.replace('_', ' ')}{f' ({hint})' if hint else ''} (--strict)")
        if hint:
            self.hints.setdefault(reason, hint)
        self.counts[reason] += 1
        places = self.first.setdefault(reason, [])
        if len(places) < self.keep_first:
            places.append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "skipped 0 records"
        hints = {"invalid_utf8": "convert such files first, e.g. iconv -f gbk -t utf-8", **self.hints}
        parts = [f"{reason.replace('_', ' ')}: {n} (first at {', '.join(self.first[reason])}"
                 f"{'; ' + hints[reason] if reason in hints else ''})" for reason, n in sorted(self.counts.items())]
        return f"skipped {plural(self.total, 'records')}; " + "; ".join(parts)

    def merge(self, other: Skips) -> None:
        """Adds what `other` counted as if each of its skips were added here (so --strict raises)."""
        for reason, n in other.counts.items():
            places = other.first.get(reason, [])
            for where in places:
                self.add(reason, where, other.hints.get(reason))
            self.counts[reason] += n - len(places)

    def to_json(self) -> dict[str, Any]:
        # Sorted: with several workers, reading and tokenizing report skips in a different interleaving.
        return {"total": self.total, "by_reason": dict(sorted(self.counts.items())),
                "first": dict(sorted(self.first.items())), "hints": dict(sorted(self.hints.items()))}

    @classmethod
    def from_json(cls, saved: dict[str, Any], strict: bool = False) -> Skips:
        """What `to_json` wrote, to report or to count on from."""
        return cls(strict=strict, counts=Counter(saved.get("by_reason", {})), first=saved.get("first", {}),
                   hints=saved.get("hints", {}))


def check_inputs(paths: list[str | Path]) -> list[Path]:
    """Fail early, with one line, on inputs that are missing, unreadable, empty or of an unknown type."""
    if not paths:
        raise TinykError("no input files given")
    out = []
    for p in map(Path, paths):
        if not p.exists():
            raise not_found(p, "input file")
        refuse_pipe(p, "input")
        if not p.is_file():
            raise TinykError(f"input is not a file: {p}")
        if not os.access(p, os.R_OK):
            raise TinykError(f"input file is not readable: {p}")
        if not p.name.endswith(SUPPORTED_SUFFIXES):
            raise TinykError(f"unsupported input type: {p} (use {', '.join(SUPPORTED_SUFFIXES)})")
        if p.name.endswith(".parquet"):  # a missing reader is said now, not after the files before it
            _parquet()
        elif _codec(p) == "zstd":
            _zstandard()
        out.append(p)
    refuse_repeats(out, "input")  # its documents would count twice, and land in both splits
    # One empty file among others is fine (a Spark export's empty part files); all of them, a mistake.
    if all(p.stat().st_size == 0 for p in out):
        raise TinykError(f"input file is empty: {out[0]}" if len(out) == 1 else
                         f"all {len(out)} input files are empty, e.g. {out[0]}")
    return out


def not_found(path: Path, what: str) -> TinykError:
    """Why `path` (of `what`, e.g. "input file") cannot be found: missing, or a symlink loop, which
    `exists()` reports alike."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return TinykError(f"{what} is a symlink loop (its links lead back to themselves): {path}")
    return TinykError(f"{what} not found: {path}")


def refuse_pipe(path: Path, what: str) -> None:
    """Refuses a named pipe or `<(command)`: inputs are sized first and read more than once."""
    if path.is_fifo():
        raise TinykError(f"{what} is a pipe, not a file: {path} (save what it gives to a file first)")


def refuse_repeats(paths: list[Path], what: str) -> None:
    """Refuses a file or directory given twice, also under another name (a link, ./x); `paths` exist."""
    seen: dict[tuple[int, int] | Path, Path] = {}
    for p in paths:
        st = p.stat()
        # Some filesystems (FAT, some FUSE mounts) report inode 0 for every file: there the real path decides.
        twice = seen.setdefault((st.st_dev, st.st_ino) if st.st_ino else p.resolve(), p)
        if twice is not p:
            raise TinykError(f"{what} {p} is given twice (also as {twice}); give each "
                             f"{'directory' if p.is_dir() else 'file'} once")


def sha256_file(path: Path) -> str:
    """The file's SHA-256, read in 1 MiB blocks (1.5 GB/s on one core of a 2-core AMD EPYC)."""
    h, buf = hashlib.sha256(), bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def plain_name(name: Any) -> bool:
    """Whether `name` (read from a file tinyk wrote, which may have been edited) names a file in a
    folder, not a path that leads elsewhere."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def is_plain_text(path: Path) -> bool:
    """A `.txt` input (one document per line), also compressed; decided by the suffix, so
    `corpus.txt.jsonl` is JSON."""
    return path.name.endswith((".txt", ".txt.gz", ".txt.zst"))


def shown(path: str | Path) -> str:
    """A path as text that can always be printed and written to JSON: bytes of a file name that are not
    UTF-8 (a GBK name from a Windows zip) become U+FFFD."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def plural(n: int, noun: str) -> str:
    """'1,234 documents', and '1 document' (`noun` is a plural ending in s)."""
    return f"{n:,} {noun[:-1] if n == 1 else noun}"


def _labels(paths: list[Path]) -> dict[Path, str]:
    """How skip reports name each input: its file name, or the path as given where names repeat
    (shards called part-0.jsonl in several folders)."""
    names = Counter(p.name for p in paths)
    return {p: shown(p.name if names[p.name] == 1 else p) for p in paths}


def put_back_interrupted(path: str | Path) -> None:
    """A missing output that a killed --force replace had moved aside (the new one not yet in place)
    goes back where it was, so a command reading it finds it rather than saying "not found". Only
    what a process of this machine that no longer runs left (see `remove_stale_temps`)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        remove_stale_temps(path)


def marker_file(directory: str | Path, name: str, what: str) -> Path:
    """`directory/name`, the file that makes `directory` a `what` directory, or one line on what is wrong."""
    d = Path(directory)
    put_back_interrupted(d)
    if d.exists() and not d.is_dir():
        raise TinykError(f"{what} directory {d} is a file, not a directory")
    if not d.is_dir():
        raise not_found(d, f"{what} directory")
    if not (d / name).is_file():
        # A run directory (its final/ model holds the tokenizer), a checkpoint, or a data split's folder.
        near = next((p for p in (d / "final", d / "model", d.parent) if (p / name).is_file()), None)
        raise TinykError(f"not a {what} directory (no {name}): {d}" + (f"; {near} is one" if near else ""))
    return d / name


_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_UTF32_BOMS = (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")
_MAGIC = {".gz": b"\x1f\x8b", ".zst": b"\x28\xb5\x2f\xfd"}  # how compressed files begin
_CODECS = {".gz": "gzip", ".zst": "zstd"}
_ZSTD_CHUNK = 4096  # compressed bytes per step; bounds what one step can expand to


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def first_line(e: BaseException) -> str:
    """An error's own first line: what follows is often a page of frames (torch, trackers)."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def memory_available() -> int | None:
    """Bytes this machine (or its container's memory limit, if lower) can still give, if known."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    if (left := cgroup_memory_left()) is not None:
        found.append(left)
    return max(0, min(found)) if found else None


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
        return "CPU memory" + (f" (asked for {int(asked[1]) / 1e9:,.1f} GB)" if asked else "")
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
        free = f"; {shutil.disk_usage(path.parent).free / 1e6:,.0f} MB free on that disk"
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


def remove_path(p: Path, ignore_errors: bool = False) -> None:
    """A file, link or directory tree; a link is removed, never followed."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=ignore_errors)
    else:
        p.unlink(missing_ok=ignore_errors)


def _codec(path: Path) -> str | None:
    return next((codec for ext, codec in _CODECS.items() if path.name.endswith(ext)), None)


def is_compressed(path: str | Path) -> bool:
    """Whether a file's size says nothing of how much text it holds (gzip, zstd, Parquet)."""
    return _codec(Path(path)) is not None or str(path).endswith(".parquet")


def _zstandard() -> Any:
    try:
        import zstandard
    except ImportError as e:
        raise TinykError("reading .zst files needs the 'zstandard' package (pip install zstandard)") from e
    return zstandard


class _ZstdTruncated(EOFError):
    pass


class _ZstdReader(io.RawIOBase):
    """Decompresses a .zst file frame after frame and, unlike zstandard's stream_reader, reports a
    file that ends inside a frame (an interrupted download) instead of ending quietly."""

    def __init__(self, path: Path):
        self._dctx = _zstandard().ZstdDecompressor()
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._frame: Any = None
        self._buf, self._pos, self._eof = b"", 0, False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while self._pos >= len(self._buf):
            if self._eof:
                return 0
            self._fill()
        n = min(len(b), len(self._buf) - self._pos)
        b[:n] = memoryview(self._buf)[self._pos:self._pos + n]
        self._pos += n
        return n

    def _fill(self) -> None:
        data = self._f.read(_ZSTD_CHUNK)
        if not data:
            if self._frame is not None:
                raise _ZstdTruncated("file ends inside a zstd frame")
            self._eof = True
            return
        out = []
        while data:
            if self._frame is None:
                self._frame = self._dctx.decompressobj()
            out.append(self._frame.decompress(data))
            if self._frame.eof:
                data, self._frame = self._frame.unused_data, None
            else:
                data = b""
        self._buf, self._pos = b"".join(out), 0

    def close(self) -> None:
        f = getattr(self, "_f", None)  # absent when open() failed in __init__
        if f is not None:
            f.close()
        super().close()


def _open_binary(path: Path) -> BinaryIO:
    codec = _codec(path)
    if codec == "gzip":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if codec == "zstd":
        return io.BufferedReader(_ZstdReader(path))  # type: ignore[return-value]
    return open(path, "rb")


def _read_errors(path: Path) -> tuple[type[BaseException], ...]:
    """What reading `path` raises when the file (not the program) is at fault."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
    if _codec(path) == "zstd":
        errors += (_zstandard().ZstdError,)
    return errors


def _read_error(path: Path, e: BaseException, lines: int) -> TinykError:
    """One line naming the file (and how far reading got) for an error raised while reading it."""
    after = f" after line {lines}" if lines else ""
    codec = _codec(path)
    io_error = isinstance(e, OSError) and e.errno is not None  # not BadGzipFile, which has none
    if codec and not io_error:
        return TinykError(f"{path}: damaged or truncated {codec} data{after} ({_one_line(e)})")
    detail = e.strerror if isinstance(e, OSError) and e.strerror else _one_line(e)
    return TinykError(f"{path}: read error{after} ({detail})")


class _Counting:
    """Wraps a binary stream to count the (uncompressed) bytes and lines consumed; turns read errors
    (a damaged or truncated compressed file, an I/O error) into one line naming the file."""

    def __init__(self, f: BinaryIO, path: Path, errors: tuple[type[BaseException], ...]):
        self.f, self.n, self.path, self.lines, self.errors = f, 0, path, 0, errors

    def readline(self, limit: int) -> bytes:
        try:
            line = self.f.readline(limit)
        except self.errors as e:
            raise _read_error(self.path, e, self.lines) from e
        self.n += len(line)
        return line


def iter_lines(path: Path, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | None, int]]:
    """Yields (line number, line bytes or None if over the limit, bytes read so far).

    A line longer than `max_line_bytes` is consumed in bounded chunks and never held whole.
    A UTF-8 byte order mark at the start of the file is dropped; any read error is one TinykError.
    """
    errors = _read_errors(path)
    try:
        raw = _open_binary(path)
    except errors as e:
        raise _read_error(path, e, 0) from e
    with raw:
        f = _Counting(raw, path, errors)
        lineno = 0
        while True:
            line = f.readline(max_line_bytes + 1)
            if not line:
                return
            lineno += 1
            if lineno == 1:
                wide = next((bits for bits, boms in ((32, _UTF32_BOMS), (16, _UTF16_BOMS)) if line.startswith(boms)),
                            None)
                if wide:
                    raise TinykError(f"{path}: UTF-{wide} text; tinyk reads UTF-8 (convert it, e.g. with iconv)")
                packed = next((ext for ext, magic in _MAGIC.items() if line.startswith(magic)), None)
                if packed and not _codec(path):
                    raise TinykError(f"{path}: {_CODECS[packed]}-compressed data in a file not named {packed}; "
                                     f"rename it to {path.name}{packed} and tinyk reads it as it is")
            if line.startswith(_BOM):  # the file's, or one glued on by `cat a.jsonl b.jsonl`
                line = line[len(_BOM):]
            # In the first 4 KB, not the first line: UTF-16LE's 上 (0A 4E) or newline (0A 00) ends lines early.
            if f.n - len(line) < 4096 and b"\x00" in line:
                raise TinykError(f"{path}: NUL bytes in its first 4 KB: UTF-16 or UTF-32 text without a byte order "
                                 f"mark, or not text at all; tinyk reads UTF-8 (convert it, e.g. iconv -f utf-16le "
                                 f"-t utf-8, or utf-16be)")
            if len(line) > max_line_bytes and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):
                    line = f.readline(1 << 20)
                f.lines = lineno
                yield lineno, None, f.n
                continue
            f.lines = lineno
            yield lineno, line, f.n


def iter_records(paths: list[Path], skips: Skips, *, max_bytes: int | None = None,
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, text_field: str = "text",
                 message_lists: bool = False) -> Iterator[tuple[str, Any]]:
    """Yields (where, record) from every input in order, skipping and counting bad lines.

    JSON inputs yield the parsed object; `.txt` lines yield {text_field: line}; Parquet rows
    yield a dict. Stops once `max_bytes` of input have been consumed. `message_lists`: a line may
    be a bare list of chat messages (the seed's SFT format), so such a first line is not taken
    for the start of a JSON array.
    """
    consumed = 0
    labels = _labels(paths)
    for path in paths:
        label = labels[path]
        if path.name.endswith(".parquet"):
            for where, rec, n in _iter_parquet(path, label):
                if max_bytes is not None and consumed + n > max_bytes:
                    skips.stopped_at = consumed
                    return
                consumed += n
                yield where, rec
            continue
        is_txt = is_plain_text(path)
        base, end = consumed, 0
        for lineno, line, read in iter_lines(path, max_line_bytes):
            if line is None:  # too long to read: skipped below, and no part of the max_bytes budget
                base -= read - end
            end = read
            if max_bytes is not None and base + read > max_bytes:
                skips.stopped_at = consumed
                return
            consumed = base + read
            where = f"{label}:{lineno}"
            head = _json_array_head(path, line, message_lists) if lineno == 1 and not is_txt else None
            if head is not None:
                raise TinykError(f"{path}: one JSON array, not JSON Lines (one record per line); convert it "
                                 f"first, e.g. {_jq_hint(path, text_field if _STRINGS.match(head) else None)}")
            if lineno == 1 and not is_txt and line is not None and line.strip() == b"{":
                raise TinykError(f"{path}: one JSON object written over many lines, not JSON Lines (one record "
                                 f"per line); write its records one per line first, e.g. for a list of them "
                                 f"under KEY: jq -c '.KEY[]' FILE > records.jsonl")
            if line is None:
                skips.add("line_too_long", where)
                continue
            try:
                s = line.decode("utf-8")
            except UnicodeDecodeError as e:
                if e.reason == "unexpected end of data" and not line.endswith(b"\n"):  # no GBK: a cut file
                    skips.add("cut_character", where, "the file ends inside a character: it was cut short "
                                                      "(e.g. by head -c)")
                elif _decodes_with_surrogates(line):  # no GBK either: the bytes of a UTF-16 surrogate
                    skips.add("encoded_surrogate", where, "a \\ud800-\\udfff surrogate written as UTF-8 bytes "
                                                          "(CESU-8, Java's modified UTF-8) is no UTF-8 text; fix "
                                                          "the program that wrote it")
                else:
                    skips.add("invalid_utf8", where)
                continue
            s = s.rstrip("\r\n")
            if not s.strip():  # blank lines separate documents and records; they are not ones
                continue
            if is_txt:
                if "\x00" in s:  # past the first 4 KB (refused whole above); in JSON, malformed_json
                    skips.add("nul_byte", where, NUL_HINT)
                    continue
                yield where, {text_field: s}
                continue
            try:
                rec = json.loads(s)
            except (ValueError, RecursionError):  # bad JSON, a 5000-digit number, nesting 1000 deep
                skips.add("malformed_json", where)
                continue
            if _SURROGATE_ESCAPE.search(s) and has_surrogate(rec):
                skips.add("lone_surrogate", where, "a \\ud800-\\udfff escape without its pair is no text; fix the "
                                                   "program that wrote it")
                continue
            yield where, rec


# Where a line may be a list of chat messages ([{"role": ...}, ...], one conversation in the seed's SFT
# format), an array of records is one whose first object starts with a key no message has, or an array
# of such conversations.
_ARRAY = re.compile(rb'\s*\[')
_ARRAY_OF_RECORDS = re.compile(rb'\s*\[\s*(\[|\{\s*(\}|"(?!(?:role|content|from|value)")))')
_STRINGS = re.compile(rb'\s*\[\s*"')  # an array of strings: the jq line makes them records


def _json_array_head(path: Path, first_line: bytes | None, message_lists: bool) -> bytes | None:
    """The first 64 KB of a JSON file that is one array (json.dump of a list, on one line or indented)
    rather than JSON Lines, else None. `first_line` is None when it was too long to hold."""
    if first_line is not None and not first_line.lstrip().startswith(b"["):
        return None
    try:
        with _open_binary(path) as f:
            head = f.read(1 << 16).removeprefix(_BOM)
    except _read_errors(path) as e:  # a truncated .json.gz: the same line as reading it on would give
        raise _read_error(path, e, 0) from e
    indented = first_line is not None and first_line.strip() == b"["
    return head if indented or (_ARRAY_OF_RECORDS if message_lists else _ARRAY).match(head) else None


def _jq_hint(path: Path, field: str | None = None) -> str:
    """The jq line that writes an array's elements one per line (strings become {field: ...} records)."""
    name = shown(path.name)
    base = name.split(".")[0] or "records"
    out = base + ".jsonl" if base + ".jsonl" != name else base + ".lines.jsonl"
    program = shlex.quote(f".[] | {{{json.dumps(field, ensure_ascii=False)}: .}}" if field else ".[]")
    if _codec(path):
        return f"decompress it, then jq -c {program} FILE > {shlex.quote(out)}"
    return f"jq -c {program} {shlex.quote(name)} > {shlex.quote(out)}"


def _decodes_with_surrogates(line: bytes) -> bool:
    """Whether `line` is UTF-8 once encoded surrogates (ED A0 80 to ED BF BF) are allowed."""
    try:
        line.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return False
    return True


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def has_surrogate(obj: Any) -> bool:
    """Whether a parsed JSON value holds a lone surrogate ("\\ud800"); escaped pairs decode to one character.
    A loop, not recursion: a line nested as deep as json.loads allows must not exhaust the stack."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            if _SURROGATE.search(x):
                return True
        elif isinstance(x, dict):
            stack += [*x.keys(), *x.values()]
        elif isinstance(x, list):
            stack += x
    return False


def _parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise TinykError("reading .parquet files needs the 'pyarrow' package (pip install pyarrow)") from e
    return pq


def _iter_parquet(path: Path, label: str) -> Iterator[tuple[str, dict, int]]:
    pq = _parquet()
    try:
        pf = pq.ParquetFile(path)
        batches = pf.iter_batches(batch_size=1024)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise TinykError(f"cannot read parquet file {path}: {_one_line(e)}") from e
    row = 0
    while True:
        try:
            batch = next(batches, None)
            recs = batch.to_pylist() if batch is not None else []
        except Exception as e:  # ArrowInvalid, ArrowIOError, OSError, ... for a damaged row group
            after = f" after row {row}" if row else ""
            raise TinykError(f"{path}: damaged parquet data{after} ({_one_line(e)})") from e
        if batch is None:
            return
        size = max(1, batch.nbytes // max(1, batch.num_rows))
        for rec in recs:
            row += 1
            yield f"{label}:row {row}", rec, size


def record_shape(rec: Any) -> str:
    """What a record holds, for a message about one tinyk cannot use: "fields 'id', 'conversations'"."""
    return f"fields {', '.join(map(repr, list(rec)[:6]))}" if isinstance(rec, dict) and rec else \
        f"a JSON {type(rec).__name__}"


def sft_format(rec: Any) -> str | None:
    """Which SFT format a record is in: "turns" (the seed's bare list of messages), "chat" (BelleGroup/
    ShareGPT `conversations` or OpenAI `messages`), "alpaca" (`instruction` and `output`); None if none.
    Here, not in data.py, so reading text can tell a user that they gave it conversations."""
    if isinstance(rec, list):
        return "turns"
    if not isinstance(rec, dict):
        return None
    if any(isinstance(rec.get(k), list) for k in ("conversations", "messages")):
        return "chat"
    return "alpaca" if "instruction" in rec and "output" in rec else None


def iter_texts(paths: list[Path], skips: Skips, *, field_name: str = "text", **kw: Any) -> Iterator[str]:
    """Yields the text of each document, skipping records without a usable text field."""
    for where, rec in iter_records(paths, skips, text_field=field_name, **kw):
        if not isinstance(rec, dict) or field_name not in rec:
            fix = ("these are SFT conversations, not text: `tinyk data sft` reads them"
                   if sft_format(rec) in ("chat", "alpaca") else "--field names the one with the text")
            skips.add("missing_field", where, f"no field {field_name!r}, the first such record has "
                                              f"{record_shape(rec)}; {fix}")
            continue
        text = rec[field_name]
        if not isinstance(text, str):
            skips.add("not_string", where)
            continue
        if not text.strip():
            skips.add("empty", where)
            continue
        yield text


def read_prompts(typed: list[str], prompt_file: str | None, field_name: str = "prompt",
                 stdin: Iterable[str] | None = None) -> tuple[list[str], str | None]:
    """`tinyk generate`'s prompts: the typed ones, then a file's (one per `.txt` line or per record's
    `field_name`) or stdin's (`-`, one per line); with a note on the lines skipped, if any."""
    prompts, note = list(typed), None
    if prompt_file == "-":  # one prompt per line on stdin, for pipelines
        try:
            lines = [line.rstrip("\r\n").removeprefix("\ufeff")  # a BOM, as in files
                     for line in (sys.stdin if stdin is None else stdin)]
            not_utf8 = any(has_surrogate(line) for line in lines)  # how a C locale's stdin decodes them
        except UnicodeDecodeError:
            not_utf8 = True
        if not_utf8:
            raise TinykError("stdin is not valid UTF-8 (convert it first, e.g. iconv -f gbk -t utf-8)")
        skips = Skips()
        for n, line in enumerate(lines, 1):
            if "\x00" in line:  # as in a .txt prompt file
                skips.add("nul_byte", f"stdin:{n}", NUL_HINT)
            elif line.strip():
                prompts.append(line)
        note = f"stdin: {skips.summary()}" if skips.total else None
        if not prompts:
            raise TinykError(f"no prompts on stdin (--prompt-file - reads one per line{f'; {note}' if note else ''})")
    elif prompt_file:
        if Path(prompt_file).is_fifo():  # `--prompt-file <(command)`
            raise TinykError(f"--prompt-file {prompt_file} is a pipe: pipe the prompts to stdin with "
                             f"--prompt-file - instead")
        skips = Skips()
        found = list(iter_texts(check_inputs([prompt_file]), skips, field_name=field_name))
        if not found and is_plain_text(Path(prompt_file)):
            why = f"no usable lines; {skips.summary()}" if skips.total else "it has no non-empty lines"
            raise TinykError(f"no prompts in {prompt_file} ({why})")
        if not found:
            raise TinykError(f"no prompts in {prompt_file} (records need a string field {field_name!r}, "
                             f"see --field; {skips.summary()})")
        note = f"{prompt_file}: {skips.summary()}" if skips.total else None
        prompts += found
    if not prompts:
        raise TinykError("give --prompt TEXT (repeatable) or --prompt-file FILE")
    return prompts, note


def check_output(out: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuses an output path that is an input, holds one, or lies inside an input directory:
    writing there (or --force replacing it) would destroy or change what the output is made from.
    Also one under a file, which no directory can be made in, and one starting with a `~` the shell
    left as it is (`--out=~/x`), which would make a folder named `~` here."""
    first = Path(out).parts[0] if Path(out).parts else ""
    if first.startswith("~") and not Path(first).exists():
        raise TinykError(f"--out {out}: {first} was not expanded to a home directory (a shell does so only at the "
                         f"start of a word: --out ~/x, not --out=~/x); give the path in full, or ./{out} for a "
                         f"folder named so")
    o = Path(out).resolve()
    for i in inputs:
        if i is None:
            continue
        p = Path(i).resolve()
        if o == p or o in p.parents:
            raise TinykError(f"--out {out} would replace the input {i}; choose another output path")
        if p in o.parents:
            raise TinykError(f"--out {out} lies inside the input {i}; inputs are never written to")
    nearest = next((a for a in Path(out).absolute().parents if a.exists() or a.is_symlink()), None)
    if nearest is not None and not nearest.is_dir():
        raise TinykError(f"--out {out}: {nearest} is a file, not a directory")


def check_output_file(out: str, inputs: Iterable[str | Path | None], *, force: bool,
                      replaces: tuple[str, Callable[[Path], bool]] | None = None) -> None:
    """Refuses an output file that could not be written, or whose writing would destroy something:
    checked before the work, so a mistake costs nothing. With `replaces` (what this kind of output is
    called, and a check that a file is one) --force replaces only such a file."""
    check_output(out, inputs)
    path = Path(out)
    if path.is_dir():
        raise TinykError(f"--out {out} is a directory; give a file name for the JSON results")
    if out.endswith(("/", os.sep)):  # Path() drops the slash: x.json/ would be written as the file x.json
        raise TinykError(f"--out {out} ends in '/', which names a directory; give a file name for the JSON results")
    if (path.exists() or path.is_symlink()) and not force:
        raise TinykError(f"--out {out} exists (use --force to replace it)")
    if (path.exists() or path.is_symlink()) and not path.is_file():  # /dev/null, a pipe, a dangling link
        raise TinykError(f"--out {out} is not a regular file, so it is not replaced; choose another path")
    if path.exists() and replaces is not None and not replaces[1](path):
        raise TinykError(f"--out {out} exists and is not {replaces[0]}, so it is not replaced; remove it yourself "
                         f"or choose another path")
    parent = path.parent
    if not parent.is_dir():
        raise TinykError(f"--out {out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TinykError(f"--out {out}: directory {parent} is not writable")
    try:  # a real write: root passes the access check where nothing can be written (/sys, /proc, read-only)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.tmp-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise write_error(path, e) from e


def without_dotdot(path: Path) -> Path:
    """`path` with a '..' before its name resolved: out/../out names its siblings through itself, a way
    that is gone once it is moved aside to be replaced."""
    return path.parent.resolve() / path.name if ".." in path.parent.parts else path


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False, inputs: Iterable[str | Path | None] = (),
               replaces: tuple[str, Callable[[Path], bool]] | None = None,
               partial: bool = False, durable: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling of `out` to fill; renames it into place only on success.

    An existing `out` is refused unless `force`, and is replaced only once the new one is complete;
    with `replaces` (what this kind of output is called, and a check that a directory is one) only
    an empty directory or such an output is replaced, so a mistyped --out never deletes someone's
    files. `out` may not overlap any of `inputs`. The temporary is named
    `.{name}.tmp-{host}-{pid}-XXXX`, so a later run can remove one left by a killed process (see
    `remove_stale_temps`). With `partial`, the temporary is `partial_sibling(out)` instead, made if
    missing and left in place on failure, for the caller to continue or remove. With `durable`, the
    output is on the disk (`sync_tree`) before it is renamed into place, and the rename once it is:
    what the caller deletes next (older checkpoints) is never the only copy that survives a power cut.
    """
    out = Path(out)
    if out.name in ("", ".", ".."):
        raise TinykError(f"output directory {str(out)!r} must be named (e.g. data/pretrain), not '.' or '..'")
    out = without_dotdot(out)
    check_output(out, inputs)
    remove_stale_temps(out)  # first: an output a killed replace had moved aside is back, and checked below
    _check_replace(out, force, replaces)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if partial:
            tmp = partial_sibling(out)
            tmp.mkdir(exist_ok=True)
        else:
            tmp = Path(tempfile.mkdtemp(prefix=f".{_stem(out.name)}.tmp-{_owner()}-", dir=out.parent))
    except OSError as e:  # said of the output, not of a hidden temporary the user never named
        raise write_error(out, e) from e
    kept: Path | None = None
    try:
        yield tmp
        _share_like_umask(tmp)
        if durable:
            sync_tree(tmp)
        try:  # again: something may have been put there meanwhile (another run, the user)
            _check_replace(out, force, replaces)
        except TinykError as e:
            kept = _unused_name(out.with_name(f"{_stem(out.name)}.new"))  # complete, partial or not
            try:
                os.replace(tmp, kept)
            except OSError:
                kept = tmp
            raise TinykError(f"{e} ({out} appeared or changed while this ran; the new output is kept as {kept})") \
                from None
        if out.exists() or out.is_symlink():
            old = out.with_name(f".{_stem(out.name)}.old-{_owner()}")
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # the earlier output stays where it was
                raise
            try:
                _carry_over(old, out)
            except OSError as e:  # the new output is in place: the rest stays aside, for a later run to move
                print(f"tinyk: warning: {shown(old)} keeps files of the replaced {shown(out)} that could not be "
                      f"moved into the new one ({first_line(e)})", file=sys.stderr)
            else:
                remove_path(old, ignore_errors=True)  # --force on a link replaces the link, not what it points to
        else:
            os.replace(tmp, out)
        if durable:
            sync_folder(out.parent)
    except BaseException:
        if not partial and kept is None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def sync_tree(root: Path) -> None:
    """Puts every file under `root`, and the folder entries naming them, on the disk. Renaming a
    folder into place orders nothing: after a power cut it could be there in name with its files empty."""
    mode = os.O_RDWR if os.name == "nt" else os.O_RDONLY  # Windows flushes only a handle open for writing
    for folder, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(folder, name), mode)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        sync_folder(Path(folder))


def sync_folder(folder: Path) -> None:
    """Puts a folder's entries (a file renamed into it) on the disk, where the system can."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows opens no folders
        return
    try:
        with contextlib.suppress(OSError):  # some file systems take no fsync of a folder (EINVAL)
            os.fsync(fd)
    finally:
        os.close(fd)


def _check_replace(out: Path, force: bool, replaces: tuple[str, Callable[[Path], bool]] | None) -> None:
    """Refuses to replace an existing `out` without `force`, or (with `replaces`) one that is not this
    kind of output: a mistyped --out never deletes someone's files."""
    if (out.exists() or out.is_symlink()) and not force:
        raise TinykError(f"output directory exists: {out} (use --force to replace it)")
    if out.exists() and replaces is not None:
        what, is_one = replaces
        if not out.is_dir():
            raise TinykError(f"output {out} is a file, not a directory; remove it yourself or choose another path")
        held = sorted(p.name for p in out.iterdir())
        if held and not is_one(out):
            raise TinykError(f"{out} exists and is not {what}, so it is not replaced (it holds "
                             f"{', '.join(held[:3])}{', ...' if len(held) > 3 else ''}); remove it yourself or "
                             "choose another path")


def _unused_name(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ...: the first that does not exist."""
    candidate, n = path, 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


# The files that describe a model, tokenizer or dataset, by the exact names tinyk and transformers'
# save_pretrained give them (it adds some tinyk does not write, chat_template.jinja first among them,
# which outranks the template the new output carries): they go with the output they described. Any
# other name is the user's (notes, vocab_study/, training_args.bin) and stays.
_OUTPUT_FILES = re.compile(r"config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|"
                           r"pytorch_model(-\d+-of-\d+)?\.bin|(model\.safetensors|pytorch_model\.bin)\.index\.json|"
                           r"tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|added_tokens\.json|"
                           r"chat_template\.jinja|vocab\.(json|txt)|merges\.txt|tokenizer\.model|"
                           r"meta\.json|progress\.json")


def is_output_file(name: str) -> bool:
    """A name that a model, tokenizer or dataset file has (`_OUTPUT_FILES`), not one of the user's."""
    return bool(_OUTPUT_FILES.fullmatch(name))


def _carry_over(old: Path, new: Path) -> None:
    """Moves into a new output the entries of the one it replaced that it lacks and that do not describe
    a model (`_OUTPUT_FILES`): the user's own (an eval's results in a demo folder, notes beside a
    model). --force replaces what tinyk made, only. A model directory inside both (the demo's chat/)
    is gone through the same way."""
    if old.is_symlink() or not old.is_dir():
        return
    for p in old.iterdir():
        target = new / p.name
        if is_output_file(p.name):
            continue
        if not target.exists() and not target.is_symlink():
            os.replace(p, target)
        elif (p / "config.json").is_file() and target.is_dir() and not target.is_symlink():
            _carry_over(p, target)


def partial_sibling(out: str | Path) -> Path:
    """`.{name}.partial` beside `out`: where a run that can be continued keeps its work until done."""
    out = Path(out)
    return out.with_name(f".{_stem(out.name)}.partial")


class DirLock:
    """An exclusive advisory lock on a directory while a process works in it. The kernel drops it when
    the process dies, so a killed run never leaves a stale lock behind; where locks are unsupported
    (not POSIX, some network filesystems) it always succeeds."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self) -> bool:
        """True when this process now holds the lock; False when another one does."""
        try:
            import fcntl
        except ImportError:
            return True
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError:
            os.close(fd)
            return True
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    __del__ = release

    def holders(self) -> list[str]:
        """The processes holding the lock, as "pid (command line)", where the kernel lists them (Linux's
        /proc/locks; nothing elsewhere, or for a process in another PID namespace or on another machine)."""
        try:
            st = self.path.stat()
            locks = Path("/proc/locks").read_text(encoding="ascii", errors="replace").splitlines()
        except OSError:
            return []
        where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        found = []
        for fields in (line.split() for line in locks):  # "1: FLOCK ADVISORY WRITE <pid> <maj:min:inode> 0 EOF"
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == where and fields[4].isdigit():
                try:
                    args = Path(f"/proc/{fields[4]}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
                    command = " ".join(b" ".join(args).decode(errors="replace").split())  # one line
                except OSError:  # gone: the lock is held through a descriptor a child of it inherited
                    command = "exited; a process it started holds the lock"
                found.append(f"{fields[4]} ({command[:100]})")
        return found


def _host() -> str:
    """This machine's name as it may appear in a file name. A pid says whether a process is alive
    only on the machine that issued it, and outputs can live on a filesystem several machines share."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "localhost"


def _owner() -> str:
    """`{host}-{pid}`: who made a temporary, as `remove_stale_temps` reads it back."""
    return f"{_host()}-{os.getpid()}"


def _stem(name: str) -> str:
    """`name` as temporaries beside it carry it: cut short, and told apart by a hash, where
    `.{name}.tmp-{host}-{pid}-XXXXXXXX` would pass the 255-byte limit filesystems put on a name (a
    legal output name must get a legal temporary)."""
    raw = os.fsencode(name)
    room = 255 - len(f"..tmp-{_host()}-{'9' * 7}-{'X' * 8}".encode())  # pids have at most 7 digits
    if len(raw) <= room:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:8]
    cut = room - len(digest) - 1
    # Not inside a UTF-8 character (before a continuation byte), so the temporary's name stays text
    # wherever it is shown or handed to a library.
    while cut and raw[cut] & 0xC0 == 0x80:
        cut -= 1
    return os.fsdecode(raw[:cut]) + "." + digest


def _pid_running(pid: int) -> bool:
    """False only when no process `pid` exists on this machine; in doubt, True."""
    if os.name != "posix":  # os.kill(pid, 0) would not be a harmless probe
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: someone else's process
        return True
    return True


def remove_stale_temps(out: str | Path) -> list[Path]:
    """Removes what a killed `atomic_dir` left beside `out`: `.{name}.tmp-{host}-{pid}-XXXX` and
    `.{name}.old-{host}-{pid}` directories made on this machine by a process that no longer runs; an
    `.old-` one is put back instead when `out` itself is missing. Returns what was removed.

    Anything else is left alone: a directory whose process is alive, one made on another machine
    sharing the filesystem, and temporaries named by older versions, whose owner cannot be told.
    """
    out = Path(out)
    host = re.escape(_host())
    pattern = re.compile(rf"\.{re.escape(_stem(out.name))}\.(?:tmp-{host}-([0-9]+)-[A-Za-z0-9_]+|old-{host}-([0-9]+))")
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return []
    removed = []
    for p in siblings:
        m = pattern.fullmatch(p.name)
        if not m:
            continue
        pid = int(m.group(1) or m.group(2))
        if pid <= 0 or pid == os.getpid() or _pid_running(pid):
            continue
        if m.group(2) and not (out.exists() or out.is_symlink()):
            with contextlib.suppress(OSError):  # another process may be cleaning up too
                os.replace(p, out)  # killed between moving the old output aside and the new one in: it goes back
            continue
        if p.is_symlink() or not p.is_dir():
            continue
        if m.group(2) and out.is_dir() and not out.is_symlink():  # killed after the new output went in:
            try:  # the user's entries of the old one go there; kept for a later run if they cannot
                _carry_over(p, out)
            except OSError:
                continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _share_like_umask(root: Path) -> None:
    """Gives a finished output the permissions a plain `mkdir`/`open` would have: `mkdtemp` makes the
    directory private (0700) and safetensors writes 0600, which would hide a model from other users."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for parent, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(parent, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(parent, name), 0o666 & ~mask)


@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary sibling to write: it replaces `path` when the block succeeds and is removed when
    it fails, so readers never see half a file and a failed write (a full disk) leaves nothing behind.
    `suffix` keeps an extension that the writer reads the format from (matplotlib's .png)."""
    path = Path(path)
    tmp = path.with_name(f".{_stem(path.name)}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def rust_path(path: str | Path) -> Iterator[str]:
    """`path` (a file or directory) as a str that Rust libraries (safetensors, tokenizers) open as the
    same one. They encode str paths as UTF-8, while the name is in the locale's encoding (GBK) or raw
    bytes (an unpacked Windows zip): such a path is reached through this process's descriptor for it."""
    s = str(path)
    try:
        same = os.fsencode(s) == s.encode("utf-8")
    except UnicodeEncodeError:  # a surrogate-escaped byte
        same = False
    if same or not os.path.isdir("/proc/self/fd"):
        yield s
        return
    fd = os.open(s, os.O_RDONLY)
    try:
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def read_json(path: str | Path) -> Any:
    """A JSON file tinyk or a user wrote, read as UTF-8. Nesting deeper than the parser's recursion (a
    damaged or hostile config.json) is a ValueError like any other bad JSON, not a RecursionError."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None
    except ValueError as e:
        if "integer string conversion" in str(e):  # Python's advice (sys.set_int_max_str_digits) is not the user's
            raise ValueError("it holds a number of thousands of digits") from None
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Writes `obj` as JSON, complete or not at all (see `atomic_file`). Paths in it whose bytes are not
    UTF-8 (a GBK folder name) are written as `shown` prints them."""
    text = json.dumps(obj, ensure_ascii=False, indent=2) + "\n"
    with atomic_file(path) as tmp:
        tmp.write_bytes(shown(text).encode("utf-8"))


def hash_files(paths: list[Path]) -> str:
    """A short content hash identifying a set of files (e.g. a tokenizer)."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]
