"""Training throughput on this CPU: tinyk's trainer step vs a plain PyTorch loop over HF LlamaForCausalLM.

Both sides get the same shape, weights, batches and dtype. The tinyk side is `Trainer.train_step`
(the step `tinyk pretrain` runs: loss over the global batch, clipping, AdamW), eager and with
`--compile`; the HF side is the loop most people write (`model(input_ids, labels).loss.backward()`,
clip, `torch.optim.AdamW`). Trials are interleaved and repeated because the machine may be shared;
the table reports the median and best tokens/s of each, and MFU against the rate of a large matmul in
the same dtype measured in the same run.

    python bench/train_cpu.py                      # tiny preset, batch 8 x its context (256), fp32, eager + compiled
    python bench/train_cpu.py --dtype bf16 --no-compile --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from _common import Parser, rotated, run_main
from tinyk.checkpoint import hf_config
from tinyk.cli.common import positive_int
from tinyk.config import COMPILE_MODES, TrainConfig
from tinyk.data import prepare_pretrain
from tinyk.demo import machine_text
from tinyk.loader import PretrainLoader
from tinyk.model import PRESETS
from tinyk.monitor import measure_matmul_flops
from tinyk.tokenizer import train_tokenizer
from tinyk.train import Trainer

TEXT = ("我们今天去公园散步，天气很好！你喜欢吃苹果吗？这本书非常有意思：作者写得很好。中国的首都是北京。"
        "The quick brown fox jumps over the lazy dog. 1+1=2; (x, y) -> z. ")


def make_data(root: Path) -> tuple[Path, Path]:
    """A small tokenizer and pretraining set; the model's vocab is set separately, so its size is the preset's."""
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": TEXT[i % 50:] + TEXT[:i % 50] + f"第{i}号。"}, ensure_ascii=False)
                              + "\n" for i in range(2000)))
    train_tokenizer([corpus], root / "tok", vocab_size=512, show_progress=False)
    prepare_pretrain([corpus], root / "tok", root / "data", val_fraction=0.01, workers=1, show_progress=False)
    return root / "tok", root / "data"


def tinyk_step(args: argparse.Namespace, root: Path, tok: Path, data: Path, compile_: bool):
    cfg = TrainConfig(data=str(data), tokenizer=str(tok), out=str(root / f"run-{compile_}"),
                      model={"preset": args.preset, "vocab_size": args.vocab}, seq_len=args.seq_len,
                      batch_size=args.batch, dtype=args.dtype, compile=compile_, compile_mode=args.compile_mode,
                      max_steps=10**6, warmup_steps=0,
                      device="cpu", progress=False)
    trainer = Trainer(cfg)

    def step() -> None:
        trainer.train_step(*trainer.next_batches())

    return trainer, step


def hf_step(args: argparse.Namespace, trainer: Trainer, data: Path):
    """The plain loop, starting from the very same weights and batch stream."""
    hc = {k: v for k, v in hf_config(trainer.mcfg).items() if k != "tinyk"}
    model = LlamaForCausalLM(LlamaConfig(**hc, attn_implementation="sdpa"))
    model.load_state_dict(trainer.model.state_dict())
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=trainer.cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    loader = PretrainLoader(data, "train", args.seq_len, args.batch, seed=trainer.cfg.seed)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with amp:
            # y is already shifted (targets), so it goes in as shift_labels: the same mean CE as tinyk.
            return model(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss

    def step() -> None:
        x, y = loader.next_batch()
        loss(x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, loss, step


def main() -> None:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=list(PRESETS))
    ap.add_argument("--vocab", type=positive_int, default=None, help="vocab size (default: the preset's)")
    ap.add_argument("--batch", type=positive_int, default=8)
    ap.add_argument("--seq-len", type=positive_int, default=None,
                    help="sequence length (default: the preset's context)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--steps", type=positive_int, default=3, help="timed steps per trial")
    ap.add_argument("--repeats", type=positive_int, default=5, help="interleaved trials per implementation")
    ap.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                    help="torch.compile mode for the compiled variant")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    print(f"machine: {machine_text()}", flush=True)
    preset = PRESETS[args.preset]
    args.vocab = args.vocab or preset["vocab_size"]
    args.seq_len = args.seq_len or preset["max_seq_len"]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        tok, data = make_data(root)
        trainer, tk_eager = tinyk_step(args, root, tok, data, False)
        hf_model, hf_loss, hf = hf_step(args, trainer, data)
        x, y = PretrainLoader(data, "train", args.seq_len, args.batch, seed=0).next_batch()
        with torch.no_grad(), trainer._autocast():
            ours = trainer.step_module(x, y).item() / y.numel()
            theirs = hf_loss(x, y).item()
        steps = {"hf-eager": hf, "tinyk-eager": tk_eager}
        compile_s = None
        if not args.no_compile:
            _, tk_compiled = tinyk_step(args, root, tok, data, True)
            t = time.perf_counter()
            tk_compiled()
            tk_compiled()
            compile_s = time.perf_counter() - t
            steps["tinyk-compiled"] = tk_compiled
        for fn in steps.values():
            fn()
        rates: dict[str, list[float]] = {k: [] for k in steps}
        mm_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        peaks = [measure_matmul_flops(0.3, dtype=mm_dtype)]
        names = list(steps)
        for r in range(args.repeats):
            for name in rotated(names, r):
                t = time.perf_counter()
                for _ in range(args.steps):
                    steps[name]()
                rates[name].append(args.batch * args.seq_len * args.steps / (time.perf_counter() - t))
        peaks.append(measure_matmul_flops(0.3, dtype=mm_dtype))
        peak = max(peaks)
        fpt = trainer.flops_per_token
        base = statistics.median(rates["hf-eager"])
        rows = []
        for name, rs in rates.items():
            med = statistics.median(rs)
            rows.append({"impl": name, "median_tokens_per_s": round(med, 1), "best_tokens_per_s": round(max(rs), 1),
                         "mfu_median": round(med * fpt / peak, 4), "speedup_vs_hf": round(med / base, 3)})
        result = {"preset": args.preset, "batch": args.batch, "compile_mode": args.compile_mode,
                  "seq_len": args.seq_len, "dtype": args.dtype,
                  "threads": torch.get_num_threads(), "flops_per_token": fpt,
                  "measured_peak_gflops": round(peak / 1e9, 1), "compile_s": round(compile_s, 1) if compile_s else None,
                  "initial_loss": {"tinyk": ours, "hf": theirs, "abs_diff": abs(ours - theirs)}, "rows": rows}
    print(f"\n{args.preset}, batch {args.batch} x {args.seq_len}, {args.dtype}, {result['threads']} threads; "
          f"FLOPs/token {fpt:.4g}; MFU vs measured {args.dtype} matmul peak {peak / 1e9:.1f} GFLOP/s; "
          f"{args.repeats} interleaved trials of {args.steps} steps; compile mode {args.compile_mode}"
          + (f"; compile took {compile_s:.0f}s" if compile_s else ""))
    print(f"initial loss on the same batch and weights: tinyk {ours:.6f}, HF {theirs:.6f}")
    print("\n| implementation | tokens/s (median) | tokens/s (best) | MFU | vs HF |\n|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['impl']} | {row['median_tokens_per_s']:,.0f} | {row['best_tokens_per_s']:,.0f} | "
              f"{row['mfu_median']:.1%} | {row['speedup_vs_hf']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    run_main(main)
