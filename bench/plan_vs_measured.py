"""`tinyk plan`'s memory estimate against what a training step really allocates, on CPU.

For each setting, one steady-state optimizer step of the trainer (LossSum, AdamW from
`make_optimizer`, clipping, zero_grad) runs under the CPU memory profiler; its peak
allocation (parameters and optimizer state included) is printed beside the estimate of
`tinyk.plan.estimate_memory` for the same setting, with the phase the estimate puts the peak in.

  .venv/bin/python bench/plan_vs_measured.py                 # seed-215m, fp32, micro-batch 2, seq 512
  .venv/bin/python bench/plan_vs_measured.py --all           # also checkpointing and bf16 autocast
  .venv/bin/python bench/plan_vs_measured.py --preset tiny --micro-batch 4 --seq-len 256 --all
  .venv/bin/torchrun --nproc-per-node 2 bench/plan_vs_measured.py --parallel fsdp --all   # a job's step, gloo
  .venv/bin/torchrun --nproc-per-node 2 bench/plan_vs_measured.py --parallel ddp --all --no-bf16   # fp32 only

seed-215m needs about 5 GB of RAM and a minute or two per row on two cores. Under torchrun each
process measures its own step (DDP's gradient buckets, FSDP's shards and unsharded blocks in flight);
the table shows the largest of them beside the plan's memory per GPU for that many GPUs.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from dataclasses import replace

import torch.distributed as dist

from _common import Parser, run_main
from tinyk.cli.common import positive_int
from tinyk.demo import machine_text
from tinyk.model import PRESETS, preset_config
from tinyk.plan import Setup, estimate_memory, measure_step_memory
from tinyk.units import MiB


def compare(s: Setup) -> dict:
    """Estimated and measured peak for one setting (CPU AdamW is not fused, so neither is the estimate)."""
    s = replace(s, fused_adamw=False)
    t0 = time.perf_counter()
    measured = measure_step_memory(s)
    if s.world_size > 1:  # the plan is per GPU: the process that needs the most
        measured = max(_gathered(measured), key=lambda m: m["peak"])
    est = estimate_memory(s)
    return {"micro_batch": s.micro_batch, "seq_len": s.seq_len, "dtype": "bf16 autocast" if s.amp else "fp32",
            "checkpointing": s.checkpointing, "grad_accum": s.grad_accum,
            "parallel": s.parallel if s.world_size > 1 else "none", "processes": s.world_size,
            "measured_mib": measured["peak"] / MiB, "static_mib": measured["static"] / MiB,
            "estimated_mib": est.peak / MiB, "phase": est.phase, "error": est.peak / measured["peak"] - 1,
            "seconds": time.perf_counter() - t0}


def _gathered(obj: dict) -> list[dict]:
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="seed-215m", choices=list(PRESETS))
    ap.add_argument("--micro-batch", type=positive_int, default=2)
    ap.add_argument("--seq-len", type=positive_int, default=512)
    ap.add_argument("--grad-accum", type=positive_int, default=1)
    ap.add_argument("--all", action="store_true", help="also activation checkpointing and bf16 autocast")
    ap.add_argument("--no-bf16", action="store_true",
                    help="with --all, leave bf16 autocast out: a job's own terms (DDP buckets, FSDP shards) do not "
                         "depend on it, and bf16 matmuls take 20x fp32's time on a CPU without native bf16")
    ap.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp", help="under torchrun: how the job trains")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    talk = int(os.environ.get("RANK", "0")) == 0
    cfg = preset_config(args.preset)
    amps = (False,) if args.no_bf16 else (False, True)
    combos = list(itertools.product(amps, (False, True))) if args.all else [(False, False)]
    job = f", {args.parallel.upper()} over {world} processes (the largest one's)" if world > 1 else ""
    if talk:
        print(f"machine: {machine_text()}")
        print(f"{args.preset} on CPU{job}: one optimizer step, peak bytes allocated (parameters and AdamW state "
              f"included)")
        print(f"{'dtype':<14}{'ckpt':<6}{'micro':>6}{'seq':>6}{'measured MiB':>14}{'plan MiB':>10}{'error':>8}  "
              f"plan's peak phase")
    rows = []
    for amp, ckpt in combos:
        s = Setup(cfg, args.seq_len, args.micro_batch, amp=amp, checkpointing=ckpt, grad_accum=args.grad_accum,
                  parallel=args.parallel, world_size=world)
        r = compare(s)
        rows.append(r)
        if talk:
            print(f"{r['dtype']:<14}{'on' if ckpt else 'off':<6}{r['micro_batch']:>6}{r['seq_len']:>6}"
                  f"{r['measured_mib']:>14,.1f}{r['estimated_mib']:>10,.1f}{r['error']:>+8.1%}  {r['phase']}",
                  flush=True)
    if args.json and talk:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"preset": args.preset, "rows": rows}, f, indent=2)
    code = 0 if all(abs(r["error"]) <= 0.15 for r in rows) else 1
    if world > 1:  # tearing gloo down at exit can abort ("terminate called"), as the trainer's own refusals saw
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    run_main(main)
