"""What stopping `tinyk data pretrain` half-way costs, when the same command continues it.

    .venv/bin/python bench/data_resume.py --size 400M

Generates a corpus as data_throughput.py does and trains (or reuses) a 6144-token tokenizer,
then in one run:
  1. `tinyk data pretrain` uninterrupted, timed;
  2. the same into another output, stopped with SIGTERM (as `kill` or a batch system stops
     it; Ctrl-C is the same to tinyk) at --stop-at of run 1's time;
  3. that command again, which continues the stopped run from its last checkpoint;
and checks that the continued output equals run 1's file by file (meta.json but for its command
and seconds). Prints the times, and how long run 3 took to read past the documents done.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_throughput import ROOT, make_corpus, sentence_pool
from tinyk.data import CHECKPOINT_S
from tinyk.demo import machine_text
from tinyk.units import parse_size


def run(corpus: Path, tok_dir: Path, out: Path, workers: int, stop_after: float | None = None) -> tuple[float, str]:
    """Wall seconds and stderr of one `tinyk data pretrain`, sent SIGTERM after `stop_after` seconds (SIGINT
    is ignored by a program started in the background by a shell)."""
    cmd = [sys.executable, "-m", "tinyk", "data", "pretrain", "--input", str(corpus), "--tokenizer", str(tok_dir),
           "--out", str(out), "--workers", str(workers)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=stop_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate()
    seconds = time.perf_counter() - t0
    if proc.returncode not in (0, 143):
        raise SystemExit(f"tinyk data pretrain failed ({proc.returncode}): {err}")
    return seconds, err


def files(d: Path) -> dict[str, bytes]:
    out = {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}
    meta = json.loads(out.pop("meta.json"))
    del meta["command"], meta["seconds"]
    out["meta.json"] = json.dumps(meta, sort_keys=True).encode()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=parse_size("400M"),
                   help=f"corpus size (default 400M; preparing it must take well over {CHECKPOINT_S:.0f} s, as "
                        f"progress is saved that often)")
    p.add_argument("--stop-at", type=float, default=0.8, help="share of the uninterrupted run's time to stop at")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--workdir", default="/tmp/tinyk-bench-resume")
    args = p.parse_args()
    print(f"machine: {machine_text()}", flush=True)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    corpus, tok_dir = work / "corpus.jsonl", work / "tokenizer-6144"
    made = [corpus, work / "whole", work / "out", work / ".out.partial"]
    if not (tok_dir / "tokenizer.json").exists():
        made.append(tok_dir)  # a tokenizer found there is reused and kept
    try:
        pool, source = sentence_pool()
        make_corpus(corpus, args.size, pool)
        if not (tok_dir / "tokenizer.json").exists():
            from tinyk.tokenizer import train_tokenizer

            train_tokenizer([corpus], tok_dir, vocab_size=6144, max_bytes=20_000_000, show_progress=False)
        mb = corpus.stat().st_size / 1e6
        print(f"corpus: {mb:,.0f} MB of {source}; {args.workers} workers on {os.cpu_count()} cores", flush=True)
        whole, _ = run(corpus, tok_dir, work / "whole", args.workers)
        splits = json.loads((work / "whole" / "meta.json").read_text())["splits"].values()
        print(f"uninterrupted: {whole:.1f}s, {sum(s['documents'] for s in splits):,} documents", flush=True)
        stopped, err = run(corpus, tok_dir, work / "out", args.workers, stop_after=args.stop_at * whole)
        kept = re.search(r"the ([\d,]+) documents? done are kept", err)
        if not kept:
            why = (f"it was stopped after {stopped:.0f} s, and progress is saved every {CHECKPOINT_S:.0f} s: raise "
                   f"--size" if stopped < CHECKPOINT_S + 15 else err.strip())
            raise SystemExit(f"the stopped run kept nothing to continue: {why}")
        print(f"stopped with SIGTERM after {stopped:.1f}s, {kept[1]} documents kept", flush=True)
        continued, err = run(corpus, tok_dir, work / "out", args.workers)
        skip = re.search(r"read past them in (\d+)s", err)
        same = files(work / "out") == files(work / "whole")
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
        for path in made:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if not any(work.iterdir()):
            work.rmdir()


if __name__ == "__main__":
    main()
