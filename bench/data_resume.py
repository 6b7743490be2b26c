"""What stopping `tinyk data pretrain` half-way costs, when the same command continues it.

    .venv/bin/python bench/data_resume.py --size 400M

Generates a corpus as data_throughput.py does and trains (or reuses) a 6144-token tokenizer,
in a folder of its own in --workdir (deleted at the end), then in one run:
  1. `tinyk data pretrain` uninterrupted, timed;
  2. the same into another output, stopped with SIGTERM (as `kill` or a batch system stops
     it; Ctrl-C is the same to tinyk) at --stop-at of run 1's time;
  3. that command again, which continues the stopped run from its last checkpoint;
and checks that the continued output equals run 1's file by file (meta.json but for its command
and seconds). Prints the times, and how long run 3 took to read past the documents done.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Parser, bench_tokenizer, data_pretrain, run_main
from data_throughput import make_corpus, sentence_pool
from tinyk.cli.common import float_range, positive_int, size_range
from tinyk.data import CHECKPOINT_S
from tinyk.demo import machine_text
from tinyk.errors import TinykError


def files(d: Path) -> dict[str, bytes]:
    out = {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}
    meta = json.loads(out.pop("meta.json"))
    del meta["command"], meta["seconds"]
    out["meta.json"] = json.dumps(meta, sort_keys=True).encode()
    return out


def main() -> None:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=size_range(1), default="400M",
                   help=f"corpus size (default 400M; preparing it must take well over {CHECKPOINT_S:.0f} s, as "
                        f"progress is saved that often)")
    p.add_argument("--stop-at", type=float_range(0, 1, lo_open=True, hi_open=True), default=0.8,
                   help="share of the uninterrupted run's time to stop at")
    p.add_argument("--workers", type=positive_int, default=os.cpu_count())
    p.add_argument("--workdir", default="/tmp/tinyk-bench-resume",
                   help="where a folder of the run's own is made (a tokenizer-6144 found here is reused)")
    args = p.parse_args()
    print(f"machine: {machine_text()}", flush=True)
    work = Path(args.workdir)
    made_work = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="tinyk-bench-resume-", dir=work))
    corpus, whole_out, out = run_dir / "corpus.jsonl", run_dir / "whole", run_dir / "out"
    tok_dir = work / "tokenizer-6144"
    if not (tok_dir / "tokenizer.json").exists():
        tok_dir = run_dir / "tokenizer-6144"
    try:
        pool, source = sentence_pool()
        make_corpus(corpus, args.size, pool)
        bench_tokenizer(corpus, tok_dir)
        mb = corpus.stat().st_size / 1e6
        print(f"corpus: {mb:,.0f} MB of {source}; {args.workers} workers on {os.cpu_count()} cores", flush=True)
        whole, _, _, _ = data_pretrain(corpus, tok_dir, whole_out, args.workers)
        splits = json.loads((whole_out / "meta.json").read_text())["splits"].values()
        print(f"uninterrupted: {whole:.1f}s, {sum(s['documents'] for s in splits):,} documents", flush=True)
        stop_after = args.stop_at * whole
        stopped, code, _, err = data_pretrain(corpus, tok_dir, out, args.workers, stop_after=stop_after)
        if code == 0:
            raise TinykError(f"the run to stop finished in {stopped:.1f} s, before the stop at {stop_after:.1f} s "
                             f"(the machine's load varies): nothing to continue; lower --stop-at or raise --size")
        kept = re.search(r"the ([\d,]+) documents? done are kept", err)
        if not kept:
            why = (f"it was stopped after {stopped:.0f} s, and progress is saved every {CHECKPOINT_S:.0f} s: raise "
                   f"--size or --stop-at" if stopped < CHECKPOINT_S + 15 else (err.strip().splitlines() or ["?"])[-1])
            raise TinykError(f"the stopped run kept nothing to continue: {why}")
        print(f"stopped with SIGTERM after {stopped:.1f}s, {kept[1]} documents kept", flush=True)
        continued, _, _, err = data_pretrain(corpus, tok_dir, out, args.workers)
        skip = re.search(r"read past them in (\d+)s", err)
        same = files(out) == files(whole_out)
        print(f"continued: {continued:.1f}s (reading past the kept documents: {skip[1] if skip else '?'}s); "
              f"output identical to the uninterrupted run: {same}", flush=True)
        total = stopped + continued
        print(f"\n| corpus | uninterrupted | stopped at | continued | stopped + continued | extra | identical |\n"
              f"|---|---|---|---|---|---|---|\n"
              f"| {mb:,.0f} MB | {whole:.1f} s | {stopped:.1f} s | {continued:.1f} s | {total:.1f} s | "
              f"{total / whole - 1:+.0%} | {'yes' if same else 'NO'} |")
        if not same:
            raise SystemExit(1)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        if made_work:
            with contextlib.suppress(OSError):  # not empty: something else was put there meanwhile
                work.rmdir()


if __name__ == "__main__":
    run_main(main)
