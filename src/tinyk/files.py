"""Reading user corpora safely and writing outputs atomically.

Every stage of tinyk reads the same kinds of input (JSONL, TXT, Parquet, compressed
JSONL) and writes directories that must be complete or absent, so both live here.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO


class TinykError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits non-zero."""


DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024
SUPPORTED_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet", ".jsonl.gz", ".jsonl.zst", ".txt.gz", ".txt.zst")


@dataclass
class Skips:
    """Counts skipped input records by reason and remembers where the first few were."""

    strict: bool = False
    keep_first: int = 5
    counts: Counter = field(default_factory=Counter)
    first: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        if self.strict:
            raise TinykError(f"{where}: {reason.replace('_', ' ')} (--strict)")
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
        parts = [f"{reason.replace('_', ' ')}: {n} (first at {', '.join(self.first[reason])})"
                 for reason, n in sorted(self.counts.items())]
        return f"skipped {self.total} records; " + "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"total": self.total, "by_reason": dict(self.counts), "first": self.first}


def check_inputs(paths: list[str | Path]) -> list[Path]:
    """Fail early, with one line, on inputs that are missing, unreadable or of an unknown type."""
    if not paths:
        raise TinykError("no input files given")
    out = []
    for p in map(Path, paths):
        if not p.exists():
            raise TinykError(f"input file not found: {p}")
        if not p.is_file():
            raise TinykError(f"input is not a file: {p}")
        if not os.access(p, os.R_OK):
            raise TinykError(f"input file is not readable: {p}")
        if not p.name.endswith(SUPPORTED_SUFFIXES):
            raise TinykError(f"unsupported input type: {p} (use {', '.join(SUPPORTED_SUFFIXES)})")
        out.append(p)
    return out


def marker_file(directory: str | Path, name: str, what: str) -> Path:
    """`directory/name`, the file that makes `directory` a `what` directory, or one line on what is wrong."""
    d = Path(directory)
    if not d.is_dir():
        raise TinykError(f"{what} directory not found: {d}")
    if not (d / name).is_file():
        raise TinykError(f"not a {what} directory (no {name}): {d}")
    return d / name


def _open_binary(path: Path) -> BinaryIO:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError as e:
            raise TinykError("reading .zst files needs the 'zstandard' package (pip install zstandard)") from e
        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))  # type: ignore[arg-type]
    return open(path, "rb")


class _Counting:
    """Wraps a binary stream to count the (uncompressed) bytes consumed."""

    def __init__(self, f: BinaryIO):
        self.f, self.n = f, 0

    def readline(self, limit: int) -> bytes:
        line = self.f.readline(limit)
        self.n += len(line)
        return line


def iter_lines(path: Path, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | None, int]]:
    """Yields (line number, line bytes or None if over the limit, bytes read so far).

    A line longer than `max_line_bytes` is consumed in bounded chunks and never held whole.
    """
    with _open_binary(path) as raw:
        f = _Counting(raw)
        lineno = 0
        while True:
            line = f.readline(max_line_bytes + 1)
            if not line:
                return
            lineno += 1
            if len(line) > max_line_bytes and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):
                    line = f.readline(1 << 20)
                yield lineno, None, f.n
                continue
            yield lineno, line, f.n


def iter_records(paths: list[Path], skips: Skips, *, max_bytes: int | None = None,
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, text_field: str = "text") -> Iterator[tuple[str, Any]]:
    """Yields (where, record) from every input in order, skipping and counting bad lines.

    JSON inputs yield the parsed object; `.txt` lines yield {text_field: line}; Parquet rows
    yield a dict. Stops once `max_bytes` of input have been consumed.
    """
    consumed = 0
    for path in paths:
        name = path.name
        if name.endswith(".parquet"):
            for where, rec, n in _iter_parquet(path):
                if max_bytes is not None and consumed + n > max_bytes:
                    return
                consumed += n
                yield where, rec
            continue
        is_txt = ".txt" in name
        base = consumed
        for lineno, line, read in iter_lines(path, max_line_bytes):
            if max_bytes is not None and base + read > max_bytes:
                return
            consumed = base + read
            where = f"{path.name}:{lineno}"
            if line is None:
                skips.add("line_too_long", where)
                continue
            try:
                s = line.decode("utf-8")
            except UnicodeDecodeError:
                skips.add("invalid_utf8", where)
                continue
            s = s.rstrip("\r\n")
            if is_txt:
                yield where, {text_field: s}
                continue
            if not s.strip():
                continue
            try:
                yield where, json.loads(s)
            except json.JSONDecodeError:
                skips.add("malformed_json", where)


def _iter_parquet(path: Path) -> Iterator[tuple[str, dict, int]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise TinykError("reading .parquet files needs the 'pyarrow' package (pip install pyarrow)") from e
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise TinykError(f"cannot read parquet file {path}: {e}") from e
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        size = max(1, batch.nbytes // max(1, batch.num_rows))
        for rec in batch.to_pylist():
            row += 1
            yield f"{path.name}:row {row}", rec, size


def iter_texts(paths: list[Path], skips: Skips, *, field_name: str = "text", **kw: Any) -> Iterator[str]:
    """Yields the text of each document, skipping records without a usable text field."""
    for where, rec in iter_records(paths, skips, text_field=field_name, **kw):
        if not isinstance(rec, dict) or field_name not in rec:
            skips.add("missing_field", where)
            continue
        text = rec[field_name]
        if not isinstance(text, str):
            skips.add("not_string", where)
            continue
        if not text.strip():
            skips.add("empty", where)
            continue
        yield text


def check_output(out: str | Path, inputs: Iterable[str | Path | None], flag: str = "--out") -> None:
    """Refuses an output path that is an input, holds one, or lies inside an input directory:
    writing there (or --force replacing it) would destroy or change what the output is made from."""
    o = Path(out).resolve()
    for i in inputs:
        if i is None:
            continue
        p = Path(i).resolve()
        if o == p or o in p.parents:
            raise TinykError(f"{flag} {out} would replace the input {i}; choose another output path")
        if p in o.parents:
            raise TinykError(f"{flag} {out} lies inside the input {i}; inputs are never written to")


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False, inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """Yields a temporary sibling of `out` to fill; renames it into place only on success.

    An existing `out` is refused unless `force`, and is replaced only once the new one is complete;
    `out` may not overlap any of `inputs`.
    """
    out = Path(out)
    check_output(out, inputs)
    if out.exists() and not force:
        raise TinykError(f"output directory exists: {out} (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _share_like_umask(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Writes JSON through a temporary sibling so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def hash_files(paths: list[Path]) -> str:
    """A short content hash identifying a set of files (e.g. a tokenizer)."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]
