"""Reading user corpora safely.

Every stage reads the same kinds of input (JSONL, TXT, Parquet, gzip- or zstd-compressed JSONL and
TXT): a bad line is skipped and counted (`Skips`), a bad file is one line, and inputs are never modified.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shlex
import stat
import sys
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .errors import DamagedInput, TinykError, not_found, one_line, shown
from .units import MiB, plural

DEFAULT_MAX_LINE_BYTES = 16 * MiB
NUL_HINT = "a NUL byte is binary data, not text"  # a text line holding one is skipped with this reason
LONE_CR_HINT = ("records ended by a lone CR (old Mac OS line ends) read as one line; convert them, e.g. "
                "tr '\\r' '\\n' < in.jsonl > out.jsonl")
NO_RECORDS = "nothing but blank lines (or Parquet files without rows)"  # why an input with nothing skipped is empty
HEAD_BYTES = 1 << 20  # what `check_heads` reads of each input
ENCODING_LINES = 1000  # a file whose first lines are mostly not UTF-8 is refused, not skipped line by line
# ... or whose lines in its first HEAD_BYTES, if there are this many (long documents: fewer, judged at the end).
ENCODING_MIN_LINES = 20
SUPPORTED_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst",
                      ".txt.gz", ".txt.zst")


@dataclass
class Skips:
    """Counts skipped input records by reason and remembers where the first few were."""

    strict: bool = False
    keep_first: int = 5
    counts: Counter = field(default_factory=Counter)
    first: dict[str, list[str]] = field(default_factory=dict)
    hints: dict[str, str] = field(default_factory=dict)  # what the first skip of a reason says about the fix
    stopped_at: int | None = None  # input bytes read (lines too long to read not counted) when max_bytes ended it
    stopped_before: str | None = None  # there, the first record not read ("file:line")
    not_read: list[str] = field(default_factory=list)  # the input files max_bytes left unopened
    consumed: int = 0  # input bytes read so far, as max_bytes counts them: for progress lines
    long_line_bytes: int = 0  # in lines too long to read, which `consumed` does not count

    def add(self, reason: str, where: str, hint: str | None = None) -> None:
        if self.strict:
            raise TinykError(f"{where}: {reason.replace('_', ' ')}{f' ({hint})' if hint else ''} (--strict)")
        if hint and not self.counts[reason]:  # what the first place listed held, not a later one
            self.hints[reason] = hint
        self.counts[reason] += 1
        places = self.first.setdefault(reason, [])
        if len(places) < self.keep_first:
            places.append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _reasons(self) -> list[str]:
        return [f"{reason.replace('_', ' ')}: {n:,} (first at {', '.join(self.first[reason])}"
                f"{'; ' + self.hints[reason] if reason in self.hints else ''})"
                for reason, n in sorted(self.counts.items())]

    def summary(self) -> str:
        """One line, for an error message."""
        if not self.total:
            return "skipped 0 records"
        return f"skipped {plural(self.total, 'records')}; " + "; ".join(self._reasons())

    def report(self, indent: str = "  ") -> str:
        """The summary with a line for each reason, for a report: several reasons with their places and
        hints ran to a line of 1,500 characters."""
        if not self.total:
            return "skipped 0 records"
        return f"skipped {plural(self.total, 'records')}:" + "".join(f"\n{indent}{r}" for r in self._reasons())

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


def mostly_skipped(skipped: int, kept: int, unit: str) -> str | None:
    """A warning when more records were skipped than kept: the summary's figures said so, but with
    exit 0 a tokenizer or dataset made of a sliver of the input (a wrong --field) went unnoticed."""
    if skipped <= kept:
        return None
    return (f"warning: more of the input was skipped ({plural(skipped, 'records')}) than kept "
            f"({plural(kept, unit)}); the summary says why")


def as_list(items: Iterable[str | Path] | str | Path) -> list[str | Path]:
    """A list of paths (or --set items); one given alone, as a library caller may, is a list of one,
    not a string walked character by character ("input is a directory: /")."""
    return [items] if isinstance(items, str | os.PathLike) else list(items)


def check_inputs(paths: Iterable[str | Path] | str | Path, *, one: bool = False) -> list[Path]:
    """Fail early, with one line, on inputs that are missing, unreadable, empty or of an unknown type
    (`one`: a flag that takes one file)."""
    paths = as_list(paths)
    if not paths:
        raise TinykError("no input files given")
    out = []
    for p in map(Path, paths):
        if str(p) == "-" and not p.exists():
            raise TinykError("inputs are read from files, not from stdin (-): save what it gives to a file first")
        if not p.exists():
            raise not_found(p, "input file")
        refuse_pipe(p, "input")
        if p.is_dir() and (p / "tokenizer.json").is_file():  # `tokenizer eval --input a.txt tok`
            raise TinykError(f"input {p} is a tokenizer or model directory, not text: a flag of several files "
                             f"(--input) takes every path after it, so give the directory before the flag")
        if p.is_dir():
            raise TinykError(f"input is a directory, not a file: {p} (give {'one of ' if one else ''}the files in it)")
        if not p.is_file():
            raise TinykError(f"input is not a file: {p}")
        if not os.access(p, os.R_OK):
            raise TinykError(f"input file is not readable: {p}")
        if not has_suffix(p, SUPPORTED_SUFFIXES):
            unpack = _unpack_hint(p)
            raise TinykError(f"unsupported input type: {p} ({f'{unpack}; tinyk reads' if unpack else 'use'} "
                             f"{', '.join(SUPPORTED_SUFFIXES)})")
        if has_suffix(p, ".parquet"):  # a missing reader is said now, not after the files before it
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


def check_heads(paths: list[Path], *, field: str = "text", message_lists: bool = False,
                max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
    """Refuses an input that is wrong as a whole (UTF-16, GBK, one JSON array, compressed data under
    another name, unreadable Parquet) from its first megabyte, before any input is read in full: met
    at its turn, it threw away the hours spent on the files before it. Bad records are left to the run."""
    for _ in iter_records(paths, Skips(), head=HEAD_BYTES, max_line_bytes=max_line_bytes, field=field,
                          message_lists=message_lists):
        pass


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
            other = f" (also as {twice})" if str(twice) != str(p) else ""  # ./x and x are both x as paths
            raise TinykError(f"{what} {p} is given twice{other}; give each {'directory' if p.is_dir() else 'file'} "
                             f"once")


def sha256_file(path: Path) -> str:
    """The file's SHA-256, read in 1 MiB blocks (1.5 GB/s on one core of a 2-core AMD EPYC)."""
    h, buf = hashlib.sha256(), bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def is_plain_text(path: Path) -> bool:
    """A `.txt` input (one document per line), also compressed; decided by the suffix, so
    `corpus.txt.jsonl` is JSON."""
    return has_suffix(path, (".txt", ".txt.gz", ".txt.zst"))


# Archives and compressors a corpus comes in (the tutorial's seq-monkey is a .jsonl.tar.bz2), and what unpacks them.
_UNPACK = {(".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst"): "tar -xf",
           (".zip",): "unzip", (".7z",): "7z x", (".rar",): "unrar x", (".bz2",): "bunzip2 -k", (".xz",): "unxz -k"}


def _unpack_hint(path: Path) -> str | None:
    """How to turn an archive or a file tinyk cannot decompress into files it reads."""
    tool = next((t for suffixes, t in _UNPACK.items() if has_suffix(path, suffixes)), None)
    return f"unpack it first, e.g. `{tool} {shlex.quote(str(path))}`, and give the files it holds" if tool else None


def has_suffix(path: str | Path, suffixes: str | tuple[str, ...]) -> bool:
    """Whether a file's name ends in one of `suffixes`, in any case (CORPUS.TXT, files from Windows)."""
    return Path(path).name.lower().endswith(suffixes)


def _labels(paths: list[Path]) -> dict[Path, str]:
    """How skip reports name each input: its file name, or the path as given where names repeat
    (shards called part-0.jsonl in several folders)."""
    names = Counter(p.name for p in paths)
    return {p: shown(p.name if names[p.name] == 1 else p) for p in paths}


_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_UTF32_BOMS = (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")
_MAGIC = {".gz": b"\x1f\x8b", ".zst": b"\x28\xb5\x2f\xfd"}  # how compressed files begin
_CODECS = {".gz": "gzip", ".zst": "zstd"}
# Compressed data and archives tinyk does not read, by how they begin, and what unpacks them to stdout or a folder.
_FOREIGN = {re.compile(rb"BZh[1-9](1AY&SY|\x17rE8P\x90)"): ("bzip2-compressed data", "bunzip2 -c {} > FILE"),
            re.compile(rb"\xfd7zXZ\x00"): ("xz-compressed data", "unxz -c {} > FILE"),
            re.compile(rb"PK\x03\x04"): ("a zip archive", "unzip {}"),
            re.compile(rb"7z\xbc\xaf\x27\x1c"): ("a 7z archive", "7z x {}")}
_ZSTD_CHUNK = 4096  # compressed bytes per step; bounds what one step can expand to


def _packed_ext(head: bytes) -> str | None:
    """The suffix (.gz, .zst) of the compressor whose data `head`, a file's first bytes, begins, if any."""
    return next((ext for ext, magic in _MAGIC.items() if head.startswith(magic)), None)


def compression(head: bytes) -> str | None:
    """The compressor ("gzip", "zstd") whose data `head`, a file's first bytes, begins, if any."""
    ext = _packed_ext(head)
    return _CODECS[ext] if ext else None


def _codec(path: Path) -> str | None:
    return next((codec for ext, codec in _CODECS.items() if has_suffix(path, ext)), None)


def file_stem(path: str | Path) -> str:
    """A file's name without its suffix, and without its compressor's first: `t` for t.jsonl.gz."""
    name = Path(path).name
    return Path(name[:-len(ext)] if (ext := next((e for e in _CODECS if has_suffix(name, e)), "")) else name).stem


def is_compressed(path: str | Path) -> bool:
    """Whether a file's size says nothing of how much text it holds (gzip, zstd, Parquet)."""
    return _codec(Path(path)) is not None or has_suffix(path, ".parquet")


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
        self._f = open(path, "rb")  # closed by close()
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


def _lone_crs(path: Path, start: int) -> bool:
    """Whether the 64 KB from byte `start` (of the text, uncompressed) hold a CR that ends no CRLF: the
    line there is lines a newline-split read cannot see. A compressed file is read up to there, so only
    near its start."""
    with contextlib.suppress(*_read_errors(path)), _open_binary(path) as f:
        if _codec(path) is None:
            f.seek(start)
        elif start > 64 * MiB:
            return False
        else:
            f.read(start)
        return b"\r" in f.read(1 << 16)[:-1].replace(b"\r\n", b"")
    return False


def _converted(path: Path, prefix: str) -> tuple[str, str, str | None]:
    """For a shell line that converts `path`: its name and its converted sibling's (`prefix` + its name,
    its suffix kept), quoted, and its codec (gzip, zstd: the line decompresses and compresses again)."""
    return shlex.quote(str(path)), shlex.quote(str(path.with_name(prefix + path.name))), _codec(path)


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
    if codec and not io_error and not lines and (why := _misnamed(path, codec)):
        return TinykError(why)
    if codec and not io_error:  # BadGzipFile is an OSError, without an errno
        return DamagedInput(f"{path}: damaged or truncated {codec} data{after} ({one_line(e)})")
    detail = e.strerror if isinstance(e, OSError) and e.strerror else one_line(e)
    return TinykError(f"{path}: read error{after} ({detail})")


def _misnamed(path: Path, codec: str) -> str | None:
    """Why a file named .gz or .zst fails at its start when it holds other data (zstd named .gz, plain
    text named .gz), which is no damage: renamed, it reads."""
    try:
        with open(path, "rb") as f:
            start = f.read(4096)
    except OSError:
        return None
    ext = next(e for e, c in _CODECS.items() if c == codec)
    stem = path.name[:-len(ext)]
    other = _packed_ext(start)
    if other and other != ext:
        return f"{path}: {_CODECS[other]}-compressed data in a file named {ext}; rename it to {stem}{other}"
    if not other and b"\x00" not in start and _utf8_so_far(start):
        return f"{path}: uncompressed text in a file named {ext}; rename it to {stem}"
    return None  # its own codec's data, damaged; or no text at all


def _refuse_wide_or_packed(path: Path, first: bytes) -> None:
    """A file's first line as UTF-16/32 text or compressed data under a plain name: one line on what to do."""
    wide = next((bits for bits, boms in ((32, _UTF32_BOMS), (16, _UTF16_BOMS)) if first.startswith(boms)), None)
    if wide:
        raise TinykError(f"{path}: UTF-{wide} text; tinyk reads UTF-8 (convert it, e.g. with iconv)")
    if not _codec(path) and (foreign := next((v for magic, v in _FOREIGN.items() if magic.match(first)), None)):
        kind, tool = foreign
        raise TinykError(f"{path}: {kind}, which tinyk does not read (it reads gzip and zstd); unpack it first, "
                         f"e.g. `{tool.format(shlex.quote(path.name))}`, and give what it holds")
    packed = _packed_ext(first)
    if packed and not _codec(path):
        raise TinykError(f"{path}: {_CODECS[packed]}-compressed data in a file not named {packed}; "
                         f"rename it to {path.name}{packed} and tinyk reads it as it is")
    if packed:
        raise TinykError(f"{path}: compressed twice (what its {_codec(path)} holds is {_CODECS[packed]}-compressed "
                         f"again); decompress it once ({_codec(path)} -dc {path.name} > FILE) and give tinyk FILE")


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


def _utf8_so_far(line: bytes) -> bool:
    """Whether `line` is UTF-8, perhaps cut inside its last character (by the line limit, or the file's end)."""
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.reason == "unexpected end of data"
    return True


def _nul_error(path: Path) -> TinykError:
    return TinykError(f"{path}: NUL bytes in its first 4 KB: UTF-16 or UTF-32 text without a byte order mark, "
                      f"or not text at all; tinyk reads UTF-8 (convert it, e.g. iconv -f utf-16le -t utf-8, or "
                      f"utf-16be)")


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
        lineno = head_nuls = 0
        nul_share_judged = False
        while True:
            line = f.readline(max_line_bytes + 2)  # with room for its end, \r\n too
            if line:
                lineno += 1
                if lineno == 1:
                    _refuse_wide_or_packed(path, line)
                if line.startswith(_BOM):  # the file's, or one glued on by `cat a.jsonl b.jsonl`
                    line = line[len(_BOM):]
                # In the first 4 KB, not the first line: UTF-16LE's 上 (0A 4E) or newline (0A 00) ends lines
                # early. UTF-16 English is half NULs, judged over those 4 KB (or the whole of a shorter
                # file); Chinese seldom valid UTF-8. A stray NUL in UTF-8 text is neither, and skips its line.
                if f.n - len(line) < 4096 and b"\x00" in line:
                    head_nuls += line.count(b"\x00")
                    if not _utf8_so_far(line):
                        raise _nul_error(path)
            if not nul_share_judged and (f.n >= 4096 or not line):
                nul_share_judged = True
                if head_nuls * 8 >= f.n > 0:
                    raise _nul_error(path)
            if not line:
                return
            if len(line) - (2 if line.endswith(b"\r\n") else line.endswith(b"\n")) > max_line_bytes:
                while line and not line.endswith(b"\n"):
                    line = f.readline(1 << 20)
                f.lines = lineno
                yield lineno, None, f.n
                continue
            f.lines = lineno
            yield lineno, line, f.n


def iter_records(paths: list[Path], skips: Skips, *, max_bytes: int | None = None,
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, field: str = "text",
                 message_lists: bool = False, head: int | None = None) -> Iterator[tuple[str, Any]]:
    """Yields (where, record) from every input in order, skipping and counting bad lines.

    JSON inputs yield the parsed object; `.txt` lines yield {field: line}; Parquet rows
    yield a dict. Stops once `max_bytes` of input have been consumed. `message_lists`: a line may
    be a bare list of chat messages (the seed's SFT format), so such a first line is not taken
    for the start of a JSON array. `head`: only each file's lines that start in its first `head`
    bytes (its first line whole), and its encoding judged there as a whole read judges it.
    """
    consumed = 0
    labels = _labels(paths)

    def stop(where: str, file: int) -> None:
        skips.stopped_at, skips.stopped_before = consumed, where
        skips.not_read = [labels[p] for p in paths[file + 1:]]

    for file, path in enumerate(paths):
        label = labels[path]
        if has_suffix(path, ".parquet"):
            for where, rec, n in _iter_parquet(path, label, None if message_lists else field):
                if head is not None:  # its first batch of rows has been read
                    break
                if max_bytes is not None and consumed + n > max_bytes:
                    stop(where, file)
                    return
                consumed += n
                skips.consumed = consumed
                if rec is None:
                    skips.add("invalid_utf8", where, "a string that is not UTF-8 in a Parquet file; fix the program "
                                                     "that wrote it")
                    continue
                yield where, rec
            continue
        is_txt = is_plain_text(path)
        base, end, begun = consumed, 0, False
        lone_crs = 0  # in .txt lines before this one: each began a line of its own, which positions count
        first_text = True  # a .txt file's first line of text, which may show it holds JSON records
        encoding = _EncodingCheck(path)
        past_head = False
        for lineno, line, read in iter_lines(path, max_line_bytes):
            if end >= HEAD_BYTES and not past_head:  # where `check_heads` stops: both judge the same lines
                past_head = True
                encoding.decide(at_least=ENCODING_MIN_LINES)
            if head is not None and end >= head:
                break
            if line is None:  # too long to read: skipped below, and no part of the max_bytes budget
                base -= read - end
                skips.long_line_bytes += read - end
            line_start, end = end, read
            where = f"{label}:{lineno + lone_crs}"
            if max_bytes is not None and base + read > max_bytes:
                stop(where, file)
                encoding.decide()  # on what was read: a sample of a GBK file is refused too
                return
            consumed = base + read
            skips.consumed = consumed
            # The first line with something on it: blank lines may come before it.
            opening = not (is_txt or begun) and (line is None or bool(line.strip()))
            if opening:
                _refuse_not_json_lines(path, line, field, message_lists)
            begun = begun or opening
            if line is None:
                limit = line_limit_text(max_line_bytes)
                why = f"a line over {limit} is skipped; tinyk data and tokenizer train read longer ones with " \
                      f"--max-line-bytes"
                if "line_too_long" not in skips.hints and _lone_crs(path, line_start):
                    name, out, packed = _converted(path, "lf-")
                    example = (f"{packed} -dc {name} | tr '\\r' '\\n' | {packed} > {out}" if packed else
                               f"tr '\\r' '\\n' < {name} > {out}")
                    why = f"a line over {limit} is skipped: lines ended by a lone CR (old Mac OS line ends) read as " \
                          f"one; convert them first, e.g. {example}"
                skips.add("line_too_long", where, why)
                continue
            cut = not line.endswith(b"\n")  # the file's last line: it may end inside a character
            if is_txt:
                # A lone CR ends a line too (classic Mac OS files; Python's universal newlines): such a file
                # is many documents, not one holding CRs, and a bad byte skips only its own.
                body = line.removesuffix(b"\n")
                parts = (body.removesuffix(b"\r") if len(body) < len(line) else body).split(b"\r")  # CRLF: one end
                for i, part in enumerate(parts):
                    here = f"{label}:{lineno + lone_crs + i}"
                    s = _line_text(part, here, skips, encoding, cut and i == len(parts) - 1)
                    if s is None or not s.strip():  # blank lines separate documents; they are not ones
                        continue
                    encoding.saw(False)
                    read_as = _read_as_record(s, field, message_lists) if first_text else None
                    first_text = False
                    if read_as:
                        raise TinykError(f"{path}: a .txt file whose lines are JSON records, which would be read as "
                                         f"text, braces and keys included; name it {_jsonl_name(path)} to read "
                                         f"{read_as}")
                    if "\x00" in s:  # a stray one in UTF-8 text (UTF-16 was refused above); in JSON, malformed_json
                        skips.add("nul_byte", here, NUL_HINT)
                        continue
                    yield here, {field: s}
                lone_crs += len(parts) - 1
                continue
            s = _line_text(line, where, skips, encoding, cut)
            if s is None:
                continue
            s = s.rstrip("\r\n")
            if not s.strip():  # blank lines separate records; they are not ones
                continue
            encoding.saw(False)
            try:
                rec = json.loads(s)
            except (ValueError, RecursionError):  # bad JSON, a 5000-digit number, nesting 1000 deep
                # JSON Lines end in \n: lines ended by a lone CR (old Mac OS) read as one malformed line
                skips.add("malformed_json", where, LONE_CR_HINT if re.search(r"[}\]]\r(?!\n)", s) else None)
                continue
            if _SURROGATE_ESCAPE.search(s) and has_surrogate(rec):
                skips.add("lone_surrogate", where, "a \\ud800-\\udfff escape without its pair is no text; fix the "
                                                   "program that wrote it")
                continue
            yield where, rec
        else:  # the whole file was read, not only its head
            encoding.decide()


def line_limit_text(max_line_bytes: int) -> str:
    """--max-line-bytes as its help says it: "16 MiB", else the bytes."""
    return f"{max_line_bytes // MiB} MiB" if max_line_bytes % MiB == 0 else f"{max_line_bytes:,} bytes"


def _line_text(line: bytes, where: str, skips: Skips, encoding: _EncodingCheck, cut: bool) -> str | None:
    """A line's text, or None with why it is none counted; `cut`: the file ends with this line, maybe
    inside a character."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        other_encoding = False
        if e.reason == "unexpected end of data" and cut:  # no GBK: a cut file
            skips.add("cut_character", where, "the file ends inside a character: it was cut short (e.g. by head -c)")
        elif _decodes_with_surrogates(line):  # no GBK either: the bytes of a UTF-16 surrogate
            skips.add("encoded_surrogate", where, "a \\ud800-\\udfff surrogate written as UTF-8 bytes (CESU-8, "
                                                  "Java's modified UTF-8) is no UTF-8 text; fix the program that "
                                                  "wrote it")
        else:
            skips.add("invalid_utf8", where, _not_utf8_hint(line))
            other_encoding = True
        encoding.saw(other_encoding, line)
        return None


GBK_HINT = ("a line in GBK among UTF-8 ones: the file mixes encodings, which iconv on the whole file would fail "
            "on or garble; re-save such lines as UTF-8")
DAMAGED_HINT = "a few bytes that are not UTF-8 in a line of UTF-8 text: a damaged line, not a file to convert"
OTHER_HINT = "bytes that are neither UTF-8 nor GBK: a damaged line, or a file to convert from its encoding"


def _not_utf8_hint(line: bytes) -> str:
    """What a line that is not UTF-8 most likely is. A damaged UTF-8 line reads but for a few bytes, and
    converting its file from GBK would garble the rest; text in GBK is almost all bytes UTF-8 cannot read.
    Either way the file is mostly UTF-8 (one that is not is refused whole, with its own iconv line), so no
    hint says to convert the file."""
    text = line.decode("utf-8", "replace")
    bad = text.count("\ufffd")
    if sum(ord(c) > 127 for c in text) - bad >= 4 * bad:
        return DAMAGED_HINT
    try:
        line.decode("gbk")
    except UnicodeDecodeError:
        return OTHER_HINT
    return GBK_HINT


def _refuse_not_json_lines(path: Path, first_line: bytes | None, field: str, message_lists: bool) -> None:
    """Refuses a JSON file that is one array or one object over many lines, from its first non-blank line
    (None: too long to hold): read as JSON Lines, each of its lines would be a malformed record."""
    head = _json_array_head(path, first_line, message_lists)
    if head is not None:
        raise TinykError(f"{path}: one JSON array, not JSON Lines (one record per line); convert it "
                         f"first, e.g. {_jq_hint(path, field if _STRINGS.match(head) else None)}")
    if first_line is not None and first_line.strip() == b"{":
        raise TinykError(f"{path}: one JSON object written over many lines, not JSON Lines (one record "
                         f"per line); write its records one per line first, e.g. for a list of them "
                         f"under KEY: jq -c '.KEY[]' FILE > records.jsonl")


def _read_as_record(line: str, field: str, message_lists: bool) -> str | None:
    """How a .jsonl name would read a .txt's line as a record (None: as text): a JSON object with a text
    field, `field` or another (then with the --field that names it), or one conversation (in an SFT
    format, or the seed's list of messages, which pretraining refuses with its own line). Text that
    merely looks like JSON, or JSON with no prose in it (a log line's short values), is text."""
    if not line.lstrip().startswith(("{", "[")):
        return None
    try:
        rec = json.loads(line)
    except (ValueError, RecursionError):
        return None
    has_field = isinstance(rec, dict) and isinstance(rec.get(field), str)
    if message_lists:
        return "them as conversations" if is_conversation(rec) or has_field else None
    if has_field:
        return f"their '{field}' field"
    if is_conversation(rec):
        return "them as conversations with tinyk data sft"
    if not isinstance(rec, dict):
        return None
    longest = _prose_key(rec)
    return f"their {short_repr(longest)} field with --field={shlex.quote(longest)}" if longest else None


def _prose_key(rec: dict) -> str | None:
    """The key of a record's longest text, if that reads as a document (20 characters or more) and the
    key as a flag's value (not a 100 kB one)."""
    texts = {k: len(v) for k, v in rec.items() if isinstance(v, str) and len(k) <= 40}
    longest = max(texts, key=texts.get, default=None)
    return longest if longest is not None and len(rec[longest].strip()) >= 20 else None


def _jsonl_name(path: Path) -> str:
    """`path`'s name, a .txt one, with .txt made .jsonl (a.txt.gz: a.jsonl.gz)."""
    at = path.name.lower().rfind(".txt")
    return f"{path.name[:at]}.jsonl{path.name[at + 4:]}"


class _EncodingCheck:
    """Refuses a file in another encoding (GBK, Big5, Latin-1) once its first lines show it: skipped line
    by line, it left a tokenizer or dataset of almost nothing, made with exit 0. A few bad lines in a
    UTF-8 file are still skipped and counted."""

    def __init__(self, path: Path):
        self.path, self.lines, self.not_utf8, self.done = path, 0, 0, False
        self.gbk = True  # every line that was not UTF-8 is GBK, so the example converts from GBK

    def saw(self, not_utf8: bool, line: bytes = b"") -> None:
        """Counts a non-blank line; the first ENCODING_LINES of them decide."""
        self.lines += 1
        self.not_utf8 += not_utf8
        if not_utf8 and self.gbk and self.lines <= ENCODING_LINES:
            try:
                line.decode("gbk")
            except UnicodeDecodeError:
                self.gbk = False
        if self.lines == ENCODING_LINES:
            self.decide()

    def decide(self, at_least: int = 0) -> None:
        """Refuses the file if most of its non-blank lines so far are not UTF-8; decides once, and only on
        `at_least` lines (a megabyte of book-length documents holds one or two, which cannot say)."""
        if self.done or self.lines < at_least:
            return
        self.done = True
        if self.not_utf8 * 2 > self.lines:
            name, out, packed = _converted(self.path, "utf8-")
            source = "gbk" if self.gbk else "ENCODING"
            example = (f"{packed} -dc {name} | iconv -f {source} -t utf-8 | {packed} > {out}" if packed else
                       f"iconv -f {source} -t utf-8 {name} > {out}")
            guess = ("GBK or another encoding?); convert it first" if self.gbk else
                     "nor as GBK: Latin-1, Big5, Shift-JIS?); find its encoding (file -i, uchardet) and convert it")
            raise TinykError(f"{self.path}: not UTF-8 text ({self.not_utf8:,} of {plural(self.lines, 'lines')} "
                             f"read could not be decoded{':' if self.gbk else ','} {guess}, e.g. {example}")


_ARRAY = re.compile(rb'\s*\[')
# Where a line may be a list of chat messages ([{"role": ...}, ...], one conversation in the seed's SFT
# format), a first line that is no JSON (too long to hold, or cut short) is judged by how it begins: an
# array of records is one whose first object starts with a key no message has, or an array of conversations.
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
    # A first line that is one conversation starts the seed's SFT JSON Lines: reading text, its lines are
    # skipped with the hint that they are conversations, not turned into records by jq. Where a line may be
    # one (SFT), an array is one of records or conversations, whatever the order of its first object's keys;
    # a first line that is no JSON (cut short) is judged by how it begins.
    parsed = _json_or_none(first_line)
    if not message_lists:
        array = _ARRAY.match(head) and not is_message_list(parsed)
    elif is_message_list(parsed) or _is_records_array(parsed):
        array = not is_message_list(parsed)
    else:
        array = _ARRAY_OF_RECORDS.match(head)
    return head if indented or array else None


def _json_or_none(line: bytes | None) -> Any:
    try:
        return None if line is None else json.loads(line)
    except (ValueError, RecursionError):
        return None


def _is_records_array(rec: Any) -> bool:
    """An array of records or of conversations, not one conversation: its first element a list, or an
    object with no key a message has (those `_ARRAY_OF_RECORDS` looks for first)."""
    return isinstance(rec, list) and bool(rec) and (isinstance(rec[0], list) or isinstance(rec[0], dict) and
                                                    not {"role", "content", "from", "value"} & rec[0].keys())


def is_message_list(rec: Any) -> bool:
    """Whether a record is one conversation in the seed's SFT format: a list of messages, each with a
    role (or ShareGPT's `from`) and its text (`content` or `value`)."""
    return isinstance(rec, list) and bool(rec) and all(
        isinstance(m, dict) and ("role" in m or "from" in m) and ("content" in m or "value" in m) for m in rec)


def _jq_hint(path: Path, field: str | None = None) -> str:
    """The jq line that writes an array's elements one per line (strings become {field: ...} records),
    with the path as given, so that it runs where the command did."""
    # Never the input's own name (on macOS and Windows Data.JSONL is data.jsonl), nor a sibling's
    # such as data.jsonl beside data.v2.json.
    out = (re.sub(r"(\.(jsonl?|gz|zst))+$", "", path.name, flags=re.IGNORECASE) or "records") + ".lines.jsonl"
    out = shlex.quote(shown(str(path.with_name(out))))
    program = _jq_program(field)
    if _codec(path):
        return f"decompress it, then jq -c {program} FILE > {out}"
    return f"jq -c {program} {shlex.quote(shown(str(path)))} > {out}"


def _jq_program(field: str | None, key: str | None = None) -> str:
    """jq's program, shell-quoted, for the elements of an array (the one under `key`), strings made {field: ...}."""
    array = f".{json.dumps(key, ensure_ascii=False)}[]" if key is not None else ".[]"
    return shlex.quote(f"{array} | {{{json.dumps(field, ensure_ascii=False)}: .}}" if field else array)


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


def _iter_parquet(path: Path, label: str, field: str | None) -> Iterator[tuple[str, dict | None, int]]:
    """Rows as dicts; with `field`, a column the file has, that column alone (what a row holds beside the
    text is neither decoded nor counted against --max-bytes)."""
    pq = _parquet()
    try:
        pf = pq.ParquetFile(path)
        columns = [field] if field is not None and field in pf.schema_arrow.names else None
        batches = pf.iter_batches(batch_size=1024, columns=columns)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DamagedInput(f"cannot read parquet file {path}: {one_line(e)}") from e
    row = 0
    while True:
        try:
            batch = next(batches, None)
            recs = _parquet_rows(batch) if batch is not None else []
        except Exception as e:  # ArrowInvalid, ArrowIOError, OSError, ... for a damaged row group
            after = f" after row {row}" if row else ""
            raise DamagedInput(f"{path}: damaged parquet data{after} ({one_line(e)})") from e
        if batch is None:
            return
        size = max(1, batch.nbytes // max(1, batch.num_rows))
        for rec in recs:
            row += 1
            yield f"{label}:row {row}", rec, size


def _parquet_rows(batch: Any) -> list[dict | None]:
    """A batch's rows as dicts; None for a row whose strings are not UTF-8 (Parquet stores them unchecked,
    and one such row is skipped as a bad line of a text file is, not the whole file called damaged)."""
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:
        rows: list[dict | None] = []
        for i in range(batch.num_rows):
            try:
                rows.append(batch.slice(i, 1).to_pylist()[0])
            except UnicodeDecodeError:
                rows.append(None)
        return rows


def record_shape(rec: Any) -> str:
    """What a record holds, for a message about one tinyk cannot use: "fields 'id', 'conversations'"."""
    return f"fields {', '.join(map(short_repr, list(rec)[:6]))}" if isinstance(rec, dict) and rec else \
        f"a JSON {json_kind(rec)}"


_JSON_KINDS = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object",
               type(None): "null"}


def json_kind(value: Any) -> str:
    """A parsed JSON value's kind as JSON names it ("array", not Python's "list")."""
    return _JSON_KINDS.get(type(value), type(value).__name__)


def short_repr(text: str, limit: int = 40) -> str:
    """`text` quoted, cut after `limit` characters: a record's 100 kB key (data used as a key) or role,
    quoted whole, made a 100 kB line of the report and of meta.json."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}..."


def sft_format(rec: Any) -> str | None:
    """Which SFT format a record is in: "turns" (the seed's bare list of messages), "chat" (BelleGroup/
    ShareGPT `conversations` or OpenAI `messages`), "alpaca" (`instruction` and `output`), "prompt" (TRL's
    `prompt` and `completion`); None if none. Here, not in data.py, so reading text can tell a user that
    they gave it conversations."""
    if isinstance(rec, list):
        return "turns"
    if not isinstance(rec, dict):
        return None
    if any(isinstance(rec.get(k), list) for k in ("conversations", "messages")):
        return "chat"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    return "prompt" if "prompt" in rec and "completion" in rec else None


def is_conversation(rec: Any) -> bool:
    """A record `tinyk data sft` reads as one conversation, in any of its formats."""
    return is_message_list(rec) or sft_format(rec) in ("chat", "alpaca", "prompt")


def _conversation_text_jq(rec: Any, field: str) -> str:
    """How to make text documents of conversations (for a tokenizer that knows their words too): the jq
    line that joins each one's turns, for the two formats whose turns are a list; else nothing."""
    key = next((k for k in ("conversations", "messages") if isinstance(rec.get(k), list)), None) \
        if isinstance(rec, dict) else None
    turns = rec if is_message_list(rec) else rec[key] if key else None
    if not turns or not isinstance(turns[0], dict):
        return ""
    where = f".{key}" if key else "."
    text = "value" if "value" in turns[0] else "content"
    program = f"{{{json.dumps(field)}: ([{where}[].{text}] | join(\"\\n\"))}}"
    return f"; as text, e.g. jq -c {shlex.quote(program)} FILE > text.jsonl"


def _holds_json(text: str) -> bool:
    """Whether a string is itself a JSON object or array (a record encoded twice), not text."""
    if not text.lstrip().startswith(("{", "[")):
        return False
    try:
        return isinstance(json.loads(text), dict | list)
    except (ValueError, RecursionError):
        return False


def iter_texts(paths: list[Path], skips: Skips, *, field: str = "text", **kw: Any) -> Iterator[str]:
    """Yields the text of each document (a record's `field`, or a line that is one JSON string), skipping
    records without usable text."""
    return (text for _, text in iter_documents(paths, skips, field=field, **kw))


def iter_documents(paths: list[Path], skips: Skips, *, field: str = "text", **kw: Any) -> Iterator[tuple[str, str]]:
    """`iter_texts` with where each text is ("file:line"). A JSON Lines line that is one string (what
    `json.dumps(text)` for each document writes) is a document's text."""
    for where, rec in iter_records(paths, skips, field=field, **kw):
        if isinstance(rec, str):
            if _holds_json(rec):  # json.dumps(json.dumps(record)): braces and keys as text
                skips.add("encoded_twice", where, "a JSON record written as a JSON string: decode it first, e.g. "
                                                  "jq -c fromjson FILE > records.jsonl")
                continue
            text = rec
        elif isinstance(rec, dict) and field in rec:
            text = rec[field]
        else:
            fix = (f"these are SFT conversations, not text: `tinyk data sft` reads them"
                   f"{_conversation_text_jq(rec, field)}" if is_conversation(rec)
                   else _records_under_a_key(rec, field) or "--field names the one with the text")
            skips.add("missing_field", where, f"no field {field!r}, the first such record has "
                                              f"{record_shape(rec)}; {fix}")
            continue
        if not isinstance(text, str):  # null, mostly: a Parquet column's missing values
            kind = "null" if text is None else f"a JSON {json_kind(text)}"
            skips.add("not_string", where, f"its {short_repr(field)} is {kind}, not text")
            continue
        if not text.strip():
            skips.add("empty", where)
            continue
        yield where, text


def _records_under_a_key(rec: Any, field: str) -> str | None:
    """The jq line for what `json.dump({"data": [records or texts]})` writes: one line, a record of one list
    and no text of its own (a news record's list of tags is no list of records)."""
    if not isinstance(rec, dict) or any(isinstance(v, str) and v.strip() for v in rec.values()):
        return None
    lists = [k for k, v in rec.items() if isinstance(v, list) and v and isinstance(v[0], dict | str)]
    if len(lists) != 1:
        return None
    key = lists[0]
    program = _jq_program(field if isinstance(rec[key][0], str) else None, key)
    return f"it holds its records as a list under {short_repr(key)}: jq -c {program} FILE > records.jsonl"


UTF8_OR = "tinyk_utf8_or_"  # a codec: "tinyk_utf8_or_cp936" reads UTF-8, or cp936 where the text is not UTF-8


class _Utf8OrDecoder(codecs.IncrementalDecoder):
    """UTF-8 when the first non-ASCII bytes are (a file saved by Notepad, PowerShell 7's pipes), else
    `fallback` (cmd.exe's `echo 你好 |` sends the code page's GBK): GBK text is hardly ever valid UTF-8,
    while UTF-8 Chinese often is valid GBK, and read as it, silently garbled (你好 as 浣犲ソ)."""

    fallback = "utf-8"

    def __init__(self, errors: str = "strict"):
        super().__init__(errors)
        self.inner: codecs.IncrementalDecoder | None = None

    def decode(self, data: bytes, final: bool = False) -> str:
        if self.inner is None:
            if data.isascii() and not final:  # ASCII in both
                return data.decode("ascii")
            try:
                codecs.getincrementaldecoder("utf-8")().decode(data, final)
                name = "utf-8"
            except UnicodeDecodeError:
                name = self.fallback
            self.inner = codecs.getincrementaldecoder(name)(self.errors)
        return self.inner.decode(data, final)

    def reset(self) -> None:
        self.inner = None

    def getstate(self) -> tuple[bytes, int]:
        return self.inner.getstate() if self.inner else (b"", 0)

    def setstate(self, state: tuple[bytes, int]) -> None:
        if self.inner:
            self.inner.setstate(state)


def _utf8_or(name: str) -> codecs.CodecInfo | None:
    """The codec registry's search for UTF8_OR names: Windows' piped stdin reads through one."""
    if not name.startswith(UTF8_OR):
        return None
    fallback = codecs.lookup(name.removeprefix(UTF8_OR)).name
    decoder = type("Decoder", (_Utf8OrDecoder,), {"fallback": fallback})

    def decode(data: bytes, errors: str = "strict") -> tuple[str, int]:
        return decoder(errors).decode(bytes(data), final=True), len(data)

    return codecs.CodecInfo(codecs.utf_8_encode, decode, name=UTF8_OR + fallback, incrementaldecoder=decoder,
                            incrementalencoder=codecs.getincrementalencoder("utf-8"))


codecs.register(_utf8_or)


def stdin_not_decodable() -> str:
    """The line for stdin bytes its decoder refused: UTF-8's, or the encoding stdin reads instead, the
    one PYTHONIOENCODING asks for or Windows' code page (`PYTHONIOENCODING=ascii` refused Chinese UTF-8,
    which was then called "not valid UTF-8")."""
    encoding = getattr(sys.stdin, "encoding", None) or "utf-8"
    codec = codecs.lookup(encoding).name
    if codec == "utf-8":
        return "stdin is not valid UTF-8 (convert it first, e.g. iconv -f gbk -t utf-8)"
    if codec.startswith(UTF8_OR):
        return f"stdin is neither UTF-8 nor {codec.removeprefix(UTF8_OR)}, this console's encoding"
    if chosen := os.environ.get("PYTHONIOENCODING", "").partition(":")[0]:
        return (f"stdin is not valid {encoding}, the encoding PYTHONIOENCODING={chosen} asks for (unset it to "
                f"read UTF-8)")
    return f"stdin is not valid {encoding}, this console's encoding (set PYTHONIOENCODING=utf-8 to read UTF-8)"


STDIN_NAMES = ("-", "/dev/stdin")  # the --prompt-file values that read stdin


def read_prompts(typed: list[str], prompt_file: str | None, field: str = "prompt") -> tuple[list[str], str | None]:
    """`tinyk generate`'s prompts: the typed ones, then a file's (one per `.txt` line, per record's
    `field` or per JSON string line) or stdin's (`-`, one per line); with a note on the lines skipped, if any."""
    prompts, note = list(typed), None
    if prompt_file in STDIN_NAMES:  # one prompt per line, for pipelines
        lines = [line.rstrip("\r").removeprefix("\ufeff") for line in _stdin_text().split("\n")]  # a BOM, as in files
        skips = Skips()
        for n, line in enumerate(lines, 1):
            if "\x00" in line:  # as in a .txt prompt file
                skips.add("nul_byte", f"stdin:{n}", NUL_HINT)
                continue
            prompts += [part for part in line.split("\r") if part.strip()]  # a lone CR ends a line, as in files
        note = f"stdin: {skips.summary()}" if skips.total else None
        if not prompts:
            raise TinykError(f"no prompts on stdin (--prompt-file - reads one per line{f'; {note}' if note else ''})")
    elif prompt_file:
        if Path(prompt_file).is_fifo():  # `--prompt-file <(command)`
            raise TinykError(f"--prompt-file {prompt_file} is a pipe: pipe the prompts to stdin with "
                             f"--prompt-file - instead")
        skips = Skips()
        found = list(iter_texts(check_inputs([prompt_file], one=True), skips, field=field))
        if not found and is_plain_text(Path(prompt_file)):
            why = f"no usable lines; {skips.summary()}" if skips.total else "it has no non-empty lines"
            raise TinykError(f"no prompts in {prompt_file} ({why})")
        if not found:
            raise TinykError(f"no prompts in {prompt_file} (records need a string field {field!r}, see --field, "
                             f"or a line may be one JSON string; {skips.summary()})")
        note = f"{prompt_file}: {skips.summary()}" if skips.total else None
        prompts += found
    if not prompts:
        raise TinykError("give --prompt TEXT (repeatable) or --prompt-file FILE")
    return prompts, note


def read_stdin_message() -> str:
    """`tinyk chat`'s piped message: all of stdin, without a BOM or the whitespace around it."""
    message = _stdin_text().removeprefix("\ufeff").strip()
    if not message:
        raise TinykError("no message on stdin (pipe in a message, or use --message TEXT)")
    return message


def _stdin_text() -> str:
    """All of stdin, refused in one line where it is not text in this console's encoding."""
    try:
        text = sys.stdin.read()
    except UnicodeDecodeError:
        raise TinykError(stdin_not_decodable()) from None
    if has_surrogate(text):  # how a surrogateescape stream reads what does not decode
        raise TinykError(stdin_not_decodable())
    return text


JSON_MAX_BYTES = 64 << 20  # far above any config, meta or results file; a larger one is not one of them


def read_json(path: str | Path) -> Any:
    """A JSON file tinyk or a user wrote, read as UTF-8. Nesting deeper than the parser's recursion (a
    damaged or hostile config.json) is a ValueError like any other bad JSON, not a RecursionError; so
    are a FIFO or device in its place (reading would wait for ever, or fill the memory) and a file of
    more than 64 MiB."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise ValueError("not a regular file")
    if info.st_size > JSON_MAX_BYTES:
        raise ValueError(f"{info.st_size / 2**20:,.0f} MiB, more than any JSON file tinyk reads")
    text = Path(path).read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None
    except ValueError as e:
        if "integer string conversion" in str(e):  # Python's advice (sys.set_int_max_str_digits) is not the user's
            raise ValueError("it holds a number of thousands of digits") from None
        raise


def hash_files(paths: list[Path]) -> str:
    """A short content hash identifying a set of files (e.g. a tokenizer)."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]
