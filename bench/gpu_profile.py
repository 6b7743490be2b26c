"""Where a pretraining step's time goes: the trainer's own step under torch.profiler, plus the parts alone.

bench/gpu.sh says how fast a configuration is; this says why. It builds one `Trainer` in this
process (seed-215m, seq 512, bf16 (fp16 on a V100/T4), compiled, micro-batch 64 unless told
otherwise), runs its real `train_step` (data loader, autocast, clipping, fused AdamW), and prints:

  1. the step's wall time, tokens/s and MFU, timed over steps after compilation (on a CPU, MFU is
     against a matmul timed before and after them, the faster counting, and none is shown where the
     step outran even that: the timing was then no peak);
  2. GPU kernel time by category (matmul, attention, fused elementwise, optimizer, ...) and the
     share of the wall time the GPU was busy (well under 100% means the host is the bottleneck);
  3. the top kernels by time;
  4. on CUDA, the parts alone at the step's shapes: each SDPA backend forward+backward with the
     model's grouped KV heads, and the attention/MLP projections as separate vs concatenated matmuls.

  PYTHONPATH=src python3 bench/gpu_profile.py            # one NVIDIA GPU, about two minutes
  PYTHONPATH=src python3 bench/gpu_profile.py --cpu-smoke  # the same path on CPU, tiny preset

Results go to --out (default $OUT, else a temporary directory): gpu_profile.md and gpu_profile.json.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from _common import Parser, run_main  # noqa: E402
from gpu_bench import prepare_data  # noqa: E402
from tinyk.cli.common import positive_int  # noqa: E402
from tinyk.config import COMPILE_MODES, TrainConfig  # noqa: E402
from tinyk.model import PRESETS, ModelConfig, short_dtype_name  # noqa: E402
from tinyk.monitor import measure_matmul_flops  # noqa: E402
from tinyk.train import Trainer  # noqa: E402

# First match wins; CUDA kernel names and, on CPU, aten op names.
CATEGORIES = [
    ("attention", re.compile(r"flash|fmha|attention|cudnn|sdpa", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach|_amp_", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|xmma|cutlass|cublas|aten::(mm|addmm|bmm|matmul|linear)\b", re.I)),
    ("cross-entropy", re.compile(r"nll|log_softmax|cross_entropy", re.I)),
    ("fused elementwise (triton)", re.compile(r"^triton_", re.I)),
    ("copies and casts", re.compile(r"copy|memcpy|memset|cast|fill|to_copy|cat", re.I)),
]


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "other"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(tr: Trainer) -> None:
    tr.train_step(*tr.next_batches())


def time_steps(tr: Trainer, warmup: int, steps: int) -> dict:
    """The step's time, rate and MFU. A GPU's peak is its table figure; a CPU's is a matmul the trainer timed
    as it started, timed again here after the steps, the faster of the two counting (other work only ever
    slows a timing down)."""
    t0 = time.perf_counter()
    _step(tr)
    _sync(tr.device)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        _step(tr)
    _sync(tr.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        _step(tr)
    _sync(tr.device)
    dt = (time.perf_counter() - t0) / steps
    tokens = tr.micro * tr.accum * tr.cfg.seq_len
    rate = tokens / dt
    peak = max(tr.peak, measure_matmul_flops(dtype=tr.dtype)) if tr.device.type == "cpu" else tr.peak
    mfu = rate * tr.flops_per_token / peak if peak else None
    # On a CPU without bf16 units the timed bf16 matmul (256 or 1024 square) is slower than the model's smaller ones.
    outran = mfu is not None and mfu > 1
    return {"first_step_s": round(first, 2), "step_ms": round(dt * 1e3, 2), "tokens_per_s": round(rate),
            "peak_flops": peak, "mfu": None if outran else mfu, "peak_outrun": outran}


def profile_steps(tr: Trainer, steps: int) -> tuple[list[dict], float]:
    """Kernels (CUDA) or operators (CPU) with their self time, summed over `steps` steps, and the wall time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = tr.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            _step(tr)
        _sync(tr.device)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    if cuda:
        # Kernels are the device-side events; operators also carry their kernels' time, so keep one kind.
        picked = [e for e in events if e.device_type == DeviceType.CUDA]
        picked = picked or [e for e in events if not e.key.startswith(("aten::", "autograd::", "Torch"))]
    else:
        picked = [e for e in events if e.key.startswith("aten::")]
    rows = []
    for e in picked:
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us > 0:
            rows.append({"name": e.key, "count": max(1, e.count // steps), "ms": us / 1e3 / steps})
    rows.sort(key=lambda r: -r["ms"])
    return rows, wall / steps * 1e3


def by_category(kernels: list[dict]) -> list[tuple[str, float, int]]:
    total: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for k in kernels:
        c = category(k["name"])
        total[c] += k["ms"]
        count[c] += k["count"]
    return sorted(((c, total[c], count[c]) for c in total), key=lambda t: -t[1])


# ----------------------------------------------------------------------------- the parts alone (CUDA)

def _cuda_ms(fn, iters: int = 10) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def attention_backends(cfg: ModelConfig, micro: int, seq: int, dt: torch.dtype) -> list[dict]:
    """Forward+backward of causal SDPA at the step's shapes under each backend; TFLOP/s counts causal work."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = "cuda"
    q = torch.randn(micro, cfg.n_heads, seq, cfg.head_dim, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(micro, cfg.n_kv_heads, seq, cfg.head_dim, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    grad = torch.randn_like(q)
    rep = cfg.n_heads // cfg.n_kv_heads
    flops = 3.5 * 4 * micro * cfg.n_heads * seq * seq * cfg.head_dim / 2  # fwd + 2.5x bwd, causal half
    out = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH):
        for gqa in (True, False):
            def run(gqa=gqa) -> None:
                kk, vv = (k, v) if gqa else (k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))
                y = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
                y.backward(grad)
            row = {"backend": backend.name, "kv": "grouped (enable_gqa)" if gqa else "repeated to all heads"}
            try:
                with sdpa_kernel(backend):
                    ms = _cuda_ms(run)
                row.update(ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1))
            except RuntimeError as e:
                row["error"] = str(e).splitlines()[0][:120]
            out.append(row)
    return out


def projections(cfg: ModelConfig, tokens: int, dt: torch.dtype) -> list[dict]:
    """Forward+backward of the block's matmuls as the model runs them vs with their weights concatenated."""
    dev = "cuda"
    d, kv, h = cfg.dim, cfg.n_kv_heads * cfg.head_dim, cfg.hidden_dim
    x = torch.randn(tokens, d, device=dev, dtype=dt, requires_grad=True)
    groups = {"q,k,v": [d, kv, kv], "gate,up": [h, h]}
    out = []
    for label, widths in groups.items():
        ws = [torch.randn(w, d, device=dev, dtype=dt, requires_grad=True) for w in widths]
        flops = 6 * tokens * d * sum(widths)

        def separate(ws=ws) -> None:
            torch.autograd.backward([F.linear(x, w) for w in ws],
                                    [torch.ones(tokens, w.shape[0], device=dev, dtype=dt) for w in ws])

        def fused(ws=ws) -> None:
            y = F.linear(x, torch.cat(ws))
            y.backward(torch.ones_like(y))

        for how, fn in (("separate", separate), ("concatenated", fused)):
            ms = _cuda_ms(fn)
            out.append({"matmuls": label, "how": how, "ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1)})
    return out


# ----------------------------------------------------------------------------- report

def report(meta: dict, timing: dict, kernels: list[dict], wall_ms: float, parts: dict) -> str:
    busy = sum(k["ms"] for k in kernels)
    unit = "GPU kernels" if meta["device"] != "CPU" else "CPU operators (self time)"
    mfu = timing["mfu"]
    if timing["peak_outrun"]:
        shown = "- (the step outran the matmul timed as this CPU's peak: no peak to measure against)"
    else:
        shown = "-" if mfu is None else f"{mfu:.1%}"
    lines = [f"{meta['preset']} step on {meta['device']}: micro-batch {meta['micro']}, seq {meta['seq_len']}, "
             f"{meta['dtype']}, {'compiled' if meta['compile'] else 'eager'} (torch {meta['torch']})", "",
             f"step {timing['step_ms']} ms, {timing['tokens_per_s']:,} tokens/s, MFU {shown}; first step "
             f"({'compilation' if meta['compile'] else 'warm-up'}) {timing['first_step_s']} s",
             f"profiled step {wall_ms:.1f} ms wall, {unit} {busy:.1f} ms ({busy / wall_ms:.0%} busy)", "",
             "| category | ms per step | share of busy | calls |", "|---|---|---|---|"]
    lines += [f"| {c} | {ms:.2f} | {ms / busy:.1%} | {n} |" for c, ms, n in by_category(kernels)]
    lines += ["", "| top kernels | ms per step | calls | category |", "|---|---|---|---|"]
    lines += [f"| `{k['name'][:90]}` | {k['ms']:.2f} | {k['count']} | {category(k['name'])} |" for k in kernels[:25]]
    if parts.get("attention"):
        lines += ["", "causal SDPA forward+backward at the step's shapes:", "",
                  "| backend | K/V | ms | TFLOP/s |", "|---|---|---|---|"]
        lines += [f"| {a['backend']} | {a['kv']} | {a.get('ms', '-')} | {a.get('tflops', a.get('error', '-'))} |"
                  for a in parts["attention"]]
    if parts.get("projections"):
        lines += ["", "projection matmuls forward+backward, one layer at the step's tokens:", "",
                  "| matmuls | how | ms | TFLOP/s |", "|---|---|---|---|"]
        lines += [f"| {p['matmuls']} | {p['how']} | {p['ms']} | {p['tflops']} |" for p in parts["projections"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny preset on CPU, eager, a few steps")
    ap.add_argument("--out", help="results directory (default: $OUT, else a temporary directory)")
    ap.add_argument("--micro-batch", type=positive_int, help="default 64 (GPU), 4 (CPU smoke)")
    ap.add_argument("--eager", action="store_true", help="profile without torch.compile")
    ap.add_argument("--compile-mode", default="default", choices=COMPILE_MODES)
    args = ap.parse_args(argv)

    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("gpu_profile: no CUDA GPU here; use --cpu-smoke for the CPU check", file=sys.stderr)
        return 2
    out = Path(args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="tinyk-gpu-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    preset, seq_len = ("tiny", 64) if smoke else ("seed-215m", 512)
    vocab = 512 if smoke else PRESETS["seed-215m"]["vocab_size"]
    micro = args.micro_batch if args.micro_batch is not None else 4 if smoke else 64
    compiled = not (args.eager or smoke)
    work = Path(tempfile.mkdtemp(prefix="tinyk-gpu-profile-work-"))
    tr: Trainer | None = None
    try:
        tok_dir, data_dir = prepare_data(work, vocab, 60_000 if smoke else 2_000_000)
        cfg = TrainConfig(kind="pretrain", data=str(data_dir), tokenizer=str(tok_dir), out=str(work / "run"),
                          model={"preset": preset}, seq_len=seq_len, batch_size=micro, micro_batch=micro,
                          max_steps=1000, warmup_steps=0, device="cpu" if smoke else "cuda",
                          dtype="bf16" if smoke else "auto",  # auto: fp16 on cards without bf16 (V100, T4)
                          compile=compiled, compile_mode=args.compile_mode, eval_every=0, save_every=0,
                          progress=False)
        tr = Trainer(cfg, force=True)
        timing = time_steps(tr, warmup=2 if smoke else 3, steps=2 if smoke else 10)
        kernels, wall_ms = profile_steps(tr, steps=1 if smoke else 3)
        parts: dict = {}
        if not smoke:
            parts = {"attention": attention_backends(tr.mcfg, micro, seq_len, tr.dtype),
                     "projections": projections(tr.mcfg, micro * seq_len, tr.dtype)}
        device_name = "CPU" if smoke else torch.cuda.get_device_name(0)
        meta = {"preset": preset, "seq_len": seq_len, "micro": micro, "dtype": short_dtype_name(tr.dtype),
                "compile": compiled,
                "compile_mode": args.compile_mode, "device": device_name, "torch": torch.__version__}
        text = report(meta, timing, kernels, wall_ms, parts)
        (out / "gpu_profile.md").write_text(text + "\n", encoding="utf-8")
        (out / "gpu_profile.json").write_text(json.dumps({**meta, "timing": timing, "wall_ms": wall_ms,
                                                          "kernels": kernels, **parts}, indent=2) + "\n",
                                              encoding="utf-8")
        print(text)
    finally:
        if tr is not None:
            tr.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    run_main(main)
