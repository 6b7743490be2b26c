"""Numbers as people write them (500M, 3.5 MB, 1,234 documents), the limits on those a user gives, and the
aligned tables the commands print them in."""

from __future__ import annotations

import decimal
import unicodedata
from collections.abc import Iterable

MAX_BATCH = 65536  # sequences per step: far more than fits anywhere, far less than exhausts memory
# Tokens per pretraining shard, at least: fewer is a file every few documents (or `--shard-tokens 100` meant
# as 100M), and training holds every shard open at once.
MIN_SHARD_TOKENS = 1000

MiB = 2**20
GiB = 2**30

MAX_SIZE = 10**18  # beyond this, counts overflow the 64-bit integers of the libraries underneath
_UNITS = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY_UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # 16MiB, as --max-line-bytes' help says


def is_int(x: object) -> bool:
    """An int, not a bool (which Python counts as one): for values read from JSON, YAML or a request."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: object) -> bool:
    """An int or a float, not a bool (NaN and infinities included: the caller's range says)."""
    return isinstance(x, int | float) and not isinstance(x, bool)


def size_text(n: int) -> str:
    """A count as a person writes it: 1G, 500M, 1e18."""
    for unit, scale in (("T", 10**12), ("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= scale and n % scale == 0 and n // scale < 1000:
            return f"{n // scale}{unit}"
    return f"{n:.0e}".replace("e+", "e") if n >= 10**15 else str(n)


def bytes_text(n: float) -> str:
    """An amount of bytes or memory to read at a glance: 512 bytes, 14.2 kB, 3.5 MB, 180 MB, 1.5 GB.
    Each unit ends where its rounded figure would reach the next one's (999,950 is 1.0 MB, not 1000.0 kB)."""
    if n < 1e3:
        return plural(int(n), "bytes")
    if n < 999_950:
        return f"{n / 1e3:.1f} kB"
    if n < 99_950_000:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e6:.0f} MB" if n < 999_500_000 else f"{n / 1e9:,.1f} GB"


def parse_size(s: str, lo: int = 0, hi: int = MAX_SIZE, *, tokens: bool = False) -> int:
    """'500M', '2G', '16MiB', '1e9' or a plain number as an integer in lo..hi; ValueError says what is allowed.

    A trailing B is bytes (500MB = 500M) unless `tokens`: a token count's B is billion ("10B tokens",
    as `tinyk plan` prints them), so a flag and a config key read 10B alike."""
    t = s.strip().lower()
    if t[-3:] in _BINARY_UNITS:
        t, scale = t[:-3], _BINARY_UNITS[t[-3:]]
    elif tokens and t.endswith("b") and t[:-1] and t[-2] not in _UNITS:
        t, scale = t[:-1], 10**9
    else:
        t, scale = t.removesuffix("b"), 1  # one B: "10bb" is no size
    if scale == 1 and t and t[-1] in _UNITS:
        t, scale = t[:-1], _UNITS[t[-1]]
    out_of_range = ValueError(f"must be a size from {size_text(lo)} to {size_text(hi)}, got {s!r}")
    try:
        value = decimal.Decimal(t) * scale  # exact: as a float, 2.01M was 2,009,999
    except decimal.InvalidOperation:
        raise ValueError(f"not a size: {s!r} (e.g. 500M, 2G)") from None
    except decimal.Overflow:  # past the exponents decimal computes with (1e999999999)
        raise out_of_range from None
    # Compared before rounding: round(1e300000) writes out all its digits first (seconds).
    if not (value.is_finite() and lo - 1 < value < hi + 1 and lo <= (n := round(value)) <= hi):
        raise out_of_range
    return n


def plural(n: int, noun: str) -> str:
    """'1,234 documents', and '1 document' (`noun` is a plural ending in s)."""
    return f"{n:,} {noun[:-1] if n == 1 else noun}"


def minutes_text(minutes: float) -> str:
    """A number of minutes as a person writes it: 6.23 (not the demo's share of its budget, 6.22829), 20, 1,440."""
    return f"{minutes:.3g}" if minutes < 100 else f"{minutes:,.0f}"


def flops_text(flops_per_s: float) -> str:
    """A FLOP rate to read: 2,250 TFLOP/s, 1.40 TFLOP/s, 156 GFLOP/s, 1.3 GFLOP/s (a CPU's emulated bf16,
    which read 0.00 TFLOP/s). Each unit ends where its rounded figure would reach the next one's."""
    if flops_per_s >= 999.5e9:
        t = flops_per_s / 1e12
        return f"{t:,.0f} TFLOP/s" if t >= 99.995 else f"{t:.2f} TFLOP/s"
    g = flops_per_s / 1e9
    return f"{g:,.0f} GFLOP/s" if g >= 99.95 else f"{g:.3g} GFLOP/s"


def display_width(s: str) -> int:
    """Columns a terminal gives `s`: CJK characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in s)


def format_table(rows: Iterable[tuple[str, ...]], header: tuple[str, ...] = ("metric", "score", "baseline")) -> str:
    """Aligned columns: the first left, the scores right, the last (baseline, left) only where it has text,
    and its heading only where some row has one (data metrics alone have none). Widths are display
    columns: a Chinese path or answer takes two a character."""
    rows = list(rows)
    rows = [header if any(r[-1] for r in rows) else (*header[:-1], ""), *rows]
    widths = [max(display_width(r[i]) for r in rows) for i in range(len(header) - 1)]

    def pad(v: str, w: int) -> str:
        return " " * (w - display_width(v))

    lines = [r[0] + pad(r[0], widths[0])
             + "".join("  " + pad(v, w) + v for v, w in zip(r[1:-1], widths[1:], strict=True))
             + ("  " + r[-1] if r[-1] else "") for r in rows]
    lines.insert(1, "-" * max(display_width(line) for line in lines))
    return "\n".join(lines)
