"""GPU benchmark of seed-215m pretraining: tokens/s, MFU and peak memory per configuration.

Runs `python3 -m tinyk pretrain` once per configuration (a fresh process each, so peak memory
and compile caches never leak between rows) on generated data, then prints one table:

  eager vs torch.compile, micro-batch 16/32/64, activation checkpointing off/on, all bf16 (fp16
  on cards without it, V100 and T4), at the shipped config's global batch of 512 sequences
  (micro-batch x gradient accumulation);
  a bf16-vs-fp32 check: the same 10 steps in both, losses compared step by step;
  beside each measured peak (torch.cuda.max_memory_allocated) the `tinyk plan` estimate (eager).

Throughput is taken over the logged intervals after the first (which holds compilation and
warm-up). Nothing is downloaded: a tokenizer and a pretraining data directory are generated
from synthetic Chinese text in seconds. Each row has a timeout, an OOM becomes a row, and the
whole run keeps to a time budget (rows that no longer fit are reported as skipped).

  bench/gpu.sh                # on a machine with one NVIDIA GPU, ~8 minutes
  bench/gpu.sh --cpu-smoke    # the same code path on CPU with the tiny preset, seconds

Results go to --out (default $OUT, else a temporary directory): gpu_bench.json, gpu_bench.md.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from _common import Parser, run_main  # noqa: E402
from tinyk.cli.common import positive_float  # noqa: E402
from tinyk.model import DTYPES, PRESETS, ModelConfig, sdpa_fuses_gqa  # noqa: E402
from tinyk.plan import Setup, estimate_memory, gpu_class  # noqa: E402
from tinyk.units import MiB  # noqa: E402

# The shipped seed-215m config's global batch: 512 sequences per optimizer step (micro-batch 64 x 8
# accumulation on one GPU), so the optimizer step weighs on tokens/s as much as it does in a real run.
SEED_BATCH = 512


@dataclass(frozen=True)
class Row:
    name: str
    micro: int
    batch: int | None = None  # global batch in sequences; None: one micro-batch per step
    compile: bool = False
    compile_mode: str = "default"
    checkpointing: bool = False
    dtype: str = "bf16"  # the mixed-precision rows' dtype; `with_half` makes it fp16 where a card lacks bf16
    steps: int = 12
    log_every: int = 4
    agree: bool = False  # one side of the bf16-vs-fp32 comparison (logs every step)
    priority: int = 0  # lower runs first; the table keeps the listed order
    timeout_s: float = 90.0


def gpu_rows() -> list[Row]:
    """The benchmark matrix in table order; `priority` runs the most telling rows first in case time runs out."""
    order = ["compiled mb64", "eager mb64", "agree bf16 mb16", "agree fp32 mb16", "compiled mb64 ckpt",
             "eager mb64 ckpt", "eager mb32", "eager mb16", "compiled mb32", "compiled mb16"]
    rows = []
    for compiled in (False, True):
        kind = "compiled" if compiled else "eager"
        # Throughput is measured from the first logged step on: compiled rows spend that interval compiling.
        common = dict(batch=SEED_BATCH, compile=compiled, steps=9 if compiled else 6,
                      log_every=3 if compiled else 2, timeout_s=180.0 if compiled else 90.0)
        for micro in (16, 32, 64):
            rows.append(Row(f"{kind} mb{micro}", micro, **common))
        rows.append(Row(f"{kind} mb64 ckpt", 64, checkpointing=True, **common))
    rows.append(Row("agree bf16 mb16", 16, steps=10, log_every=1, agree=True))
    rows.append(Row("agree fp32 mb16", 16, dtype="fp32", steps=10, log_every=1, agree=True))
    return [replace(r, priority=order.index(r.name)) for r in rows]


def extra_rows() -> list[Row]:
    """Steps toward the MFU goal, run only when named in --only: a micro-batch of 128 (fewer, larger
    kernels), and inductor's autotuned kernels (Triton matmuls with the elementwise work fused in;
    compiling takes minutes)."""
    common = dict(batch=SEED_BATCH, compile=True, steps=9, log_every=3, timeout_s=360.0)
    return [Row("compiled mb128", 128, **common),
            Row("compiled mb64 autotune", 64, compile_mode="max-autotune-no-cudagraphs", **common)]


def with_half(row: Row, half: str) -> Row:
    """The row with fp16 autocast instead of bf16 (cards before Ampere compute in fp16)."""
    if row.dtype != "bf16" or half == "bf16":
        return row
    return replace(row, dtype=half, name=row.name.replace("bf16", half))


def smoke_rows() -> list[Row]:
    """The same code path shrunk for CPU: three processes of two steps (bf16, fp32, checkpointing).

    torch.compile on CPU costs tens of seconds per process, so the smoke run leaves it out.
    """
    return [Row("eager mb2", 2, steps=2, log_every=1, agree=True, timeout_s=120),
            Row("eager mb2 ckpt", 2, checkpointing=True, steps=2, log_every=1, timeout_s=120),
            Row("agree fp32 mb2", 2, dtype="fp32", steps=2, log_every=1, agree=True, timeout_s=120)]


# ----------------------------------------------------------------------------- synthetic data

def write_corpus(path: Path, n_chars: int, seed: int = 0) -> Path:
    """Chinese-looking text from a Zipf-distributed lexicon of 1-4 character words.

    Word frequencies and fixed spellings give the model something to learn in a few steps,
    so the bf16/fp32 loss curves move; thousands of distinct characters give BPE enough pairs
    to fill a 6144-token vocabulary.
    """
    rng = random.Random(seed)
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 3500)]
    lexicon = ["".join(rng.choice(chars) for _ in range(rng.choice((1, 2, 2, 3, 4)))) for _ in range(6000)]
    weights = [1 / (i + 1) for i in range(len(lexicon))]
    punct = "，。，、；！？"
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < n_chars:
            words = rng.choices(lexicon, weights, k=rng.randint(40, 160))
            text = "".join(w + (rng.choice(punct) if rng.random() < 0.15 else "") for w in words) + "。"
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            written += len(text)
    return path


def prepare_data(work: Path, vocab_size: int, n_chars: int) -> tuple[Path, Path]:
    """Tokenizer and pretraining data directory, made with tinyk's own writers."""
    from tinyk.data import prepare_pretrain
    from tinyk.tokenizer import load_tokenizer, train_tokenizer

    corpus = write_corpus(work / "corpus.jsonl", n_chars)
    tok_dir, data_dir = work / "tokenizer", work / "data"
    # A few MB are plenty for BPE to fill the vocabulary; the data uses the whole corpus.
    train_tokenizer([corpus], tok_dir, vocab_size=vocab_size, max_bytes=3_000_000, show_progress=False)
    got = load_tokenizer(tok_dir).vocab_size
    if got != vocab_size:
        raise RuntimeError(f"the synthetic corpus gave a {got}-token vocabulary, not {vocab_size}")
    prepare_pretrain([corpus], tok_dir, data_dir, val_fraction=0.02, show_progress=False)
    return tok_dir, data_dir


# ----------------------------------------------------------------------------- one row

def _train_config(path: Path, preset: str, seq_len: int) -> Path:
    """The run's settings, written as JSON (which is also YAML)."""
    cfg = {"model": {"preset": preset}, "seq_len": seq_len, "eval_every": 0, "eval_batches": 1,
           "save_every": 0, "keep_checkpoints": 1, "warmup_steps": 0, "lr": 3e-4, "seed": 0}
    path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src")] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_row(row: Row, *, work: Path, cfg_file: Path, tok_dir: Path, data_dir: Path, device: str,
            timeout_s: float, logs: Path) -> dict:
    out = work / "runs" / row.name.replace(" ", "_")
    cmd = [sys.executable, "-m", "tinyk", "pretrain", "--config", str(cfg_file), "--data", str(data_dir),
           "--tokenizer", str(tok_dir), "--out", str(out), "--force", "--no-progress", "--device", device,
           "--max-steps", str(row.steps), "--batch-size", str(row.batch or row.micro), "--micro-batch", str(row.micro),
           "--dtype", row.dtype, "--log-every", str(row.log_every)]
    if row.compile:
        cmd += ["--compile", "--set", f"compile_mode={row.compile_mode}"]
    if row.checkpointing:
        cmd.append("--activation-checkpointing")
    t0 = time.perf_counter()
    result = _describe(row)
    # A session of its own, so a timeout also kills torch.compile's worker processes.
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        code = None
    except BaseException:  # interrupted (Ctrl-C, or SIGTERM from a time limit): the GPU is freed too
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(out, ignore_errors=True)
        raise
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    # On a CPU the trainer times its peak again when a window outruns it, and caps MFU at 100% of it from then on.
    result["mfu_retimed"] = "peak for MFU timed again" in output
    (logs / f"{out.name}.log").write_text(" ".join(cmd) + "\n\n" + output[-20000:], encoding="utf-8")
    records = _records(out / "metrics.jsonl")
    shutil.rmtree(out, ignore_errors=True)  # a 215M run leaves ~3.5 GB of checkpoints
    if code is None:
        result["status"] = f"timeout after {timeout_s:.0f}s"
    elif code != 0:
        oom = "out of GPU memory" in output or "OutOfMemoryError" in output or "CUDA out of memory" in output
        result["status"] = "OOM" if oom else f"failed (exit {code}): {_last_line(output)}"
    else:
        result["status"] = "ok"
    result.update(_throughput(records))
    return result


def compile_missing() -> str | None:
    """What torch.compile's Triton kernels need and this machine lacks: a C compiler and Python's
    headers to build their launcher, and Triton itself. Without them each compiled row would spend
    its start-up and then fail."""
    import importlib.util
    import sysconfig

    if importlib.util.find_spec("triton") is None:
        return "no triton for torch.compile's kernels"
    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):  # where Triton looks
        return "no C compiler for torch.compile's Triton kernels"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        return "no Python.h for torch.compile's Triton kernels"
    return None


def work_dir() -> Path:
    """Where the rows run: /dev/shm where it has room (each row saves a 3.3 GB checkpoint and model at
    its end, 7-10 s each on a VM's disk, which the time budget would pay for), else the temporary folder."""
    shm = Path("/dev/shm")
    room = shutil.disk_usage(shm).free if shm.is_dir() and os.access(shm, os.W_OK) else 0
    return Path(tempfile.mkdtemp(prefix="tinyk-gpu-bench-work-", dir=shm if room > 16 * 2**30 else None))


def _describe(row: Row) -> dict:
    return {"name": row.name, "micro_batch": row.micro, "batch": row.batch or row.micro, "compile": row.compile,
            "compile_mode": row.compile_mode, "checkpointing": row.checkpointing, "dtype": row.dtype,
            "steps": row.steps, "agree": row.agree}


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in rec and "step" in rec:
            out.append(rec)
    return out


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "no output"


def _throughput(records: list[dict]) -> dict:
    """Steady-state rate over the logged intervals after the first, which holds compilation and warm-up."""
    res: dict = {"losses": [r["loss"] for r in records]}
    if not records:
        return res
    skips = [r["step"] for r in records if r.get("skipped_steps")]
    if skips:  # fp16 only; the agreement rows log every step, so this is the step itself
        res["skipped_steps"], res["first_skip"] = sum(r["skipped_steps"] for r in records), skips[0]
    first, last = records[0], records[-1]
    # One window only (a row cut short) is start-up and compilation, no steady rate: none is shown.
    if len(records) > 1 and last["elapsed_s"] > first["elapsed_s"]:
        rate = (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"])
        res["tokens_per_s"] = rate
        # The trainer's MFU is tokens/s x FLOPs per token / peak; rescale its last figure to the steady rate.
        if last.get("mfu") and last.get("tokens_per_s"):
            res["mfu"] = last["mfu"] * rate / last["tokens_per_s"]
    mems = [r["peak_mem_mib"] for r in records if r.get("peak_mem_mib") is not None]
    res["peak_mem_mib"] = max(mems) if mems else None
    res["flops_per_token"] = last.get("flops_per_token")
    return res


# ----------------------------------------------------------------------------- report

def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _mfu(r: dict) -> float | None:
    """The row's MFU as shown: none where the trainer re-timed its CPU peak, as it then caps MFU at 100%."""
    return None if r.get("mfu_retimed") else r.get("mfu")


def _compiled(r: dict) -> str:
    return ("yes" if r.get("compile_mode", "default") == "default" else r["compile_mode"]) if r["compile"] else "no"


def table(results: list[dict], title: str) -> str:
    lines = [title, "",
             "| config | batch | micro-batch | compile | ckpt | dtype | tokens/s | MFU | peak MiB | "
             "plan MiB (eager) | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['batch']} | {r['micro_batch']} | {_compiled(r)} | "
                     f"{'on' if r['checkpointing'] else 'off'} | {r['dtype']} | "
                     f"{_fmt(r.get('tokens_per_s'), ',.0f')} | "
                     f"{_fmt(_mfu(r), '.1%')} | {_fmt(r.get('peak_mem_mib'), ',.0f')} | "
                     f"{_fmt(r.get('plan_mib'), ',.0f')} | {r['status']} |")
    return "\n".join(lines)


def agreement(results: list[dict]) -> dict | None:
    """Largest relative difference between the bf16 (or fp16) and fp32 loss at the same step.

    A step fp16's loss scaler skipped leaves the losses after it one update behind fp32's, so the
    comparison ends at the first skipped step (whose own loss was computed before the skip).
    """
    agree = [r for r in results if r.get("agree")]
    a = next((r for r in agree if r["dtype"] != "fp32"), None)
    b = next((r for r in agree if r["dtype"] == "fp32"), None)
    if not a or not b or not a.get("losses") or not b.get("losses"):
        return None
    n = min(len(a["losses"]), len(b["losses"]), (a.get("first_skip") or math.inf))
    diffs = [abs(x - y) / abs(y) for x, y in zip(a["losses"][:n], b["losses"][:n], strict=True)]
    return {"dtype": a["dtype"], "steps": n, "max_rel_diff": max(diffs), "half": a["losses"][:n],
            "fp32": b["losses"][:n], "skipped_steps": a.get("skipped_steps"), "ok": max(diffs) < 0.02}


def mfu_lines(results: list[dict], gpu_key: str | None, device_name: str) -> list[str]:
    """The lines to paste into tinyk/plan.py's GPUS table for this GPU class: the best compiled and the
    best eager bf16 row (`mfu` and `eager_mfu`: the plan follows the run's compile setting)."""
    ok = [r for r in results if r["status"] == "ok" and r.get("mfu") is not None and not r["checkpointing"]
          and r["dtype"] != "fp32" and not r.get("agree")]
    if gpu_key is None:
        return []
    lines = []
    for key, compiled in (("mfu", True), ("eager_mfu", False)):
        if rows := [r for r in ok if bool(r["compile"]) == compiled]:
            best = max(rows, key=lambda r: r["mfu"])
            lines.append(f'measured {key} for plan.GPUS["{gpu_key}"]: {best["mfu"]:.3f}, "measured: bench/gpu.sh on '
                         f'{device_name}, {best["name"]}, {time.strftime("%Y-%m-%d")}"')
    return lines


def report(rows: list[Row], results: dict[str, dict], *, out: Path, title: str, device_name: str,
           gpu_key: str | None, started: float, meta: dict) -> tuple[str, list[dict]]:
    """Writes gpu_bench.json and gpu_bench.md (after every row, so a killed run still leaves results)."""
    ordered = [results.get(r.name) or {**_describe(r), "status": "not run yet"} for r in rows]
    agree = agreement(ordered)
    total = round(time.perf_counter() - started, 1)
    notes = [f"total {total:.0f}s"]
    if agree:
        notes.append(f"{agree['dtype']} vs fp32 over {agree['steps']} steps: largest relative loss difference "
                     f"{agree['max_rel_diff']:.2e} ({'ok' if agree['ok'] else 'TOO LARGE'}, limit 2e-2)"
                     + (f"; fp16's loss scaler skipped {agree['skipped_steps']} step(s), so the comparison stops "
                        f"at the first" if agree["skipped_steps"] else ""))
    if any(r.get("mfu_retimed") for r in ordered):
        notes.append("MFU -: a window outran the matmul the trainer timed as this CPU's peak, so it timed it again and "
                     "caps MFU at 100% from then on, which is no measurement")
    notes += mfu_lines(ordered, gpu_key, device_name)
    text = "\n".join(notes) + "\n\n" + table(ordered, title)  # the table last, as the issue asks
    data = {**meta, "device": device_name, "rows": ordered, "half_vs_fp32": agree, "total_s": total}
    (out / "gpu_bench.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    (out / "gpu_bench.md").write_text(text + "\n", encoding="utf-8")
    return text, ordered


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny preset on CPU, two steps per row")
    ap.add_argument("--out", help="results directory (default: $OUT, else a temporary directory)")
    ap.add_argument("--budget-s", type=positive_float, default=480.0,
                    help="total time budget, data generation included")
    ap.add_argument("--only", nargs="*", help="run only the rows with these names")
    ap.add_argument("--half", choices=["auto", "bf16", "fp16"], default="auto",
                    help="the mixed-precision rows' dtype (auto: bf16, or fp16 on cards without it, V100 and T4)")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("gpu_bench: no CUDA GPU here; use --cpu-smoke for the CPU check", file=sys.stderr)
        return 2
    for package in ("yaml", "tokenizers", "safetensors", "numpy", "tqdm"):  # what every row's trainer imports
        try:
            __import__(package)
        except ImportError as e:
            print(f"gpu_bench: the trainer needs the {package!r} package here ({e})", file=sys.stderr)
            return 2
    preset, seq_len = ("tiny", 64) if smoke else ("seed-215m", 512)
    vocab = 512 if smoke else PRESETS["seed-215m"]["vocab_size"]
    model_cfg = ModelConfig(**{**PRESETS[preset], "vocab_size": vocab})
    has_flash = smoke or torch.cuda.get_device_capability(0)[0] >= 8
    half = args.half if args.half != "auto" else "bf16" if has_flash else "fp16"
    rows = [with_half(r, half) for r in (smoke_rows() if smoke else gpu_rows())]
    if args.only:
        known = rows + ([] if smoke else [with_half(r, half) for r in extra_rows()])
        unknown = sorted(set(args.only) - {r.name for r in known})
        if unknown:
            print(f"gpu_bench: no row named {', '.join(map(repr, unknown))}; rows: "
                  f"{', '.join(r.name for r in known)}", file=sys.stderr)
            return 2
        rows = [r for r in known if r.name in args.only]
    out = Path(args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="tinyk-gpu-bench-"))
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    device = "cpu" if smoke else "cuda"
    device_name = "CPU" if smoke else torch.cuda.get_device_name(0)
    # On a CPU the trainer's peak is a matmul it times in the row's own dtype, not one dense bf16 figure.
    against = "a matmul timed in the row's dtype" if smoke else f"the device's dense {half} peak"
    title = (f"{preset} pretraining on {device_name}, seq {seq_len}, vocab {vocab} (MFU against {against}; "
             f"plan = tinyk plan's eager estimate)")
    meta = {"smoke": smoke, "preset": preset, "seq_len": seq_len, "torch": torch.__version__}
    gpu_key = None if smoke else gpu_class(device_name)
    results: dict[str, dict] = {}
    work = work_dir() if not smoke else Path(tempfile.mkdtemp(prefix="tinyk-gpu-bench-work-"))
    stopped, running = None, None
    # A time limit's SIGTERM (run_main) ends the run as Ctrl-C does: the row's process is killed, the table printed.
    try:
        tok_dir, data_dir = prepare_data(work, vocab, 60_000 if smoke else 2_000_000)
        print(f"gpu_bench: data ready in {time.perf_counter() - started:.0f}s on {device_name}", flush=True)
        cfg_file = _train_config(work / "bench.yaml", preset, seq_len)
        failures = 0
        no_compile = None if smoke else compile_missing()
        for row in sorted(rows, key=lambda r: r.priority):
            left = args.budget_s - (time.perf_counter() - started)
            # A row started with less than half its timeout left would most likely end as a timeout.
            why = ("time budget" if left < max(20.0, row.timeout_s / 2) else "earlier rows failed" if failures >= 2
                   else no_compile if row.compile else None)
            if why:
                results[row.name] = {**_describe(row), "status": f"skipped ({why})"}
                continue
            running = row
            r = run_row(row, work=work, cfg_file=cfg_file, tok_dir=tok_dir, data_dir=data_dir, device=device,
                        timeout_s=min(row.timeout_s, left), logs=logs)
            est = estimate_memory(Setup(model_cfg, seq_len, row.micro, amp=row.dtype != "fp32",
                                        checkpointing=row.checkpointing, fused_adamw=not smoke,
                                        grad_accum=(row.batch or row.micro) // row.micro,
                                        repeat_kv=not sdpa_fuses_gqa(device, DTYPES[row.dtype], has_flash)))
            r["plan_mib"] = est.peak / MiB
            # Two failures in a row that are not OOMs mean a broken set-up: stop spending device time.
            failures = failures + 1 if r["status"].startswith("failed") else 0
            if row.compile and r["status"].startswith("timeout") and not r["losses"]:
                no_compile = "a compiled row timed out before its first log line"  # the others would too
            results[row.name] = r
            print(f"gpu_bench: {row.name}: {r['status']}, {r['wall_s']}s, tokens/s "
                  f"{_fmt(r.get('tokens_per_s'), ',.0f')}, MFU {_fmt(_mfu(r), '.3f')}, "
                  f"peak MiB {_fmt(r.get('peak_mem_mib'), ',.0f')}", flush=True)
            report(rows, results, out=out, title=title, device_name=device_name, gpu_key=gpu_key, started=started,
                   meta=meta)
    except KeyboardInterrupt:
        stopped = "interrupted"
        if running is not None and running.name not in results:
            results[running.name] = {**_describe(running), "status": "interrupted"}
    except Exception as e:  # a broken set-up (data generation, the memory model): said, and the table still printed
        stopped = f"stopped by {type(e).__name__}: {e}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text, ordered = report(rows, results, out=out, title=title, device_name=device_name, gpu_key=gpu_key,
                           started=started, meta=meta)
    print()
    if stopped:
        print(f"gpu_bench: {stopped}; the rows not run are marked so")  # the table follows, last
    print(text)
    measured = any(r["status"] == "ok" for r in ordered)
    if stopped:
        return 130 if stopped == "interrupted" else 1
    return 0 if measured and all(r["status"] in ("ok", "skipped (time budget)") for r in ordered) else 1


if __name__ == "__main__":
    run_main(main)
