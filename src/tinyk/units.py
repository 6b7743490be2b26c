"""Numbers as people write them (500M, 3.5 MB, 1,234 documents), and the limits on those a user gives."""

from __future__ import annotations

import decimal
import unicodedata

MAX_BATCH = 65536  # sequences per step: far more than fits anywhere, far less than exhausts memory
# Tokens per pretraining shard, at least: fewer is a file every few documents (or `--shard-tokens 100` meant
# as 100M), and training holds every shard open at once.
MIN_SHARD_TOKENS = 1000

MiB = 2**20
GiB = 2**30

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
        value = decimal.Decimal(t) * scale  # exact: as a float, 2.01M was 2,009,999
    except decimal.InvalidOperation:
        raise ValueError(f"not a size: {s!r} (e.g. 500M, 2G)") from None
    if not (value.is_finite() and lo <= (n := round(value)) <= hi):
        raise ValueError(f"must be a size from {size_text(lo)} to {size_text(hi)}, got {s!r}")
    return n


def plural(n: int, noun: str) -> str:
    """'1,234 documents', and '1 document' (`noun` is a plural ending in s)."""
    return f"{n:,} {noun[:-1] if n == 1 else noun}"


def display_width(s: str) -> int:
    """Columns a terminal gives `s`: CJK characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in s)
