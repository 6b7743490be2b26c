"""Decode speed of tinyk's engine against Hugging Face `transformers.generate`, same model, same run.

A random-init `seed-82m` model directory (vocab 6144) is loaded by both; each does greedy
decoding of identical prompts of `--prompt-len` tokens for `--new-tokens` tokens (EOS ignored),
at each batch size and dtype. Runs are interleaved, taking turns going first, so background
load hits both alike.
`--dtype int8` runs tinyk with int8 weights (`--quantize int8`: bf16 compute, fp32 on a CPU without
bf16 instructions; `int8-bf16`: bf16 compute on any CPU, what int8 did everywhere before 2026-12-07) against HF in
fp32, the reference numerics and HF's fastest CPU setting here; "same tokens" then says
whether quantization changed any greedy token of the (random-init) model.

  time to first token (TTFT) = wall time of a 1-token generate (prefill + first token)
  decode tokens/s            = batch * (new_tokens - 1) / (T(new_tokens) - T(1))

Usage: .venv/bin/python bench/decode.py [--batch 1 8] [--dtype float32 bfloat16 int8 int8-bf16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _common import Parser, decode_rate, rotated, run_main
from tinyk.checkpoint import init_model_dir, is_model_dir
from tinyk.cli.common import int_range, positive_int
from tinyk.demo import machine_text
from tinyk.engine import Engine, SamplingParams
from tinyk.model import DTYPES
from tinyk.tokenizer import train_tokenizer


def synthetic_tokenizer(out: Path, vocab_size: int = 6144) -> Path:
    """A tokenizer with the seed's vocabulary size, trained on generated Chinese text (no download)."""
    if (out / "tokenizer.json").is_file():
        return out
    rng = random.Random(0)
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 2500)]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "bench_corpus.jsonl"
        with open(corpus, "w", encoding="utf-8") as f:
            for i in range(3000):
                text = "".join(rng.choice(chars[:200 + i % 2300]) for _ in range(200))
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        train_tokenizer([corpus], out, vocab_size=vocab_size, show_progress=False, force=True)
    return out


def model_dir(work: Path, tokenizer: Path | None) -> Path:
    """The benchmark's model, with random weights. The synthetic tokenizer's is reused across runs (if it
    holds that tokenizer); one for a named tokenizer is built anew each time, in a folder of its own, so
    that a later run without one never measures it."""
    if tokenizer is not None:
        out = work / "seed-82m-named-tokenizer"
        init_model_dir("seed-82m", tokenizer, out, seed=0, force=True)
        return out
    tok, out = synthetic_tokenizer(work / "tokenizer"), work / "seed-82m"
    if not (is_model_dir(out) and (out / "tokenizer.json").read_bytes() == (tok / "tokenizer.json").read_bytes()):
        init_model_dir("seed-82m", tok, out, seed=0, force=True)
    return out


def timed(fn, device: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def matmul_floor(model_dir: Path, batch: int, repeats: int = 20, windows: int = 5) -> float:
    """Tokens/s if a fp32 decode step were nothing but its matrix products (weights read once each).

    No fp32 implementation can beat this, so it bounds what a same-arithmetic engine can gain. The best
    of several timed windows: a ceiling taken in a moment the machine was busy would read low.
    """
    import torch.nn.functional as F

    from tinyk.checkpoint import load_model

    model, _ = load_model(model_dir)
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {w.shape[1]: torch.randn(batch, w.shape[1]) for w in weights}
    with torch.inference_mode():
        for _ in range(3):
            for w in weights:
                F.linear(xs[w.shape[1]], w)
        best = math.inf
        for _ in range(windows):
            t0 = time.perf_counter()
            for _ in range(repeats):
                for w in weights:
                    F.linear(xs[w.shape[1]], w)
            best = min(best, time.perf_counter() - t0)
    return batch * repeats / best


def measure(engine: Engine, hf, batch: int, args: argparse.Namespace) -> dict:
    """TTFT and decode speed of both implementations on the same random prompts, interleaved."""
    dev = engine.device
    ids = torch.randint(5, engine.vocab_size, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch))
    ids_dev = ids.to(dev)

    def tinyk(n: int):
        sp = SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=n, ignore_eos=True)
        return [c.token_ids for c in engine.generate(ids.tolist(), sp)]

    def transformers(n: int):
        with torch.inference_mode():
            out = hf.generate(ids_dev, attention_mask=torch.ones_like(ids_dev), do_sample=False, max_new_tokens=n,
                              min_new_tokens=n, pad_token_id=4, eos_token_id=4,
                              repetition_penalty=1.0)  # not generation_config.json's 1.1: tinyk runs none
        return out[:, args.prompt_len:].tolist()

    same = tinyk(args.new_tokens) == transformers(args.new_tokens)
    for fn in (tinyk, transformers):  # warm the prefill-only path too: a first, cold call is no measure of speed
        fn(1)
    impls = {"tinyk": tinyk, "transformers": transformers}
    times: dict[str, dict[str, list[float]]] = {name: {"first": [], "full": []} for name in impls}
    for r in range(args.repeats):
        for name in rotated(list(impls), r):
            fn = impls[name]
            times[name]["first"].append(timed(lambda fn=fn: fn(1), dev))
            times[name]["full"].append(timed(lambda fn=fn: fn(args.new_tokens), dev))
    dtype = str(engine.dtype).removeprefix("torch.")
    if engine.quantize == "int8":
        dtype = f"int8 ({dtype} compute)"
    row = {"device": dev.type, "dtype": dtype, "batch": batch, "same_tokens": same}
    for name, t in times.items():
        first, full = statistics.median(t["first"]), statistics.median(t["full"])
        row[f"{name}_ttft_ms"] = round(first * 1000, 1)
        row[f"{name}_decode_tok_s"] = round(decode_rate(batch * (args.new_tokens - 1), first, full,
                                                        "--new-tokens or --repeats"), 1)
    row["speedup"] = round(row["tinyk_decode_tok_s"] / row["transformers_decode_tok_s"], 2)
    return row


def main() -> None:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tinyk-bench-decode",
                    help="where the model directory is built (reused across runs)")
    ap.add_argument("--tokenizer", type=Path, help="a trained 6144-token tokenizer (default: a synthetic one)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=positive_int, nargs="+", default=[1, 8])
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16", "int8"],
                    choices=[*sorted(DTYPES), "int8", "int8-bf16"])
    ap.add_argument("--prompt-len", type=positive_int, default=64)
    ap.add_argument("--new-tokens", type=int_range(2), default=64, help="at least 2: the first is timed apart")
    ap.add_argument("--repeats", type=positive_int, default=3)
    ap.add_argument("--threads", type=positive_int, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    print(f"machine: {machine_text()}", flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    args.work.mkdir(parents=True, exist_ok=True)
    mdir = model_dir(args.work, args.tokenizer)
    results = []
    for dtype in args.dtype:
        int8 = dtype.startswith("int8")
        compute = {"int8": None, "int8-bf16": "bfloat16"}.get(dtype, dtype)
        engine = Engine.from_dir(mdir, device=args.device, dtype=compute, quantize="int8" if int8 else "none")
        hf_dtype = torch.float32 if int8 else DTYPES[dtype]
        hf = AutoModelForCausalLM.from_pretrained(mdir, dtype=hf_dtype).to(engine.device).eval()
        for batch in args.batch:
            results.append(measure(engine, hf, batch, args))
            print(json.dumps(results[-1]), flush=True)
        del engine, hf
    if args.device == "cpu":
        for batch in args.batch:
            print(f"fp32 matrix products alone, batch {batch}: {matmul_floor(mdir, batch):.1f} tokens/s (the ceiling "
                  "for any fp32 decode)")
    print(f"\nseed-82m on {args.device}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}\n")
    print("| dtype (int8: HF in fp32) | batch | tinyk tok/s | HF tok/s | speedup | tinyk TTFT ms | HF TTFT ms "
          "| same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['dtype']} | {r['batch']} | {r['tinyk_decode_tok_s']} | {r['transformers_decode_tok_s']} | "
              f"{r['speedup']}x | {r['tinyk_ttft_ms']} | {r['transformers_ttft_ms']} | {r['same_tokens']} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    run_main(main)
