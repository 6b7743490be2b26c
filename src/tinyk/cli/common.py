"""Argument helpers shared by the stage modules."""

from __future__ import annotations

import argparse

_UNITS = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(s: str) -> int:
    """'500M', '2G', '1e9' or a plain integer, as a byte or token count."""
    t = s.strip().lower().rstrip("b")
    try:
        if t and t[-1] in _UNITS:
            return int(float(t[:-1]) * _UNITS[t[-1]])
        return int(float(t))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {s!r} (e.g. 500M, 2G)") from None


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Sampling flags shared by generate, chat and eval; defaults avoid loops on small models."""
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy; higher = more random (default 0.7)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0 = off (default 50)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass; 1 = off (default 0.9)")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens below min_p x the top probability; 0 = off (default 0)")
    p.add_argument("--repetition-penalty", type=float, default=1.1,
                   help="penalise tokens already in the text; 1 = off (default 1.1)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="token budget per answer (default 256)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
